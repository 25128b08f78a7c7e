package pathmgr

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// running starts a Manager on wan0+wan1 with Run in a goroutine, and stops
// both when the test ends. Changes go to the returned channel.
func running(t *testing.T, cfg Config) (*Manager, <-chan Status) {
	t.Helper()
	return runningWith(t, cfg, nil)
}

// runningWith is running with setup (if not nil) called between Start and
// Run, e.g. to set hooks.
func runningWith(t *testing.T, cfg Config, setup func(*Manager)) (*Manager, <-chan Status) {
	t.Helper()
	ch := make(chan Status, 256)
	cfg.OnChange = func(s Status) {
		select {
		case ch <- s:
		default:
		}
	}
	m := start(t, cfg)
	if setup != nil {
		setup(m)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := m.Run(ctx); err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		if err := m.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return m, ch
}

// waitState waits (generously: this is about behaviour, not speed) until
// uplink name is in state want, and returns its status.
func waitState(t *testing.T, m *Manager, name string, want State) Status {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for _, s := range m.Status() {
			if s.Name == name && s.State == want {
				return s
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("uplink %s never became %s: %+v", name, want, m.Status())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// endpointOn reports whether the kernel has an MPTCP endpoint on addr.
func endpointOn(t *testing.T, addr netip.Addr) bool {
	t.Helper()
	pm := openPM(t)
	eps, err := pm.Endpoints()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range eps {
		if e.Addr == addr {
			return true
		}
	}
	return false
}

// ruleFrom reports whether a `from addr` rule exists.
func ruleFrom(t *testing.T, addr netip.Addr) bool {
	t.Helper()
	rules, err := netlink.RuleList(netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rules {
		if r.Src != nil && r.Src.IP.Equal(addr.AsSlice()) {
			return true
		}
	}
	return false
}

func setLink(t *testing.T, name string, up bool) {
	t.Helper()
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if up {
		err = netlink.LinkSetUp(l)
	} else {
		err = netlink.LinkSetDown(l)
	}
	if err != nil {
		t.Fatal(err)
	}
}

func addrOp(t *testing.T, name, cidr string, add bool) {
	t.Helper()
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	if add {
		err = netlink.AddrAdd(l, a)
	} else {
		err = netlink.AddrDel(l, a)
	}
	if err != nil {
		t.Fatalf("addr %s %v: %v", cidr, add, err)
	}
}

func defaultBack(t *testing.T, name, gw string, metric int) {
	t.Helper()
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	r := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
		Gw: net.ParseIP(gw), Priority: metric, Protocol: unix.RTPROT_DHCP}
	if err := netlink.RouteReplace(r); err != nil {
		t.Fatal(err)
	}
}

// Each way an uplink can stop working takes its endpoint (and, unless only
// the liveness probe failed, its table and rule) away, and its return puts
// them back, with Run alone noticing.
func TestRunFollowsTheHost(t *testing.T) {
	wan1Addr := mustAddr("100.64.0.2")
	tests := []struct {
		name       string
		cut, heal  func(t *testing.T, m *Manager)
		cutState   State
		ruleKept   bool       // the `from` rule survives the cut
		healedAddr netip.Addr // the address wan1 has afterwards
	}{
		{
			name:     "link down, up, default route back",
			cut:      func(t *testing.T, m *Manager) { setLink(t, "wan1", false) },
			heal:     func(t *testing.T, m *Manager) { setLink(t, "wan1", true); defaultBack(t, "wan1", "100.64.0.1", 200) },
			cutState: StateDown, healedAddr: wan1Addr,
		},
		{
			name:     "carrier lost and back",
			cut:      func(t *testing.T, m *Manager) { setLink(t, "wan1p", false) },
			heal:     func(t *testing.T, m *Manager) { setLink(t, "wan1p", true) },
			cutState: StateDown, healedAddr: wan1Addr,
		},
		{
			name: "address removed, the same one back",
			cut:  func(t *testing.T, m *Manager) { addrOp(t, "wan1", "100.64.0.2/24", false) },
			heal: func(t *testing.T, m *Manager) {
				addrOp(t, "wan1", "100.64.0.2/24", true)
				defaultBack(t, "wan1", "100.64.0.1", 200)
			},
			cutState: StateDown, healedAddr: wan1Addr,
		},
		{
			name: "address removed, a new one",
			cut:  func(t *testing.T, m *Manager) { addrOp(t, "wan1", "100.64.0.2/24", false) },
			heal: func(t *testing.T, m *Manager) {
				addrOp(t, "wan1", "100.64.0.77/24", true)
				defaultBack(t, "wan1", "100.64.0.1", 200)
			},
			cutState: StateDown, healedAddr: mustAddr("100.64.0.77"),
		},
		{
			name:     "gateway gone",
			cut:      func(t *testing.T, m *Manager) { delDefault(t, "wan1") },
			heal:     func(t *testing.T, m *Manager) { defaultBack(t, "wan1", "100.64.0.1", 200) },
			cutState: StateDown, healedAddr: wan1Addr,
		},
		{
			name:     "concentrator silent over it",
			cut:      func(t *testing.T, m *Manager) { m.SetReachable("wan1", false) },
			heal:     func(t *testing.T, m *Manager) { m.SetReachable("wan1", true) },
			cutState: StateWithdrawn, ruleKept: true, healedAddr: wan1Addr,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			withNetns(t, func() {
				twoUplinks(t)
				m, changes := running(t, Config{Uplinks: []UplinkConfig{{Name: "wan0"}, {Name: "wan1"}}})
				waitState(t, m, "wan1", StateUp)
				if !endpointOn(t, wan1Addr) || !ruleFrom(t, wan1Addr) {
					t.Fatal("wan1 not set up at start")
				}

				tt.cut(t, m)
				s := waitState(t, m, "wan1", tt.cutState)
				if s.Reason == "" {
					t.Errorf("cut: no reason given: %+v", s)
				}
				if endpointOn(t, wan1Addr) {
					t.Error("cut: wan1's endpoint is still there")
				}
				if got := ruleFrom(t, wan1Addr); got != tt.ruleKept {
					t.Errorf("cut: rule from %s present = %v, want %v", wan1Addr, got, tt.ruleKept)
				}
				if !endpointOn(t, mustAddr("192.0.2.2")) {
					t.Error("cut: wan0 lost its endpoint too")
				}
				if got := m.PreferredSource(); got != mustAddr("192.0.2.2") {
					t.Errorf("cut: preferred source %s, want wan0's", got)
				}
				select {
				case c := <-changes:
					if c.Name != "wan1" || c.State != tt.cutState {
						t.Errorf("cut: OnChange got %+v", c)
					}
				case <-time.After(5 * time.Second):
					t.Error("cut: no OnChange")
				}

				tt.heal(t, m)
				s = waitState(t, m, "wan1", StateUp)
				if s.Addr != tt.healedAddr || s.EndpointID == 0 {
					t.Errorf("healed: %+v, want address %s and an endpoint", s, tt.healedAddr)
				}
				if !endpointOn(t, tt.healedAddr) || !ruleFrom(t, tt.healedAddr) {
					t.Error("healed: endpoint or rule missing on", tt.healedAddr)
				}
				if tt.healedAddr != wan1Addr && (endpointOn(t, wan1Addr) || ruleFrom(t, wan1Addr)) {
					t.Error("healed: the old address still has an endpoint or rule")
				}
				// And traffic from it leaves through wan1 again.
				r, err := lookupFrom(tt.healedAddr)
				if err != nil || r.LinkIndex != s.Index {
					t.Errorf("healed: lookup from %s = %+v, %v", tt.healedAddr, r, err)
				}
			})
		})
	}
}

func delDefault(t *testing.T, name string) {
	t.Helper()
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{LinkIndex: l.Attrs().Index, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		if isDefault(r.Dst) {
			if err := netlink.RouteDel(&r); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// A link going down and up every 100 ms is held back after a few flaps:
// the number of netlink changes stays bounded, and once the link is quiet
// it comes back.
func TestRunDampsFlapping(t *testing.T) {
	withNetns(t, func() {
		twoUplinks(t)
		m, _ := running(t, Config{Uplinks: []UplinkConfig{{Name: "wan0"}, {Name: "wan1"}}})
		waitState(t, m, "wan1", StateUp)
		base := m.Changes()
		const flaps = 30
		for range flaps {
			setLink(t, "wan1p", false)
			time.Sleep(50 * time.Millisecond)
			setLink(t, "wan1p", true)
			time.Sleep(50 * time.Millisecond)
		}
		spent := m.Changes() - base
		// Unplumbing and plumbing wan1 is about a dozen changes; without
		// damping 30 flaps would be ~360.
		if spent > 5*12 {
			t.Errorf("%d flaps cost %d netlink changes", flaps, spent)
		}
		var damped bool
		for _, s := range m.Status() {
			if s.Name == "wan1" {
				damped = s.Damped
			}
		}
		if !damped {
			t.Errorf("wan1 not damped after %d flaps: %+v", flaps, m.Status())
		}
		// Quiet now: it must come back on its own.
		s := waitState(t, m, "wan1", StateUp)
		if s.Damped || !endpointOn(t, s.Addr) {
			t.Errorf("after the flapping: %+v", s)
		}
		t.Logf("%d flaps: %d netlink changes, %d transitions", flaps, spent, s.Transitions)
	})
}

// An uplink without carrier at start is not an error: it starts down and
// comes up with its carrier.
func TestStartWithoutCarrier(t *testing.T) {
	withNetns(t, func() {
		twoUplinks(t)
		setLink(t, "wan1p", false)
		m, _ := running(t, Config{Uplinks: []UplinkConfig{{Name: "wan0"}, {Name: "wan1"}}})
		s := waitState(t, m, "wan1", StateDown)
		if s.Reason != "no carrier" {
			t.Errorf("reason %q", s.Reason)
		}
		setLink(t, "wan1p", true)
		waitState(t, m, "wan1", StateUp)
	})
}

func TestDamper(t *testing.T) {
	t0 := time.Unix(1000, 0)
	tests := []struct {
		name    string
		losses  []time.Duration // offsets from t0
		at      time.Duration
		allowed bool
	}{
		{"never lost", nil, 0, true},
		{"one outage", []time.Duration{0}, 0, true},
		{"two outages a second apart", []time.Duration{0, time.Second}, time.Second, true},
		{"three in two seconds", []time.Duration{0, time.Second, 2 * time.Second}, 2 * time.Second, false},
		{"three in two seconds, then quiet for 6 s", []time.Duration{0, time.Second, 2 * time.Second}, 8 * time.Second, true},
		{"three spread over a minute", []time.Duration{0, 30 * time.Second, 60 * time.Second}, 60 * time.Second, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var d damper
			for _, l := range tt.losses {
				d.lost(t0.Add(l))
			}
			ok, wait := d.allow(t0.Add(tt.at))
			if ok != tt.allowed {
				t.Fatalf("allow = %v (wait %v), want %v; penalty %.2f", ok, wait, tt.allowed, d.value(t0.Add(tt.at)))
			}
			if !ok {
				if wait <= 0 {
					t.Fatalf("held back with no wait")
				}
				if ok2, _ := d.allow(t0.Add(tt.at + wait)); !ok2 {
					t.Errorf("still held back after the wait it gave (%v)", wait)
				}
			}
		})
	}
}

// Without --uplink the client takes every interface with a default route,
// best metric first, never loopback or a TUN.
func TestDiscoverUplinks(t *testing.T) {
	withNetns(t, func() {
		if _, err := DiscoverUplinks(); err == nil {
			t.Error("no default route at all: want an error")
		}
		twoUplinks(t)
		addLink(t, "lan0", "10.1.0.2/24") // no default route: not an uplink
		got, err := DiscoverUplinks()
		if err != nil {
			t.Fatal(err)
		}
		want := []UplinkConfig{{Name: "wan0"}, {Name: "wan1"}}
		if !slices.Equal(got, want) {
			t.Errorf("got %v, want %v", got, want)
		}
		if got, _ := DiscoverUplinks("wan0"); !slices.Equal(got, want[1:]) {
			t.Errorf("excluding wan0: got %v", got)
		}
		// Metrics decide the order, not creation: wan1 first now.
		delDefault(t, "wan1")
		defaultBack(t, "wan1", "100.64.0.1", 50)
		if got, _ := DiscoverUplinks(); !slices.Equal(got, []UplinkConfig{{Name: "wan1"}, {Name: "wan0"}}) {
			t.Errorf("after re-metric: got %v", got)
		}
	})
}
