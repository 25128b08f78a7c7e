//go:build linux

package tunnel

import (
	"bytes"
	mrand "math/rand/v2"
	"testing"
	"time"

	"github.com/flynn/noise"
)

// TestHandshakeDH: the one-multiplication DH gives Noise's DH25519 bytes
// for every key it may be handed (its static key, with and without the
// precomputed static-static, its ephemeral key, any other), the same
// ephemeral key from the same random bytes, and a handshake between it and
// flynn/noise's own suite on the other end completes with the same keys:
// the wire is unchanged.
func TestHandshakeDH(t *testing.T) {
	rng := mrand.NewChaCha8([32]byte{'d', 'h'})
	gen := func() noise.DHKey {
		k, err := noise.DH25519.GenerateKeypair(rng)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	static, peer, other := gen(), gen(), gen()
	sk, err := newStaticKey(PrivateKey(static.Private))
	if err != nil {
		t.Fatal(err)
	}
	ss, err := staticStatic(sk, PublicKey(peer.Public))
	if err != nil {
		t.Fatal(err)
	}
	for _, cached := range []bool{false, true} {
		d := &handshakeDH{static: sk.priv, staticRaw: sk.raw}
		if cached {
			d.ss = func(pub []byte) ([]byte, bool) { return bytes.Clone(ss), bytes.Equal(pub, peer.Public) }
		}
		seed := [32]byte{byte(len(ss)), 1}
		eph, err := d.GenerateKeypair(mrand.NewChaCha8(seed))
		if err != nil {
			t.Fatal(err)
		}
		want, _ := noise.DH25519.GenerateKeypair(mrand.NewChaCha8(seed))
		if !bytes.Equal(eph.Private, want.Private) || !bytes.Equal(eph.Public, want.Public) {
			t.Fatalf("ephemeral key from the same bytes differs from DH25519's")
		}
		for _, priv := range []noise.DHKey{static, eph, other} {
			for _, pub := range []noise.DHKey{peer, other, eph} {
				got, err := d.DH(priv.Private, pub.Public)
				if err != nil {
					t.Fatal(err)
				}
				want, err := noise.DH25519.DH(priv.Private, pub.Public)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Errorf("cached %v: DH differs from DH25519's", cached)
				}
			}
		}
		// A low-order point fails as with DH25519.
		if _, err := d.DH(static.Private, make([]byte, 32)); err == nil {
			t.Error("DH with the all-zero point succeeded")
		}
	}

	// Our client against flynn/noise's own suite as the server, and
	// the other way round: the same handshake, the same transport keys.
	p := newPair(t, ServerConfig{}, ClientConfig{Cipher: CipherChaCha})
	plainServer := func(t *testing.T, m1 []byte) (m2 []byte, send *noise.CipherState) {
		hs, err := noise.NewHandshakeState(noise.Config{CipherSuite: cipherSuite, Pattern: noise.HandshakeIK, Prologue: prologue, StaticKeypair: dhKey(p.serverKey)})
		if err != nil {
			t.Fatal(err)
		}
		payload, _, _, err := hs.ReadMessage(nil, m1[:msg1NoiseSize])
		if err != nil {
			t.Fatalf("flynn/noise's DH25519 cannot read our msg1: %v", err)
		}
		if _, _, _, err := parseMsg1Payload(payload); err != nil {
			t.Fatal(err)
		}
		var pl [msg2PayloadSize]byte
		putMsg2Payload(pl[:], Connected, ChaCha20Poly1305)
		m2, cs1, _, err := hs.WriteMessage(nil, pl[:])
		if err != nil {
			t.Fatal(err)
		}
		return m2, cs1
	}
	hs, m1, err := p.cli.msg1(testDst)
	if err != nil {
		t.Fatal(err)
	}
	m2, srvRecv := plainServer(t, m1)
	v, keys, err := readMsg2(hs, m2, p.cli.offerAES)
	if err != nil || v != Connected {
		t.Fatalf("our client reading flynn/noise's msg2: %v %v", v, err)
	}
	if keys.send.UnsafeKey() != srvRecv.UnsafeKey() {
		t.Fatal("our client and flynn/noise's server derived different keys")
	}

	cliKey := dhKey(p.clientKey)
	chs, err := noise.NewHandshakeState(noise.Config{CipherSuite: cipherSuite, Pattern: noise.HandshakeIK, Initiator: true, Prologue: prologue, StaticKeypair: cliKey, PeerStatic: func() []byte { k := p.serverKey.Public(); return k[:] }()})
	if err != nil {
		t.Fatal(err)
	}
	var pl [msg1PayloadSize]byte
	putMsg1Payload(pl[:], time.Now(), target{dst: testDst}, offer{})
	msg, _, _, err := chs.WriteMessage(nil, pl[:])
	if err != nil {
		t.Fatal(err)
	}
	mac := mac1(&p.srv.mac1, msg)
	pf, why := p.srv.checkMsg1(append(msg, mac[:]...))
	if pf == nil {
		t.Fatalf("our server refused flynn/noise's msg1: %s", why)
	}
	var pl2 [msg2PayloadSize]byte
	putMsg2Payload(pl2[:], Connected, pf.cipher)
	m2b, _, scs2, err := pf.hs.WriteMessage(nil, pl2[:])
	if err != nil {
		t.Fatal(err)
	}
	if _, ccs1, ccs2, err := chs.ReadMessage(nil, m2b); err != nil || ccs2.UnsafeKey() != scs2.UnsafeKey() || ccs1 == nil {
		t.Fatalf("flynn/noise's client reading our msg2: %v", err)
	}
}

// BenchmarkHandshake: one whole handshake, both ends' CPU (msg1, its
// checks, msg2 and its reading), as a pooled connection costs.
func BenchmarkHandshake(b *testing.B) {
	p := newPair(b, ServerConfig{}, ClientConfig{})
	p.srv.cfg.ReplayWindow = time.Hour
	b.ReportAllocs()
	for range b.N {
		p.handshake(b)
	}
}
