//go:build linux

package tunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flynn/noise"
)

// runPool runs c.RunPool until the test ends, and waits for it.
func runPool(t testing.TB, c *Client) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.RunPool(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("RunPool: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("RunPool did not return after cancel")
		}
	})
}

// gate is a ClientConfig.Source a test can turn off: with it off the pool
// has no uplink to dial over and stops refilling, so what a flow gets
// from the pool is decided by the test, not by a race with the refill.
type gate struct{ off atomic.Bool }

func (g *gate) source() netip.Addr {
	if g.off.Load() {
		return netip.Addr{}
	}
	return netip.MustParseAddr("127.0.0.1")
}

// echoOnce dials dst, sends a few bytes and checks they come back.
func echoOnce(t testing.TB, c *Client) error {
	t.Helper()
	fc, err := c.DialTCP(context.Background(), testDst)
	if err != nil {
		return err
	}
	defer fc.Close()
	if _, err := fc.Write([]byte("ping")); err != nil {
		return err
	}
	fc.CloseWrite()
	got, err := io.ReadAll(fc)
	if err != nil {
		return err
	}
	if string(got) != "ping" {
		t.Errorf("echo: %q", got)
	}
	return nil
}

// TestPool: a flow takes a pooled connection when one is ready and dials
// afresh when none is; either way the bytes arrive, and the server saw a
// request frame (not msg1) on the pooled ones.
func TestPool(t *testing.T) {
	ln := listenMPTCP(t, false)
	var g gate
	// The pool alone: a finished flow's connection is not put back
	// (TestReuse has that).
	p := newPair(t, ServerConfig{}, ClientConfig{Server: lnAddr(ln), PoolSize: 3, Source: g.source, NoReuse: true})
	var dsts atomic.Int64
	serve(t, p.srv, ln, func(ctx context.Context, f *Flow) {
		if f.Dst == testDst {
			dsts.Add(1)
		}
		echoAccept(ctx, f)
	})
	runPool(t, p.cli)
	waitFor(t, "the pool filled", func() bool { return p.cli.Stats().Pooled == 3 && p.srv.Stats().Pooled == 3 })
	g.off.Store(true)
	for i := range 5 {
		if err := echoOnce(t, p.cli); err != nil {
			t.Fatalf("flow %d: %v", i, err)
		}
	}
	cs := p.cli.Stats()
	if cs.PoolHits != 3 || cs.Connected != 5 || cs.Failures != 0 || cs.Pooled != 0 || cs.PoolGrow != 2 {
		t.Errorf("client stats %+v: want 3 flows from the pool, 2 fresh (the pool to grow by them), none failed", cs)
	}
	// The server keeps each finished flow's connection for a moment,
	// until it sees the client close it.
	waitFor(t, "the server holding nothing pooled", func() bool { return p.srv.Stats().Pooled == 0 })
	ss := p.srv.Stats()
	if ss.Flows != 5 || ss.Pooled != 0 || dsts.Load() != 5 {
		t.Errorf("server stats %+v, %d flows to the destination", ss, dsts.Load())
	}
	// Refill once an uplink is back, to the size plus what the two
	// flows that found none added.
	g.off.Store(false)
	waitFor(t, "the pool refilled", func() bool { return p.cli.Stats().Pooled == 5 })
	if err := echoOnce(t, p.cli); err != nil {
		t.Fatal(err)
	}
	if cs := p.cli.Stats(); cs.PoolHits != 4 {
		t.Errorf("after the refill: %d pool hits, want 4", cs.PoolHits)
	}
}

// TestPoolVerdicts: a refusal on a pooled connection comes back as the
// same VerdictError as on a fresh one, and services work from the pool.
func TestPoolVerdicts(t *testing.T) {
	ln := listenMPTCP(t, false)
	var g gate
	p := newPair(t, ServerConfig{}, ClientConfig{Server: lnAddr(ln), PoolSize: 2, Source: g.source})
	serve(t, p.srv, ln, func(ctx context.Context, f *Flow) {
		if f.Service == ServiceResolver {
			echoAccept(ctx, f)
			return
		}
		f.Refuse(NotAllowed)
	})
	runPool(t, p.cli)
	waitFor(t, "the pool filled", func() bool { return p.cli.Stats().Pooled == 2 })
	g.off.Store(true)
	_, err := p.cli.DialTCP(context.Background(), testDst)
	if ve, ok := errors.AsType[*VerdictError](err); !ok || ve.Verdict != NotAllowed || ve.Dst != testDst {
		t.Errorf("refused from the pool: %v", err)
	}
	fc, err := p.cli.DialService(context.Background(), ServiceResolver)
	if err != nil {
		t.Fatalf("service from the pool: %v", err)
	}
	fc.Close()
	if cs := p.cli.Stats(); cs.PoolHits != 2 || cs.Rejected != 1 || cs.Connected != 1 {
		t.Errorf("client stats %+v", cs)
	}
}

// TestPoolServerClosed: pooled connections the concentrator closed, at
// its PoolIdle or by restarting, are never handed to a flow: the flows
// that follow all connect, dialling afresh, and none fails.
func TestPoolServerClosed(t *testing.T) {
	t.Run("idle timeout", func(t *testing.T) {
		ln := listenMPTCP(t, false)
		var g gate
		p := newPair(t, ServerConfig{PoolIdle: 200 * time.Millisecond}, ClientConfig{Server: lnAddr(ln), PoolSize: 3, Source: g.source})
		serve(t, p.srv, ln, echoAccept)
		runPool(t, p.cli)
		waitFor(t, "the pool filled", func() bool { return p.cli.Stats().Pooled == 3 })
		g.off.Store(true)
		waitFor(t, "the server closed them", func() bool { return p.srv.Stats().PoolUnused >= 3 })
		for i := range 3 {
			if err := echoOnce(t, p.cli); err != nil {
				t.Fatalf("flow %d: %v", i, err)
			}
		}
		cs := p.cli.Stats()
		// The first flow dials afresh; the later ones may take the
		// connection it put back (reuse), never a stale one.
		if cs.Failures != 0 || cs.Connected != 3 || cs.PoolStale < 3 || cs.PoolHits > cs.PoolReused {
			t.Errorf("client stats %+v: want 3 stale pooled connections skipped, 3 flows connected, hits only on connections put back", cs)
		}
	})
	t.Run("restart", func(t *testing.T) {
		ln := listenMPTCP(t, false)
		addr := ln.Addr().String()
		var g gate
		p := newPair(t, ServerConfig{}, ClientConfig{Server: lnAddr(ln), PoolSize: 4, Source: g.source})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- p.srv.Serve(ctx, ln, echoAccept) }()
		runPool(t, p.cli)
		waitFor(t, "the pool filled", func() bool { return p.cli.Stats().Pooled == 4 })
		g.off.Store(true)
		// One flow open across the restart: the only one allowed to fail.
		open, err := p.cli.DialTCP(context.Background(), testDst)
		if err != nil {
			t.Fatal(err)
		}
		defer open.Close()
		cancel()
		if err := <-done; err != nil {
			t.Fatalf("Serve: %v", err)
		}
		ln2, err := Listen(context.Background(), addr, false)
		if err != nil {
			t.Fatalf("listen again on %s: %v", addr, err)
		}
		t.Cleanup(func() { ln2.Close() })
		srv2, err := NewServer(ServerConfig{Key: p.serverKey, Peers: []PublicKey{p.clientKey.Public()}})
		if err != nil {
			t.Fatal(err)
		}
		srv2.horizon = srv2.start.Add(-time.Hour)
		serve(t, srv2, ln2, echoAccept)
		if _, err := open.Read(make([]byte, 1)); err == nil {
			t.Error("the flow open across the restart still reads")
		}
		before := p.cli.Stats()
		for i := range 5 {
			if err := echoOnce(t, p.cli); err != nil {
				t.Fatalf("flow %d after the restart: %v", i, err)
			}
		}
		cs := p.cli.Stats()
		// Hits after the restart only on connections the flows after
		// it put back (reuse), none on the dead pool's.
		if cs.Failures != before.Failures || cs.Connected != before.Connected+5 || cs.PoolHits-before.PoolHits > cs.PoolReused-before.PoolReused {
			t.Errorf("after the restart: stats %+v (before %+v): want 5 flows connected, none from the dead pool, none failed", cs, before)
		}
		if cs.PoolStale < 3 {
			t.Errorf("%d stale pooled connections skipped, want the 3 left in the pool", cs.PoolStale)
		}
	})
}

// TestPoolGoneOnUse: a pooled connection that the concentrator closes
// between the liveness check and the request frame reports errPoolGone
// (open then dials afresh), never a failed flow or a verdict.
func TestPoolGoneOnUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		io.ReadFull(c, make([]byte, requestFrameSize))
		c.Close()
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	p := newPair(t, ServerConfig{}, ClientConfig{})
	key := [32]byte{1}
	cs := func() *noise.CipherState { return noise.UnsafeNewCipherState(cipherSuite, key, 0) }
	pc := &pooledConn{tc: raw.(*net.TCPConn), keys: transportKeys{send: cs(), recv: cs()}, born: time.Now()}
	if _, err := p.cli.usePooled(context.Background(), pc, target{dst: testDst}); !errors.Is(err, errPoolGone) {
		t.Fatalf("usePooled on a connection closed under it: %v, want errPoolGone", err)
	}
}

// TestPoolLimits: the concentrator caps pooled connections per peer (the
// client's pool backs off on Limited), and a replayed pool msg1 gets
// silence like any replay.
func TestPoolLimits(t *testing.T) {
	ln := listenMPTCP(t, false)
	p := newPair(t, ServerConfig{MaxPooledPerPeer: 2, HandshakeDeadline: 300 * time.Millisecond}, ClientConfig{Server: lnAddr(ln), PoolSize: 5})
	serve(t, p.srv, ln, echoAccept)
	runPool(t, p.cli)
	waitFor(t, "the cap answered", func() bool { return p.srv.Stats().PoolLimited >= 1 })
	if n := p.srv.Stats().Pooled; n > 2 {
		t.Errorf("%d pooled connections held for one peer, cap 2", n)
	}
	if n := p.cli.Stats().Pooled; n > 2 {
		t.Errorf("client pool holds %d, the server caps it at 2", n)
	}
	if err := echoOnce(t, p.cli); err != nil {
		t.Fatal(err)
	}

	_, m1, _, err := p.cli.msg1For(target{pool: true})
	if err != nil {
		t.Fatal(err)
	}
	send := func() int64 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write(m1)
		n, _ := io.CopyN(io.Discard, c, msg2Size)
		return n
	}
	first := send()
	before := p.srv.Stats().Replayed
	if n := send(); n != 0 {
		t.Errorf("a replayed pool msg1 got %d bytes back (the original got %d)", n, first)
	}
	if p.srv.Stats().Replayed != before+1 {
		t.Errorf("the replay was not counted as one")
	}
}

// A flow takes a pooled connection with nothing unacknowledged in flight
// over one still sending (whose next bytes the MPTCP scheduler would put
// on the other subflow), and the busy one only when no other is there.
func TestTakePooledPrefersIdle(t *testing.T) {
	busy, busyPeer := tcpPair(t)
	idle, _ := tcpPair(t)
	// The peer reads nothing: once its window is full, bytes stay
	// unacknowledged in busy's send queue.
	busy.SetWriteBuffer(1 << 20)
	busy.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
	busy.Write(make([]byte, 8<<20))
	busy.SetWriteDeadline(time.Time{})
	_ = busyPeer
	c := &Client{cfg: ClientConfig{PoolMaxAge: time.Minute}}
	c.pool.running = true
	c.pool.kick = make(chan struct{}, 1)
	now := time.Now()
	c.pool.ready = []*pooledConn{{tc: busy, born: now}, {tc: idle, born: now.Add(time.Millisecond)}}
	if pc := c.takePooled(); pc == nil || pc.tc != idle {
		t.Fatalf("took %v, want the idle connection", pc)
	}
	if pc := c.takePooled(); pc == nil || pc.tc != busy {
		t.Fatalf("took %v, want the busy one, the only one left", pc)
	}
	if pc := c.takePooled(); pc != nil {
		t.Fatalf("took %v from an empty pool", pc)
	}
}

// peekConn on every state a pooled connection can be in: nothing but an
// owed ready frame may wait on it, and one owing a ready frame that has
// not come in full is still sending (its last end-of-stream frame is
// unacknowledged until the ready frame's ACK).
func TestPeekConn(t *testing.T) {
	tests := []struct {
		name        string
		owes        bool
		peer        []byte // what the concentrator's end sent
		fin         bool   // and then its FIN
		wantAlive   bool
		wantSending bool
	}{
		{name: "nothing owed, nothing came", wantAlive: true},
		{name: "nothing owed, a byte came", peer: []byte{0}},
		{name: "nothing owed, FIN", fin: true},
		{name: "ready frame owed, not come", owes: true, wantAlive: true, wantSending: true},
		{name: "ready frame owed, part of it came", owes: true, peer: make([]byte, readyFrameSize-1), wantAlive: true, wantSending: true},
		{name: "ready frame owed and come", owes: true, peer: make([]byte, readyFrameSize), wantAlive: true},
		{name: "ready frame owed, more came", owes: true, peer: make([]byte, readyFrameSize+1)},
		{name: "ready frame owed, FIN", owes: true, fin: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, peer := tcpPair(t)
			if len(tt.peer) > 0 {
				if _, err := peer.Write(tt.peer); err != nil {
					t.Fatal(err)
				}
				waitFor(t, "the bytes arrived", func() bool { return inq(t, c) == len(tt.peer) })
			}
			if tt.fin {
				peer.CloseWrite()
				// Nothing else shows the FIN's arrival: wait for
				// peekConn to see it (waitFor fails the test if it
				// never does).
				waitFor(t, "the FIN seen", func() bool { alive, _ := peekConn(c, tt.owes); return !alive })
			}
			alive, sending := peekConn(c, tt.owes)
			if alive != tt.wantAlive || alive && sending != tt.wantSending {
				t.Errorf("alive %v, sending %v; want %v, %v", alive, sending, tt.wantAlive, tt.wantSending)
			}
			if got := inq(t, c); got != len(tt.peer) {
				t.Errorf("peekConn consumed bytes: %d left of %d", got, len(tt.peer))
			}
		})
	}
}

// The pool grows by one for each flow that finds no connection or only a
// busy one, up to twice PoolSize, shrinks by one for each that takes one
// idle past poolSlack, and is back at PoolSize's two after PoolLinger.
func TestPoolGrow(t *testing.T) {
	busy, busyPeer := tcpPair(t)
	busy.SetWriteBuffer(1 << 20)
	busy.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
	busy.Write(make([]byte, 8<<20)) // the peer reads nothing: unacknowledged
	busy.SetWriteDeadline(time.Time{})
	_ = busyPeer
	c := &Client{cfg: ClientConfig{PoolSize: 2, PoolMaxAge: time.Minute, PoolLinger: time.Hour}}
	c.pool.running = true
	c.pool.kick = make(chan struct{}, 1)
	now := time.Now()
	idleConn := func(idle time.Time) *pooledConn {
		tc, _ := tcpPair(t)
		return &pooledConn{tc: tc, born: now, idle: idle}
	}
	steps := []struct {
		name     string
		ready    []*pooledConn
		wantGrow int
	}{
		{name: "empty pool", wantGrow: 1},
		{name: "only a busy one", ready: []*pooledConn{{tc: busy, born: now, idle: now}}, wantGrow: 2},
		{name: "empty again, at the cap", wantGrow: 2},
		{name: "an idle one, just put back", ready: []*pooledConn{idleConn(time.Now())}, wantGrow: 2},
		{name: "an idle one, waiting past poolSlack", ready: []*pooledConn{idleConn(now.Add(-2 * poolSlack))}, wantGrow: 1},
		{name: "again", ready: []*pooledConn{idleConn(now.Add(-2 * poolSlack))}, wantGrow: 0},
		{name: "again, at zero", ready: []*pooledConn{idleConn(now.Add(-2 * poolSlack))}, wantGrow: 0},
		{name: "empty once more", wantGrow: 1},
	}
	for _, s := range steps {
		c.pool.ready = s.ready
		c.takePooled()
		c.pool.mu.Lock()
		grow, target := c.pool.grow, c.poolTarget(time.Now())
		c.pool.mu.Unlock()
		if grow != s.wantGrow || target != 2+s.wantGrow {
			t.Fatalf("%s: grow %d, target %d; want %d, %d", s.name, grow, target, s.wantGrow, 2+s.wantGrow)
		}
	}
	c.pool.mu.Lock()
	defer c.pool.mu.Unlock()
	c.pool.lastUse = time.Now().Add(-2 * time.Hour)
	if target := c.poolTarget(time.Now()); target != poolIdleSize || c.pool.grow != 0 {
		t.Fatalf("after PoolLinger: target %d, grow %d; want %d, 0", target, c.pool.grow, poolIdleSize)
	}
}
