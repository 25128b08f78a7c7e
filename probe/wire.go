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
	label = "mpvpn probe v1"

	typeRequest = 0x01
	typeReply   = 0x02

	// RequestSize and ReplySize are the only datagram sizes in the
	// protocol. A reply is never larger than the request it answers.
	RequestSize = 1 + 8 + 8 + 8 + macSize
	ReplySize   = 1 + 8 + 8 + 8 + macSize
	macSize     = 16
	macOffset   = RequestSize - macSize

	// MaxSkew is how far a request's timestamp may be from the server's
	// clock. It bounds how long a captured request stays replayable
	// once a server restart has emptied the replay windows.
	MaxSkew = 30 * time.Second

	// epochShift turns a Unix-nanosecond timestamp into the epoch the
	// id is derived from: 2^38 ns ≈ 275 s. It must be far longer than
	// MaxSkew so that a timestamp the server accepts is always in the
	// server's own epoch or a neighbour.
	epochShift = 38
)

// keys is what both ends derive from one client/server key pair.
type keys struct {
	k   [32]byte // the root key K, from which ids are derived
	mac [32]byte // Kmac, the key of every MAC in both directions
}

// deriveKeys computes K and Kmac from own private key and the other side's
// public key. clientPub and serverPub are bound into K so that the key is
// tied to this pair and this protocol, not only to the DH output.
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
	h, _ = blake2s.New256(ks.k[:])
	h.Write([]byte("mac"))
	h.Sum(ks.mac[:0])
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

// newMAC returns the keyed BLAKE2s-128 used for requests and replies.
func newMAC(k *keys) hash.Hash {
	h, err := blake2s.New128(k.mac[:])
	if err != nil {
		panic("probe: blake2s.New128: " + err.Error()) // 32-byte key: impossible
	}
	return h
}

// sumMAC writes the MAC of msg into out. h is reset first; out must not
// escape for sumMAC to stay allocation-free, so callers keep it in a
// long-lived struct.
func sumMAC(h hash.Hash, msg []byte, out *[macSize]byte) {
	h.Reset()
	h.Write(msg)
	h.Sum(out[:0])
}

// request is a decoded request. The MAC is checked separately, after the
// cheap checks and once the peer (its key) is known.
type request struct {
	id      uint64
	ts      int64
	counter uint64
}

// putRequest writes a request with mac key h into buf (which must hold
// RequestSize bytes) and returns the datagram.
func putRequest(buf []byte, h hash.Hash, id uint64, ts int64, counter uint64) []byte {
	b := buf[:RequestSize]
	b[0] = typeRequest
	binary.BigEndian.PutUint64(b[1:], id)
	binary.BigEndian.PutUint64(b[9:], uint64(ts))
	binary.BigEndian.PutUint64(b[17:], counter)
	var m [macSize]byte
	sumMAC(h, b[:macOffset], &m)
	copy(b[macOffset:], m[:])
	return b
}

// parseRequest checks length and type and decodes the fields. It does no
// crypto.
func parseRequest(b []byte) (request, bool) {
	if len(b) != RequestSize || b[0] != typeRequest {
		return request{}, false
	}
	return request{
		id:      binary.BigEndian.Uint64(b[1:]),
		ts:      int64(binary.BigEndian.Uint64(b[9:])),
		counter: binary.BigEndian.Uint64(b[17:]),
	}, true
}

// reply is a decoded, authenticated reply.
type reply struct {
	counter uint64
	ts      int64 // the client's request timestamp, echoed
	server  int64 // the server's clock when it answered
}

// putReply writes the reply to req into buf (at least ReplySize bytes).
func putReply(buf []byte, h hash.Hash, req request, server int64, scratch *[macSize]byte) []byte {
	b := buf[:ReplySize]
	b[0] = typeReply
	binary.BigEndian.PutUint64(b[1:], req.counter)
	binary.BigEndian.PutUint64(b[9:], uint64(req.ts))
	binary.BigEndian.PutUint64(b[17:], uint64(server))
	sumMAC(h, b[:macOffset], scratch)
	copy(b[macOffset:], scratch[:])
	return b
}

// parseReply authenticates and decodes a reply with mac key h.
func parseReply(b []byte, h hash.Hash) (reply, bool) {
	if len(b) != ReplySize || b[0] != typeReply {
		return reply{}, false
	}
	var m [macSize]byte
	sumMAC(h, b[:macOffset], &m)
	if subtle.ConstantTimeCompare(m[:], b[macOffset:]) != 1 {
		return reply{}, false
	}
	return reply{
		counter: binary.BigEndian.Uint64(b[1:]),
		ts:      int64(binary.BigEndian.Uint64(b[9:])),
		server:  int64(binary.BigEndian.Uint64(b[17:])),
	}, true
}
