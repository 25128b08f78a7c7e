package tuntest

import (
	"fmt"
	"os"
	"runtime"
	"testing"

	"github.com/mpvpn/mpvpn/internal/netnstest"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// CannotRun fails t when CI=true, and skips it otherwise: in CI a test
// that needs root or a TUN and cannot have them must not pass silently.
func CannotRun(t testing.TB, format string, args ...any) {
	t.Helper()
	netnstest.CannotRun(t, format, args...)
}

// NetNS is a network namespace made for one test. It is anonymous (no
// name under /run/netns), so nothing of it can outlive the test process:
// the kernel frees it when the test's cleanup closes the handle and the
// last socket and device in it are closed.
type NetNS struct {
	h netns.NsHandle
}

// NewNetNS creates a network namespace with its loopback up, and
// registers its release with t.Cleanup. It calls CannotRun when the
// process is not root or cannot create namespaces or open /dev/net/tun.
func NewNetNS(t testing.TB) *NetNS {
	t.Helper()
	if os.Geteuid() != 0 {
		CannotRun(t, "needs root for network namespaces and TUN devices")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		CannotRun(t, "no TUN support: %v", err)
	}
	type result struct {
		h   netns.NsHandle
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// Never unlocked: the thread moves into the new namespace and
		// must end with this goroutine rather than go back to the
		// scheduler's pool in the wrong namespace.
		runtime.LockOSThread()
		h, err := netns.New()
		ch <- result{h, err}
	}()
	r := <-ch
	if r.err != nil {
		CannotRun(t, "cannot create a network namespace: %v", r.err)
	}
	n := &NetNS{h: r.h}
	t.Cleanup(func() { n.h.Close() })
	if err := n.Do(func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	}); err != nil {
		t.Fatalf("netns: loopback up: %v", err)
	}
	return n
}

// Do runs f on an OS thread inside the namespace and returns its error.
// Sockets, TUN devices and netlink requests f creates belong to the
// namespace; the sockets may then be used from any goroutine.
func (n *NetNS) Do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		// Never unlocked, as in NewNetNS: the thread dies with the
		// goroutine and takes the namespace switch with it.
		runtime.LockOSThread()
		if err := netns.Set(n.h); err != nil {
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		errc <- f()
	}()
	return <-errc
}
