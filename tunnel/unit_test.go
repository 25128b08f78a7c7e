//go:build linux

package tunnel

import (
	"encoding/base64"
	"encoding/hex"
	"errors"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/curve25519"
)

func TestKeys(t *testing.T) {
	// RFC 7748 §6.1: Alice's key pair.
	priv, _ := hex.DecodeString("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
	pub, _ := hex.DecodeString("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
	k, err := ParsePrivateKey(base64.StdEncoding.EncodeToString(priv))
	if err != nil {
		t.Fatal(err)
	}
	if got := k.Public(); string(got[:]) != string(pub) {
		t.Fatalf("Public = %x, want %x", got, pub)
	}

	for range 20 {
		k, err := GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		if k[0]&7 != 0 || k[31]&128 != 0 || k[31]&64 == 0 {
			t.Fatalf("key not clamped: %x", k[:])
		}
		s := k.Base64Secret()
		if len(s) != 44 || !strings.HasSuffix(s, "=") {
			t.Fatalf("Base64Secret() = %q, want 44 base64 characters as wg genkey", s)
		}
		k2, err := ParsePrivateKey("  " + s + "\n")
		if err != nil || k2 != k {
			t.Fatalf("round trip: %v", err)
		}
		want, _ := curve25519.X25519(k[:], curve25519.Basepoint)
		p := k.Public()
		if string(p[:]) != string(want) {
			t.Fatal("Public disagrees with x/crypto/curve25519")
		}
		p2, err := ParsePublicKey(p.String())
		if err != nil || p2 != p {
			t.Fatalf("public round trip: %v", err)
		}
	}

	bad := []struct{ in, want string }{
		{"", "empty"},
		{"   \n", "empty"},
		{"abc", "44"},
		{strings.Repeat("A", 43), "44"},
		{strings.Repeat("A", 45), "44"},
		{strings.Repeat("A", 44), "decodes to 33"},
		{strings.Repeat("!", 43) + "=", "base64"},
		{base64.StdEncoding.EncodeToString(make([]byte, 32)), "zero"},
		{base64.URLEncoding.EncodeToString(append([]byte{0xfb, 0xef, 0xbe}, make([]byte, 29)...)), "base64"},
	}
	for _, b := range bad {
		if _, err := ParsePrivateKey(b.in); err == nil || !strings.Contains(err.Error(), b.want) {
			t.Errorf("ParsePrivateKey(%q) = %v, want an error mentioning %q", b.in, err, b.want)
		}
		if _, err := ParsePublicKey(b.in); err == nil || !strings.Contains(err.Error(), b.want) {
			t.Errorf("ParsePublicKey(%q) = %v, want an error mentioning %q", b.in, err, b.want)
		}
	}
	if got := k.LogValue().String(); strings.Contains(got, k.Base64Secret()) {
		t.Fatal("LogValue shows the private key")
	}
}

func TestVerdictErrno(t *testing.T) {
	tests := []struct {
		v    Verdict
		want syscall.Errno
	}{
		{Refused, syscall.ECONNREFUSED},
		{Unreachable, syscall.EHOSTUNREACH},
		{TimedOut, syscall.ETIMEDOUT},
		{NotAllowed, syscall.EACCES},
		{Limited, syscall.EAGAIN},
	}
	for _, tt := range tests {
		var err error = &VerdictError{Verdict: tt.v, Dst: testDst}
		if !errors.Is(err, tt.want) {
			t.Errorf("%s: errors.Is(err, %v) is false", tt.v, tt.want)
		}
		if !strings.Contains(err.Error(), tt.v.String()) {
			t.Errorf("%s: message %q does not name the verdict", tt.v, err)
		}
		if ve, ok := errors.AsType[*VerdictError](err); !ok || ve.Verdict != tt.v {
			t.Errorf("%s: errors.As failed", tt.v)
		}
	}
	if Connected.Errno() != 0 || Verdict(0).Errno() != syscall.EPROTO || Verdict(99).valid() {
		t.Fatal("Connected / invalid verdicts")
	}
}

func TestMsg1Payload(t *testing.T) {
	ts := time.Unix(1_700_000_000, 123_456_789)
	for _, dst := range []string{"198.51.100.10:443", "[2001:db8::1]:80", "[::ffff:192.0.2.1]:22", "0.0.0.0:1", "[::]:65535"} {
		ap := netip.MustParseAddrPort(dst)
		var b [msg1PayloadSize]byte
		putMsg1Payload(b[:], ts, target{dst: ap}, offer{})
		gts, gdst, _, err := parseMsg1Payload(b[:])
		if err != nil {
			t.Fatalf("%s: %v", dst, err)
		}
		want := target{dst: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())}
		if !gts.Equal(ts) || gdst != want {
			t.Fatalf("%s: got %v %v", dst, gts, gdst)
		}
	}
	for _, o := range []offer{{}, {aes: true}, {ready: true}, {aes: true, ready: true}} {
		var b [msg1PayloadSize]byte
		putMsg1Payload(b[:], ts, target{pool: true}, o)
		if _, got, offered, err := parseMsg1Payload(b[:]); err != nil || !got.pool || offered != o {
			t.Fatalf("pool request offering %+v: got %v, offered %+v, %v", o, got, offered, err)
		}
	}
	var svc [msg1PayloadSize]byte
	putMsg1Payload(svc[:], ts, target{svc: ServiceResolver}, offer{})
	if gts, got, _, err := parseMsg1Payload(svc[:]); err != nil || !gts.Equal(ts) || got != (target{svc: ServiceResolver}) {
		t.Fatalf("resolver request: got %v %v %v", gts, got, err)
	}
	for name, m := range map[string]func(b []byte){
		"unknown service": func(b []byte) { b[13] = 3 },
		"service 0":       func(b []byte) { b[13] = 0 },
		"address bytes":   func(b []byte) { b[14] = 1 },
		"port bytes":      func(b []byte) { b[31] = 53 },
	} {
		b := svc
		m(b[:])
		if _, _, _, err := parseMsg1Payload(b[:]); err == nil {
			t.Errorf("service, %s: accepted", name)
		}
	}
	var good [msg1PayloadSize]byte
	putMsg1Payload(good[:], ts, target{dst: testDst}, offer{aes: true, ready: true})
	mutations := map[string]func(b []byte){
		"short":          nil,
		"proto UDP":      func(b []byte) { b[12] = 17 },
		"family 0":       func(b []byte) { b[13] = 0 },
		"family 5":       func(b []byte) { b[13] = 5 },
		"v4 padding":     func(b []byte) { b[20] = 1 },
		"port 0":         func(b []byte) { b[30], b[31] = 0, 0 },
		"nanos 1e9":      func(b []byte) { b[8], b[9], b[10], b[11] = 0x3b, 0x9a, 0xca, 0x00 },
		"seconds < 2^62": func(b []byte) { b[0] = 0 },
		"seconds ≥ 2^63": func(b []byte) { b[0] = 0x80 },
		"v4 as mapped v6": func(b []byte) {
			b[13] = 6
			copy(b[14:30], netip.MustParseAddr("::ffff:1.2.3.4").AsSlice())
		},
		"unknown cipher offered":  func(b []byte) { b[32] |= 1 << 1 },
		"unknown feature offered": func(b []byte) { b[33] |= 1 << 1 },
		"offer padding":           func(b []byte) { b[35] = 1 },
	}
	for name, m := range mutations {
		b := good
		in := b[:]
		if m == nil {
			in = in[:msg1PayloadSize-1]
		} else {
			m(in)
		}
		if _, _, _, err := parseMsg1Payload(in); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestMsg2Payload(t *testing.T) {
	for v := Connected; v <= Limited; v++ {
		for _, c := range []Cipher{ChaCha20Poly1305, AES256GCM} {
			var b [msg2PayloadSize]byte
			putMsg2Payload(b[:], v, c)
			if got, gc, err := parseMsg2Payload(b[:]); err != nil || got != v || gc != c {
				t.Fatalf("%s, %s: %v %v %v", v, c, got, gc, err)
			}
		}
	}
	for _, b := range [][]byte{
		make([]byte, 16),
		{7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
		{1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1},
		{1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, // no cipher 2
		{1},
	} {
		if _, _, err := parseMsg2Payload(b); err == nil {
			t.Errorf("%x accepted", b)
		}
	}
}

func TestReplayCache(t *testing.T) {
	c := newReplayCache(3)
	k := func(i byte) [KeySize]byte { return [KeySize]byte{i} }
	steps := []struct {
		key         byte
		expiry, now int64
		want        replayResult
		wantEntries int
	}{
		{1, 100, 0, replayFresh, 1},
		{1, 100, 10, replaySeen, 1},
		{2, 50, 10, replayFresh, 2},
		{3, 200, 20, replayFresh, 3},
		{4, 200, 20, replayFull, 3},
		// Expiry is the last instant the timestamp check still
		// accepts the message: at 50 key 2 is kept, after it dropped.
		{2, 60, 50, replaySeen, 3},
		{2, 60, 51, replayFresh, 3},
		{1, 100, 99, replaySeen, 2}, // 2 (60) expired meanwhile
		{1, 100, 100, replaySeen, 2},
		{1, 300, 101, replayFresh, 2}, // 1 (100) expired and came back
	}
	for i, s := range steps {
		if got := c.add(k(s.key), s.expiry, s.now); got != s.want {
			t.Fatalf("step %d: add(%d) = %d, want %d", i, s.key, got, s.want)
		}
		if n := c.len(); n != s.wantEntries {
			t.Fatalf("step %d: %d entries, want %d", i, n, s.wantEntries)
		}
	}
}

// TestCheckMsg1Timestamps: a stamp is accepted from ReplayWindow behind
// the server's clock to FutureSkew ahead of it, and never at or before
// the horizon (start + FutureSkew), which is what keeps a message
// recorded before a restart from being accepted after it.
func TestCheckMsg1Timestamps(t *testing.T) {
	base := time.Now()
	const w, f = 30 * time.Second, time.Second
	tests := []struct {
		name  string
		stamp time.Duration // msg1's timestamp minus the server's now
		start time.Duration // server start relative to the server's now (horizon: start + f)
		ok    bool
	}{
		{"in sync", 0, -time.Hour, true},
		{"29s behind", -29 * time.Second, -time.Hour, true},
		{"30s behind", -30 * time.Second, -time.Hour, true},
		{"31s behind", -31 * time.Second, -time.Hour, false},
		{"0.9s ahead", 900 * time.Millisecond, -time.Hour, true},
		{"1s ahead", time.Second, -time.Hour, true},
		{"1.1s ahead", 1100 * time.Millisecond, -time.Hour, false},
		// A client with a clock 29 s fast connects only because it
		// stamps in the server's clock (learned from the probes).
		{"29s ahead", 29 * time.Second, -time.Hour, false},
		// Recorded before a restart: stamped no later than the old
		// run's clock plus FutureSkew, so at most start+FutureSkew.
		{"recorded before a restart", -2 * time.Second, -time.Second, false},
		{"recorded before a restart, stamped ahead", 300 * time.Millisecond, -600 * time.Millisecond, false},
		{"at the horizon", 400 * time.Millisecond, -600 * time.Millisecond, false},
		{"just after start, own clock", 0, -time.Millisecond, false},
		{"just after start, stamped past the horizon", f - time.Millisecond + time.Microsecond, -time.Millisecond, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := newPair(t, ServerConfig{ReplayWindow: w, FutureSkew: f}, ClientConfig{})
			p.srv.now = func() time.Time { return base }
			p.srv.horizon = base.Add(tt.start + f)
			p.cli.now = func() time.Time { return base.Add(tt.stamp) }
			_, m1, err := p.cli.msg1(testDst)
			if err != nil {
				t.Fatal(err)
			}
			pf, why := p.srv.checkMsg1(m1)
			if ok := pf != nil; ok != tt.ok {
				t.Fatalf("accepted = %v (%s), want %v", ok, why, tt.ok)
			}
			if !tt.ok && why != rejectTime {
				t.Fatalf("rejected for %s, want the timestamp", why)
			}
		})
	}
}

// TestCheckMsg1Order: each failure is caught by the check meant for it.
func TestCheckMsg1Order(t *testing.T) {
	p := newPair(t, ServerConfig{}, ClientConfig{})
	_, m1, _ := p.cli.msg1(testDst)
	flip := func(i int) []byte {
		b := append([]byte(nil), m1...)
		b[i] ^= 1
		return b
	}
	remac := func(b []byte) []byte {
		m := mac1(&p.srv.mac1, b[:msg1NoiseSize])
		return append(b[:msg1NoiseSize:msg1NoiseSize], m[:]...)
	}
	stranger := newPair(t, ServerConfig{}, ClientConfig{})
	stranger.cli.cfg.ServerKey = p.serverKey.Public()
	stranger.cli.mac1 = mac1Key(p.serverKey.Public())
	_, fromStranger, _ := stranger.cli.msg1(testDst)

	tests := []struct {
		name string
		msg  []byte
		want reject
	}{
		{"short", m1[:143], rejectMAC},
		{"long", append(append([]byte(nil), m1...), 0), rejectMAC},
		{"mac1 bit", flip(140), rejectMAC},
		{"ephemeral bit", flip(0), rejectMAC},
		{"ephemeral bit, mac1 redone", remac(flip(0)), rejectNoise},
		{"static bit, mac1 redone", remac(flip(40)), rejectNoise},
		{"payload bit, mac1 redone", remac(flip(100)), rejectNoise},
		{"unknown client key", fromStranger, rejectPeer},
	}
	for _, tt := range tests {
		if pf, why := p.srv.checkMsg1(tt.msg); pf != nil || why != tt.want {
			t.Errorf("%s: %v %s, want %s", tt.name, pf != nil, why, tt.want)
		}
	}
	if pf, why := p.srv.checkMsg1(m1); pf == nil {
		t.Fatalf("the original: %s", why)
	}
	if pf, why := p.srv.checkMsg1(m1); pf != nil || why != rejectReplay {
		t.Fatalf("the original again: %v %s, want a replay", pf != nil, why)
	}
}

func TestConfigErrors(t *testing.T) {
	k := mustKey(t)
	if _, err := NewServer(ServerConfig{Key: k}); err == nil {
		t.Error("server without peers accepted")
	}
	if _, err := NewServer(ServerConfig{Peers: []PublicKey{k.Public()}}); err == nil {
		t.Error("server without key accepted")
	}
	// u = 1 is a point of small order: X25519 with it gives all zeros,
	// so every handshake would fail. It must be refused up front.
	var low PublicKey
	low[0] = 1
	if _, err := NewServer(ServerConfig{Key: k, Peers: []PublicKey{low}}); err == nil {
		t.Error("low-order peer key accepted")
	}
	srv := netip.MustParseAddrPort("127.0.0.1:1")
	for name, cfg := range map[string]ClientConfig{
		"no server":     {Key: k, ServerKey: k.Public()},
		"port 0":        {Server: netip.MustParseAddrPort("127.0.0.1:0"), Key: k, ServerKey: k.Public()},
		"no key":        {Server: srv, ServerKey: k.Public()},
		"no server key": {Server: srv, Key: k},
		"low order":     {Server: srv, Key: k, ServerKey: low},
	} {
		if _, err := NewClient(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
