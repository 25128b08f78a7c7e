package pathmgr

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// twoUplinks builds the client side of the test topology: wan0 and wan1,
// each with an address and a default route with its own metric, as a DHCP
// client leaves them. wan0 also has IPv6.
func twoUplinks(t *testing.T) (wan0, wan1 netlink.Link) {
	t.Helper()
	wan0 = addLink(t, "wan0", "192.0.2.2/24", "2001:db8:1::2/64")
	wan1 = addLink(t, "wan1", "100.64.0.2/24")
	addDefault(t, wan0, "192.0.2.1", 100)
	addDefault(t, wan1, "100.64.0.1", 200)
	addDefault(t, wan0, "2001:db8:1::1", 100)
	return wan0, wan1
}

func start(t *testing.T, cfg Config) *Manager {
	t.Helper()
	m, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	return m
}

var farAway = net.ParseIP("198.51.100.10")

// lookupFrom is `ip route get 198.51.100.10 from src`.
func lookupFrom(src netip.Addr) (netlink.Route, error) {
	routes, err := netlink.RouteGetWithOptions(farAway, &netlink.RouteGetOptions{SrcAddr: src.AsSlice()})
	if err != nil {
		return netlink.Route{}, err
	}
	if len(routes) != 1 {
		return netlink.Route{}, fmt.Errorf("%d routes", len(routes))
	}
	return routes[0], nil
}

func TestStartSetsUpUplinks(t *testing.T) {
	withNetns(t, func() {
		wan0, wan1 := twoUplinks(t)
		// wan0 filters strictly (and must be loosened); wan1 does not.
		if err := SetSysctl("net.ipv4.conf.wan0.rp_filter", "1"); err != nil {
			t.Fatal(err)
		}
		if err := SetLimits(1, 0); err != nil {
			t.Fatal(err)
		}
		before := takeSnapshot(t)

		m := start(t, Config{Uplinks: []UplinkConfig{{Name: "wan0"}, {Name: "wan1", Backup: true}}})
		closed := false
		defer func() {
			if !closed {
				m.Close()
			}
		}()

		type want struct {
			link          netlink.Link
			addr, gw      string
			addr6, gw6    string
			table, prio   int
			backup        bool
			flags         EndpointFlags
			otherGateway  string
			rpFilterAfter string
		}
		wants := []want{
			{wan0, "192.0.2.2", "192.0.2.1", "2001:db8:1::2", "2001:db8:1::1", 7100, 7100, false, FlagSubflow, "100.64.0.1", "2"},
			{wan1, "100.64.0.2", "100.64.0.1", "", "", 7101, 7101, true, FlagSubflow | FlagBackup, "192.0.2.1", "0"},
		}
		ups := m.Uplinks()
		if len(ups) != len(wants) {
			t.Fatalf("Uplinks() = %v", ups)
		}
		pm := openPM(t)
		seenIDs := map[uint8]bool{}
		for i, w := range wants {
			u := ups[i]
			name := w.link.Attrs().Name
			if u.Name != name || u.Index != w.link.Attrs().Index || u.Addr != mustAddr(w.addr) || u.Gateway != mustAddr(w.gw) ||
				u.Table != w.table || u.RulePrio != w.prio || u.Backup != w.backup || u.EndpointID == 0 || seenIDs[u.EndpointID] {
				t.Errorf("uplink %d = %+v, want %+v", i, u, w)
			}
			seenIDs[u.EndpointID] = true
			if w.addr6 != "" && (u.Addr6 != mustAddr(w.addr6) || u.Gateway6 != mustAddr(w.gw6)) {
				t.Errorf("uplink %s IPv6 = %s via %s, want %s via %s", name, u.Addr6, u.Gateway6, w.addr6, w.gw6)
			}

			// The endpoint, as the kernel holds it.
			ep, err := pm.Endpoint(u.EndpointID)
			if err != nil {
				t.Fatal(err)
			}
			wantEP := Endpoint{ID: u.EndpointID, Addr: u.Addr, Flags: w.flags, IfIndex: u.Index}
			if ep != wantEP {
				t.Errorf("%s endpoint = %s, want %s", name, ep, wantEP)
			}

			// The rules.
			fams := []int{netlink.FAMILY_V4}
			if w.addr6 != "" {
				fams = append(fams, netlink.FAMILY_V6)
			}
			for _, fam := range fams {
				rules, err := netlink.RuleListFiltered(fam, &netlink.Rule{Priority: w.prio}, netlink.RT_FILTER_PRIORITY)
				if err != nil {
					t.Fatal(err)
				}
				src := w.addr
				if fam == netlink.FAMILY_V6 {
					src = w.addr6
				}
				if len(rules) != 1 || rules[0].Table != w.table || rules[0].Src == nil || !rules[0].Src.IP.Equal(net.ParseIP(src)) {
					t.Errorf("%s family %d rules at %d = %v, want one `from %s lookup %d`", name, fam, w.prio, rules, src, w.table)
				}
			}

			// The table: connected prefix, default via the gateway,
			// unreachable default at the highest metric.
			routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: w.table}, netlink.RT_FILTER_TABLE)
			if err != nil {
				t.Fatal(err)
			}
			var haveGw, haveUnreach, haveConn bool
			for _, r := range routes {
				switch {
				case r.Type == unix.RTN_UNREACHABLE && isDefault(r.Dst) && uint32(r.Priority) == ^uint32(0):
					haveUnreach = true
				case r.Type == unix.RTN_UNICAST && isDefault(r.Dst) && r.Gw.Equal(net.ParseIP(w.gw)) && r.LinkIndex == u.Index:
					haveGw = true
				case r.Type == unix.RTN_UNICAST && r.Dst != nil && r.Dst.Contains(net.ParseIP(w.gw)) && r.LinkIndex == u.Index:
					haveConn = true
				}
			}
			if !haveGw || !haveUnreach || !haveConn {
				t.Errorf("table %d = %v; want a connected route, default via %s and an unreachable default", w.table, routes, w.gw)
			}

			// A lookup from the uplink's address leaves through it.
			r, err := lookupFrom(u.Addr)
			if err != nil || r.LinkIndex != u.Index || !r.Gw.Equal(net.ParseIP(w.gw)) {
				t.Errorf("route from %s = %+v, %v; want via %s dev %s", u.Addr, r, err, w.gw, name)
			}
			if w.addr6 != "" {
				r, err := netlink.RouteGetWithOptions(net.ParseIP("2001:db8:ff::1"), &netlink.RouteGetOptions{SrcAddr: net.ParseIP(w.addr6)})
				if err != nil || len(r) != 1 || r[0].LinkIndex != u.Index || !r[0].Gw.Equal(net.ParseIP(w.gw6)) {
					t.Errorf("IPv6 route from %s = %+v, %v; want via %s", w.addr6, r, err, w.gw6)
				}
			}

			if v, _ := GetSysctl("net/ipv4/conf/" + name + "/rp_filter"); v != w.rpFilterAfter {
				t.Errorf("%s rp_filter = %s, want %s", name, v, w.rpFilterAfter)
			}
		}
		if l, _ := pm.Limits(); l.Subflows != 2 {
			t.Errorf("limits = %+v, want subflows raised to 2 (one per uplink)", l)
		}

		// Without its default route, wan0's table still answers (with
		// unreachable) rather than letting the lookup fall through to
		// main and out of wan1.
		for _, w := range wants {
			def := &netlink.Route{Table: w.table, LinkIndex: w.link.Attrs().Index, Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, Gw: net.ParseIP(w.gw)}
			if err := netlink.RouteDel(def); err != nil {
				t.Fatalf("remove %s's default from its table: %v", w.link.Attrs().Name, err)
			}
			r, err := lookupFrom(mustAddr(w.addr))
			if err == nil {
				t.Errorf("with its default gone, route from %s = %+v; want unreachable, not %s", w.addr, r, w.otherGateway)
			} else if !errors.Is(err, unix.EHOSTUNREACH) && !errors.Is(err, unix.ENETUNREACH) {
				t.Errorf("with its default gone, route from %s: %v; want unreachable", w.addr, err)
			}
		}

		// Close puts the namespace back exactly as it was (the removed
		// defaults are no error).
		closed = true
		if err := m.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		if d := before.diff(takeSnapshot(t)); d != "" {
			t.Errorf("Close left the namespace changed:\n%s", d)
		}
		if err := m.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	})
}

func TestStartValidation(t *testing.T) {
	withNetns(t, func() {
		twoUplinks(t)
		addLink(t, "noaddr")
		addLink(t, "nogw", "203.0.113.2/24")
		down := addLink(t, "down0", "198.18.0.2/24")
		addDefault(t, down, "198.18.0.1", 300)
		if err := netlink.LinkSetDown(down); err != nil {
			t.Fatal(err)
		}
		// A stale-looking endpoint and rule that must survive a refused Start.
		pm := openPM(t)
		if _, err := pm.AddEndpoint(Endpoint{Addr: mustAddr("192.0.2.2"), Flags: FlagSubflow}); err != nil {
			t.Fatal(err)
		}
		before := takeSnapshot(t)

		nine := make([]UplinkConfig, 9)
		for i := range nine {
			nine[i] = UplinkConfig{Name: fmt.Sprintf("wan%d", i)}
		}
		tests := []struct {
			name    string
			cfg     Config
			message []string
		}{
			{"unknown interface", Config{Uplinks: []UplinkConfig{{Name: "wan0"}, {Name: "wan9"}}}, []string{"uplink wan9", "no such interface"}},
			{"no address", Config{Uplinks: []UplinkConfig{{Name: "wan0"}, {Name: "noaddr"}}}, []string{"uplink noaddr", "no IPv4 address"}},
			{"no default route", Config{Uplinks: []UplinkConfig{{Name: "nogw"}, {Name: "wan1"}}}, []string{"uplink nogw", "no IPv4 default route"}},
			{"interface down", Config{Uplinks: []UplinkConfig{{Name: "wan0"}, {Name: "down0"}}}, []string{"uplink down0", "is down"}},
			{"too many", Config{Uplinks: nine}, []string{"9 uplinks", "at most 8", "wan8"}},
			{"none", Config{}, []string{"no uplinks"}},
			{"twice", Config{Uplinks: []UplinkConfig{{Name: "wan0"}, {Name: "wan0"}}}, []string{"uplink wan0", "twice"}},
			{"kernel table", Config{Uplinks: []UplinkConfig{{Name: "wan0"}}, TableBase: 250}, []string{"table 253"}},
			{"priority after main", Config{Uplinks: []UplinkConfig{{Name: "wan0"}}, RulePrio: 32760}, []string{"priority 32760"}},
			{"fallback among the marked rules", Config{Uplinks: []UplinkConfig{{Name: "wan0"}}, FallbackPrio: 7105}, []string{"fallback rule priority 7105"}},
			{"fallback after main", Config{Uplinks: []UplinkConfig{{Name: "wan0"}}, RulePrio: 32600}, []string{"fallback rule priority 32800"}},
		}
		for _, tt := range tests {
			m, err := Start(context.Background(), tt.cfg)
			if err == nil {
				m.Close()
				t.Errorf("%s: Start succeeded", tt.name)
				continue
			}
			for _, s := range tt.message {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("%s: error %q does not mention %q", tt.name, err, s)
				}
			}
			if d := before.diff(takeSnapshot(t)); d != "" {
				t.Errorf("%s: a refused Start changed the namespace:\n%s", tt.name, d)
			}
		}
	})
}

func TestStartRemovesStaleState(t *testing.T) {
	tests := []struct {
		name string
		// whileDown changes the host between the crash and the restart.
		whileDown func(t *testing.T)
		// the endpoints the restart must leave, without ids
		endpoints []string
	}{
		{"same addresses", func(*testing.T) {}, []string{
			"192.0.2.2 subflow ifindex IDX0", "100.64.0.2 subflow backup ifindex IDX1"}},
		{"wan1 renumbered while mpvpn was down", func(t *testing.T) {
			wan1, err := netlink.LinkByName("wan1")
			if err != nil {
				t.Fatal(err)
			}
			old, _ := netlink.ParseAddr("100.64.0.2/24")
			if err := netlink.AddrDel(wan1, old); err != nil {
				t.Fatal(err)
			}
			nu, _ := netlink.ParseAddr("100.64.0.3/24")
			if err := netlink.AddrAdd(wan1, nu); err != nil {
				t.Fatal(err)
			}
			addDefault(t, wan1, "100.64.0.1", 200)
		}, []string{"192.0.2.2 subflow ifindex IDX0", "100.64.0.3 subflow backup ifindex IDX1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			withNetns(t, func() {
				wan0, wan1 := twoUplinks(t)
				// Someone else's rule inside mpvpn's priority range,
				// pointing at their own table: not mpvpn's, left alone.
				foreign := netlink.NewRule()
				foreign.Priority = 7101
				foreign.Table = 100
				foreign.Src = &net.IPNet{IP: net.ParseIP("10.0.0.0").To4(), Mask: net.CIDRMask(8, 32)}
				if err := netlink.RuleAdd(foreign); err != nil {
					t.Fatal(err)
				}
				cfg := Config{Uplinks: []UplinkConfig{{Name: "wan0"}, {Name: "wan1", Backup: true}}}

				// A crash: Start, then the process dies without Close.
				// Only the Manager's sockets go away; the kernel keeps
				// the rest.
				crashed := start(t, cfg)
				crashed.release()
				tt.whileDown(t)
				m := start(t, cfg)
				pm := openPM(t)
				eps, err := pm.Endpoints()
				if err != nil {
					t.Fatal(err)
				}
				var got []string
				for _, e := range eps {
					got = append(got, e.String())
				}
				want := strings.NewReplacer("IDX0", fmt.Sprint(wan0.Attrs().Index), "IDX1", fmt.Sprint(wan1.Attrs().Index))
				if g, w := strings.Join(snapshot{endpoints: got}.withoutIDs().endpoints, "; "), want.Replace(strings.Join(tt.endpoints, "; ")); g != w {
					t.Errorf("endpoints after the restart: %s; want %s", g, w)
				}
				for i, u := range m.Uplinks() {
					rules, err := netlink.RuleListFiltered(netlink.FAMILY_V4, &netlink.Rule{Priority: 7100 + i}, netlink.RT_FILTER_PRIORITY)
					if err != nil {
						t.Fatal(err)
					}
					mine := 0
					for _, r := range rules {
						if r.Table == u.Table {
							mine++
						}
					}
					if mine != 1 {
						t.Errorf("%d rules at %d for table %d, want 1: %v", mine, 7100+i, u.Table, rules)
					}
					if r, err := lookupFrom(u.Addr); err != nil || r.LinkIndex != u.Index {
						t.Errorf("route from %s = %+v, %v", u.Addr, r, err)
					}
				}
				if err := m.Close(); err != nil {
					t.Fatalf("Close: %v", err)
				}
				// Close removes the stale state as well: the crashed
				// run's rules, routes and endpoints are gone, the
				// foreign rule is still there.
				after := takeSnapshot(t)
				if len(after.endpoints) != 0 {
					t.Errorf("endpoints left: %v", after.endpoints)
				}
				for _, r := range after.rules {
					if strings.Contains(r, "table 710") {
						t.Errorf("rule left: %s", r)
					}
				}
				if !slices.ContainsFunc(after.rules, func(r string) bool { return strings.Contains(r, "10.0.0.0/8") && strings.Contains(r, "table 100") }) {
					t.Errorf("the foreign rule at 7101 was removed: %v", after.rules)
				}
				for _, r := range after.routes {
					if strings.Contains(r, "Table: 710") {
						t.Errorf("route left: %s", r)
					}
				}
			})
		})
	}
}

// The Manager stays bound to its namespace: Close from a goroutine on
// another thread (in the test binary's own namespace) still cleans the
// test namespace and touches nothing else.
func TestCloseFromAnotherThread(t *testing.T) {
	withNetns(t, func() {
		twoUplinks(t)
		if err := SetSysctl("net.ipv4.conf.wan1.rp_filter", "1"); err != nil {
			t.Fatal(err)
		}
		before := takeSnapshot(t)
		m := start(t, Config{Uplinks: []UplinkConfig{{Name: "wan0"}, {Name: "wan1"}}})
		errc := make(chan error)
		go func() { errc <- m.Close() }()
		if err := <-errc; err != nil {
			t.Fatalf("Close: %v", err)
		}
		if d := before.diff(takeSnapshot(t)); d != "" {
			t.Errorf("Close from another thread left:\n%s", d)
		}
	})
}

func TestSysctlNames(t *testing.T) {
	tests := []struct {
		name, path string
		ok         bool
	}{
		{"net.mptcp.enabled", "/proc/sys/net/mptcp/enabled", true},
		{"net/ipv4/conf/eth0.100/rp_filter", "/proc/sys/net/ipv4/conf/eth0.100/rp_filter", true},
		{"", "", false},
		{"../../etc/passwd", "", false},
		{"/etc/passwd", "", false},
		{"net/../../etc", "", false},
	}
	for _, tt := range tests {
		p, err := sysctlPath(tt.name)
		if (err == nil) != tt.ok || p != tt.path {
			t.Errorf("sysctlPath(%q) = %q, %v; want %q ok=%v", tt.name, p, err, tt.path, tt.ok)
		}
	}
	if err := SetSysctl("net.mptcp.no_such_setting", "1"); err == nil || !strings.Contains(err.Error(), "no such setting") {
		t.Errorf("SetSysctl of a missing setting: %v", err)
	}
}
