package pathmgr

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/mpvpn/mpvpn/internal/netnstest"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// cannotRun fails the test under CI and skips it elsewhere.
func cannotRun(t *testing.T, format string, args ...any) {
	t.Helper()
	netnstest.CannotRun(t, format, args...)
}

// withNetns runs fn inside a network namespace of its own (see
// internal/netnstest).
func withNetns(t *testing.T, fn func()) {
	t.Helper()
	netnstest.RequireMPTCP(t)
	netnstest.Run(t, fn)
}

// addLink creates an up veth interface with the given addresses (IPv6
// ones without duplicate address detection, so they are usable at once).
// Its peer, name+"p", stays in the namespace without addresses, up so the
// carrier is. (A veth rather than a dummy: this kernel may lack dummy.)
func addLink(t *testing.T, name string, addrs ...string) netlink.Link {
	t.Helper()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("add veth %s: %v", name, err)
	}
	for _, n := range []string{name + "p", name} {
		l, err := netlink.LinkByName(n)
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		addr, err := netlink.ParseAddr(a)
		if err != nil {
			t.Fatal(err)
		}
		if addr.IP.To4() == nil {
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(link, addr); err != nil {
			t.Fatalf("add %s to %s: %v", a, name, err)
		}
	}
	return link
}

// addDefault adds `default via gw dev link metric metric` to main, as a
// DHCP client (or RA) leaves one per interface.
func addDefault(t *testing.T, link netlink.Link, gw string, metric int) {
	t.Helper()
	ip := net.ParseIP(gw)
	dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	if ip.To4() == nil {
		dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	r := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: dst, Gw: ip, Priority: metric, Protocol: unix.RTPROT_DHCP}
	if err := netlink.RouteAdd(r); err != nil {
		t.Fatalf("add default via %s dev %s: %v", gw, link.Attrs().Name, err)
	}
}

// snapshot is the namespace's routing and MPTCP state as text, for
// before/after comparisons.
type snapshot struct {
	rules, routes, endpoints []string
	limits                   Limits
	rpFilter                 map[string]string
}

func takeSnapshot(t *testing.T) snapshot {
	t.Helper()
	var s snapshot
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := netlink.RuleList(fam)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range rules {
			s.rules = append(s.rules, fmt.Sprintf("%d %s invert=%v mark=%d", fam, r, r.Invert, r.Mark))
		}
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range routes {
			if netnstest.KernelRoute(r) {
				continue // racy, and never mpvpn's
			}
			s.routes = append(s.routes, fmt.Sprintf("%s type=%d metric=%d", r, r.Type, r.Priority))
		}
	}
	pm, err := OpenPM(netns.None())
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	eps, err := pm.Endpoints()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range eps {
		s.endpoints = append(s.endpoints, e.String())
	}
	if s.limits, err = pm.Limits(); err != nil {
		t.Fatal(err)
	}
	s.rpFilter = map[string]string{}
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		v, err := GetSysctl("net/ipv4/conf/" + l.Attrs().Name + "/rp_filter")
		if err != nil {
			t.Fatal(err)
		}
		s.rpFilter[l.Attrs().Name] = v
	}
	slices.Sort(s.rules)
	slices.Sort(s.routes)
	return s
}

func (s snapshot) diff(o snapshot) string {
	var b strings.Builder
	cmp := func(what string, a, b2 []string) {
		if !slices.Equal(a, b2) {
			fmt.Fprintf(&b, "%s differ:\n  before: %s\n  after:  %s\n", what, strings.Join(a, "\n          "), strings.Join(b2, "\n          "))
		}
	}
	cmp("rules", s.rules, o.rules)
	cmp("routes", s.routes, o.routes)
	cmp("endpoints", s.endpoints, o.endpoints)
	if s.limits != o.limits {
		fmt.Fprintf(&b, "limits differ: before %+v after %+v\n", s.limits, o.limits)
	}
	for k, v := range s.rpFilter {
		if o.rpFilter[k] != v {
			fmt.Fprintf(&b, "rp_filter of %s differs: before %s after %s\n", k, v, o.rpFilter[k])
		}
	}
	return b.String()
}

// withoutIDs drops the endpoint ids, which the kernel allocates anew.
func (s snapshot) withoutIDs() snapshot {
	eps := make([]string, len(s.endpoints))
	for i, e := range s.endpoints {
		f := strings.Fields(e)
		if len(f) > 2 && f[1] == "id" {
			f = append(f[:1], f[3:]...)
		}
		eps[i] = strings.Join(f, " ")
	}
	s.endpoints = eps
	return s
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }
