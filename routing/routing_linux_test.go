package routing

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/mpvpn/mpvpn/internal/netnstest"
	"github.com/mpvpn/mpvpn/pathmgr"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// The marks the client uses: its own sockets', then Mark+1 and Mark+2.
const (
	mark       = 0x6d70
	directMark = mark + 1
	tunnelMark = mark + 2
)

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

// topology is a client with one uplink, wan0: 192.0.2.2 on the connected
// 192.0.2.0/24 (the LAN) and 2001:db8:1::2 on 2001:db8:1::/64, default
// via 192.0.2.1 and 2001:db8:1::1 as DHCP and RA leave them; and a real
// TUN, mpvpn0, with 10.77.77.1 and the ULA fd77::1.
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
	}{{wan0, "192.0.2.2/24"}, {wan0, "2001:db8:1::2/64"}, {tun, "10.77.77.1/32"}, {tun, "fd77::1/128"}} {
		addr, _ := netlink.ParseAddr(a.addr)
		addr.Flags = unix.IFA_F_NODAD
		if err := netlink.AddrAdd(a.link, addr); err != nil {
			t.Fatalf("add %s: %v", a.addr, err)
		}
	}
	for _, gw := range []string{"192.0.2.1", "2001:db8:1::1"} {
		if err := netlink.RouteAdd(defaultVia(wan0, gw)); err != nil {
			t.Fatalf("default via %s: %v", gw, err)
		}
	}
	return wan0, tun
}

func defaultVia(link netlink.Link, gw string) *netlink.Route {
	ip := net.ParseIP(gw)
	dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	if ip.To4() == nil {
		dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	return &netlink.Route{LinkIndex: link.Attrs().Index, Dst: dst, Gw: ip, Priority: 100}
}

// snapshot lists every rule and route of the namespace (as `ip rule`, `ip
// -6 rule` and `ip route show table all`, both families, would).
func snapshot(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := netlink.RuleList(fam)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			out = append(out, fmt.Sprintf("rule %d %s invert=%v mark=%#x suppress=%d proto=%d", fam, r, r.Invert, r.Mark, r.SuppressPrefixlen, r.Protocol))
		}
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range routes {
			if netnstest.KernelRoute(r) {
				continue // racy, and never mpvpn's
			}
			out = append(out, fmt.Sprintf("route %s type=%d metric=%d proto=%d", r, r.Type, r.Priority, r.Protocol))
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

// Addresses the lookups go to.
const (
	routed4 = "198.51.100.10" // in the split Routes
	routed6 = "2001:db8:77::1"
	public4 = "203.0.113.10" // in no Route
	public6 = "2001:db8:99::1"
	lan4    = "192.0.2.50" // wan0's connected networks
	lan6    = "2001:db8:1::50"
	excl4   = "203.0.113.200" // in the Exclude of the modes that have one
	excl6   = "2001:db8:99:1::1"
	uplink4 = "192.0.2.2" // wan0's own addresses
	uplink6 = "2001:db8:1::2"
)

// lookup is one `ip route get <dst> [from <src>] [oif <oif>] [mark <mark>]`.
type lookup struct {
	dst  string
	mark uint32
	src  string // a socket bound to this address
	oif  string // a socket bound to this interface
	want string // "tun", "wan0" or "unreachable"
}

func (l lookup) String() string {
	s := l.dst
	if l.src != "" {
		s += " from " + l.src
	}
	if l.oif != "" {
		s += " oif " + l.oif
	}
	if l.mark != 0 {
		s += fmt.Sprintf(" mark %#x", l.mark)
	}
	return s
}

// where answers l in the current namespace.
func where(t *testing.T, l lookup, wan0, tun netlink.Link) string {
	t.Helper()
	opts := &netlink.RouteGetOptions{Mark: l.mark, Oif: l.oif}
	if l.src != "" {
		opts.SrcAddr = net.ParseIP(l.src)
	}
	routes, err := netlink.RouteGetWithOptions(net.ParseIP(l.dst), opts)
	switch {
	case errors.Is(err, unix.ENETUNREACH) || errors.Is(err, unix.EHOSTUNREACH):
		return "unreachable"
	case err != nil:
		return "error: " + err.Error()
	case len(routes) != 1:
		return fmt.Sprintf("%d routes", len(routes))
	case routes[0].LinkIndex == wan0.Attrs().Index:
		return "wan0"
	case tun != nil && routes[0].LinkIndex == tun.Attrs().Index:
		return "tun"
	}
	return fmt.Sprintf("ifindex %d", routes[0].LinkIndex)
}

func check(t *testing.T, phase string, ls []lookup, wan0, tun netlink.Link) {
	t.Helper()
	for _, l := range ls {
		if got := where(t, l, wan0, tun); got != l.want {
			t.Errorf("%s: %s goes to %s, want %s", phase, l, got, l.want)
		}
	}
}

// startPathmgr sets up pathmgr's per-uplink rules (`from <addr> fwmark
// mark lookup 7100`, above the ladder), as the client does.
func startPathmgr(t *testing.T) *pathmgr.Manager {
	t.Helper()
	netnstest.RequireMPTCP(t)
	m, err := pathmgr.Start(context.Background(), pathmgr.Config{Uplinks: []pathmgr.UplinkConfig{{Name: "wan0"}}, Mark: mark})
	if err != nil {
		t.Fatalf("pathmgr: %v", err)
	}
	return m
}

// Every mode, with pathmgr's rules in place as in the client: where each
// kind of packet goes, then with main's default routes gone, then with
// the TUN gone; and Close, and Cleanup after a crash, put every rule and
// route back as it was.
func TestModes(t *testing.T) {
	split := []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24"), netip.MustParsePrefix("2001:db8:77::/48")}
	// Common to every mode: mpvpn's own sockets never enter the TUN,
	// bound to the uplink's address (pathmgr's table) or not (main).
	own := []lookup{
		{dst: routed4, mark: mark, want: "wan0"},
		{dst: routed6, mark: mark, want: "wan0"},
		{dst: public4, mark: mark, want: "wan0"},
		{dst: public6, mark: mark, want: "wan0"},
		{dst: routed4, mark: mark, src: uplink4, want: "wan0"},
		{dst: public6, mark: mark, src: uplink6, want: "wan0"},
	}
	ownWithoutMain := []lookup{
		{dst: public4, mark: mark, want: "unreachable"},
		{dst: public6, mark: mark, want: "unreachable"},
	}
	tests := []struct {
		name      string
		cfg       Config
		lookups   []lookup
		noMainDef []lookup // main's default routes deleted
		noTUN     []lookup // then the TUN deleted too
	}{
		{
			name: "split",
			cfg:  Config{Routes: split},
			lookups: []lookup{
				{dst: routed4, want: "tun"},
				{dst: routed6, want: "tun"},
				{dst: public4, want: "wan0"},
				{dst: public6, want: "wan0"},
				{dst: lan4, want: "wan0"},
				{dst: lan6, want: "wan0"},
				{dst: routed4, src: uplink4, want: "tun"},
				{dst: public4, src: uplink4, want: "wan0"},
				{dst: routed4, mark: tunnelMark, want: "tun"}, // no TunnelMark here: just a mark
			},
			noMainDef: []lookup{{dst: public4, want: "unreachable"}, {dst: routed4, want: "tun"}},
		},
		{
			name: "split, Exclude inside a route",
			cfg:  Config{Routes: split, Exclude: prefixes("198.51.100.128/25", "2001:db8:77:1::/64")},
			lookups: []lookup{
				{dst: routed4, want: "tun"},
				{dst: "198.51.100.200", want: "wan0"},
				{dst: routed6, want: "tun"},
				{dst: "2001:db8:77:1::1", want: "wan0"},
			},
			noMainDef: []lookup{{dst: "198.51.100.200", want: "unreachable"}, {dst: "2001:db8:77:1::1", want: "unreachable"}},
		},
		{
			name: "split, direct and tunnel marks",
			cfg:  Config{Routes: split, DirectMark: directMark, TunnelMark: tunnelMark},
			lookups: []lookup{
				{dst: routed4, want: "tun"},
				// T's default route is the tunnel mark's only.
				{dst: public4, want: "wan0"},
				{dst: public6, want: "wan0"},
				{dst: lan4, want: "wan0"},
				{dst: public4, mark: tunnelMark, want: "tun"},
				{dst: public6, mark: tunnelMark, want: "tun"},
				{dst: lan4, mark: tunnelMark, want: "tun"},
				{dst: public4, mark: tunnelMark, src: uplink4, want: "tun"},
				{dst: routed4, mark: directMark, want: "wan0"},
				{dst: routed6, mark: directMark, want: "wan0"},
			},
			noMainDef: []lookup{
				{dst: public4, mark: directMark, want: "unreachable"},
				{dst: public6, mark: directMark, want: "unreachable"},
				{dst: public4, mark: tunnelMark, want: "tun"},
			},
			noTUN: []lookup{
				{dst: public4, mark: tunnelMark, want: "unreachable"},
				{dst: public6, mark: tunnelMark, want: "unreachable"},
				{dst: lan4, mark: tunnelMark, want: "unreachable"},
			},
		},
		{
			name: "route-all",
			cfg:  Config{RouteAll: true},
			lookups: []lookup{
				{dst: public4, want: "tun"},
				{dst: public6, want: "tun"},
				{dst: lan4, want: "tun"},
				{dst: lan6, want: "tun"},
				{dst: public4, src: uplink4, want: "tun"}, // pathmgr's rule is for the marked only
				{dst: public6, src: uplink6, want: "tun"},
				{dst: lan4, mark: mark, want: "wan0"},
				{dst: public4, mark: tunnelMark, want: "tun"}, // no TunnelMark here: just a mark
				// Bound to an interface, a socket skips the TUN's
				// routes: the firewall's to stop, not routing's.
				{dst: public4, oif: "wan0", want: "wan0"},
			},
			noMainDef: []lookup{{dst: public4, want: "tun"}, {dst: public6, want: "tun"}},
		},
		{
			name: "route-all, AllowLAN",
			cfg:  Config{RouteAll: true, AllowLAN: true},
			lookups: []lookup{
				{dst: public4, want: "tun"},
				{dst: public6, want: "tun"},
				{dst: lan4, want: "wan0"},
				{dst: lan6, want: "wan0"},
				{dst: lan4, src: uplink4, want: "wan0"},
				{dst: public4, src: uplink4, want: "tun"},
			},
			noMainDef: []lookup{{dst: public4, want: "tun"}, {dst: lan4, want: "wan0"}},
		},
		{
			name: "route-all, Exclude",
			cfg:  Config{RouteAll: true, Exclude: prefixes("203.0.113.128/25", "2001:db8:99:1::/64")},
			lookups: []lookup{
				{dst: public4, want: "tun"},
				{dst: public6, want: "tun"},
				{dst: excl4, want: "wan0"},
				{dst: excl6, want: "wan0"},
				{dst: excl4, src: uplink4, want: "wan0"},
				{dst: lan4, want: "tun"},
			},
			noMainDef: []lookup{
				{dst: excl4, want: "unreachable"}, // never into the TUN
				{dst: excl6, want: "unreachable"},
				{dst: public4, want: "tun"},
			},
		},
		{
			name: "route-all, direct and tunnel marks, Exclude",
			cfg:  Config{RouteAll: true, DirectMark: directMark, TunnelMark: tunnelMark, Exclude: prefixes("203.0.113.128/25")},
			lookups: []lookup{
				{dst: public4, want: "tun"},
				{dst: public4, mark: directMark, want: "wan0"},
				{dst: public6, mark: directMark, want: "wan0"},
				{dst: lan4, mark: directMark, want: "wan0"},
				{dst: public4, mark: directMark, src: uplink4, want: "wan0"},
				{dst: public4, mark: tunnelMark, want: "tun"},
				{dst: public6, mark: tunnelMark, want: "tun"},
				{dst: excl4, want: "wan0"},
				{dst: excl4, mark: tunnelMark, want: "tun"}, // the app's mark wins
				// Bound to an interface, even a tunnel-marked socket
				// skips the TUN, and for IPv4 the kernel sends it
				// on-link rather than unreachable: the firewall's to
				// stop (see the package comment).
				{dst: public4, mark: tunnelMark, oif: "wan0", want: "wan0"},
				{dst: public6, mark: tunnelMark, oif: "wan0", want: "unreachable"},
			},
			noMainDef: []lookup{
				{dst: public4, mark: directMark, want: "unreachable"}, // not into the TUN
				{dst: public6, mark: directMark, want: "unreachable"},
				{dst: public4, want: "tun"},
			},
			noTUN: []lookup{
				{dst: public4, mark: tunnelMark, want: "unreachable"},
				{dst: public6, mark: tunnelMark, want: "unreachable"},
				{dst: excl4, mark: tunnelMark, want: "unreachable"},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			withNetns(t, func() {
				wan0, tun := topology(t)
				pm := startPathmgr(t)
				defer pm.Close()
				cfg := tt.cfg
				cfg.TUN, cfg.Mark = "mpvpn0", mark
				before := snapshot(t)

				r := apply(t, cfg)
				check(t, "applied", slices.Concat(own, tt.lookups), wan0, tun)
				if err := r.Close(); err != nil {
					t.Fatalf("Close: %v", err)
				}
				sameState(t, "Apply+Close", before, snapshot(t))

				// A crash: Apply, then the process dies without
				// Close. Cleanup removes exactly what it added.
				crashed := apply(t, cfg)
				var want []string
				for _, rl := range crashed.rules {
					want = append(want, rl.String())
				}
				for _, rt := range crashed.routes {
					fam, dst := "IPv4", rt.Dst.String()
					if rt.Dst.IP.To4() == nil {
						fam = "IPv6"
					}
					if ones, _ := rt.Dst.Mask.Size(); ones == 0 {
						dst = "default"
					}
					if fam == "IPv6" {
						dst += " dev mpvpn0 metric 1024"
					} else {
						dst += " dev mpvpn0"
					}
					want = append(want, fmt.Sprintf("route table 7200: %s (%s)", dst, fam))
				}
				crashed.release()
				done, err := Cleanup(Config{Table: cfg.Table, RulePrio: cfg.RulePrio})
				if err != nil {
					t.Fatalf("Cleanup: %v", err)
				}
				slices.Sort(want)
				if got := slices.Sorted(slices.Values(done)); !slices.Equal(got, want) {
					t.Errorf("Cleanup removed\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
				}
				sameState(t, "crash+Cleanup", before, snapshot(t))

				r = apply(t, cfg)
				defer r.Close()
				for _, gw := range []string{"192.0.2.1", "2001:db8:1::1"} {
					if err := netlink.RouteDel(defaultVia(wan0, gw)); err != nil {
						t.Fatal(err)
					}
				}
				check(t, "without main's defaults", slices.Concat(ownWithoutMain, tt.noMainDef), wan0, tun)
				for _, gw := range []string{"192.0.2.1", "2001:db8:1::1"} {
					if err := netlink.RouteAdd(defaultVia(wan0, gw)); err != nil {
						t.Fatal(err)
					}
				}
				if err := netlink.LinkDel(tun); err != nil {
					t.Fatal(err)
				}
				check(t, "without the TUN", tt.noTUN, wan0, nil)
			})
		})
	}
}

// The ladder as the package comment draws it, for everything at once.
func TestLadder(t *testing.T) {
	c := Config{TUN: "mpvpn0", Mark: mark, DirectMark: directMark, TunnelMark: tunnelMark, RouteAll: true, AllowLAN: true,
		Exclude: prefixes("203.0.113.0/24", "198.51.100.7/32", "2001:db8:99::/48")}
	if err := c.check(); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		for _, r := range ladder(&c, fam) {
			got = append(got, r.String())
		}
	}
	want := []string{
		"rule 7200: fwmark 0x6d70 lookup main (IPv4)",
		"rule 7201: fwmark 0x6d70 unreachable (IPv4)",
		"rule 7202: fwmark 0x6d71 lookup main (IPv4)",
		"rule 7203: fwmark 0x6d71 unreachable (IPv4)",
		"rule 7204: fwmark 0x6d72 lookup 7200 (IPv4)",
		"rule 7205: fwmark 0x6d72 unreachable (IPv4)",
		"rule 7210: to 203.0.113.0/24 lookup main (IPv4)",
		"rule 7210: to 198.51.100.7/32 lookup main (IPv4)",
		"rule 7211: to 203.0.113.0/24 unreachable (IPv4)",
		"rule 7211: to 198.51.100.7/32 unreachable (IPv4)",
		"rule 7220: from all lookup main suppress_prefixlength 0 (IPv4)",
		"rule 7230: from all lookup 7200 (IPv4)",
		"rule 7200: fwmark 0x6d70 lookup main (IPv6)",
		"rule 7201: fwmark 0x6d70 unreachable (IPv6)",
		"rule 7202: fwmark 0x6d71 lookup main (IPv6)",
		"rule 7203: fwmark 0x6d71 unreachable (IPv6)",
		"rule 7204: fwmark 0x6d72 lookup 7200 (IPv6)",
		"rule 7205: fwmark 0x6d72 unreachable (IPv6)",
		"rule 7210: to 2001:db8:99::/48 lookup main (IPv6)",
		"rule 7211: to 2001:db8:99::/48 unreachable (IPv6)",
		"rule 7220: from all lookup main suppress_prefixlength 0 (IPv6)",
		"rule 7230: from all lookup 7200 (IPv6)",
	}
	if !slices.Equal(got, want) {
		t.Errorf("ladder:\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
	// Split mode, nothing new set: the ladder today's client gets.
	c = Config{TUN: "mpvpn0", Mark: mark, Routes: testRoutes}
	if err := c.check(); err != nil {
		t.Fatal(err)
	}
	got = nil
	for _, r := range ladder(&c, unix.AF_INET) {
		got = append(got, r.String())
	}
	want = []string{
		"rule 7200: fwmark 0x6d70 lookup main (IPv4)",
		"rule 7201: fwmark 0x6d70 unreachable (IPv4)",
		"rule 7230: from all lookup 7200 suppress_prefixlength 0 (IPv4)",
	}
	if !slices.Equal(got, want) {
		t.Errorf("split ladder:\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}

// The kernel holds the rules as written: read back, each is the same
// rule, tagged with Protocol, and `ip rule` shows what the package
// comment says.
func TestRulesAsTheKernelHoldsThem(t *testing.T) {
	withNetns(t, func() {
		topology(t)
		cfg := Config{TUN: "mpvpn0", Mark: mark, Routes: testRoutes, DirectMark: directMark, TunnelMark: tunnelMark, Exclude: prefixes("198.51.100.128/25")}
		r := apply(t, cfg)
		defer r.Close()
		k := r.k
		for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
			rules, err := k.rules(fam)
			if err != nil {
				t.Fatal(err)
			}
			var mine []rule
			for _, rl := range rules {
				if r.cfg.ownsPrio(rl.prio) {
					mine = append(mine, rl)
				}
			}
			var want []rule
			for _, rl := range r.rules {
				if rl.family == fam {
					want = append(want, rl)
				}
			}
			if !slices.EqualFunc(mine, want, func(a, b rule) bool { return a.String() == b.String() && a.proto == Protocol && b.proto == Protocol }) {
				t.Errorf("%s: the kernel holds\n  %v\nwant\n  %v", familyName(fam), mine, want)
			}
		}
		out, err := runIP("-4", "rule", "show")
		if err != nil {
			cannotRun(t, "no ip(8): %v", err)
		}
		for _, want := range []string{
			"7200:\tfrom all fwmark 0x6d70 lookup main proto 109",
			"7201:\tfrom all fwmark 0x6d70 unreachable proto 109",
			"7204:\tfrom all fwmark 0x6d72 lookup 7200 proto 109",
			"7211:\tfrom all to 198.51.100.128/25 unreachable proto 109",
			"7230:\tfrom all lookup 7200 suppress_prefixlength 0 proto 109",
		} {
			if !strings.Contains(out, want) {
				t.Errorf("`ip rule` lacks %q:\n%s", want, out)
			}
		}
	})
}

// CheckHost refuses somebody else's rule at mpvpn's priorities, a rule
// anywhere that looks up its table and a route in its table, before
// anything changes; what an earlier run of mpvpn left is no conflict.
func TestCheckHost(t *testing.T) {
	cfg := Config{TUN: "mpvpn0", Mark: mark, RouteAll: true}
	tests := []struct {
		name    string
		foreign func(t *testing.T, tun netlink.Link)
		message string // "" : no conflict
	}{
		{"clean host", func(*testing.T, netlink.Link) {}, ""},
		{"a rule at mpvpn's priorities", func(t *testing.T, _ netlink.Link) {
			addRule(t, rule{family: unix.AF_INET, prio: 7250, action: unix.FR_ACT_TO_TBL, table: 100, suppress: -1})
		}, "rule 7250: from all lookup 100 (IPv4)"},
		{"an IPv6 rule that looks like mpvpn's but is not tagged", func(t *testing.T, _ netlink.Link) {
			addRule(t, rule{family: unix.AF_INET6, prio: 7201, action: unix.FR_ACT_UNREACHABLE, hasMark: true, mark: mark, mask: ^uint32(0), suppress: -1})
		}, "rule 7201: fwmark 0x6d70 unreachable (IPv6)"},
		{"a rule elsewhere that looks up mpvpn's table", func(t *testing.T, _ netlink.Link) {
			addRule(t, rule{family: unix.AF_INET, prio: 100, action: unix.FR_ACT_TO_TBL, table: 7200, suppress: -1})
		}, "rule 100: from all lookup 7200 (IPv4)"},
		{"a route in mpvpn's table", func(t *testing.T, tun netlink.Link) {
			if err := netlink.RouteAdd(&netlink.Route{Table: 7200, LinkIndex: tun.Attrs().Index, Dst: ipNet(netip.MustParsePrefix("10.1.0.0/16")), Scope: netlink.SCOPE_LINK}); err != nil {
				t.Fatal(err)
			}
		}, "route table 7200: 10.1.0.0/16 dev mpvpn0 proto 3 (IPv4)"},
		{"mpvpn's own, from a crashed run", func(t *testing.T, _ netlink.Link) {
			crashed := apply(t, cfg)
			crashed.release()
		}, ""},
		{"mpvpn's own, from an earlier version", func(t *testing.T, _ netlink.Link) {
			addRule(t, rule{family: unix.AF_INET, prio: 7200, action: unix.FR_ACT_TO_TBL, table: 7200, invert: true, hasMark: true, mark: mark, mask: ^uint32(0), suppress: -1})
		}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			withNetns(t, func() {
				_, tun := topology(t)
				tt.foreign(t, tun)
				before := snapshot(t)
				err := CheckHost(cfg)
				if tt.message == "" {
					if err != nil {
						t.Fatalf("CheckHost: %v", err)
					}
					r := apply(t, cfg)
					if err := r.Close(); err != nil {
						t.Fatal(err)
					}
					return
				}
				if err == nil || !strings.Contains(err.Error(), tt.message) {
					t.Fatalf("CheckHost = %v; want an error naming %q", err, tt.message)
				}
				if r, err := Apply(cfg); err == nil || !strings.Contains(err.Error(), tt.message) {
					if r != nil {
						r.Close()
					}
					t.Errorf("Apply = %v; want an error naming %q", err, tt.message)
				}
				sameState(t, "CheckHost and a refused Apply", before, snapshot(t))
			})
		})
	}
}

// Cleanup after a crash removes mpvpn's rules and routes and nothing of
// anybody else's: not a rule at mpvpn's priorities, not one that looks
// like mpvpn's but lacks its tag, not a route in another table.
func TestCleanupLeavesOthersAlone(t *testing.T) {
	withNetns(t, func() {
		_, tun := topology(t)
		before := snapshot(t)
		if done, err := Cleanup(Config{}); err != nil || len(done) != 0 {
			t.Fatalf("Cleanup of a clean namespace = %q, %v", done, err)
		}
		cfg := Config{TUN: "mpvpn0", Mark: mark, RouteAll: true, AllowLAN: true}
		crashed := apply(t, cfg)
		crashed.release()

		addRule(t, rule{family: unix.AF_INET, prio: 7250, action: unix.FR_ACT_TO_TBL, table: 100, suppress: -1})
		addRule(t, rule{family: unix.AF_INET6, prio: 7201, action: unix.FR_ACT_UNREACHABLE, hasMark: true, mark: mark, mask: ^uint32(0), suppress: -1})
		addRule(t, rule{family: unix.AF_INET, prio: 7200, action: unix.FR_ACT_TO_TBL, table: unix.RT_TABLE_MAIN, hasMark: true, mark: mark, mask: ^uint32(0), suppress: -1, proto: unix.RTPROT_STATIC})
		if err := netlink.RouteAdd(&netlink.Route{Table: 7300, LinkIndex: tun.Attrs().Index, Dst: ipNet(netip.MustParsePrefix("10.1.0.0/16")), Scope: netlink.SCOPE_LINK}); err != nil {
			t.Fatal(err)
		}
		if err := netlink.RouteAdd(&netlink.Route{Table: 7200, LinkIndex: tun.Attrs().Index, Dst: ipNet(netip.MustParsePrefix("10.2.0.0/16")), Scope: netlink.SCOPE_LINK}); err != nil {
			t.Fatal(err)
		}
		withForeign := snapshot(t)

		done, err := Cleanup(Config{})
		if err != nil {
			t.Fatalf("Cleanup: %v", err)
		}
		want := []string{
			"rule 7230: from all lookup 7200 (IPv4)",
			"rule 7220: from all lookup main suppress_prefixlength 0 (IPv4)",
			"rule 7201: fwmark 0x6d70 unreachable (IPv4)",
			"rule 7200: fwmark 0x6d70 lookup main (IPv4)",
			"rule 7230: from all lookup 7200 (IPv6)",
			"rule 7220: from all lookup main suppress_prefixlength 0 (IPv6)",
			"rule 7201: fwmark 0x6d70 unreachable (IPv6)",
			"rule 7200: fwmark 0x6d70 lookup main (IPv6)",
			"route table 7200: default dev mpvpn0 (IPv4)",
			"route table 7200: default dev mpvpn0 metric 1024 (IPv6)",
		}
		if !slices.Equal(done, want) {
			t.Errorf("Cleanup removed, in this order:\n  %s\nwant\n  %s", strings.Join(done, "\n  "), strings.Join(want, "\n  "))
		}
		// Left: exactly the host and the foreign things.
		var foreign []string
		for _, s := range withForeign {
			if !slices.Contains(before, s) && !strings.Contains(s, "proto=109") {
				foreign = append(foreign, s)
			}
		}
		if len(foreign) != 5 {
			t.Fatalf("foreign state: %d lines, want 5:\n%s", len(foreign), strings.Join(foreign, "\n"))
		}
		sameState(t, "Cleanup", slices.Sorted(slices.Values(slices.Concat(before, foreign))), snapshot(t))
	})
}

// nsNone opens sockets in the calling thread's namespace.
var nsNone = netns.None()

// runIP runs ip(8), for what `ip rule` shows; the package never does.
func runIP(args ...string) (string, error) {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// addRule adds somebody else's rule (or an earlier version's).
func addRule(t *testing.T, r rule) {
	t.Helper()
	k, err := openKernel(nsNone)
	if err != nil {
		t.Fatal(err)
	}
	defer k.close()
	if err := k.addRule(r); err != nil {
		t.Fatalf("add %s: %v", r, err)
	}
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
			{"local table", with(func(c *Config) { c.Table = 255 }), "table 255"},
			{"after main", with(func(c *Config) { c.RulePrio = 32766 }), "priority 32766"},
			{"range past main", with(func(c *Config) { c.RulePrio = 32700 }), "priority 32700"},
			{"host bits", with(func(c *Config) { c.Routes = prefixes("198.51.100.1/24") }), "did you mean 198.51.100.0/24"},
			{"everything", with(func(c *Config) { c.Routes = prefixes("0.0.0.0/0") }), "route-all"},
			{"everything v6", with(func(c *Config) { c.Routes = prefixes("::/0") }), "route-all"},
			{"loopback", with(func(c *Config) { c.Routes = prefixes("127.0.0.0/8") }), "loopback"},
			{"multicast", with(func(c *Config) { c.Routes = prefixes("239.1.0.0/16") }), "multicast"},
			{"link-local v6", with(func(c *Config) { c.Routes = prefixes("fe80::/64") }), "link-local"},
			{"mapped", with(func(c *Config) { c.Routes = prefixes("::ffff:198.51.100.0/120") }), "198.51.100.0/24"},
			{"twice", with(func(c *Config) { c.Routes = prefixes("198.51.100.0/24", "198.51.100.0/24") }), "listed twice"},
			{"invalid", with(func(c *Config) { c.Routes = []netip.Prefix{{}} }), "not a valid prefix"},
			{"direct mark is mpvpn's", with(func(c *Config) { c.DirectMark = mark }), "direct mark 0x6d70"},
			{"tunnel mark is mpvpn's", with(func(c *Config) { c.TunnelMark = mark }), "tunnel mark 0x6d70"},
			{"one mark for both", with(func(c *Config) { c.DirectMark, c.TunnelMark = directMark, directMark }), "both 0x6d71"},
			{"LAN without route-all", with(func(c *Config) { c.AllowLAN = true }), "route-all"},
			{"exclude everything", with(func(c *Config) { c.RouteAll, c.Exclude = true, prefixes("::/0") }), "covers everything"},
			{"exclude host bits", with(func(c *Config) { c.Exclude = prefixes("203.0.113.1/24") }), "did you mean 203.0.113.0/24"},
			{"exclude twice", with(func(c *Config) { c.Exclude = prefixes("192.0.2.0/24", "192.0.2.0/24") }), "listed twice"},
			{"route inside exclude", with(func(c *Config) { c.Exclude = prefixes("198.51.0.0/16") }), "route 198.51.100.0/24 lies inside excluded 198.51.0.0/16"},
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
		// What is valid.
		for _, c := range []Config{
			{TUN: "mpvpn0", Mark: mark, RouteAll: true},
			{TUN: "mpvpn0", Mark: mark, TunnelMark: tunnelMark}, // split, only the marked app tunnelled
			{TUN: "mpvpn0", Mark: mark, RouteAll: true, AllowLAN: true, Exclude: prefixes("169.254.169.254/32")},
		} {
			if err := c.Validate(); err != nil {
				t.Errorf("Validate(%+v): %v", c, err)
			}
		}
	})
}

// When the kernel refuses a route half-way, Apply takes back the ones it
// added. With IPv6 off on the TUN, the IPv4 routes go in and the IPv6 one
// fails, in split mode as in route-all (which must not leave IPv6 out of
// the tunnel unnoticed).
func TestApplyRollsBack(t *testing.T) {
	for _, cfg := range []Config{
		{TUN: "mpvpn0", Routes: testRoutes, Mark: mark},
		{TUN: "mpvpn0", RouteAll: true, Mark: mark},
	} {
		withNetns(t, func() {
			topology(t)
			if err := os.WriteFile("/proc/sys/net/ipv6/conf/mpvpn0/disable_ipv6", []byte("1"), 0o644); err != nil {
				t.Fatal(err)
			}
			before := snapshot(t)
			r, err := Apply(cfg)
			if err == nil {
				r.Close()
				t.Fatal("Apply succeeded with IPv6 off on the TUN")
			}
			want := "add route 2001:db8:77::/48"
			if cfg.RouteAll {
				want = "add route ::/0"
			}
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not name the refused route (%s)", err, want)
			}
			sameState(t, "a failed Apply", before, snapshot(t))
		})
	}
}

func TestApplyRemovesStaleState(t *testing.T) {
	withNetns(t, func() {
		topology(t)
		before := snapshot(t)
		// An earlier version's rule, left by a crash.
		addRule(t, rule{family: unix.AF_INET, prio: 7200, action: unix.FR_ACT_TO_TBL, table: 7200, invert: true, hasMark: true, mark: mark, mask: ^uint32(0), suppress: -1})
		cfg := Config{TUN: "mpvpn0", Routes: testRoutes, Mark: mark, RouteAll: true}
		// A crash: Apply, then the process dies without Close.
		crashed := apply(t, cfg)
		crashed.release()
		afterFirst := snapshot(t)
		// The restart may carry other routes; the old ones must go.
		cfg.Routes, cfg.RouteAll = prefixes("198.51.100.0/24"), false
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
		if n := count(afterSecond, "proto=109"); n != 2*3+1 {
			t.Errorf("%d rules and routes of mpvpn's after the restart, want 7 (3 rules per family, 1 route):\n%s", n, strings.Join(afterSecond, "\n"))
		}
		if n := count(afterSecond, "invert=true"); n != 0 {
			t.Errorf("the earlier version's rule survived the restart:\n%s", strings.Join(afterSecond, "\n"))
		}
		if n := count(afterFirst, "Table: 7200"); n != 5 {
			t.Errorf("the crashed run did not leave its 5 routes: %v", afterFirst)
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
		r := apply(t, Config{TUN: "mpvpn0", Routes: testRoutes, Mark: mark, TunnelMark: tunnelMark})
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
