package concentrator

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/goleak"

	"github.com/mpvpn/mpvpn/internal/netnstest"
	"github.com/mpvpn/mpvpn/tunnel"
)

// The tracker sees every interface's addresses and the IPv4 broadcast
// addresses the kernel routes as local, follows changes, and is nil after
// Close.
func TestOwnAddrs(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	netnstest.Run(t, func() {
		link := addVeth(t, "own0")
		addAddr(t, link, "10.1.2.3/24", "")
		addAddr(t, link, "10.9.0.1/16", "10.9.1.255") // broadcast set explicitly
		addAddr(t, link, "10.7.0.1/31", "")
		addAddr(t, link, "2001:db8::5/64", "")

		o, err := startOwnAddrs(testLogger(t), thisNetns(t), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer o.Close()
		set := o.Snapshot()
		if set == nil {
			t.Fatal("no set after start")
		}
		for _, a := range []string{"127.0.0.1", "::1", "10.1.2.3", "10.1.2.255", "10.9.0.1", "10.9.1.255", "10.9.255.255", "10.7.0.1", "2001:db8::5"} {
			if !set.Contains(netip.MustParseAddr(a)) {
				t.Errorf("%s missing from the own-address set", a)
			}
		}
		// A /31 has no broadcast address (RFC 3021); the network address
		// of a subnet is no host's.
		for _, a := range []string{"10.7.0.0", "10.1.2.0", "10.1.2.4", "2001:db8::6"} {
			if set.Contains(netip.MustParseAddr(a)) {
				t.Errorf("%s in the own-address set", a)
			}
		}

		addAddr(t, link, "192.0.2.9/32", "")
		waitFor(t, "192.0.2.9 added", func() bool {
			s := o.Snapshot()
			return s != nil && s.Contains(netip.MustParseAddr("192.0.2.9"))
		})
		delAddr(t, link, "10.1.2.3/24")
		waitFor(t, "10.1.2.3 and its broadcast removed", func() bool {
			s := o.Snapshot()
			return s != nil && !s.Contains(netip.MustParseAddr("10.1.2.3")) && !s.Contains(netip.MustParseAddr("10.1.2.255"))
		})

		o.Close()
		o.Close() // twice is fine
		if o.Snapshot() != nil {
			t.Error("snapshot still set after Close")
		}
	})
}

// flakySubscribe wraps the real subscription so a test can break it (by
// reporting an error through its ErrorCallback, as the library does) and
// make the next attempts fail.
type flakySubscribe struct {
	mu       sync.Mutex
	fail     int // attempts still to fail
	failures int
	report   func(error)
}

func (f *flakySubscribe) subscribe(ch chan<- netlink.AddrUpdate, done <-chan struct{}, opts netlink.AddrSubscribeOptions) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail > 0 {
		f.fail--
		f.failures++
		return errors.New("injected subscribe failure")
	}
	f.report = opts.ErrorCallback
	return netlink.AddrSubscribeWithOptions(ch, done, opts)
}

func (f *flakySubscribe) failed() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.failures
}

// While the subscription is broken the set is unknown and the policy
// refuses everything; the tracker resubscribes, re-reads the set (with
// what changed meanwhile) and the policy works again.
func TestOwnAddrsFailClosed(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	netnstest.Run(t, func() {
		link := addVeth(t, "own0")
		addAddr(t, link, "10.1.2.3/24", "")

		f := &flakySubscribe{fail: 1}
		if _, err := startOwnAddrs(testLogger(t), thisNetns(t), f.subscribe); err == nil {
			t.Fatal("start succeeded with a failing subscription")
		}

		o, err := startOwnAddrs(testLogger(t), thisNetns(t), f.subscribe)
		if err != nil {
			t.Fatal(err)
		}
		defer o.Close()
		p := &Policy{Listen: netip.MustParseAddrPort("0.0.0.0:7100"), Own: o.Snapshot}
		public := netip.MustParseAddrPort("198.51.100.10:443")
		if err := p.Check(public); err != nil {
			t.Fatalf("public destination: %v", err)
		}

		f.mu.Lock()
		f.fail = 3
		report := f.report
		f.mu.Unlock()
		report(errors.New("injected receive failure"))
		waitFor(t, "the set to become unknown", func() bool { return o.Snapshot() == nil })
		if err := p.Check(public); err == nil || !strings.Contains(err.Error(), "own-address set unavailable") {
			t.Errorf("with the set unknown: %v, want refused as unavailable", err)
		}
		addAddr(t, link, "10.5.5.5/32", "")
		waitFor(t, "three failed resubscriptions", func() bool { return f.failed() == 4 })
		if o.Snapshot() != nil {
			t.Error("set known again after failed resubscriptions")
		}

		waitFor(t, "the set to be read again", func() bool { return o.Snapshot() != nil })
		if err := p.Check(public); err != nil {
			t.Errorf("public destination after recovery: %v", err)
		}
		if err := p.Check(netip.MustParseAddrPort("10.5.5.5:80")); err == nil {
			t.Error("an address added during the outage is not in the set")
		}
	})
}

// Listen starts the tracker and the policy uses it; Serve stops it when it
// returns, and then every destination is refused.
func TestListenOwnAddrs(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	netnstest.Run(t, func() {
		link := addVeth(t, "own0")
		addAddr(t, link, "198.51.100.7/24", "")
		key, err := tunnel.GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		peer, err := tunnel.GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		srv, err := Listen(ctx, Config{
			Listen: "127.0.0.1:0",
			Key:    key,
			Peers:  []tunnel.PublicKey{peer.Public()},
			Deny:   []netip.Prefix{netip.MustParsePrefix("198.51.100.99/32")},
			Logger: testLogger(t),
		})
		if err != nil {
			t.Fatal(err)
		}
		defer srv.Close()
		for _, tc := range []struct {
			dst   string
			allow bool
		}{
			{"198.51.100.7:80", false},   // own
			{"198.51.100.255:80", false}, // own broadcast
			{"198.51.100.99:80", false},  // Config.Deny
			{"198.51.100.10:80", true},
		} {
			if err := srv.policy.Check(netip.MustParseAddrPort(tc.dst)); (err == nil) != tc.allow {
				t.Errorf("%s: %v, want allowed=%v", tc.dst, err, tc.allow)
			}
		}
		addAddr(t, link, "203.0.113.5/32", "")
		waitFor(t, "203.0.113.5 refused as own", func() bool {
			return srv.policy.Check(netip.MustParseAddrPort("203.0.113.5:80")) != nil
		})

		done := make(chan error, 1)
		go func() { done <- srv.Serve(ctx) }()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if err := srv.policy.Check(netip.MustParseAddrPort("198.51.100.10:80")); err == nil {
			t.Error("a destination allowed after Serve returned")
		}
	})
}

// A deny prefix with host bits, or none at all, is a configuration error.
func TestListenDenyInvalid(t *testing.T) {
	for _, p := range []netip.Prefix{netip.MustParsePrefix("198.51.100.7/24"), {}} {
		_, err := Listen(context.Background(), Config{Listen: "127.0.0.1:0", Peers: []tunnel.PublicKey{{}}, Deny: []netip.Prefix{p}})
		if err == nil || !strings.Contains(err.Error(), "deny") {
			t.Errorf("deny %v: Listen returned %v, want a deny error", p, err)
		}
	}
}

// thisNetns is the namespace of the calling (locked) thread, closed when
// the test ends.
func thisNetns(t *testing.T) netns.NsHandle {
	t.Helper()
	ns, err := netns.Get()
	if err != nil {
		t.Fatalf("current netns: %v", err)
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}

func addVeth(t *testing.T, name string) netlink.Link {
	t.Helper()
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
		netnstest.CannotRun(t, "cannot add a veth pair: %v", err)
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		t.Fatal(err)
	}
	return link
}

func addAddr(t *testing.T, link netlink.Link, cidr, brd string) {
	t.Helper()
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	if brd != "" {
		a.Broadcast = net.ParseIP(brd).To4() // the kernel reads 4 bytes
	}
	if err := netlink.AddrAdd(link, a); err != nil {
		t.Fatalf("add %s: %v", cidr, err)
	}
}

func delAddr(t *testing.T, link netlink.Link, cidr string) {
	t.Helper()
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.AddrDel(link, a); err != nil {
		t.Fatalf("delete %s: %v", cidr, err)
	}
}

// waitFor polls cond: the tracker applies changes asynchronously.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}
