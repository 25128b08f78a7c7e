//go:build linux

package probe

import (
	"crypto/subtle"
	"encoding/binary"
	"fmt"
	"hash"
	"time"

	"golang.org/x/crypto/blake2s"
	"golang.org/x/crypto/curve25519"

	"github.com/mpvpn/mpvpn/tunnel"
)

const (
	label = "mpvpn probe v2"

	// The labels of the four keys derived from K. None starts with "id",
	// so no label is ever the message of an id derivation ("id" ‖ 8-byte
	// epoch) under the same key K.
	labelReqMAC = "request mac"
	labelReqEnc = "request encryption"
	labelRepMAC = "reply mac"
	labelRepEnc = "reply encryption"

	idSize       = 8
	tagSize      = 16
	reqPlainSize = 8 + 8     // timestamp ‖ counter
	repPlainSize = 8 + 8 + 8 // counter ‖ server clock ‖ horizon

	// RequestSize and ReplySize are the only datagram sizes in the
	// protocol. A reply is never larger than the request it answers.
	RequestSize = idSize + reqPlainSize + tagSize
	ReplySize   = repPlainSize + tagSize

	// MaxSkew is how far a request's timestamp may be from the server's
	// clock. It bounds how long a captured request stays replayable
	// once a server restart has emptied the replay windows (a replayed
	// request gets one reply of its own size, rate-bounded: no
	// amplification). It is twice the ±30 s of clock error a client must
	// survive (issue 8), because the replies are how such a client
	// learns the concentrator's clock and stamps its handshakes in it.
	MaxSkew = 60 * time.Second

	// epochShift turns a Unix-nanosecond timestamp into the epoch the
	// id is derived from: 2^38 ns ≈ 275 s. It must be far longer than
	// MaxSkew so that a timestamp the server accepts is always in the
	// server's own epoch or a neighbour.
	epochShift = 38
)

// A reply must never be larger than a request, or the responder would be
// an amplifier for anyone who can spoof a client's address.
var _ [RequestSize - ReplySize]struct{}

// keys is what both ends derive from one client/server key pair. Each
// direction has its own MAC and encryption keys, so a request can never
// pass for a reply or the other way round, even though both are 40 bytes
// and carry no type byte.
type keys struct {
	k              [32]byte // the root key K, from which ids and the keys below are derived
	reqMAC, reqEnc [32]byte // client → server
	repMAC, repEnc [32]byte // server → client
}

// deriveKeys computes K and the four direction keys from own private key
// and the other side's public key. clientPub and serverPub are bound into
// K so that the key is tied to this pair and this protocol, not only to
// the DH output.
func deriveKeys(priv tunnel.PrivateKey, other, clientPub, serverPub tunnel.PublicKey) (keys, error) {
	ss, err := curve25519.X25519(priv[:], other[:])
	if err != nil {
		// x/crypto refuses an all-zero result: other is a low-order point.
		return keys{}, fmt.Errorf("public key %s is not usable: %w", other, err)
	}
	var ks keys
	h, _ := blake2s.New256(ss) // 32-byte key: never fails
	h.Write([]byte(label))
	h.Write(clientPub[:])
	h.Write(serverPub[:])
	h.Sum(ks.k[:0])
	for _, d := range [...]struct {
		label string
		out   *[32]byte
	}{
		{labelReqMAC, &ks.reqMAC},
		{labelReqEnc, &ks.reqEnc},
		{labelRepMAC, &ks.repMAC},
		{labelRepEnc, &ks.repEnc},
	} {
		h, _ = blake2s.New256(ks.k[:])
		h.Write([]byte(d.label))
		h.Sum(d.out[:0])
	}
	return ks, nil
}

func epochOf(ts int64) uint64 { return uint64(ts) >> epochShift }

// clientID is the id the client sends during epoch.
func clientID(k *[32]byte, epoch uint64) uint64 {
	h, _ := blake2s.New256(k[:])
	var b [2 + 8]byte
	copy(b[:], "id")
	binary.BigEndian.PutUint64(b[2:], epoch)
	h.Write(b[:])
	var sum [32]byte
	h.Sum(sum[:0])
	return binary.BigEndian.Uint64(sum[:8])
}

// siv is one direction's deterministic authenticated encryption, in the
// manner of SIV (RFC 5297) with keyed BLAKE2s for both halves: the tag T
// is a MAC of the cleartext prefix and the plaintext, and the plaintext is
// encrypted with a key stream derived from T. Deterministic encryption
// needs no nonce, which a 40-byte datagram has no room for; it is only
// safe because no plaintext is ever sealed twice (every request carries a
// new counter, every reply answers one), so T, and with it the whole
// ciphertext, is new and unpredictable each time.
//
// Its hashes and buffers are reused so that sealing and opening allocate
// nothing; it is not safe for concurrent use.
type siv struct {
	mac   hash.Hash // BLAKE2s-128, keyed with the direction's MAC key
	prf   hash.Hash // BLAKE2s-256, keyed with the direction's encryption key
	tag   [tagSize]byte
	pad   [blake2s.Size]byte
	plain [max(reqPlainSize, repPlainSize)]byte
}

func newSIV(macKey, encKey *[32]byte) *siv {
	mac, err := blake2s.New128(macKey[:])
	if err != nil {
		panic("probe: blake2s.New128: " + err.Error()) // 32-byte key: impossible
	}
	prf, _ := blake2s.New256(encKey[:]) // 32-byte key: never fails
	return &siv{mac: mac, prf: prf}
}

func newRequestSIV(k *keys) *siv { return newSIV(&k.reqMAC, &k.reqEnc) }
func newReplySIV(k *keys) *siv   { return newSIV(&k.repMAC, &k.repEnc) }

// keyStream fills s.pad from the tag t.
func (s *siv) keyStream(t []byte) {
	s.prf.Reset()
	s.prf.Write(t)
	s.prf.Sum(s.pad[:0])
}

// seal turns b, laid out as clear ‖ plaintext ‖ tagSize bytes of room,
// into clear ‖ ciphertext ‖ tag, in place. The first clearLen bytes are
// authenticated but not encrypted.
func (s *siv) seal(b []byte, clearLen int) {
	body := b[clearLen : len(b)-tagSize]
	s.mac.Reset()
	s.mac.Write(b[:len(b)-tagSize])
	s.mac.Sum(s.tag[:0])
	copy(b[len(b)-tagSize:], s.tag[:])
	s.keyStream(s.tag[:])
	subtle.XORBytes(body, body, s.pad[:len(body)])
}

// open decrypts clear ‖ ciphertext ‖ tag, and returns the plaintext if the
// tag authenticates it. b is not modified; the plaintext is in s's buffer,
// valid until s is used again.
func (s *siv) open(b []byte, clearLen int) ([]byte, bool) {
	n := len(b) - clearLen - tagSize
	t := b[len(b)-tagSize:]
	s.keyStream(t)
	p := s.plain[:n]
	subtle.XORBytes(p, b[clearLen:clearLen+n], s.pad[:n])
	s.mac.Reset()
	s.mac.Write(b[:clearLen])
	s.mac.Write(p)
	s.mac.Sum(s.tag[:0])
	if subtle.ConstantTimeCompare(s.tag[:], t) != 1 {
		return nil, false // and never act on an unauthenticated plaintext
	}
	return p, true
}

// request is a decoded request.
type request struct {
	id      uint64
	ts      int64
	counter uint64
}

// putRequest seals a request with the request keys s into buf (which must
// hold RequestSize bytes) and returns the datagram.
func putRequest(buf []byte, s *siv, req request) []byte {
	b := buf[:RequestSize]
	binary.BigEndian.PutUint64(b[0:], req.id)
	binary.BigEndian.PutUint64(b[idSize:], uint64(req.ts))
	binary.BigEndian.PutUint64(b[idSize+8:], req.counter)
	s.seal(b, idSize)
	return b
}

// requestID returns the id of a datagram of the request's size: the one
// field that can be read without a key, and all the responder needs to
// find the peer whose keys open the rest.
func requestID(b []byte) (uint64, bool) {
	if len(b) != RequestSize {
		return 0, false
	}
	return binary.BigEndian.Uint64(b), true
}

// openRequest authenticates and decrypts a request (of RequestSize bytes:
// see requestID) with the request keys s. It checks nothing but the tag.
func openRequest(b []byte, s *siv) (request, bool) {
	p, ok := s.open(b, idSize)
	if !ok {
		return request{}, false
	}
	return request{
		id:      binary.BigEndian.Uint64(b),
		ts:      int64(binary.BigEndian.Uint64(p)),
		counter: binary.BigEndian.Uint64(p[8:]),
	}, true
}

// reply is a decoded, authenticated reply.
type reply struct {
	counter uint64 // the request's, echoed
	server  int64  // the server's clock when it answered (Unix ns)
	horizon int64  // the server's replay horizon (Unix ns), 0 if none
}

// putReply seals rep with the reply keys s into buf (at least ReplySize
// bytes).
func putReply(buf []byte, s *siv, rep reply) []byte {
	b := buf[:ReplySize]
	binary.BigEndian.PutUint64(b[0:], rep.counter)
	binary.BigEndian.PutUint64(b[8:], uint64(rep.server))
	binary.BigEndian.PutUint64(b[16:], uint64(rep.horizon))
	s.seal(b, 0)
	return b
}

// parseReply authenticates and decodes a reply with the reply keys s.
func parseReply(b []byte, s *siv) (reply, bool) {
	if len(b) != ReplySize {
		return reply{}, false
	}
	p, ok := s.open(b, 0)
	if !ok {
		return reply{}, false
	}
	return reply{
		counter: binary.BigEndian.Uint64(p),
		server:  int64(binary.BigEndian.Uint64(p[8:])),
		horizon: int64(binary.BigEndian.Uint64(p[16:])),
	}, true
}
