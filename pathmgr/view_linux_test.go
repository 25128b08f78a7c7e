package pathmgr

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

// Every new flow asks PreferredSource, so no reader may wait while Run is
// in the middle of a pass: neither while it reads the host (the dumps,
// which a big routing table makes slow) nor while it holds the lock to
// make its changes. Each case stops Run at one of those points and calls,
// meanwhile, everything that other goroutines call.
func TestReadsDoNotWaitOnRun(t *testing.T) {
	tests := []struct {
		phase string
		// wantLocked: whether mu is held at that point. Reading the
		// host must not hold it; making the changes does, which shows
		// that readers never take it.
		wantLocked bool
		hook       func(h *hooks, f func())
	}{
		{"reading the host", false, func(h *hooks, f func()) { h.observing = f }},
		{"applying with the lock held", true, func(h *hooks, f func()) { h.applying = f }},
	}
	for _, tt := range tests {
		t.Run(tt.phase, func(t *testing.T) {
			withNetns(t, func() {
				t.Cleanup(func() { goleak.VerifyNone(t) })
				twoUplinks(t)
				var armed atomic.Bool
				entered := make(chan struct{})
				release := make(chan struct{})
				var once sync.Once
				unblock := func() { once.Do(func() { close(release) }) }
				m, _ := runningWith(t, Config{Uplinks: []UplinkConfig{{Name: "wan0"}, {Name: "wan1"}}}, func(m *Manager) {
					tt.hook(&m.hooks, func() {
						if !armed.CompareAndSwap(true, false) {
							return
						}
						locked := !m.mu.TryLock()
						if !locked {
							m.mu.Unlock()
						}
						if locked != tt.wantLocked {
							t.Errorf("%s: mu held = %v, want %v", tt.phase, locked, tt.wantLocked)
						}
						close(entered)
						<-release
					})
				})
				// Registered after runningWith, so it runs before Run is
				// stopped and waited for.
				t.Cleanup(unblock)
				waitState(t, m, "wan0", StateUp)
				waitState(t, m, "wan1", StateUp)
				wan0 := mustAddr("192.0.2.2")

				armed.Store(true)
				m.SetReachable("wan1", false) // a pass at once
				select {
				case <-entered:
				case <-time.After(10 * time.Second):
					t.Fatalf("Run never got to %s", tt.phase)
				}

				// Run is stuck mid-pass. (Which pass does not matter, nor
				// whether wan1's verdict is in the view yet: wan0 is up in
				// every view there is.)
				calls := []struct {
					name string
					call func() error
				}{
					{"PreferredSource", func() error {
						if got := m.PreferredSource(); got != wan0 {
							return fmt.Errorf("got %s, want %s", got, wan0)
						}
						return nil
					}},
					{"Status", func() error {
						st := m.Status()
						if len(st) != 2 || st[0].State != StateUp || st[0].Addr != wan0 {
							return fmt.Errorf("got %+v, want wan0 up", st)
						}
						return nil
					}},
					{"Uplinks", func() error {
						if ups := m.Uplinks(); len(ups) != 2 || ups[0].Addr != wan0 {
							return fmt.Errorf("got %+v", ups)
						}
						return nil
					}},
					{"Changes", func() error { m.Changes(); return nil }},
					// The prober's goroutine: its verdicts must not queue
					// behind Run either.
					{"SetReachable", func() error {
						m.SetReachable("wan0", false)
						m.SetReachable("wan0", true)
						return nil
					}},
				}
				for _, c := range calls {
					done := make(chan error, 1)
					go func() { done <- c.call() }()
					select {
					case err := <-done:
						if err != nil {
							t.Errorf("%s while Run is %s: %v", c.name, tt.phase, err)
						}
					case <-time.After(2 * time.Second):
						unblock()
						<-done
						t.Fatalf("%s waited while Run was %s", c.name, tt.phase)
					}
				}

				// Let Run go: the pass it was in carries on.
				unblock()
				waitState(t, m, "wan1", StateWithdrawn)
				waitState(t, m, "wan0", StateUp)
				if got := m.PreferredSource(); got != wan0 {
					t.Errorf("after the pass: preferred source %s, want %s", got, wan0)
				}
				m.SetReachable("wan1", true)
				waitState(t, m, "wan1", StateUp)
			})
		})
	}
}

// Readers on several goroutines, a prober flipping its verdict and Run
// following a busy host (a big main table; wan1's carrier, address and
// gateway coming and going) all at once: run with -race. Every view a
// reader gets must be one Run finished, never one half-applied.
func TestConcurrentReadersWhileRunning(t *testing.T) {
	withNetns(t, func() {
		t.Cleanup(func() { goleak.VerifyNone(t) })
		twoUplinks(t)
		bigMainTable(t, 4000)
		var passes atomic.Uint64
		m, _ := runningWith(t, Config{Uplinks: []UplinkConfig{{Name: "wan0"}, {Name: "wan1"}}}, func(m *Manager) {
			m.hooks.observing = func() { passes.Add(1) }
		})
		waitState(t, m, "wan0", StateUp)
		waitState(t, m, "wan1", StateUp)
		wan0 := mustAddr("192.0.2.2")
		passes.Store(0)

		stop := make(chan struct{})
		var wg sync.WaitGroup
		var reads atomic.Uint64
		var slowest atomic.Int64 // ns, of one PreferredSource
		readers := max(4, runtime.GOMAXPROCS(0))
		for range readers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var lastChanges uint64
				for {
					select {
					case <-stop:
						return
					default:
					}
					t0 := time.Now()
					src := m.PreferredSource()
					if d := int64(time.Since(t0)); d > slowest.Load() {
						slowest.Store(d) // racy maximum; it is only logged
					}
					if src != wan0 {
						t.Errorf("preferred source %s, want wan0's %s (wan0 is never touched)", src, wan0)
						return
					}
					if err := checkView(m.Status()); err != nil {
						t.Error(err)
						return
					}
					if ups := m.Uplinks(); len(ups) != 2 || ups[0].Name != "wan0" || ups[1].Name != "wan1" {
						t.Errorf("Uplinks() = %+v", ups)
						return
					}
					c := m.Changes()
					if c < lastChanges {
						t.Errorf("Changes went back from %d to %d", lastChanges, c)
						return
					}
					lastChanges = c
					reads.Add(1)
					// Busy, but not so greedy that Run and the prober
					// only get the CPU when a reader is preempted.
					runtime.Gosched()
				}
			}()
		}
		wg.Add(1)
		go func() { // the prober
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				case <-time.After(3 * time.Millisecond):
				}
				m.SetReachable("wan1", i%2 == 1)
			}
		}()

		// The host, on this goroutine: it is the one in the namespace.
		// For at least two seconds and enough of Run's passes to overlap
		// the readers many times; on a loaded machine a pass over the
		// big table can take a few hundred milliseconds.
		const minPasses = 20
		t0 := time.Now()
		for i := 0; time.Since(t0) < 2*time.Second || passes.Load() < minPasses; i++ {
			if time.Since(t0) > time.Minute {
				close(stop)
				wg.Wait()
				t.Fatalf("Run made only %d passes in a minute", passes.Load())
			}
			switch i % 3 {
			case 0:
				setLink(t, "wan1p", false)
				time.Sleep(10 * time.Millisecond)
				setLink(t, "wan1p", true)
			case 1:
				addrOp(t, "wan1", "100.64.0.2/24", false)
				time.Sleep(10 * time.Millisecond)
				addrOp(t, "wan1", "100.64.0.2/24", true)
				defaultBack(t, "wan1", "100.64.0.1", 200)
			case 2:
				delDefault(t, "wan1")
				time.Sleep(10 * time.Millisecond)
				defaultBack(t, "wan1", "100.64.0.1", 200)
			}
			time.Sleep(10 * time.Millisecond)
		}
		close(stop)
		wg.Wait()
		t.Logf("%d reads on %d goroutines during %d passes of Run; slowest PreferredSource %v; %d netlink changes",
			reads.Load(), readers, passes.Load(), time.Duration(slowest.Load()), m.Changes())
		if reads.Load() == 0 {
			t.Fatal("no reads")
		}

		// Quiet again, and the probe happy: wan1 comes back (once the
		// damper lets it) with everything in place.
		m.SetReachable("wan1", true)
		// Events of the storm may still be queued, and the damper may
		// hold wan1 back once more: what must hold is that it settles up
		// with everything in place, within a few resyncs.
		deadline := time.Now().Add(15 * time.Second)
		for {
			s := waitState(t, m, "wan1", StateUp)
			if endpointOn(t, s.Addr) && ruleFrom(t, s.Addr) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("wan1 up without its endpoint or rule for 15 s: %+v", s)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err := checkView(m.Status()); err != nil {
			t.Error(err)
		}
	})
}

// checkView reports what is wrong with a view a reader got: each state
// must come with what goes with it once Run has finished with an uplink.
func checkView(st []Status) error {
	if len(st) != 2 || st[0].Name != "wan0" || st[1].Name != "wan1" {
		return fmt.Errorf("status %+v: want wan0 and wan1", st)
	}
	if st[0].State != StateUp || st[0].Addr != mustAddr("192.0.2.2") {
		return fmt.Errorf("wan0 %+v: want up on 192.0.2.2 throughout", st[0])
	}
	for _, s := range st {
		var bad bool
		switch s.State {
		case StateUp:
			bad = !s.Addr.IsValid() || s.EndpointID == 0 || s.Reason != ""
		case StateWithdrawn:
			bad = s.EndpointID != 0 || s.Reason == ""
		case StateDown:
			bad = s.Addr.IsValid() || s.EndpointID != 0 || s.Reason == ""
		default:
			bad = true
		}
		if bad {
			return fmt.Errorf("inconsistent view of %s: %+v", s.Name, s)
		}
	}
	return nil
}

// bigMainTable gives main n more routes, on an interface that is no
// uplink, so that every dump Run makes takes a while, as on a router.
func bigMainTable(t *testing.T, n int) {
	t.Helper()
	lan := addLink(t, "lan0", "10.255.255.1/24")
	for i := range n {
		r := &netlink.Route{
			LinkIndex: lan.Attrs().Index,
			Dst:       &net.IPNet{IP: net.IPv4(10, byte(i>>8), byte(i), 0).To4(), Mask: net.CIDRMask(24, 32)},
			Scope:     netlink.SCOPE_LINK,
			Protocol:  unix.RTPROT_STATIC,
		}
		if err := netlink.RouteAdd(r); err != nil {
			t.Fatalf("route %d of %d: %v", i, n, err)
		}
	}
}

// Readers see what was last published, and only that: a caller that
// changes what it got changes nothing for the next one, and a change of
// the state shows once it is published.
func TestPublishedView(t *testing.T) {
	if got := (&Manager{}).Status(); len(got) != 0 {
		t.Errorf("nothing published yet: Status() = %+v", got)
	}
	m := &Manager{uplinks: []*uplinkState{
		{Uplink: Uplink{Name: "wan0", Addr: mustAddr("192.0.2.2")}, state: StateUp},
		{Uplink: Uplink{Name: "wan1", Addr: mustAddr("100.64.0.2")}, state: StateUp},
	}}
	m.publish()
	st := m.Status()
	st[0].State, st[0].Addr = StateDown, netip.Addr{}
	ups := m.Uplinks()
	ups[0].Addr = netip.Addr{}
	if got := m.Status(); got[0].State != StateUp || got[0].Addr != mustAddr("192.0.2.2") {
		t.Errorf("after a caller changed its copy: %+v", got[0])
	}
	if got := m.PreferredSource(); got != mustAddr("192.0.2.2") {
		t.Errorf("preferred source %s", got)
	}
	// A change shows only once it is published.
	m.uplinks[0].state = StateWithdrawn
	if got := m.PreferredSource(); got != mustAddr("192.0.2.2") {
		t.Errorf("unpublished change seen: preferred source %s", got)
	}
	m.publish()
	if got := m.PreferredSource(); got != mustAddr("100.64.0.2") {
		t.Errorf("published: preferred source %s, want wan1's", got)
	}
}

// A dump the kernel interrupted (the table changed under it) is read
// again a few times; any other error is not.
func TestRetryInterrupted(t *testing.T) {
	errOther := errors.New("other")
	tests := []struct {
		name      string
		fails     []error // the errors of the first attempts, in order
		wantCalls int
		wantErr   error
	}{
		{"fine", nil, 1, nil},
		{"interrupted once", []error{netlink.ErrDumpInterrupted}, 2, nil},
		{"interrupted every time", []error{netlink.ErrDumpInterrupted, netlink.ErrDumpInterrupted, netlink.ErrDumpInterrupted, netlink.ErrDumpInterrupted}, dumpAttempts, netlink.ErrDumpInterrupted},
		{"another error", []error{errOther}, 1, errOther},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			calls := 0
			got, err := retryInterrupted(func() ([]int, error) {
				calls++
				if calls <= len(tt.fails) {
					return nil, tt.fails[calls-1]
				}
				return []int{1}, nil
			})
			if calls != tt.wantCalls || !errors.Is(err, tt.wantErr) || (err == nil && len(got) != 1) {
				t.Errorf("%d calls, %v, %v; want %d calls, %v", calls, got, err, tt.wantCalls, tt.wantErr)
			}
		})
	}
}
