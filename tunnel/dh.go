//go:build linux

package tunnel

import (
	"crypto/ecdh"
	"crypto/subtle"
	"fmt"
	"io"

	"github.com/flynn/noise"
)

// handshakeDH is Noise's DH25519 for one handshake, doing each X25519
// once. flynn/noise's own (v1.1.0) hands DH the private key as bytes and
// calls curve25519.X25519, which (x/crypto 2026, over crypto/ecdh) makes
// an ecdh.PrivateKey from them: that computes the key's public half, a
// second scalar multiplication, on every DH. A handshake so did nine
// where four are needed: half of a new flow's CPU on both ends (perf,
// 2026-12-02: X25519 was 45 % of the client's CPU under `ab`). Here the
// static key and the handshake's ephemeral key are ecdh.PrivateKeys made
// once, and the static-static DH, the same for every handshake between
// the same two keys, is computed once per peer (as wireguard-go's
// precomputedStaticStatic). The results are the same bytes, so the wire
// is unchanged.
type handshakeDH struct {
	static    *ecdh.PrivateKey
	staticRaw []byte
	// ss returns the static-static DH with the peer whose static public
	// key is pub, if it is known ahead (nil: compute it).
	ss func(pub []byte) ([]byte, bool)

	eph    *ecdh.PrivateKey
	ephRaw []byte
}

var _ noise.DHFunc = (*handshakeDH)(nil)

func (d *handshakeDH) DHName() string { return "25519" }
func (d *handshakeDH) DHLen() int     { return KeySize }

// GenerateKeypair makes the ephemeral key from 32 bytes of rng, as
// flynn/noise's does (so a test's deterministic rng still determines it;
// ecdh.GenerateKey would ignore it).
func (d *handshakeDH) GenerateKeypair(rng io.Reader) (noise.DHKey, error) {
	var b [KeySize]byte
	if _, err := io.ReadFull(rng, b[:]); err != nil {
		return noise.DHKey{}, err
	}
	k, err := ecdh.X25519().NewPrivateKey(b[:])
	clear(b[:])
	if err != nil {
		return noise.DHKey{}, err
	}
	d.eph, d.ephRaw = k, k.Bytes()
	return noise.DHKey{Private: k.Bytes(), Public: k.PublicKey().Bytes()}, nil
}

func (d *handshakeDH) DH(priv, pub []byte) ([]byte, error) {
	var k *ecdh.PrivateKey
	switch {
	case d.eph != nil && subtle.ConstantTimeCompare(priv, d.ephRaw) == 1:
		k = d.eph
	case d.static != nil && subtle.ConstantTimeCompare(priv, d.staticRaw) == 1:
		if d.ss != nil {
			if r, ok := d.ss(pub); ok {
				return r, nil
			}
		}
		k = d.static
	default:
		var err error
		if k, err = ecdh.X25519().NewPrivateKey(priv); err != nil {
			return nil, err
		}
	}
	return x25519(k, pub)
}

func x25519(k *ecdh.PrivateKey, pub []byte) ([]byte, error) {
	p, err := ecdh.X25519().NewPublicKey(pub)
	if err != nil {
		return nil, err
	}
	return k.ECDH(p)
}

// staticKey is an end's static key, made once.
type staticKey struct {
	priv *ecdh.PrivateKey
	raw  []byte
}

func newStaticKey(k PrivateKey) (staticKey, error) {
	p, err := ecdh.X25519().NewPrivateKey(k[:])
	if err != nil {
		return staticKey{}, fmt.Errorf("tunnel: static key: %w", err)
	}
	return staticKey{priv: p, raw: p.Bytes()}, nil
}

// suite is the handshake's cipher suite around d: the same protocol name
// as cipherSuite (Noise_IK_25519_ChaChaPoly_BLAKE2s).
func (d *handshakeDH) suite() noise.CipherSuite {
	return noise.NewCipherSuite(d, noise.CipherChaChaPoly, noise.HashBLAKE2s)
}
