package routing

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/mpvpn/mpvpn/internal/netnstest"

	"github.com/vishvananda/netlink"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const mark = 0x6d70

// cannotRun fails the test under CI and skips it elsewhere.
func cannotRun(t *testing.T, format string, args ...any) {
	t.Helper()
	netnstest.CannotRun(t, format, args...)
}

// withNetns runs fn inside a network namespace of its own (see
// internal/netnstest).
func withNetns(t *testing.T, fn func()) {
	t.Helper()
	netnstest.Run(t, fn)
}

// topology is a client with one uplink (wan0, default via 192.0.2.1 and
// 2001:db8:1::1, as DHCP and RA leave them) and a real TUN, mpvpn0.
func topology(t *testing.T) (wan0, tun netlink.Link) {
	t.Helper()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "wan0"}, PeerName: "wan0p"}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("add veth: %v", err)
	}
	tt := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "mpvpn0"}, Mode: netlink.TUNTAP_MODE_TUN, Flags: netlink.TUNTAP_NO_PI, Queues: 1, NonPersist: true}
	if err := netlink.LinkAdd(tt); err != nil {
		cannotRun(t, "cannot create a TUN: %v", err)
	}
	t.Cleanup(func() {
		for _, f := range tt.Fds {
			f.Close()
		}
	})
	for _, n := range []string{"wan0p", "wan0", "mpvpn0"} {
		l, err := netlink.LinkByName(n)
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	wan0, _ = netlink.LinkByName("wan0")
	tun, _ = netlink.LinkByName("mpvpn0")
	for _, a := range []struct {
		link netlink.Link
		addr string
	}{{wan0, "192.0.2.2/24"}, {wan0, "2001:db8:1::2/64"}, {tun, "10.77.77.1/32"}} {
		addr, _ := netlink.ParseAddr(a.addr)
		addr.Flags = unix.IFA_F_NODAD
		if err := netlink.AddrAdd(a.link, addr); err != nil {
			t.Fatalf("add %s: %v", a.addr, err)
		}
	}
	for _, gw := range []string{"192.0.2.1", "2001:db8:1::1"} {
		ip := net.ParseIP(gw)
		dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
		if ip.To4() == nil {
			dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
		}
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: wan0.Attrs().Index, Dst: dst, Gw: ip, Priority: 100}); err != nil {
			t.Fatalf("default via %s: %v", gw, err)
		}
	}
	return wan0, tun
}

// snapshot lists every rule and route of the namespace.
func snapshot(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := netlink.RuleList(fam)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			out = append(out, fmt.Sprintf("rule %d %s invert=%v mark=%#x", fam, r, r.Invert, r.Mark))
		}
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range routes {
			if netnstest.KernelRoute(r) {
				continue // racy, and never mpvpn's
			}
			out = append(out, fmt.Sprintf("route %s type=%d metric=%d", r, r.Type, r.Priority))
		}
	}
	slices.Sort(out)
	return out
}

func sameState(t *testing.T, what string, before, after []string) {
	t.Helper()
	if !slices.Equal(before, after) {
		t.Errorf("%s changed the namespace:\n  before: %s\n  after:  %s", what, strings.Join(before, "\n          "), strings.Join(after, "\n          "))
	}
}

func apply(t *testing.T, cfg Config) *Router {
	t.Helper()
	r, err := Apply(cfg)
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	return r
}

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

// The concentrator, 203.0.113.1, is inside a routed prefix on purpose.
var testRoutes = prefixes("198.51.100.0/24", "203.0.113.0/24", "2001:db8:77::/48")

func TestApplyRoutesIntoTUN(t *testing.T) {
	withNetns(t, func() {
		wan0, tun := topology(t)
		before := snapshot(t)
		r := apply(t, Config{TUN: "mpvpn0", Routes: testRoutes, Mark: mark})

		// One `not fwmark 0x6d70 lookup 7200` per family, at 7200.
		for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			rules, err := netlink.RuleListFiltered(fam, &netlink.Rule{Priority: DefaultRulePrio}, netlink.RT_FILTER_PRIORITY)
			if err != nil {
				t.Fatal(err)
			}
			if len(rules) != 1 || !rules[0].Invert || rules[0].Mark != mark || rules[0].Table != DefaultTable {
				t.Errorf("family %d rules at %d = %+v; want one `not fwmark %#x lookup %d`", fam, DefaultRulePrio, rules, mark, DefaultTable)
			}
		}
		// The table holds exactly the routes, each dev mpvpn0.
		var inTable []string
		for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: DefaultTable}, netlink.RT_FILTER_TABLE)
			if err != nil {
				t.Fatal(err)
			}
			for _, rt := range routes {
				if rt.LinkIndex != tun.Attrs().Index {
					t.Errorf("route %s is not dev mpvpn0", rt)
				}
				inTable = append(inTable, rt.Dst.String())
			}
		}
		slices.Sort(inTable)
		if want := []string{"198.51.100.0/24", "2001:db8:77::/48", "203.0.113.0/24"}; !slices.Equal(inTable, want) {
			t.Errorf("table %d holds %v, want %v", DefaultTable, inTable, want)
		}

		lookups := []struct {
			name    string
			dst     string
			mark    uint32
			wantTUN bool
		}{
			{"app flow to a routed prefix", "198.51.100.10", 0, true},
			{"mpvpn's own socket to the same place", "198.51.100.10", mark, false},
			{"the concentrator, unmarked", "203.0.113.1", 0, true},
			{"the concentrator, from mpvpn's marked subflows", "203.0.113.1", mark, false},
			{"a different mark is not the bypass", "203.0.113.1", mark + 1, true},
			{"outside the routes", "198.18.0.1", 0, false},
			{"IPv6 routed prefix", "2001:db8:77::1", 0, true},
			{"IPv6, marked", "2001:db8:77::1", mark, false},
		}
		for _, l := range lookups {
			routes, err := netlink.RouteGetWithOptions(net.ParseIP(l.dst), &netlink.RouteGetOptions{Mark: l.mark})
			if err != nil || len(routes) != 1 {
				t.Errorf("%s: route get %s mark %#x: %v, %v", l.name, l.dst, l.mark, routes, err)
				continue
			}
			want := wan0.Attrs().Index
			if l.wantTUN {
				want = tun.Attrs().Index
			}
			if routes[0].LinkIndex != want {
				t.Errorf("%s: %s mark %#x goes out ifindex %d, want %d (tun %d, wan0 %d)",
					l.name, l.dst, l.mark, routes[0].LinkIndex, want, tun.Attrs().Index, wan0.Attrs().Index)
			}
		}

		// Close from another goroutine (another thread, in the test
		// binary's namespace) still cleans this namespace.
		errc := make(chan error)
		go func() { errc <- r.Close() }()
		if err := <-errc; err != nil {
			t.Fatalf("Close: %v", err)
		}
		sameState(t, "Apply+Close", before, snapshot(t))
		if err := r.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	})
}

func TestApplyValidation(t *testing.T) {
	withNetns(t, func() {
		topology(t)
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "down0"}, PeerName: "down0p"}
		if err := netlink.LinkAdd(veth); err != nil {
			t.Fatal(err)
		}
		before := snapshot(t)
		ok := Config{TUN: "mpvpn0", Routes: testRoutes, Mark: mark}
		with := func(f func(*Config)) Config {
			c := ok
			c.Routes = slices.Clone(ok.Routes)
			f(&c)
			return c
		}
		tests := []struct {
			name    string
			cfg     Config
			message string
		}{
			{"no TUN", with(func(c *Config) { c.TUN = "nope0" }), "TUN nope0: no such interface"},
			{"TUN down", with(func(c *Config) { c.TUN = "down0" }), "TUN down0 is down"},
			{"no name", with(func(c *Config) { c.TUN = "" }), "no TUN"},
			{"mark 0", with(func(c *Config) { c.Mark = 0 }), "fwmark 0"},
			{"no routes", with(func(c *Config) { c.Routes = nil }), "no routes"},
			{"main table", with(func(c *Config) { c.Table = 254 }), "table 254"},
			{"after main", with(func(c *Config) { c.RulePrio = 32766 }), "priority 32766"},
			{"host bits", with(func(c *Config) { c.Routes = prefixes("198.51.100.1/24") }), "did you mean 198.51.100.0/24"},
			{"everything", with(func(c *Config) { c.Routes = prefixes("0.0.0.0/0") }), "route-all"},
			{"everything v6", with(func(c *Config) { c.Routes = prefixes("::/0") }), "route-all"},
			{"loopback", with(func(c *Config) { c.Routes = prefixes("127.0.0.0/8") }), "loopback"},
			{"multicast", with(func(c *Config) { c.Routes = prefixes("239.1.0.0/16") }), "multicast"},
			{"link-local v6", with(func(c *Config) { c.Routes = prefixes("fe80::/64") }), "link-local"},
			{"mapped", with(func(c *Config) { c.Routes = prefixes("::ffff:198.51.100.0/120") }), "198.51.100.0/24"},
			{"twice", with(func(c *Config) { c.Routes = prefixes("198.51.100.0/24", "198.51.100.0/24") }), "listed twice"},
			{"invalid", with(func(c *Config) { c.Routes = []netip.Prefix{{}} }), "not a valid prefix"},
		}
		for _, tt := range tests {
			r, err := Apply(tt.cfg)
			if err == nil {
				r.Close()
				t.Errorf("%s: Apply succeeded", tt.name)
			} else if !strings.Contains(err.Error(), tt.message) {
				t.Errorf("%s: error %q does not mention %q", tt.name, err, tt.message)
			}
			sameState(t, tt.name, before, snapshot(t))
		}
	})
}

// When the kernel refuses a route half-way, Apply takes back the ones it
// added. With IPv6 off on the TUN, the IPv4 routes go in and the IPv6 one
// fails.
func TestApplyRollsBack(t *testing.T) {
	withNetns(t, func() {
		topology(t)
		if err := os.WriteFile("/proc/sys/net/ipv6/conf/mpvpn0/disable_ipv6", []byte("1"), 0o644); err != nil {
			t.Fatal(err)
		}
		before := snapshot(t)
		r, err := Apply(Config{TUN: "mpvpn0", Routes: testRoutes, Mark: mark})
		if err == nil {
			r.Close()
			t.Fatal("Apply succeeded with IPv6 off on the TUN")
		}
		if !strings.Contains(err.Error(), "2001:db8:77::/48") {
			t.Errorf("error %q does not name the refused route", err)
		}
		sameState(t, "a failed Apply", before, snapshot(t))
	})
}

func TestApplyRemovesStaleState(t *testing.T) {
	withNetns(t, func() {
		topology(t)
		before := snapshot(t)
		cfg := Config{TUN: "mpvpn0", Routes: testRoutes, Mark: mark}
		// A crash: Apply, then the process dies without Close.
		crashed := apply(t, cfg)
		crashed.release()
		afterFirst := snapshot(t)
		// The restart may carry other routes; the old ones must go.
		cfg.Routes = prefixes("198.51.100.0/24")
		r := apply(t, cfg)
		afterSecond := snapshot(t)
		count := func(s []string, sub string) (n int) {
			for _, x := range s {
				if strings.Contains(x, sub) {
					n++
				}
			}
			return n
		}
		if n := count(afterSecond, "table 7200"); n != 1 {
			t.Errorf("%d rules for table 7200 after the restart, want 1 (IPv4 only now):\n%s", n, strings.Join(afterSecond, "\n"))
		}
		if n := count(afterSecond, "Table: 7200"); n != 1 {
			t.Errorf("%d routes in table 7200 after the restart, want 1", n)
		}
		if count(afterFirst, "Table: 7200") != 3 {
			t.Errorf("the crashed run did not leave its 3 routes: %v", afterFirst)
		}
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
		sameState(t, "crash, restart, Close", before, snapshot(t))
	})
}

// Close after the TUN vanished (the device took its routes along) is
// clean and still removes the rules.
func TestCloseAfterTUNGone(t *testing.T) {
	withNetns(t, func() {
		_, tun := topology(t)
		before := snapshot(t)
		r := apply(t, Config{TUN: "mpvpn0", Routes: testRoutes, Mark: mark})
		if err := netlink.LinkDel(tun); err != nil {
			t.Fatal(err)
		}
		if err := r.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		var want []string
		for _, s := range before {
			if !strings.Contains(s, fmt.Sprintf("Ifindex: %d ", tun.Attrs().Index)) {
				want = append(want, s)
			}
		}
		sameState(t, "Apply, TUN removed, Close", want, snapshot(t))
	})
}

func TestCheckPrefix(t *testing.T) {
	tests := []struct {
		p  string
		ok bool
	}{
		{"198.51.100.0/24", true},
		{"0.0.0.0/1", true}, // covers loopback and multicast, but not only them
		{"10.0.0.0/8", true},
		{"203.0.113.7/32", true},
		{"2001:db8::/32", true},
		{"0.0.0.0/0", false},
		{"127.0.0.1/32", false},
		{"169.254.0.0/16", false},
		{"224.0.0.0/4", false},
		{"255.255.255.255/32", false},
		{"0.0.0.0/32", false},
		{"::1/128", false},
		{"ff02::/16", false},
		{"10.0.0.1/8", false},
	}
	for _, tt := range tests {
		err := checkPrefix(netip.MustParsePrefix(tt.p))
		if (err == nil) != tt.ok {
			t.Errorf("checkPrefix(%s) = %v, want ok=%v", tt.p, err, tt.ok)
		}
	}
}
