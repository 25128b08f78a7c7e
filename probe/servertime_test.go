//go:build linux

package probe

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/internal/netnstest"
	"github.com/mpvpn/mpvpn/tunnel"
)

func TestServerClock(t *testing.T) {
	const (
		S = int64(1_800_000_000 * time.Second) // the server's clock at the first sample
		H = S - int64(time.Hour)               // a horizon in the past
	)
	type sample struct {
		at              time.Duration // received, after base
		server, horizon int64
	}
	tests := []struct {
		name    string
		samples []sample
		query   time.Duration
		want    int64 // the server's clock, as estimated
		ok      bool
	}{
		{"no sample", nil, time.Second, 0, false},
		{"one sample, two seconds on", []sample{{time.Second, S, 0}}, 3 * time.Second, S + int64(2*time.Second), true},
		{
			// The second reply took 5 ms longer on its way: the
			// first one's estimate is closer, and is the larger.
			"the shortest delay wins",
			[]sample{{time.Second, S, 0}, {2 * time.Second, S + int64(time.Second-5*time.Millisecond), 0}},
			3 * time.Second, S + int64(2*time.Second), true,
		},
		{
			"a sample beyond the window no longer counts",
			[]sample{{time.Second, S, 0}, {15 * time.Second, S + int64(14*time.Second-5*time.Millisecond), 0}},
			16 * time.Second, S + int64(15*time.Second-5*time.Millisecond), true,
		},
		{
			"within the window it still does",
			[]sample{{time.Second, S, 0}, {9 * time.Second, S + int64(8*time.Second-5*time.Millisecond), 0}},
			10 * time.Second, S + int64(9*time.Second), true,
		},
		{"the latest sample counts for a minute", []sample{{time.Second, S, 0}}, 60 * time.Second, S + int64(59*time.Second), true},
		{"and no more", []sample{{time.Second, S, 0}}, 62 * time.Second, 0, false},
		{"a horizon in the past changes nothing", []sample{{time.Second, S, H}}, 2 * time.Second, S + int64(time.Second), true},
		{
			"clamped just past a horizon ahead",
			[]sample{{time.Second, S, S + int64(5*time.Second)}},
			2 * time.Second, S + int64(5*time.Second+time.Microsecond), true,
		},
		{
			"the horizon is the latest reply's",
			[]sample{{time.Second, S, S + int64(5*time.Second)}, {2 * time.Second, S + int64(time.Second), H}},
			3 * time.Second, S + int64(2*time.Second), true,
		},
		{
			// The concentrator restarted with a clock 20 s behind
			// its old one: the old samples must not carry the
			// estimate ahead of the new clock.
			"a restart forgets the old clock",
			[]sample{{time.Second, S + int64(20*time.Second), H}, {2 * time.Second, S + int64(time.Second), H + 1}},
			3 * time.Second, S + int64(2*time.Second), true,
		},
		{
			"a late reply from before the restart is ignored",
			[]sample{
				{time.Second, S + int64(20*time.Second), H},
				{2 * time.Second, S + int64(time.Second), H + 1},
				{2*time.Second - time.Millisecond, S + int64(21*time.Second), H},
			},
			3 * time.Second, S + int64(2*time.Second), true,
		},
	}
	base := time.Now()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := serverClock{base: base}
			for _, s := range tt.samples {
				c.add(s.server, s.horizon, base.Add(s.at))
			}
			got, _, ok := c.at(base.Add(tt.query))
			if ok != tt.ok || got != tt.want {
				t.Errorf("at(%v) = %v, %v; want %v, %v", tt.query, got-S, ok, tt.want-S, tt.ok)
			}
		})
	}
}

// serverAt is a server clock offset from this host's by a fixed amount.
type serverAt time.Duration

func (o serverAt) now() time.Time { return time.Now().Add(time.Duration(o)) }

// restartable is a concentrator's responder that can be restarted on its
// socket, each time a new Responder (empty replay windows) with its own
// clock and horizon, as a new process would have.
type restartable struct {
	t                    *testing.T
	pc                   net.PacketConn
	serverKey, clientKey tunnel.PrivateKey
	stop                 func()
}

func startRestartable(t *testing.T) *restartable {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		netnstest.CannotRun(t, "listen: %v", err)
	}
	rs := &restartable{t: t, pc: pc, serverKey: mustKey(t), clientKey: mustKey(t), stop: func() {}}
	t.Cleanup(func() {
		rs.stop()
		pc.Close()
	})
	return rs
}

func (rs *restartable) addr() netip.AddrPort { return rs.pc.LocalAddr().(*net.UDPAddr).AddrPort() }

// start stops the running responder, if any, and starts one whose clock
// is clock and whose horizon is horizon.
func (rs *restartable) start(clock serverAt, horizon time.Time) {
	rs.t.Helper()
	rs.stop()
	r, err := NewResponder(ResponderConfig{
		Key: rs.serverKey, Peers: []tunnel.PublicKey{rs.clientKey.Public()},
		Now: clock.now, Horizon: func() time.Time { return horizon },
	})
	if err != nil {
		rs.t.Fatal(err)
	}
	rs.pc.SetReadDeadline(time.Time{}) // the last Serve left a past one, to wake its read
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Serve(ctx, rs.pc) }()
	rs.stop = func() {
		cancel()
		if err := <-done; err != nil {
			rs.t.Errorf("Serve: %v", err)
		}
		rs.stop = func() {}
	}
}

// checkServerNow samples ServerNow for a while: it must never be ahead of
// the server's clock, and behind by no more than slack plus a round trip.
func checkServerNow(t *testing.T, p *Prober, clock serverAt, slack time.Duration) {
	t.Helper()
	var worst time.Duration
	for range 20 {
		before := clock.now()
		got, ok := p.ServerNow()
		after := clock.now()
		if !ok {
			t.Fatal("ServerNow: no estimate")
		}
		if got.After(after) {
			t.Fatalf("ServerNow is %v ahead of the server's clock", got.Sub(after))
		}
		rtt := p.Status()[0].RTT
		lag := before.Sub(got)
		if lag > rtt+slack {
			t.Fatalf("ServerNow is %v behind the server's clock (RTT %v)", lag, rtt)
		}
		worst = max(worst, lag)
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("ServerNow at most %v behind the server's clock (RTT %v)", worst, p.Status()[0].RTT)
}

// waitHorizon waits for a reply that carries h.
func waitHorizon(t *testing.T, p *Prober, h time.Time) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !p.ServerHorizon().Equal(h) {
		if time.Now().After(deadline) {
			t.Fatalf("horizon %v, want %v", p.ServerHorizon(), h)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// The server's clock as the replies tell it, whatever this host's clock
// says: ±30 s (the clock error a client must survive) and ±59 s, just
// within MaxSkew (beyond it, nothing is answered).
func TestServerNow(t *testing.T) {
	// Loopback's RTT is tens of microseconds, but the race detector
	// and a loaded machine can hold a goroutine for a while.
	const slack = 50 * time.Millisecond
	for _, offset := range []time.Duration{-59 * time.Second, -30 * time.Second, 0, 30 * time.Second, 59 * time.Second} {
		t.Run(offset.String(), func(t *testing.T) {
			clock := serverAt(offset)
			tn := startResponderWith(t, "udp4", "127.0.0.1:0", ResponderConfig{Now: clock.now})
			p := newProber(t, ProberConfig{Server: tn.addr, Key: tn.clientKey, ServerKey: tn.serverKey.Public()})
			if got, ok := p.ServerNow(); ok {
				t.Fatalf("ServerNow before any reply = %v, true", got)
			}
			if h := p.ServerHorizon(); !h.IsZero() {
				t.Fatalf("ServerHorizon before any reply = %v", h)
			}
			p.SetPath("lo", tn.addr.Addr())
			waitStatus(t, p, 5*time.Second, "answered", func(s PathStatus) bool { return s.Received >= 3 })
			checkServerNow(t, p, clock, slack)
			if h := p.ServerHorizon(); !h.IsZero() {
				t.Errorf("ServerHorizon = %v, want none", h)
			}
		})
	}
}

// A concentrator restart moves the horizon, and maybe its clock back: the
// next reply moves ServerNow past the new horizon at once, and nothing of
// the old clock remains.
func TestServerNowAfterRestart(t *testing.T) {
	const slack = 50 * time.Millisecond
	rs := startRestartable(t)
	clock := serverAt(20 * time.Second)
	h := clock.now().Add(-time.Hour)
	rs.start(clock, h)
	p := newProber(t, ProberConfig{Server: rs.addr(), Key: rs.clientKey, ServerKey: rs.serverKey.Public()})
	p.SetPath("lo", rs.addr().Addr())
	waitHorizon(t, p, h)
	checkServerNow(t, p, clock, slack)

	// Restarted on the host's clock, with a horizon 2 s ahead of it
	// (its start plus a tolerance): ServerNow is just past the horizon.
	clock = 0
	h = clock.now().Add(2 * time.Second)
	rs.start(clock, h)
	waitHorizon(t, p, h)
	if got, ok := p.ServerNow(); !ok || !got.Equal(h.Add(time.Microsecond)) {
		t.Errorf("ServerNow = %v, %v; want the horizon %v + 1µs", got, ok, h)
	}

	// Restarted with a clock 30 s behind the first one's, and a horizon
	// in its past: the first one's samples are forgotten.
	clock = serverAt(-10 * time.Second)
	h = clock.now().Add(-time.Second)
	rs.start(clock, h)
	waitHorizon(t, p, h)
	checkServerNow(t, p, clock, slack)
}

// No reply, no estimate.
func TestServerNowUnanswered(t *testing.T) {
	tn := startResponder(t, "udp4", "127.0.0.1:0")
	ch := newChanges()
	p := newProber(t, ProberConfig{
		Server: tn.addr, Key: tn.clientKey, ServerKey: mustKey(t).Public(), OnChange: ch.on,
	})
	p.SetPath("a", netip.MustParseAddr("127.0.0.1"))
	ch.wait(t, false, 5*time.Second)
	if got, ok := p.ServerNow(); ok {
		t.Errorf("ServerNow with every request refused = %v, true", got)
	}
}
