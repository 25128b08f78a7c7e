//go:build linux

package probe

import (
	"net/netip"
	"sync/atomic"
	"testing"
	"time"
)

// TestIdleBackoff: with no flow open (Busy false) a path sends a
// bounded number of probes over a window, at most one per IdleInterval
// (and one to start); the moment a flow opens it probes at Interval
// again, and a path that went dark while idle is found dead, from the
// busy cadence's silence counted from then, without a false verdict
// while it was alive.
func TestIdleBackoff(t *testing.T) {
	const (
		interval = 20 * time.Millisecond
		idle     = 200 * time.Millisecond
		window   = time.Second
	)
	tn := startResponder(t, "udp4", "127.0.0.1:0")
	rl := startRelay(t, tn.addr)
	ch := newChanges()
	var busy atomic.Bool
	p := newProber(t, ProberConfig{
		Server: rl.addr(), Key: tn.clientKey, ServerKey: tn.serverKey.Public(), OnChange: ch.on,
		Interval: interval, DeadAfter: 3 * interval, IdleInterval: idle, Busy: busy.Load,
	})
	p.SetPath("a", netip.MustParseAddr("127.0.0.1"))
	waitStatus(t, p, 5*time.Second, "alive", func(s PathStatus) bool { return s.Known && s.Alive })

	count := func(d time.Duration) uint64 {
		before := p.Status()[0].Sent
		time.Sleep(d)
		return p.Status()[0].Sent - before
	}
	if n, most := count(window), uint64(window/idle)+1; n > most {
		t.Errorf("idle: %d probes in %v, want at most %d (one per %v)", n, window, most, idle)
	}
	busy.Store(true)
	if n, least := count(window), uint64(window/interval)/2; n < least {
		t.Errorf("busy: %d probes in %v, want at least %d (one per %v)", n, window, least, interval)
	}
	if got := ch.list(); len(got) != 0 {
		t.Fatalf("OnChange %v while the path answered all along", got)
	}

	// Dark while idle, then a flow opens: found dead at the busy
	// cadence, then back once it answers.
	busy.Store(false)
	time.Sleep(2 * idle)
	rl.drop.Store(true)
	time.Sleep(idle / 2)
	busy.Store(true)
	ch.wait(t, false, 5*time.Second)
	rl.drop.Store(false)
	ch.wait(t, true, 5*time.Second)

	// Idle and dark: found dead too, after three idle intervals.
	busy.Store(false)
	time.Sleep(2 * idle)
	rl.drop.Store(true)
	ch.wait(t, false, 5*time.Second)
	if st := p.Status()[0]; st.Alive {
		t.Errorf("after OnChange(false): %+v", st)
	}
}
