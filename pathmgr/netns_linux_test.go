package pathmgr

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// cannotRun fails the test in CI (CI=true) and skips it elsewhere: a CI
// run that silently skipped the kernel tests would prove nothing.
func cannotRun(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("cannot run (and CI=true): "+format, args...)
	}
	t.Skipf(format, args...)
}

// withNetns runs fn on a locked OS thread inside a network namespace made
// for it, and puts the thread back and drops the namespace on every path
// (t.Fatal included). The host's own networking is never touched.
func withNetns(t *testing.T, fn func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		cannotRun(t, "needs root to create network namespaces")
	}
	if _, err := os.Stat("/proc/sys/net/mptcp/enabled"); err != nil {
		cannotRun(t, "the kernel has no MPTCP: %v", err)
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("current netns: %v", err)
	}
	ns, err := netns.New() // moves this thread into the new namespace
	if err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		cannotRun(t, "cannot create a network namespace: %v", err)
	}
	defer func() {
		if err := netns.Set(orig); err != nil {
			// Keep the thread locked: the runtime ends it with this
			// goroutine instead of reusing it in the wrong namespace.
			t.Errorf("back to the original netns: %v", err)
		} else {
			runtime.UnlockOSThread()
		}
		ns.Close()
		orig.Close()
	}()
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatalf("lo: %v", err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		t.Fatalf("lo up: %v", err)
	}
	fn()
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
			// The kernel adds the local table's entries and IPv6
			// link-local and multicast routes on its own, some time
			// after a link comes up (seen late on a loaded machine):
			// none of them is mpvpn's, so they would only make the
			// comparison racy.
			if r.Table == unix.RT_TABLE_LOCAL || (r.Dst != nil && (r.Dst.IP.IsLinkLocalUnicast() || r.Dst.IP.IsMulticast())) {
				continue
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
