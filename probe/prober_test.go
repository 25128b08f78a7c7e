//go:build linux

package probe

import (
	"context"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/internal/netnstest"
	"github.com/mpvpn/mpvpn/tunnel"
)

// testNet is a Responder serving on loopback and the keys to reach it.
type testNet struct {
	r         *Responder
	addr      netip.AddrPort
	serverKey tunnel.PrivateKey
	clientKey tunnel.PrivateKey
}

func startResponder(t *testing.T, network, addr string) *testNet {
	t.Helper()
	return startResponderWith(t, network, addr, ResponderConfig{})
}

// startResponderWith is startResponder with cfg's clock, horizon and
// bounds; the keys are the test's.
func startResponderWith(t *testing.T, network, addr string, cfg ResponderConfig) *testNet {
	t.Helper()
	tn := &testNet{serverKey: mustKey(t), clientKey: mustKey(t)}
	cfg.Key, cfg.Peers = tn.serverKey, []tunnel.PublicKey{tn.clientKey.Public()}
	r, err := NewResponder(cfg)
	if err != nil {
		t.Fatal(err)
	}
	tn.r = r
	pc, err := net.ListenPacket(network, addr)
	if err != nil {
		netnstest.CannotRun(t, "listen %s %s: %v", network, addr, err)
	}
	tn.addr = pc.LocalAddr().(*net.UDPAddr).AddrPort()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Serve(ctx, pc) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		pc.Close()
	})
	return tn
}

// changes records OnChange calls.
type changes struct {
	mu  sync.Mutex
	got []bool
	ch  chan bool
}

func newChanges() *changes { return &changes{ch: make(chan bool, 100)} }

func (c *changes) on(path string, alive bool) {
	c.mu.Lock()
	c.got = append(c.got, alive)
	c.mu.Unlock()
	c.ch <- alive
}

func (c *changes) list() []bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]bool(nil), c.got...)
}

// wait fails unless OnChange reports want within d.
func (c *changes) wait(t *testing.T, want bool, d time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	select {
	case got := <-c.ch:
		if got != want {
			t.Fatalf("OnChange(%v), want %v", got, want)
		}
		return time.Since(start)
	case <-time.After(d):
		t.Fatalf("no OnChange(%v) within %v", want, d)
	}
	return 0
}

func newProber(t *testing.T, cfg ProberConfig) *Prober {
	t.Helper()
	p, err := NewProber(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// waitStatus polls the only path's status until ok or the deadline.
func waitStatus(t *testing.T, p *Prober, d time.Duration, what string, ok func(PathStatus) bool) PathStatus {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		st := p.Status()
		if len(st) == 1 && ok(st[0]) {
			return st[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("not %s within %v: %+v", what, d, st)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestRoundTrip(t *testing.T) {
	tests := []struct {
		name, network, addr string
		mark                uint32
	}{
		{"IPv4", "udp4", "127.0.0.1:0", 0},
		{"IPv6", "udp6", "[::1]:0", 0},
		{"IPv4 marked", "udp4", "127.0.0.1:0", 0x6d70},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.mark != 0 && os.Geteuid() != 0 {
				netnstest.CannotRun(t, "SO_MARK needs CAP_NET_ADMIN")
			}
			tn := startResponder(t, tt.network, tt.addr)
			ch := newChanges()
			p := newProber(t, ProberConfig{
				Server: tn.addr, Key: tn.clientKey, ServerKey: tn.serverKey.Public(),
				Mark: tt.mark, OnChange: ch.on,
			})
			p.SetPath("lo", tn.addr.Addr())
			st := waitStatus(t, p, 5*time.Second, "alive", func(s PathStatus) bool { return s.Known && s.Alive && s.Received >= 3 })
			if st.RTT <= 0 || st.LastReply.IsZero() || st.Sent < st.Received || st.Name != "lo" || st.Src != tn.addr.Addr() || st.Errors != 0 {
				t.Errorf("status %+v", st)
			}
			if got := ch.list(); len(got) != 0 {
				t.Errorf("OnChange called %v for a path that was alive from the start", got)
			}
			if s := tn.r.Stats(); s.Replies == 0 || s.Replies != s.Requests {
				t.Errorf("responder stats %+v", s)
			}
		})
	}
}

// relay forwards datagrams between one client and the server, and drops
// everything while drop is set: carrier up, nothing gets through.
type relay struct {
	pc   *net.UDPConn
	drop atomic.Bool
}

func startRelay(t *testing.T, server netip.AddrPort) *relay {
	t.Helper()
	pc, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
	if err != nil {
		t.Fatal(err)
	}
	up, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
	if err != nil {
		t.Fatal(err)
	}
	rl := &relay{pc: pc}
	var client atomic.Pointer[netip.AddrPort]
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // client → server
		defer wg.Done()
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			client.Store(&from)
			if !rl.drop.Load() {
				up.WriteToUDPAddrPort(buf[:n], server)
			}
		}
	}()
	go func() { // server → client
		defer wg.Done()
		buf := make([]byte, 1500)
		for {
			n, _, err := up.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if c := client.Load(); c != nil && !rl.drop.Load() {
				pc.WriteToUDPAddrPort(buf[:n], *c)
			}
		}
	}()
	t.Cleanup(func() {
		pc.Close()
		up.Close()
		wg.Wait()
	})
	return rl
}

func (rl *relay) addr() netip.AddrPort { return rl.pc.LocalAddr().(*net.UDPAddr).AddrPort() }

func TestDeadAndBack(t *testing.T) {
	tn := startResponder(t, "udp4", "127.0.0.1:0")
	rl := startRelay(t, tn.addr)
	ch := newChanges()
	p := newProber(t, ProberConfig{
		Server: rl.addr(), Key: tn.clientKey, ServerKey: tn.serverKey.Public(), OnChange: ch.on,
	})
	p.SetPath("a", netip.MustParseAddr("127.0.0.1"))
	waitStatus(t, p, 5*time.Second, "alive", func(s PathStatus) bool { return s.Known && s.Alive })

	for round := range 2 {
		rl.drop.Store(true)
		took := ch.wait(t, false, 5*time.Second)
		t.Logf("round %d: dead after %v (DeadAfter %v, Interval %v)", round, took, DefaultDeadAfter, DefaultInterval)
		st := p.Status()[0]
		if !st.Known || st.Alive {
			t.Fatalf("after OnChange(false): %+v", st)
		}
		rl.drop.Store(false)
		took = ch.wait(t, true, 5*time.Second)
		t.Logf("round %d: alive again after %v", round, took)
		if st := p.Status()[0]; !st.Alive {
			t.Fatalf("after OnChange(true): %+v", st)
		}
	}
	if got := ch.list(); len(got) != 4 {
		t.Errorf("OnChange calls %v, want dead, alive, dead, alive", got)
	}
}

func TestWrongServerKey(t *testing.T) {
	tn := startResponder(t, "udp4", "127.0.0.1:0")
	ch := newChanges()
	p := newProber(t, ProberConfig{
		Server: tn.addr, Key: tn.clientKey, ServerKey: mustKey(t).Public(), OnChange: ch.on,
	})
	p.SetPath("a", tn.addr.Addr())
	ch.wait(t, false, 5*time.Second)
	time.Sleep(3 * DefaultInterval)
	st := p.Status()[0]
	if st.Alive || st.Received != 0 || st.Sent == 0 {
		t.Errorf("status %+v", st)
	}
	if s := tn.r.Stats(); s.Replies != 0 || s.UnknownID == 0 {
		t.Errorf("responder stats %+v: want only unknown ids", s)
	}
}

func TestUnknownClient(t *testing.T) {
	tn := startResponder(t, "udp4", "127.0.0.1:0")
	ch := newChanges()
	p := newProber(t, ProberConfig{
		Server: tn.addr, Key: mustKey(t), ServerKey: tn.serverKey.Public(), OnChange: ch.on,
	})
	p.SetPath("a", tn.addr.Addr())
	ch.wait(t, false, 5*time.Second)
	if s := tn.r.Stats(); s.Replies != 0 || s.UnknownID == 0 {
		t.Errorf("responder stats %+v: want only unknown ids", s)
	}
}

// A source that cannot be bound, or a send that fails, is a probe without
// a reply, once per interval: the path dies and the loop does not spin.
func TestErrorsDoNotSpin(t *testing.T) {
	tn := startResponder(t, "udp4", "127.0.0.1:0")
	tests := []struct {
		name string
		src  netip.Addr
	}{
		{"address not on this host", netip.MustParseAddr("192.0.2.1")}, // bind fails, nothing is sent
		{"wrong family", netip.MustParseAddr("::1")},                   // every send fails
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ch := newChanges()
			const interval = 20 * time.Millisecond
			p := newProber(t, ProberConfig{
				Server: tn.addr, Key: tn.clientKey, ServerKey: tn.serverKey.Public(),
				Interval: interval, DeadAfter: 4 * interval, OnChange: ch.on,
			})
			start := time.Now()
			p.SetPath("a", tt.src)
			ch.wait(t, false, 5*time.Second)
			time.Sleep(300 * time.Millisecond)
			st := p.Status()[0]
			limit := uint64(time.Since(start)/interval) + 2
			if st.Errors == 0 || st.Errors > limit || st.Sent != 0 || st.LastError == "" {
				t.Errorf("status %+v: want 1..%d errors, nothing sent", st, limit)
			}
			t.Logf("%d errors, last: %s", st.Errors, st.LastError)
		})
	}
}

func TestPathLifecycle(t *testing.T) {
	tn := startResponder(t, "udp4", "127.0.0.1:0")
	rl := startRelay(t, tn.addr)
	ch := newChanges()
	p := newProber(t, ProberConfig{
		Server: rl.addr(), Key: tn.clientKey, ServerKey: tn.serverKey.Public(), OnChange: ch.on,
	})
	lo1, lo2 := netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.2")
	p.SetPath("a", lo1)
	waitStatus(t, p, 5*time.Second, "alive", func(s PathStatus) bool { return s.Alive })
	p.SetPath("a", lo1) // no change: keeps its state
	if st := p.Status()[0]; !st.Known {
		t.Fatalf("SetPath with the same source reset the path: %+v", st)
	}

	// Dead on the old address; the first replies from the new address
	// bring it back, and the caller is told.
	rl.drop.Store(true)
	ch.wait(t, false, 5*time.Second)
	p.SetPath("a", lo2)
	if st := p.Status()[0]; st.Known || st.Src != lo2 {
		t.Fatalf("after a new source: %+v, want unknown from %v", st, lo2)
	}
	rl.drop.Store(false)
	ch.wait(t, true, 5*time.Second)

	p.RemovePath("a")
	p.RemovePath("a")
	if st := p.Status(); len(st) != 0 {
		t.Fatalf("after RemovePath: %+v", st)
	}
	p.Close()
	p.SetPath("b", lo1)
	if st := p.Status(); len(st) != 0 {
		t.Fatalf("SetPath after Close started %+v", st)
	}
	if got := ch.list(); len(got) != 2 {
		t.Errorf("OnChange calls %v, want dead, alive", got)
	}
}

func TestNewProberErrors(t *testing.T) {
	k, s := mustKey(t), mustKey(t).Public()
	srv := netip.MustParseAddrPort("127.0.0.1:7100")
	tests := []struct {
		name string
		cfg  ProberConfig
	}{
		{"no server", ProberConfig{Key: k, ServerKey: s}},
		{"port 0", ProberConfig{Server: netip.MustParseAddrPort("127.0.0.1:0"), Key: k, ServerKey: s}},
		{"no key", ProberConfig{Server: srv, ServerKey: s}},
		{"no server key", ProberConfig{Server: srv, Key: k}},
		{"low-order server key", ProberConfig{Server: srv, Key: k, ServerKey: tunnel.PublicKey{1}}},
		{"dead-after below two intervals", ProberConfig{Server: srv, Key: k, ServerKey: s, Interval: time.Second}},
		{"negative", ProberConfig{Server: srv, Key: k, ServerKey: s, AliveAfter: -1}},
	}
	for _, tt := range tests {
		if p, err := NewProber(tt.cfg); err == nil {
			p.Close()
			t.Errorf("%s: no error", tt.name)
		}
	}
}
