//go:build linux

package tunnel

import (
	"crypto/hmac"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"time"

	"github.com/flynn/noise"
	"golang.org/x/crypto/blake2s"
)

// Wire sizes; doc.go draws the layouts.
const (
	tagSize = 16 // Poly1305

	// msg1: Noise IK "e, es, s, ss" + payload, then mac1. The payload:
	// timestamp, target (requestSize), the ciphers the client offers.
	msg1PayloadSize = timestampSize + requestSize + offerSize                     // 36
	msg1NoiseSize   = KeySize + (KeySize + tagSize) + (msg1PayloadSize + tagSize) // 132
	mac1Size        = 16
	msg1Size        = msg1NoiseSize + mac1Size // 148

	// The first message of clients before the cipher offer (2026-12):
	// no offer, 144 bytes. The concentrator still takes it, as an offer
	// of ChaCha20-Poly1305 alone, so that it can be upgraded before its
	// clients (serveConn).
	msg1V0PayloadSize = timestampSize + requestSize                                   // 32
	msg1V0NoiseSize   = KeySize + (KeySize + tagSize) + (msg1V0PayloadSize + tagSize) // 128
	msg1V0Size        = msg1V0NoiseSize + mac1Size                                    // 144

	// msg2: Noise IK "e, ee, se" + payload (verdict, chosen cipher,
	// zeros).
	msg2PayloadSize = 16
	msg2Size        = KeySize + msg2PayloadSize + tagSize // 64

	// Transport frames: 2-byte big-endian length, then that many bytes of
	// ciphertext (plaintext + tag). A frame is at most 32 KiB on the wire
	// (Noise would allow 64 KiB): that is about what a sender writes
	// anyway (see writeFramePayload), and it halves what a frame that
	// stops half-way can pin on the receiver (issue 8: SECURITY.md's
	// bound of 64 KiB per malicious connection). Exactly 32 KiB, so that
	// a frame's buffer fills one of Go's allocation size classes instead
	// of spilling into the next (40 KiB).
	frameHeaderSize = 2
	maxFrameSize    = 32 << 10                       // 32768
	maxCiphertext   = maxFrameSize - frameHeaderSize // 32766
	maxPlaintext    = maxCiphertext - tagSize        // 32750

	timestampSize = 12
	// offerSize: msg1's last bytes. The first is a bit set of the
	// transport ciphers the client offers beyond ChaCha20-Poly1305,
	// which every end speaks (bit 0: AES-256-GCM); the second a bit set
	// of what else the client speaks (bit 0: ready frames, see
	// reuse.go); the rest are zero.
	offerSize  = 4
	offerAES   = 1 << 0
	offerReady = 1 << 0
	protoTCP   = 6 // IANA protocol number; 17 (UDP) is reserved for later
	// protoService: the flow asks for one of the concentrator's own
	// services (the family byte names it), not for a destination. 0 is
	// IPv6's hop-by-hop option, never a transport protocol, so it cannot
	// be confused with one.
	protoService = 0
	// protoPool: msg1 asks for nothing yet. The server answers msg2 at
	// once (Connected: authenticated and ready; Limited: over the peer's
	// pool cap), and the connection waits, keyed, until the client's
	// first transport frame names the target (a request frame). 255 is
	// IANA's "reserved", never a transport protocol.
	protoPool = 255
	// poolSoon in the byte after protoPool: the request frame follows
	// at once (0: the connection waits in the pool).
	poolSoon = 1

	// A request frame's plaintext: bytes 12..31 of msg1's payload layout
	// (protocol, family or service, address, port); a verdict frame's:
	// msg2's payload layout, its cipher byte zero (the cipher was agreed
	// in msg2). Each is the first frame of its direction on a pooled
	// connection, and always this size.
	requestSize      = 20
	requestFrameSize = frameHeaderSize + requestSize + tagSize
	verdictFrameSize = frameHeaderSize + msg2PayloadSize + tagSize
	// A ready frame: an empty frame, the concentrator's first on a
	// connection a finished flow left, when the client offered it
	// (reuse.go).
	readyFrameSize = frameHeaderSize + tagSize
)

// Service is one of the concentrator's own services that a flow can ask
// for instead of a destination.
type Service uint8

const (
	// ServiceResolver is the concentrator's DNS resolver, spoken as DNS
	// over TCP (RFC 1035 4.2.2 framing, RFC 7766 pipelining) on the flow.
	ServiceResolver Service = 1
	// ServiceDatagrams carries the client's UDP datagrams, framed (see
	// package udprelay), to and from the concentrator's UDP sockets.
	ServiceDatagrams Service = 2
)

func (s Service) valid() bool { return s == ServiceResolver || s == ServiceDatagrams }

func (s Service) String() string {
	switch s {
	case ServiceResolver:
		return "resolver"
	case ServiceDatagrams:
		return "datagrams"
	}
	return fmt.Sprintf("service(%d)", uint8(s))
}

// target is what msg1 asks for: a destination, a service, or (pool) a
// connection that names its target later, in a request frame.
type target struct {
	dst  netip.AddrPort
	svc  Service // 0: dst
	pool bool
	// soon, with pool: the request frame follows msg2 at once (a flow
	// that found no pooled connection), so the connection is a flow
	// being opened, not one waiting in the pool.
	soon bool
}

func (t target) String() string {
	if t.pool {
		return "pool"
	}
	if t.svc != 0 {
		return t.svc.String()
	}
	return t.dst.String()
}

// prologue binds every handshake to this protocol and version: a message
// made for anything else (another mpvpn version, WireGuard's own IKpsk2)
// fails to decrypt.
var prologue = []byte("mpvpn v1")

// cipherSuite is Noise_IK_25519_ChaChaPoly_BLAKE2s.
var cipherSuite = noise.NewCipherSuite(noise.DH25519, noise.CipherChaChaPoly, noise.HashBLAKE2s)

const mac1Label = "mpvpn v1 mac1"

// mac1Key derives the key of msg1's mac1 from the server's public key, as
// WireGuard does: whoever does not know the server's public key cannot
// make the server do any DH work.
func mac1Key(server PublicKey) [blake2s.Size]byte {
	var k [blake2s.Size]byte
	h, _ := blake2s.New256(nil) // unkeyed: cannot fail
	h.Write([]byte(mac1Label))
	h.Write(server[:])
	h.Sum(k[:0])
	return k
}

// mac1 is keyed BLAKE2s-128 over the Noise part of msg1.
func mac1(key *[blake2s.Size]byte, msg []byte) [mac1Size]byte {
	var m [mac1Size]byte
	h, _ := blake2s.New128(key[:]) // a 32-byte key: cannot fail
	h.Write(msg)
	h.Sum(m[:0])
	return m
}

// mac1Valid checks the mac1 of a msg1 of either size (msg1Size, or
// msg1V0Size from an older client).
func mac1Valid(key *[blake2s.Size]byte, msg1 []byte) bool {
	if len(msg1) != msg1Size && len(msg1) != msg1V0Size {
		return false
	}
	n := len(msg1) - mac1Size
	m := mac1(key, msg1[:n])
	return hmac.Equal(m[:], msg1[n:])
}

// TAI64N-like timestamp: 8 bytes of 2^62 + Unix seconds, 4 bytes of
// nanoseconds, both big-endian. (Unix seconds rather than true TAI: both
// ends only compare it with their own clock.)
const tai64Base = uint64(1) << 62

var errBadTimestamp = errors.New("bad timestamp")

func putTimestamp(b []byte, t time.Time) {
	binary.BigEndian.PutUint64(b[0:8], tai64Base+uint64(t.Unix()))
	binary.BigEndian.PutUint32(b[8:12], uint32(t.Nanosecond()))
}

func parseTimestamp(b []byte) (time.Time, error) {
	s := binary.BigEndian.Uint64(b[0:8])
	ns := binary.BigEndian.Uint32(b[8:12])
	if s < tai64Base || s >= tai64Base<<1 || ns >= 1e9 {
		return time.Time{}, errBadTimestamp
	}
	return time.Unix(int64(s-tai64Base), int64(ns)), nil
}

var errBadPayload = errors.New("malformed payload")

// offer is what msg1's last bytes say the client speaks beyond what
// every end does.
type offer struct {
	aes   bool // AES-256-GCM
	ready bool // ready frames on connections it reuses (reuse.go)
}

// putMsg1Payload writes the 36-byte request: the timestamp, the target
// (putTarget), then the offer.
func putMsg1Payload(b []byte, ts time.Time, t target, o offer) {
	putTimestamp(b[0:timestampSize], ts)
	putTarget(b[timestampSize:timestampSize+requestSize], t)
	ob := b[timestampSize+requestSize : msg1PayloadSize]
	clear(ob)
	if o.aes {
		ob[0] = offerAES
	}
	if o.ready {
		ob[1] = offerReady
	}
}

// putTarget writes the 20 bytes that name t: protocol, family, address,
// port; or protoService, the service and zeros; or protoPool and zeros.
func putTarget(b []byte, t target) {
	clear(b[:requestSize])
	switch {
	case t.pool:
		b[0] = protoPool
		if t.soon {
			b[1] = poolSoon
		}
		return
	case t.svc != 0:
		b[0] = protoService
		b[1] = byte(t.svc)
		return
	}
	dst := t.dst
	b[0] = protoTCP
	a := dst.Addr().Unmap()
	if a.Is4() {
		b[1] = 4
		a4 := a.As4()
		copy(b[2:6], a4[:])
	} else {
		b[1] = 6
		a16 := a.As16()
		copy(b[2:18], a16[:])
	}
	binary.BigEndian.PutUint16(b[18:20], dst.Port())
}

// parseMsg1Payload is strict: every byte has one valid meaning, so a
// future version cannot be misread as this one.
// It returns the timestamp, the target, and the offer.
//
// An older client's 32-byte payload has no offer: ChaCha20-Poly1305, no
// ready frames.
func parseMsg1Payload(b []byte) (time.Time, target, offer, error) {
	if len(b) != msg1PayloadSize && len(b) != msg1V0PayloadSize {
		return time.Time{}, target{}, offer{}, errBadPayload
	}
	ts, err := parseTimestamp(b[0:timestampSize])
	if err != nil {
		return time.Time{}, target{}, offer{}, err
	}
	t, err := parseTarget(b[timestampSize:timestampSize+requestSize], true)
	if err != nil {
		return time.Time{}, target{}, offer{}, err
	}
	ob := b[timestampSize+requestSize:]
	if len(ob) == 0 {
		return ts, t, offer{}, nil
	}
	if ob[0]&^offerAES != 0 || ob[1]&^offerReady != 0 || ob[2] != 0 || ob[3] != 0 {
		return time.Time{}, target{}, offer{}, errBadPayload
	}
	return ts, t, offer{aes: ob[0]&offerAES != 0, ready: ob[1]&offerReady != 0}, nil
}

// parseTarget reads the 20 bytes putTarget writes, as strictly; pool says
// whether protoPool may appear (in msg1, not in a request frame).
func parseTarget(b []byte, pool bool) (target, error) {
	if len(b) != requestSize {
		return target{}, errBadPayload
	}
	zero := func(z []byte) bool {
		for _, c := range z {
			if c != 0 {
				return false
			}
		}
		return true
	}
	switch b[0] {
	case protoPool:
		if !pool || b[1] > poolSoon || !zero(b[2:]) {
			return target{}, errBadPayload
		}
		return target{pool: true, soon: b[1] == poolSoon}, nil
	case protoService:
		svc := Service(b[1])
		if !svc.valid() || !zero(b[2:]) {
			return target{}, errBadPayload
		}
		return target{svc: svc}, nil
	case protoTCP:
		dst, err := parseDst(b)
		return target{dst: dst}, err
	}
	return target{}, errBadPayload
}

// parseDst reads the family, address and port of a TCP target.
func parseDst(b []byte) (netip.AddrPort, error) {
	var a netip.Addr
	switch b[1] {
	case 4:
		for _, z := range b[6:18] {
			if z != 0 {
				return netip.AddrPort{}, errBadPayload
			}
		}
		a = netip.AddrFrom4([4]byte(b[2:6]))
	case 6:
		a = netip.AddrFrom16([16]byte(b[2:18]))
		if a.Is4In6() {
			// The client unmaps; a mapped address here is not
			// something this version produces.
			return netip.AddrPort{}, errBadPayload
		}
	default:
		return netip.AddrPort{}, errBadPayload
	}
	port := binary.BigEndian.Uint16(b[18:20])
	if port == 0 {
		return netip.AddrPort{}, errBadPayload
	}
	return netip.AddrPortFrom(a, port), nil
}

// putMsg2Payload writes the verdict and the transport cipher the
// concentrator chose (ChaCha20Poly1305, 0, in a verdict frame).
func putMsg2Payload(b []byte, v Verdict, c Cipher) {
	clear(b[:msg2PayloadSize])
	b[0] = byte(v)
	b[1] = byte(c)
}

func parseMsg2Payload(b []byte) (Verdict, Cipher, error) {
	if len(b) != msg2PayloadSize {
		return 0, 0, errBadPayload
	}
	v, c := Verdict(b[0]), Cipher(b[1])
	if !v.valid() || !c.valid() {
		return 0, 0, errBadPayload
	}
	for _, z := range b[2:] {
		if z != 0 {
			return 0, 0, errBadPayload
		}
	}
	return v, c, nil
}

func newHandshake(dh *handshakeDH, initiator bool, static noise.DHKey, peer []byte, rng io.Reader) (*noise.HandshakeState, error) {
	cfg := noise.Config{
		CipherSuite:   dh.suite(),
		Pattern:       noise.HandshakeIK,
		Initiator:     initiator,
		Prologue:      prologue,
		StaticKeypair: static,
		PeerStatic:    peer,
	}
	if rng != nil {
		cfg.Random = rng
	}
	return noise.NewHandshakeState(cfg)
}

func dhKey(k PrivateKey) noise.DHKey {
	pub := k.Public()
	return noise.DHKey{Private: append([]byte(nil), k[:]...), Public: pub[:]}
}
