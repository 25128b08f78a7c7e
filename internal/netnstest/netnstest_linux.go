package netnstest

import (
	"net"
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Run runs fn on a locked OS thread inside a network namespace made for it
// (loopback up), and puts the thread back and drops the namespace on every
// path, t.Fatal included. Sockets fn creates on this goroutine belong to
// the namespace; other goroutines may use them.
func Run(t testing.TB, fn func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		CannotRun(t, "needs root to create network namespaces")
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
		CannotRun(t, "cannot create a network namespace: %v", err)
	}
	defer func() {
		if err := netns.Set(orig); err != nil {
			// Leave the thread locked: the runtime ends it with this
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

// KernelRoute reports whether the kernel adds r on its own when a link or
// address comes up: the local table's entries and IPv6 link-local and
// multicast routes. Before/after comparisons leave them out, since they
// appear some time after the link does (seen late on a loaded machine) and
// are never mpvpn's.
func KernelRoute(r netlink.Route) bool {
	if r.Table == unix.RT_TABLE_LOCAL {
		return true
	}
	return r.Dst != nil && (r.Dst.IP.IsLinkLocalUnicast() || r.Dst.IP.IsMulticast() || r.Dst.IP.Equal(net.IPv6linklocalallnodes))
}
