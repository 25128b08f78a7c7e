//go:build linux

package udprelay

import (
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/chacha20poly1305"
)

// The second transport: the same messages as authenticated UDP packets
// straight over each uplink's path to the concentrator's port (the one the
// liveness probes use), so that a datagram never waits behind another
// one's lost segment. The datagram stream still opens the session: the
// concentrator sends, inside it (encrypted and authenticated by the
// tunnel's Noise handshake), a session index and two fresh keys, one per
// direction. A packet is then
//
//	0  4  session index, BE (the concentrator's)
//	4  8  counter, BE: the AEAD nonce, never reused under a key
//	12 .. ChaCha20-Poly1305 of (flags ‖ message), bytes 0..11 as
//	      additional data; message is a stream message without its
//	      length; flags bit 0: send the answers over two paths too
//
// and the receiver drops a counter it has seen, or one too far behind the
// highest (a sliding window of 2048, as WireGuard's), so a replayed or
// duplicated packet is dropped: a datagram sent on two paths arrives once.
const (
	kindSession   = 4 // server → client, on the stream: index and keys
	kindKeepalive = 5 // client → server, on a path: "this path is mine now"

	pktHeaderSize = 12
	flagDuplicate = 1
	sessionKeys   = 2 * chacha20poly1305.KeySize

	// minPacket is the smallest packet: the header, the flags, a message
	// header and the tag. It is larger than a probe (40 bytes), so the two
	// never share a size on the port they share.
	minPacket = pktHeaderSize + 1 + headerSize - 2 + chacha20poly1305.Overhead
)

// Path is one uplink the client can send over: its address, with the
// probe's round-trip time.
type Path struct {
	Name string
	Addr netip.Addr
	RTT  time.Duration
}

// window is a sliding replay window of windowSize counters.
type window struct {
	mu     sync.Mutex
	top    uint64 // the highest counter seen + 1 (0: none yet)
	bitmap [windowWords]uint64
}

const (
	windowWords = 32
	windowSize  = windowWords * 64
)

// accept reports whether counter is new, and marks it seen. Only call it
// for packets that authenticated.
func (w *window) accept(counter uint64) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if counter+1 > w.top {
		// Advance: clear the words between the old top and the new one.
		shift := counter + 1 - w.top
		if shift >= windowSize {
			w.bitmap = [windowWords]uint64{}
		} else {
			for i := w.top; i < counter+1; i++ {
				w.bitmap[(i/64)%windowWords] &^= 1 << (i % 64)
			}
		}
		w.top = counter + 1
	} else if w.top-counter > windowSize {
		return false // too old
	}
	word, bit := &w.bitmap[(counter/64)%windowWords], uint64(1)<<(counter%64)
	if *word&bit != 0 {
		return false
	}
	*word |= bit
	return true
}

// session is one direction pair of keys, with its counters.
type session struct {
	index   uint32
	send    cipher.AEAD
	recv    cipher.AEAD
	counter atomic.Uint64 // the next counter to send with
	replay  window
}

func newSession(index uint32, sendKey, recvKey []byte) (*session, error) {
	s, err := chacha20poly1305.New(sendKey)
	if err != nil {
		return nil, err
	}
	r, err := chacha20poly1305.New(recvKey)
	if err != nil {
		return nil, err
	}
	return &session{index: index, send: s, recv: r}, nil
}

func nonce(counter uint64) []byte {
	var n [chacha20poly1305.NonceSize]byte
	binary.BigEndian.PutUint64(n[4:], counter)
	return n[:]
}

// seal makes a packet of msg (a stream message, length included, which
// is left out).
func (s *session) seal(msg []byte, flags byte) ([]byte, error) {
	c := s.counter.Add(1) - 1
	if c == 1<<64-1 {
		return nil, errors.New("udprelay: session counter exhausted")
	}
	body := msg[2:]
	b := make([]byte, pktHeaderSize, pktHeaderSize+1+len(body)+chacha20poly1305.Overhead)
	binary.BigEndian.PutUint32(b[0:4], s.index)
	binary.BigEndian.PutUint64(b[4:12], c)
	plain := make([]byte, 0, 1+len(body))
	plain = append(append(plain, flags), body...)
	return s.send.Seal(b, nonce(c), plain, b[:pktHeaderSize]), nil
}

// open authenticates pkt, checks its counter against the window, and
// returns its flags and message.
func (s *session) open(pkt []byte) (byte, msg, error) {
	if len(pkt) < minPacket {
		return 0, msg{}, errMalformed
	}
	c := binary.BigEndian.Uint64(pkt[4:12])
	plain, err := s.recv.Open(nil, nonce(c), pkt[pktHeaderSize:], pkt[:pktHeaderSize])
	if err != nil {
		return 0, msg{}, errMalformed
	}
	if !s.replay.accept(c) {
		return 0, msg{}, errReplayed
	}
	m, err := parseBody(plain[1:])
	return plain[0], m, err
}

var errReplayed = errors.New("udprelay: replayed or duplicate packet")

// packetIndex is the session index of a packet, false when it cannot be
// one.
func packetIndex(pkt []byte) (uint32, bool) {
	if len(pkt) < minPacket {
		return 0, false
	}
	return binary.BigEndian.Uint32(pkt), true
}

// newSessionKeys makes a session's index and keys: random, from the
// kernel's generator.
func newSessionKeys() (uint32, [sessionKeys]byte, error) {
	var k [sessionKeys]byte
	var ib [4]byte
	if _, err := rand.Read(k[:]); err != nil {
		return 0, k, fmt.Errorf("udprelay: session keys: %w", err)
	}
	if _, err := rand.Read(ib[:]); err != nil {
		return 0, k, fmt.Errorf("udprelay: session index: %w", err)
	}
	return binary.BigEndian.Uint32(ib[:]), k, nil
}
