//go:build linux

package tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/flynn/noise"
)

func TestParseCipherPolicy(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want CipherPolicy
		ok   bool
	}{
		{"", CipherAuto, true},
		{"auto", CipherAuto, true},
		{"chacha20-poly1305", CipherChaCha, true},
		{"aes-256-gcm", CipherAES, true},
		{"aes", 0, false},
		{"AES-256-GCM", 0, false},
		{"aes-128-gcm", 0, false},
	} {
		got, err := ParseCipherPolicy(tt.in)
		if (err == nil) != tt.ok || (tt.ok && got != tt.want) {
			t.Errorf("ParseCipherPolicy(%q) = %v, %v; want %v, ok %v", tt.in, got, err, tt.want, tt.ok)
		}
		if tt.ok && tt.in != "" && got.String() != tt.in {
			t.Errorf("%v.String() = %q, want %q", got, got.String(), tt.in)
		}
	}
}

// TestCipherNegotiation: every pair of settings, on this host's CPU, over
// real connections, fresh and pooled: both ends use the cipher the rule
// gives (AES-256-GCM only when the client offers it and the concentrator
// takes it), the bytes arrive, and both ends count it.
func TestCipherNegotiation(t *testing.T) {
	hw := HardwareAES()
	t.Logf("this host has AES instructions: %v", hw)
	policies := []CipherPolicy{CipherAuto, CipherChaCha, CipherAES}
	for _, cp := range policies {
		for _, sp := range policies {
			want := ChaCha20Poly1305
			if cp.wantsAES(hw) && sp.wantsAES(hw) {
				want = AES256GCM
			}
			for _, pooled := range []bool{false, true} {
				name := "client " + cp.String() + ", server " + sp.String()
				if pooled {
					name += ", pooled"
				}
				t.Run(name, func(t *testing.T) {
					ln := listenMPTCP(t, false)
					size := -1
					if pooled {
						size = 1
					}
					p := newPair(t, ServerConfig{Cipher: sp}, ClientConfig{Server: lnAddr(ln), Cipher: cp, PoolSize: size})
					srvCipher := make(chan Cipher, 1)
					serve(t, p.srv, ln, func(ctx context.Context, f *Flow) {
						srvCipher <- f.Cipher
						echoAccept(ctx, f)
					})
					if pooled {
						runPool(t, p.cli)
						waitFor(t, "a pooled connection", func() bool { return p.cli.Stats().Pooled == 1 })
					}
					fc, err := p.cli.DialTCP(context.Background(), testDst)
					if err != nil {
						t.Fatal(err)
					}
					defer fc.Close()
					if got := fc.Cipher(); got != want {
						t.Errorf("client uses %s, want %s", got, want)
					}
					if got := <-srvCipher; got != want {
						t.Errorf("server uses %s, want %s", got, want)
					}
					// Several frames each way, the largest among them.
					msg := make([]byte, 3*maxPlaintext+123)
					rand.Read(msg)
					go func() { fc.Write(msg); fc.CloseWrite() }()
					got, err := io.ReadAll(fc)
					if err != nil || !bytes.Equal(got, msg) {
						t.Fatalf("echo: %d of %d bytes, %v", len(got), len(msg), err)
					}
					wantN := uint64(0)
					if want == AES256GCM {
						wantN = 1
					}
					if cs, ss := p.cli.Stats(), p.srv.Stats(); cs.AESGCM != wantN || ss.AESGCM != wantN || cs.OffersAES != cp.wantsAES(hw) || ss.AcceptsAES != sp.wantsAES(hw) {
						t.Errorf("stats: client AESGCM %d offers %v, server AESGCM %d accepts %v; want %d, %v, %d, %v",
							cs.AESGCM, cs.OffersAES, ss.AESGCM, ss.AcceptsAES, wantN, cp.wantsAES(hw), wantN, sp.wantsAES(hw))
					}
					if pooled && p.cli.Stats().PoolHits != 1 {
						t.Errorf("the flow did not take the pooled connection")
					}
				})
			}
		}
	}
}

// TestCipherNotOffered: a msg2 that names AES-256-GCM to a client that
// offered only ChaCha20-Poly1305 is refused, although it authenticates:
// the choice is the client's to allow (and a downgrade the other way
// cannot be made by anyone without the keys, since both payloads are
// inside the handshake's AEAD and hash).
func TestCipherNotOffered(t *testing.T) {
	for _, offered := range []bool{false, true} {
		p := newPair(t, ServerConfig{Cipher: CipherAES}, ClientConfig{Cipher: map[bool]CipherPolicy{false: CipherChaCha, true: CipherAES}[offered]})
		hs, pf := p.checkedMsg1(t)
		if want := map[bool]Cipher{false: ChaCha20Poly1305, true: AES256GCM}[offered]; pf.cipher != want {
			t.Errorf("offered AES %v: the server chose %s, want %s", offered, pf.cipher, want)
		}
		var payload [msg2PayloadSize]byte
		putMsg2Payload(payload[:], Connected, AES256GCM) // whatever was offered
		m2, _, _, err := pf.hs.WriteMessage(nil, payload[:])
		if err != nil {
			t.Fatal(err)
		}
		_, keys, err := readMsg2(hs, m2, p.cli.offerAES)
		if offered && (err != nil || keys.cipher != AES256GCM) {
			t.Errorf("offered and chosen: %v, %s", err, keys.cipher)
		}
		if !offered && (err == nil || !errors.Is(err, errBadPayload)) {
			t.Errorf("not offered, chosen anyway: %v, want a refusal", err)
		}
	}
}

// TestCipherKeysSeparate: the AES-256-GCM transport never uses Split's key
// itself, and two ends that disagree on the cipher fail on the first
// frame (ErrTampered), never read garbage.
func TestCipherKeysSeparate(t *testing.T) {
	var split [32]byte
	rand.Read(split[:])
	cs := func() *noise.CipherState { return noise.UnsafeNewCipherState(cipherSuite, split, 0) }
	aes := transport(AES256GCM, cs())
	if aes.UnsafeKey() == split {
		t.Fatal("the AES transport key is Split's key")
	}
	if transport(ChaCha20Poly1305, cs()).UnsafeKey() != split {
		t.Fatal("the ChaCha20-Poly1305 transport is not Noise's own")
	}
	// Sealed under one, opened under the other, both ways round.
	for _, tt := range []struct {
		name       string
		send, recv *noise.CipherState
	}{
		{"AES sent, ChaCha expected", transport(AES256GCM, cs()), cs()},
		{"ChaCha sent, AES expected", cs(), transport(AES256GCM, cs())},
		{"AES both", transport(AES256GCM, cs()), transport(AES256GCM, cs())},
	} {
		var wire bytes.Buffer
		w := newConn(&fakeConn{w: &wire}, tt.send, nil, false, nil)
		if _, err := w.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		r := newConn(&fakeConn{r: &wire}, nil, tt.recv, false, nil)
		buf := make([]byte, 64)
		n, err := r.Read(buf)
		same := tt.name == "AES both"
		if same && (err != nil || string(buf[:n]) != "hello") {
			t.Errorf("%s: %q, %v", tt.name, buf[:n], err)
		}
		if !same && (n != 0 || !errors.Is(err, ErrTampered)) {
			t.Errorf("%s: read %d bytes, %v; want ErrTampered", tt.name, n, err)
		}
	}
}

// TestOlderClientMsg1: a client from before the cipher offer sends a
// 144-byte msg1 (no offer) and waits for msg2. The concentrator takes it,
// answers with ChaCha20-Poly1305 (a msg2 whose bytes after the verdict
// are all zero, as that client's strict parser wants), and the flow
// works; so the concentrator can be upgraded before its clients.
func TestOlderClientMsg1(t *testing.T) {
	ln := listenMPTCP(t, false)
	p := newPair(t, ServerConfig{Cipher: CipherAES}, ClientConfig{Server: lnAddr(ln), PoolSize: -1})
	serve(t, p.srv, ln, echoAccept)
	c := p.cli
	dh := &handshakeDH{static: c.sk.priv, staticRaw: c.sk.raw}
	hs, err := newHandshake(dh, true, c.static, append([]byte(nil), c.cfg.ServerKey[:]...), nil)
	if err != nil {
		t.Fatal(err)
	}
	var payload [msg1V0PayloadSize]byte
	putTimestamp(payload[:timestampSize], time.Now())
	putTarget(payload[timestampSize:], target{dst: testDst})
	msg, _, _, err := hs.WriteMessage(nil, payload[:])
	if err != nil || len(msg) != msg1V0NoiseSize {
		t.Fatalf("old msg1: %d bytes, %v", len(msg), err)
	}
	mac := mac1(&c.mac1, msg)
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := raw.Write(append(msg, mac[:]...)); err != nil {
		t.Fatal(err)
	}
	var m2 [msg2Size]byte
	if _, err := io.ReadFull(raw, m2[:]); err != nil {
		t.Fatalf("no msg2 for an older client's msg1: %v", err)
	}
	pl, cs1, cs2, err := hs.ReadMessage(nil, m2[:])
	if err != nil {
		t.Fatal(err)
	}
	if pl[0] != byte(Connected) || !bytes.Equal(pl[1:], make([]byte, msg2PayloadSize-1)) {
		t.Fatalf("msg2 payload %x: want Connected and zeros", pl)
	}
	fc := newConn(raw, cs1, cs2, false, nil)
	if _, err := fc.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	fc.CloseWrite()
	got, err := io.ReadAll(fc)
	if err != nil || string(got) != "ping" {
		t.Fatalf("echo: %q, %v", got, err)
	}
	if s := p.srv.Stats(); s.Flows != 1 || s.AESGCM != 0 {
		t.Errorf("server stats: %d flows, %d on AES; want 1, 0", s.Flows, s.AESGCM)
	}
}
