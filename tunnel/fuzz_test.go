//go:build linux

package tunnel

import (
	"bytes"
	"errors"
	"io"
	mrand "math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/flynn/noise"
)

// Fixed keys and clock, so that seeds made here stay valid in the fuzz
// functions (and in testdata, should the fuzzer ever save a corpus).
var (
	fuzzFrameKey  = [32]byte{1, 2, 3, 4, 5, 6, 7, 8}
	fuzzServerKey = PrivateKey{0x30, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 0x41}
	fuzzClientKey = PrivateKey{0x48, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 0x42}
	fuzzNow       = time.Unix(1_800_000_000, 0)
)

func fuzzCipher() *noise.CipherState { return noise.UnsafeNewCipherState(cipherSuite, fuzzFrameKey, 0) }

// FuzzFrameReader feeds arbitrary bytes to a Conn's read side. It must
// never panic, never return more plaintext than could have been sent, and
// three ways of reading (small Reads, large Reads, WriteTo) must agree on
// the bytes delivered and on whether the stream ended cleanly.
func FuzzFrameReader(f *testing.F) {
	record := func(chunks ...[]byte) []byte {
		var wire bytes.Buffer
		c := newConn(&fakeConn{w: &wire}, fuzzCipher(), nil, false, nil)
		for _, ch := range chunks {
			c.Write(ch)
		}
		c.CloseWrite()
		return wire.Bytes()
	}
	f.Add(record())
	f.Add(record([]byte("hello")))
	f.Add(record([]byte("a"), []byte("bb"), bytes.Repeat([]byte("c"), 300)))
	f.Add(record(bytes.Repeat([]byte{0xee}, 5000))[:3000])
	f.Add([]byte{0, 15, 1, 2, 3})
	f.Add([]byte{0xff, 0xff})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		type result struct {
			out []byte
			eof bool
		}
		run := func(read func(c *Conn) ([]byte, error)) result {
			raw := &fakeConn{r: bytes.NewReader(data)}
			c := newConn(raw, nil, fuzzCipher(), false, nil)
			out, err := read(c)
			if err == nil {
				t.Fatal("reading ended without an error or EOF")
			}
			if err != io.EOF && !raw.closed.Load() {
				t.Fatalf("failed with %v but left the connection open", err)
			}
			if len(out) > len(data) {
				t.Fatalf("%d bytes of plaintext from %d bytes of input", len(out), len(data))
			}
			return result{out, err == io.EOF}
		}
		var results []result
		for _, m := range readModes {
			results = append(results, run(m.read))
		}
		for i, r := range results[1:] {
			if !bytes.Equal(r.out, results[0].out) || r.eof != results[0].eof {
				t.Fatalf("%s and %s disagree: %d bytes (eof %v) vs %d (eof %v)",
					readModes[0].name, readModes[i+1].name, len(results[0].out), results[0].eof, len(r.out), r.eof)
			}
		}
	})
}

// fuzzPair is the fixed server and client of the handshake fuzzers, with
// a deterministic clock and ephemeral keys.
func fuzzPair(f testing.TB) (*Server, *Client) {
	srv, err := NewServer(ServerConfig{Key: fuzzServerKey, Peers: []PublicKey{fuzzClientKey.Public()}})
	if err != nil {
		f.Fatal(err)
	}
	srv.now = func() time.Time { return fuzzNow }
	srv.start = fuzzNow.Add(-time.Hour)
	srv.rand = mrand.NewChaCha8([32]byte{'s'})
	cli, err := NewClient(ClientConfig{Server: netip.MustParseAddrPort("192.0.2.1:7100"), Key: fuzzClientKey, ServerKey: fuzzServerKey.Public()})
	if err != nil {
		f.Fatal(err)
	}
	cli.now = func() time.Time { return fuzzNow }
	return srv, cli
}

// FuzzServerMsg1 feeds arbitrary first messages to the server's checks.
// If the first byte is odd, mac1 is recomputed over the rest so that the
// fuzzer reaches the Noise and payload code. Whatever passes must come
// from the configured peer and name a valid destination, and the server
// must then be able to answer it.
func FuzzServerMsg1(f *testing.F) {
	srv, cli := fuzzPair(f)
	for i, dst := range []string{"198.51.100.10:443", "[2001:db8::1]:22"} {
		cli.rand = mrand.NewChaCha8([32]byte{byte(i)})
		_, m1, err := cli.msg1(netip.MustParseAddrPort(dst))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(append([]byte{0}, m1...))
		f.Add(append([]byte{1}, m1...))
	}
	f.Add([]byte{1})
	f.Add(append([]byte{1}, make([]byte, msg1Size)...))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		m := bytes.Clone(data[1:])
		if data[0]&1 == 1 && len(m) >= msg1NoiseSize {
			m = m[:msg1NoiseSize:msg1NoiseSize]
			mac := mac1(&srv.mac1, m)
			m = append(m, mac[:]...)
		}
		srv.peers[fuzzClientKey.Public()].replay = newReplayCache(16) // every input is judged fresh
		pf, why := srv.checkMsg1(m)
		if pf == nil {
			if why < 0 || why >= numRejects {
				t.Fatalf("reason %d", why)
			}
			return
		}
		if pf.key != fuzzClientKey.Public() || (pf.dst.svc == 0 && (!pf.dst.dst.IsValid() || pf.dst.dst.Port() == 0)) || (pf.dst.svc != 0 && (!pf.dst.svc.valid() || pf.dst.dst.IsValid())) {
			t.Fatalf("accepted %+v", pf)
		}
		var payload [msg2PayloadSize]byte
		putMsg2Payload(payload[:], Refused, pf.cipher)
		if _, _, _, err := pf.hs.WriteMessage(nil, payload[:]); err != nil {
			t.Fatalf("cannot answer an accepted msg1: %v", err)
		}
		if again, why := srv.checkMsg1(m); again != nil || why != rejectReplay {
			t.Fatalf("the same msg1 twice: %v %s", again != nil, why)
		}
	})
}

// FuzzClientMsg2 feeds arbitrary answers to the client. Seeds are the
// server's real answers, one per verdict, to the client's deterministic
// msg1. Anything accepted must carry a valid verdict.
func FuzzClientMsg2(f *testing.F) {
	srv, cli := fuzzPair(f)
	msg1 := func() ([]byte, *noise.HandshakeState) {
		cli.rand = mrand.NewChaCha8([32]byte{'c'})
		hs, m1, err := cli.msg1(testDst)
		if err != nil {
			f.Fatal(err)
		}
		return m1, hs
	}
	for v := Connected; v <= Limited; v++ {
		m1, _ := msg1()
		srv.peers[fuzzClientKey.Public()].replay = newReplayCache(16)
		pf, why := srv.checkMsg1(m1)
		if pf == nil {
			f.Fatalf("seed msg1 rejected: %s", why)
		}
		var payload [msg2PayloadSize]byte
		putMsg2Payload(payload[:], v, pf.cipher)
		m2, _, _, err := pf.hs.WriteMessage(nil, payload[:])
		if err != nil {
			f.Fatal(err)
		}
		f.Add(m2)
	}
	f.Add(make([]byte, msg2Size))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		_, hs := msg1()
		v, keys, err := readMsg2(hs, data, cli.offerAES)
		if err != nil {
			if keys.send != nil || keys.recv != nil {
				t.Fatal("keys returned with an error")
			}
			return
		}
		if !v.valid() || keys.send == nil || keys.recv == nil {
			t.Fatalf("accepted verdict %d", v)
		}
		if !keys.cipher.valid() || (keys.cipher == AES256GCM && !cli.offerAES) {
			t.Fatalf("accepted cipher %s (offered AES: %v)", keys.cipher, cli.offerAES)
		}
		if len(data) != msg2Size {
			t.Fatalf("accepted a %d-byte msg2", len(data))
		}
		if ve := (&VerdictError{Verdict: v}); v != Connected && !errors.Is(ve, v.Errno()) {
			t.Fatalf("verdict %s does not map to its errno", v)
		}
	})
}
