//go:build linux

package tunnel

import (
	"context"
	"errors"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

// twoPeers is a server that lists two clients, A and B.
func twoPeers(t *testing.T, scfg ServerConfig, ccfg ClientConfig) (srv *Server, a, b *Client) {
	t.Helper()
	p := newPair(t, scfg, ccfg) // the server lists A
	ka, kb := p.clientKey, mustKey(t)
	scfg.Key = p.serverKey
	scfg.Peers = []PublicKey{ka.Public(), kb.Public()}
	srv, err := NewServer(scfg)
	if err != nil {
		t.Fatal(err)
	}
	srv.horizon = srv.start.Add(-time.Hour)
	if !ccfg.Server.IsValid() {
		ccfg.Server = netip.MustParseAddrPort("127.0.0.1:9")
	}
	ccfg.ServerKey = p.serverKey.Public()
	ccfg.Key = ka
	if a, err = NewClient(ccfg); err != nil {
		t.Fatal(err)
	}
	ccfg.Key = kb
	if b, err = NewClient(ccfg); err != nil {
		t.Fatal(err)
	}
	return srv, a, b
}

// TestPeerFloodIsolation (issue 8, item 3): one peer's handshakes, however
// many, never refuse another peer's. A peer that fills its replay cache
// (stamping as far ahead as the server allows, so its entries live
// longest) refuses only itself; stamps further ahead are refused before
// they reach any cache; a peer over its handshake rate gets Limited while
// the other's flows go through.
func TestPeerFloodIsolation(t *testing.T) {
	t.Run("replay cache", func(t *testing.T) {
		srv, a, b := twoPeers(t, ServerConfig{}, ClientConfig{})
		const capA = 64
		pa := srv.peers[a.cfg.Key.Public()]
		pa.replay = newReplayCache(capA)
		ahead := func() time.Time { return srv.Now().Add(srv.cfg.FutureSkew) }
		a.now = ahead
		for i := range capA + 100 {
			_, m1, err := a.msg1(testDst)
			if err != nil {
				t.Fatal(err)
			}
			pf, why := srv.checkMsg1(m1)
			if i < capA && pf == nil {
				t.Fatalf("A's handshake %d refused (%s) before its cache was full", i, why)
			}
			if i >= capA && why != rejectReplayFull {
				t.Fatalf("A's handshake %d: %v %s, want its replay cache full", i, pf != nil, why)
			}
		}
		// Stamps beyond FutureSkew never reach a cache.
		a.now = func() time.Time { return srv.Now().Add(30 * time.Second) }
		before := srv.peers[b.cfg.Key.Public()].replay.len()
		for range 100 {
			_, m1, _ := a.msg1(testDst)
			if pf, why := srv.checkMsg1(m1); pf != nil || why != rejectTime {
				t.Fatalf("A stamping +30s: %v %s, want the timestamp refused", pf != nil, why)
			}
		}
		for i := range 100 {
			_, m1, _ := b.msg1(testDst)
			if pf, why := srv.checkMsg1(m1); pf == nil {
				t.Fatalf("B's handshake %d refused (%s) while A flooded", i, why)
			}
		}
		if n := srv.peers[b.cfg.Key.Public()].replay.len(); n != before+100 {
			t.Errorf("B's cache holds %d entries, want %d: A's flood must not touch it", n, before+100)
		}
		if pa.full.Load() != 100 {
			t.Errorf("A's ReplayFull = %d, want 100", pa.full.Load())
		}
	})
	t.Run("handshake rate", func(t *testing.T) {
		ln := listenMPTCP(t, false)
		srv, a, b := twoPeers(t, ServerConfig{PeerHandshakeRate: 1, PeerHandshakeBurst: 3}, ClientConfig{Server: lnAddr(ln)})
		serve(t, srv, ln, echoAccept)
		var limited int
		for range 10 {
			c, err := a.DialTCP(context.Background(), testDst)
			if err == nil {
				c.Close()
				continue
			}
			if ve, ok := errors.AsType[*VerdictError](err); !ok || ve.Verdict != Limited || !errors.Is(err, syscall.EAGAIN) {
				t.Fatalf("A over its rate: %v, want Limited", err)
			}
			limited++
		}
		if limited < 6 {
			t.Fatalf("A got %d of 10 flows refused at 1/s with a burst of 3, want at least 6", limited)
		}
		for i := range 3 {
			c, err := b.DialTCP(context.Background(), testDst)
			if err != nil {
				t.Fatalf("B's flow %d while A is over its rate: %v", i, err)
			}
			c.Close()
		}
		st := srv.Stats()
		if st.RateLimited != uint64(limited) {
			t.Errorf("RateLimited = %d, want %d", st.RateLimited, limited)
		}
		for _, ps := range srv.PeerStats() {
			want := uint64(0)
			if ps.Key == a.cfg.Key.Public() {
				want = uint64(limited)
			}
			if ps.Limited != want {
				t.Errorf("peer %s: Limited = %d, want %d", ps.Key, ps.Limited, want)
			}
		}
	})
	t.Run("server's flow cap", func(t *testing.T) {
		ln := listenMPTCP(t, false)
		srv, a, b := twoPeers(t, ServerConfig{MaxFlows: 2}, ClientConfig{Server: lnAddr(ln)})
		serve(t, srv, ln, echoAccept)
		for range 2 {
			c, err := a.DialTCP(context.Background(), testDst)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
		}
		_, err := b.DialTCP(context.Background(), testDst)
		if ve, ok := errors.AsType[*VerdictError](err); !ok || ve.Verdict != Limited {
			t.Fatalf("a third flow over MaxFlows=2: %v, want Limited", err)
		}
		if st := srv.Stats(); st.Full != 1 {
			t.Errorf("Full = %d, want 1", st.Full)
		}
	})
}

// TestReplayAcrossRestart (issue 8, item 2): a msg1 stamped as far ahead
// as a server accepts, recorded and accepted once, is refused by the
// next run of the server however soon it starts; a client stamping in
// the new run's clock, past its horizon, connects at once.
func TestReplayAcrossRestart(t *testing.T) {
	p := newPair(t, ServerConfig{}, ClientConfig{})
	first := p.srv
	first.horizon = first.start.Add(-time.Hour)
	p.cli.now = func() time.Time { return first.Now().Add(first.cfg.FutureSkew) }
	_, m1, err := p.cli.msg1(testDst)
	if err != nil {
		t.Fatal(err)
	}
	if pf, why := first.checkMsg1(m1); pf == nil {
		t.Fatalf("the first run refused the original: %s", why)
	}
	// The restart: same keys, a new process (so a new start and an empty
	// cache), as soon as can be.
	second, err := NewServer(ServerConfig{Key: p.serverKey, Peers: []PublicKey{p.clientKey.Public()}})
	if err != nil {
		t.Fatal(err)
	}
	if pf, why := second.checkMsg1(m1); pf != nil || why != rejectTime {
		t.Fatalf("the recorded msg1 after a restart: %v %s, want refused by the horizon", pf != nil, why)
	}
	// What a client that learned the new horizon stamps.
	p.cli.now = func() time.Time { return second.Horizon().Add(time.Microsecond) }
	_, fresh, _ := p.cli.msg1(testDst)
	if pf, why := second.checkMsg1(fresh); pf == nil {
		t.Fatalf("a client stamping past the new horizon was refused: %s", why)
	}
}
