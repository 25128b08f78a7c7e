package pathmgr

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/mptcpinfo"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const mark = 0x6d70

// lookup is `ip route get 198.51.100.10 from src mark m`.
func lookup(src netip.Addr, m uint32) (netlink.Route, error) {
	routes, err := netlink.RouteGetWithOptions(farAway, &netlink.RouteGetOptions{SrcAddr: src.AsSlice(), Mark: m})
	if err != nil {
		return netlink.Route{}, err
	}
	if len(routes) != 1 {
		return netlink.Route{}, fmt.Errorf("%d routes", len(routes))
	}
	return routes[0], nil
}

// With a Mark, an uplink's `from <addr>` rule is mpvpn's sockets' alone: a
// socket bound to wan1's address with the mark leaves through wan1, one
// without it goes on to the rules below, where routing's route-all ladder
// takes it into the TUN (here a stand-in at 7200 sends it out of wan0).
// Only what nothing before routed reaches the unmarked fallback rule at
// 7300+i, which keeps the uplink's address on the uplink.
func TestSourceRulesMatchTheMark(t *testing.T) {
	withNetns(t, func() {
		wan0, wan1 := twoUplinks(t)
		before := takeSnapshot(t)
		m := start(t, Config{Uplinks: []UplinkConfig{{Name: "wan0"}, {Name: "wan1"}}, Mark: mark})

		for _, want := range []struct {
			family int
			prio   int
			src    string
			mark   uint32
			table  int
		}{
			{netlink.FAMILY_V4, 7100, "192.0.2.2", mark, 7100},
			{netlink.FAMILY_V6, 7100, "2001:db8:1::2", mark, 7100},
			{netlink.FAMILY_V4, 7101, "100.64.0.2", mark, 7101},
			{netlink.FAMILY_V4, 7300, "192.0.2.2", 0, 7100},
			{netlink.FAMILY_V6, 7300, "2001:db8:1::2", 0, 7100},
			{netlink.FAMILY_V4, 7301, "100.64.0.2", 0, 7101},
		} {
			rules, err := netlink.RuleListFiltered(want.family, &netlink.Rule{Priority: want.prio}, netlink.RT_FILTER_PRIORITY)
			if err != nil {
				t.Fatal(err)
			}
			wholeMask := func(r netlink.Rule) bool { return want.mark == 0 || (r.Mask != nil && *r.Mask == ^uint32(0)) }
			if len(rules) != 1 || rules[0].Mark != want.mark || !wholeMask(rules[0]) || rules[0].Table != want.table ||
				rules[0].Src == nil || !rules[0].Src.IP.Equal(net.ParseIP(want.src)) || rules[0].Invert {
				t.Errorf("rules at %d = %v; want one `from %s fwmark %#x lookup %d`", want.prio, rules, want.src, want.mark, want.table)
			}
		}

		type route struct {
			src   string
			mark  uint32
			via   netlink.Link
			viaGw string
		}
		check := func(phase string, tests []route) {
			t.Helper()
			for _, tt := range tests {
				r, err := lookup(mustAddr(tt.src), tt.mark)
				if err != nil || r.LinkIndex != tt.via.Attrs().Index || !r.Gw.Equal(net.ParseIP(tt.viaGw)) {
					t.Errorf("%s: route from %s mark %#x = %+v, %v; want via %s dev %s", phase, tt.src, tt.mark, r, err, tt.viaGw, tt.via.Attrs().Name)
				}
			}
		}
		check("pathmgr's rules alone", []route{
			{"100.64.0.2", mark, wan1, "100.64.0.1"},
			{"100.64.0.2", 0, wan1, "100.64.0.1"}, // the fallback
			{"192.0.2.2", mark, wan0, "192.0.2.1"},
		})
		// A stand-in for routing's route-all ladder, between the two.
		catchAll := netlink.NewRule()
		catchAll.Priority = 7230
		catchAll.Table = unix.RT_TABLE_MAIN
		if err := netlink.RuleAdd(catchAll); err != nil {
			t.Fatal(err)
		}
		check("with a rule between them", []route{
			{"100.64.0.2", mark, wan1, "100.64.0.1"},
			{"100.64.0.2", 0, wan0, "192.0.2.1"}, // the ladder's
			{"100.64.0.2", mark + 1, wan0, "192.0.2.1"},
			{"192.0.2.2", mark, wan0, "192.0.2.1"},
		})
		if err := netlink.RuleDel(catchAll); err != nil {
			t.Fatal(err)
		}
		// The uplink's table still ends in unreachable for the marked.
		def := &netlink.Route{Table: 7101, LinkIndex: wan1.Attrs().Index, Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, Gw: net.ParseIP("100.64.0.1")}
		if err := netlink.RouteDel(def); err != nil {
			t.Fatal(err)
		}
		if r, err := lookup(mustAddr("100.64.0.2"), mark); err == nil {
			t.Errorf("with wan1's default gone, marked route from 100.64.0.2 = %+v; want unreachable", r)
		}

		if err := m.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		if d := before.diff(takeSnapshot(t)); d != "" {
			t.Errorf("Close left the namespace changed:\n%s", d)
		}
	})
}

// Cleanup, after a crash, removes exactly the crashed run's rules, routes
// and endpoints and lists each; somebody else's rule at mpvpn's
// priorities, table outside its range and endpoints of other shapes stay.
func TestCleanupAfterCrash(t *testing.T) {
	withNetns(t, func() {
		wan0, _ := twoUplinks(t)
		lan := addLink(t, "lan0", "10.9.0.1/24")
		addr3, _ := netlink.ParseAddr("192.0.2.3/24")
		if err := netlink.AddrAdd(wan0, addr3); err != nil {
			t.Fatal(err)
		}
		cfg := Config{Uplinks: []UplinkConfig{{Name: "wan0"}, {Name: "wan1", Backup: true}}, Mark: mark}

		// Nothing to clean: nothing removed.
		if done, err := Cleanup(cfg); err != nil || len(done) != 0 {
			t.Fatalf("Cleanup of a clean namespace = %q, %v", done, err)
		}

		crashed := start(t, cfg)
		ups := crashed.Uplinks()
		crashed.release() // the process dies: only its sockets go

		// Somebody else's, added after the crash.
		foreign := netlink.NewRule()
		foreign.Priority = 7101
		foreign.Table = 100
		foreign.Src = &net.IPNet{IP: net.ParseIP("10.0.0.0").To4(), Mask: net.CIDRMask(8, 32)}
		if err := netlink.RuleAdd(foreign); err != nil {
			t.Fatal(err)
		}
		otherTable := &netlink.Route{Table: 7300, LinkIndex: lan.Attrs().Index, Dst: &net.IPNet{IP: net.ParseIP("10.8.0.0").To4(), Mask: net.CIDRMask(16, 32)}, Scope: netlink.SCOPE_LINK}
		if err := netlink.RouteAdd(otherTable); err != nil {
			t.Fatal(err)
		}
		pm := openPM(t)
		for _, ep := range []Endpoint{
			{Addr: mustAddr("192.0.2.3"), Flags: FlagSubflow},                                         // no dev
			{Addr: mustAddr("10.9.0.1"), Flags: FlagSubflow, IfIndex: lan.Attrs().Index},              // not an uplink
			{Addr: mustAddr("2001:db8:1::2"), Flags: FlagSignal, IfIndex: wan0.Attrs().Index},         // another shape
			{Addr: mustAddr("192.0.2.3"), Port: 4000, Flags: FlagSignal, IfIndex: wan0.Attrs().Index}, // a port
		} {
			if _, err := pm.AddEndpoint(ep); err != nil && !errors.Is(err, syscall.EEXIST) {
				t.Fatalf("add foreign endpoint %s: %v", ep, err)
			}
		}
		withForeign := takeSnapshot(t)

		done, err := Cleanup(cfg)
		if err != nil {
			t.Fatalf("Cleanup: %v", err)
		}
		var want []string
		for i, u := range ups {
			want = append(want, fmt.Sprintf("rule %d: from %s fwmark 0x6d70 lookup %d (IPv4)", 7100+i, u.Addr, u.Table))
			want = append(want, fmt.Sprintf("rule %d: from %s lookup %d (IPv4)", 7300+i, u.Addr, u.Table))
			flags := "subflow"
			if u.Backup {
				flags += " backup"
			}
			want = append(want, fmt.Sprintf("MPTCP endpoint %s id %d %s dev %s", u.Addr, u.EndpointID, flags, u.Name))
		}
		want = append(want,
			"rule 7100: from 2001:db8:1::2 fwmark 0x6d70 lookup 7100 (IPv6)",
			"rule 7300: from 2001:db8:1::2 lookup 7100 (IPv6)",
			"route table 7100: 192.0.2.0/24 dev wan0 (IPv4)",
			"route table 7100: default via 192.0.2.1 dev wan0 (IPv4)",
			"route table 7100: unreachable default metric 4294967295 (IPv4)",
			"route table 7101: 100.64.0.0/24 dev wan1 (IPv4)",
			"route table 7101: default via 100.64.0.1 dev wan1 (IPv4)",
			"route table 7101: unreachable default metric 4294967295 (IPv4)",
			// IPv6 routes get metric 1024 when none is given.
			"route table 7100: 2001:db8:1::/64 dev wan0 metric 1024 (IPv6)",
			"route table 7100: fe80::/64 dev wan0 metric 1024 (IPv6)",
			"route table 7100: default via 2001:db8:1::1 dev wan0 metric 1024 (IPv6)",
			"route table 7100: unreachable default metric 4294967295 (IPv6)",
		)
		slices.Sort(want)
		got := slices.Sorted(slices.Values(done))
		if !slices.Equal(got, want) {
			t.Errorf("Cleanup removed:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
		}

		// What is left is the host before the crash plus the foreign
		// things: the limits and rp_filter are the journal's, not
		// Cleanup's.
		after := takeSnapshot(t)
		if after.limits != withForeign.limits {
			t.Errorf("Cleanup changed the limits: %s, the crashed run left %s", after.limits, withForeign.limits)
		}
		after.limits, after.rpFilter = withForeign.limits, withForeign.rpFilter
		if d := withoutMine(withForeign, ups).diff(after); d != "" {
			t.Errorf("Cleanup removed the wrong things:\n%s", d)
		}
		for _, r := range after.rules {
			if strings.Contains(r, "table 710") {
				t.Errorf("rule left: %s", r)
			}
		}
		if !slices.ContainsFunc(after.rules, func(r string) bool { return strings.Contains(r, "10.0.0.0/8") && strings.Contains(r, "table 100") }) {
			t.Errorf("the foreign rule at 7101 was removed: %v", after.rules)
		}
		if len(after.endpoints) != len(withForeign.endpoints)-len(ups) {
			t.Errorf("endpoints left %v; want the foreign ones of %v", after.endpoints, withForeign.endpoints)
		}
		if done, err := Cleanup(cfg); err != nil || len(done) != 0 {
			t.Errorf("second Cleanup = %q, %v; want nothing", done, err)
		}
	})
}

// withoutMine is s without pathmgr's rules, routes and the crashed run's
// endpoints.
func withoutMine(s snapshot, ups []Uplink) snapshot {
	keep := func(xs []string, mine func(string) bool) []string {
		var out []string
		for _, x := range xs {
			if !mine(x) {
				out = append(out, x)
			}
		}
		return out
	}
	s.rules = keep(s.rules, func(r string) bool { return strings.Contains(r, "table 710") })
	s.routes = keep(s.routes, func(r string) bool { return strings.Contains(r, "Table: 710") })
	s.endpoints = keep(s.endpoints, func(e string) bool {
		return slices.ContainsFunc(ups, func(u Uplink) bool { return strings.HasPrefix(e, fmt.Sprintf("%s id %d ", u.Addr, u.EndpointID)) })
	})
	return s
}

// The mark-only rules rely on the kernel giving every subflow of an MPTCP
// socket the socket's SO_MARK, the ones its path manager opens from the
// endpoints too. Here a rule below pathmgr's sends everything unmarked to
// an unreachable table (as route-all sends it to the TUN): a connection
// from a marked socket gets its second subflow over wan1, and an unmarked
// socket cannot even connect.
//
//	client ns                        server ns
//	wan0 192.0.2.2  ──── veth ────  wan0p 192.0.2.1
//	wan1 100.64.0.2 ──── veth ────  wan1p 100.64.0.1    lo 198.51.100.10 (listens)
func TestSubflowsCarryTheMark(t *testing.T) {
	withNetns(t, func() {
		clientNs, err := netns.Get()
		if err != nil {
			t.Fatal(err)
		}
		defer clientNs.Close()
		serverNs, err := netns.New() // the thread is now in it
		if err != nil {
			cannotRun(t, "second network namespace: %v", err)
		}
		defer serverNs.Close()
		if err := netns.Set(clientNs); err != nil {
			t.Fatal(err)
		}
		inServer := func(fn func()) {
			t.Helper()
			if err := netns.Set(serverNs); err != nil {
				t.Fatal(err)
			}
			defer func() {
				if err := netns.Set(clientNs); err != nil {
					t.Fatal(err)
				}
			}()
			fn()
		}

		for _, n := range []string{"wan0", "wan1"} {
			if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: n}, PeerName: n + "p"}); err != nil {
				t.Fatal(err)
			}
			peer, err := netlink.LinkByName(n + "p")
			if err != nil {
				t.Fatal(err)
			}
			if err := netlink.LinkSetNsFd(peer, int(serverNs)); err != nil {
				t.Fatal(err)
			}
		}
		var ln net.Listener
		inServer(func() {
			for _, a := range []struct{ link, addr string }{{"lo", "198.51.100.10/32"}, {"wan0p", "192.0.2.1/24"}, {"wan1p", "100.64.0.1/24"}} {
				l, err := netlink.LinkByName(a.link)
				if err != nil {
					t.Fatal(err)
				}
				addr, _ := netlink.ParseAddr(a.addr)
				if err := netlink.AddrAdd(l, addr); err != nil {
					t.Fatal(err)
				}
				if err := netlink.LinkSetUp(l); err != nil {
					t.Fatal(err)
				}
			}
			for _, n := range []string{"wan0p", "wan1p"} {
				if err := SetSysctl("net/ipv4/conf/"+n+"/arp_ignore", "1"); err != nil {
					t.Fatal(err)
				}
			}
			var lc net.ListenConfig
			lc.SetMultipathTCP(true)
			if ln, err = lc.Listen(context.Background(), "tcp", "198.51.100.10:7000"); err != nil {
				t.Fatal(err)
			}
		})
		served := make(chan struct{})
		go func() {
			defer close(served)
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() { defer c.Close(); io.Copy(c, c) }()
			}
		}()
		defer func() { ln.Close(); <-served }()

		for _, a := range []struct{ link, addr, gw string }{{"wan0", "192.0.2.2/24", "192.0.2.1"}, {"wan1", "100.64.0.2/24", "100.64.0.1"}} {
			l, err := netlink.LinkByName(a.link)
			if err != nil {
				t.Fatal(err)
			}
			addr, _ := netlink.ParseAddr(a.addr)
			if err := netlink.AddrAdd(l, addr); err != nil {
				t.Fatal(err)
			}
			if err := netlink.LinkSetUp(l); err != nil {
				t.Fatal(err)
			}
			metric := 100
			if a.link == "wan1" {
				metric = 200
			}
			addDefault(t, l, a.gw, metric)
		}
		m := start(t, Config{Uplinks: []UplinkConfig{{Name: "wan0"}, {Name: "wan1"}}, Mark: mark})
		defer m.Close()

		// Everything unmarked that pathmgr's rules do not take is
		// unreachable.
		blackhole := &netlink.Route{Table: 7299, Type: unix.RTN_UNREACHABLE, Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}}
		if err := netlink.RouteAdd(blackhole); err != nil {
			t.Fatal(err)
		}
		catchAll := netlink.NewRule()
		catchAll.Priority = 7200
		catchAll.Table = 7299
		if err := netlink.RuleAdd(catchAll); err != nil {
			t.Fatal(err)
		}

		// dev binds the socket to an interface, as the path manager
		// binds a subflow to its endpoint's; that control dial is plain
		// TCP, or Go would wait out a failed MPTCP attempt and a TCP one.
		dial := func(src string, m uint32, dev string) (net.Conn, error) {
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 10 * time.Second}
			d.SetMultipathTCP(dev == "")
			d.Control = func(_, _ string, rc syscall.RawConn) error {
				var serr error
				err := rc.Control(func(fd uintptr) {
					if m != 0 {
						serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(m))
					}
					if dev != "" && serr == nil {
						serr = unix.BindToDevice(int(fd), dev)
					}
				})
				return errors.Join(err, serr)
			}
			return d.Dial("tcp", "198.51.100.10:7000")
		}
		// The controls. Unmarked from wan0's address: unreachable.
		if c, err := dial("192.0.2.2", 0, ""); err == nil {
			c.Close()
			t.Errorf("an unmarked socket bound to wan0's address connected: it must not match pathmgr's rules")
		}
		// Unmarked from wan1's address and bound to wan1, as the path
		// manager opens a subflow from wan1's endpoint: with no rule
		// finding a route, IPv4 takes the destination for on-link
		// (ip_route_output_key_hash_rcu, Linux 6.18), and the server
		// does not answer ARP for it there (arp_ignore=1). So an
		// unmarked subflow would not come up.
		if c, err := dial("100.64.0.2", 0, "wan1"); err == nil {
			c.Close()
			t.Errorf("an unmarked socket bound to wan1 connected: the test cannot tell a marked subflow from an unmarked one")
		}

		c, err := dial("192.0.2.2", mark, "")
		if err != nil {
			t.Fatalf("marked dial: %v", err)
		}
		defer c.Close()
		buf := make([]byte, 5)
		deadline := time.Now().Add(10 * time.Second)
		for {
			if _, err := c.Write([]byte("hello")); err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(c, buf); err != nil {
				t.Fatal(err)
			}
			info, err := mptcpinfo.GetConn(c.(*net.TCPConn))
			if err != nil {
				t.Fatal(err)
			}
			if info.Fallback {
				t.Fatalf("the connection fell back to TCP: %+v", info)
			}
			if slices.ContainsFunc(info.Subflows, func(s mptcpinfo.Subflow) bool {
				return s.Local.Addr() == mustAddr("100.64.0.2") && s.State == 1
			}) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("no established subflow from wan1 (100.64.0.2) after 10 s: %+v", info.Subflows)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
}
