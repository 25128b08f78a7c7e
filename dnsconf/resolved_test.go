//go:build linux

package dnsconf

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/mpvpn/mpvpn/internal/netnstest"

	"github.com/godbus/dbus/v5"
	"go.uber.org/goleak"
)

// busConfig is a bus that lets anybody own any name and call anything: a
// stand-in for the system bus, on a socket of the test's own.
const busConfig = `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=%s</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
`

// startBus runs a private dbus-daemon for the test and points
// DBUS_SYSTEM_BUS_ADDRESS at it. It returns the address.
func startBus(t *testing.T) string {
	t.Helper()
	daemon, err := exec.LookPath("dbus-daemon")
	if err != nil {
		netnstest.CannotRun(t, "no dbus-daemon: %v", err)
	}
	dir := t.TempDir()
	conf := filepath.Join(dir, "bus.conf")
	if err := os.WriteFile(conf, fmt.Appendf(nil, busConfig, filepath.Join(dir, "bus")), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(daemon, "--config-file="+conf, "--print-address", "--nofork", "--nopidfile")
	cmd.Stderr = t.Output() // "failed to set fd limit" as non-root and the like
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("dbus-daemon: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	addr, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("dbus-daemon's address: %v", err)
	}
	addr = strings.TrimSpace(addr)
	t.Setenv("DBUS_SYSTEM_BUS_ADDRESS", addr)
	return addr
}

// fakeResolved records the org.freedesktop.resolve1.Manager calls it gets.
// It has no SetLinkDefaultRoute, like resolved before v240; newResolved
// adds it.
type fakeResolved struct {
	mu    sync.Mutex
	calls []string
}

func (f *fakeResolved) record(format string, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, fmt.Sprintf(format, args...))
}

func (f *fakeResolved) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

func (f *fakeResolved) SetLinkDNS(ifindex int32, addrs []linkDNS) *dbus.Error {
	f.record("SetLinkDNS %d %v", ifindex, addrs)
	return nil
}

func (f *fakeResolved) SetLinkDomains(ifindex int32, domains []linkDomain) *dbus.Error {
	f.record("SetLinkDomains %d %v", ifindex, domains)
	return nil
}

func (f *fakeResolved) RevertLink(ifindex int32) *dbus.Error {
	f.record("RevertLink %d", ifindex)
	return nil
}

type newResolved struct{ *fakeResolved }

func (f newResolved) SetLinkDefaultRoute(ifindex int32, enable bool) *dbus.Error {
	f.record("SetLinkDefaultRoute %d %v", ifindex, enable)
	return nil
}

// serve exports obj as resolved's manager on the bus at addr and takes
// resolved's name.
func serve(t *testing.T, addr string, obj any) {
	t.Helper()
	conn, err := dbus.Connect(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if err := conn.Export(obj, resolvedPath, resolvedIface); err != nil {
		t.Fatal(err)
	}
	reply, err := conn.RequestName(resolvedName, dbus.NameFlagDoNotQueue)
	if err != nil || reply != dbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("RequestName: %v, %v", reply, err)
	}
}

func verifyNoLeaks(t *testing.T) {
	t.Cleanup(func() { goleak.VerifyNone(t) }) // first registered: runs last
}

func TestResolved(t *testing.T) {
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name         string
		defaultRoute bool // the fake has SetLinkDefaultRoute
	}{
		{"resolved", true},
		{"resolved before v240", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			verifyNoLeaks(t)
			addr := startBus(t)
			fake := &fakeResolved{}
			var obj any = fake
			if tc.defaultRoute {
				obj = newResolved{fake}
			}
			serve(t, addr, obj)
			log := testLogger(t)
			path := filepath.Join(t.TempDir(), "resolv.conf")

			st, err := Prepare(Config{
				Mode: Auto,
				Link: "lo",
				Servers: []netip.Addr{
					netip.MustParseAddr("10.64.0.53"),
					netip.MustParseAddr("fd00:6d70::53"),
					netip.MustParseAddr("::ffff:192.0.2.53"),
				},
				Path:   path,
				Logger: log,
			})
			if err != nil {
				t.Fatal(err)
			}
			if st.Backend != Resolved || st.Link != "lo" || st.Ifindex != lo.Index {
				t.Fatalf("Prepare: %+v; want resolved on lo (ifindex %d)", st, lo.Index)
			}
			if got := fake.Calls(); len(got) != 0 {
				t.Fatalf("Prepare called %v", got)
			}
			st = roundTrip(t, st)

			if err := Apply(st, log); err != nil {
				t.Fatal(err)
			}
			want := []string{
				fmt.Sprintf("SetLinkDNS %d [{2 [10 64 0 53]} {10 [253 0 109 112 0 0 0 0 0 0 0 0 0 0 0 83]} {2 [192 0 2 53]}]", lo.Index),
				fmt.Sprintf("SetLinkDomains %d [{~. true}]", lo.Index),
			}
			if tc.defaultRoute {
				want = append(want, fmt.Sprintf("SetLinkDefaultRoute %d true", lo.Index))
			}
			if got := fake.Calls(); !slices.Equal(got, want) {
				t.Fatalf("Apply called\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
			if _, err := os.Lstat(path); err == nil {
				t.Fatal("the resolved backend touched resolv.conf")
			}

			msg, err := Undo(st, log)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(msg, "reverted") {
				t.Errorf("Undo: %q", msg)
			}
			want = append(want, fmt.Sprintf("RevertLink %d", lo.Index))
			if got := fake.Calls(); !slices.Equal(got, want) {
				t.Fatalf("Undo: calls\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
		})
	}
}

// After a crash the TUN is gone and resolved has forgotten it: Undo is a
// success that calls nothing, also when the ifindex now has another name.
func TestResolvedUndoLinkGone(t *testing.T) {
	verifyNoLeaks(t)
	addr := startBus(t)
	fake := &fakeResolved{}
	serve(t, addr, newResolved{fake})
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range []State{
		{Backend: Resolved, Link: "mpvpn-gone0", Ifindex: 1 << 30},
		{Backend: Resolved, Link: "mpvpn-gone0", Ifindex: lo.Index},
	} {
		msg, err := Undo(roundTrip(t, st), nil)
		if err != nil || !strings.Contains(msg, "gone; nothing to undo") {
			t.Errorf("Undo(%+v): %q, %v", st, msg, err)
		}
	}
	if got := fake.Calls(); len(got) != 0 {
		t.Fatalf("Undo called %v", got)
	}
}

// Without an owner of resolved's name, or without a bus: Auto takes the
// file, Resolved fails saying why.
func TestResolvedNotRunning(t *testing.T) {
	verifyNoLeaks(t)
	for _, tc := range []struct {
		name string
		bus  func(t *testing.T)
		err  string
	}{
		{"no owner", func(t *testing.T) { startBus(t) }, "systemd-resolved is not running"},
		{"no bus", func(t *testing.T) {
			t.Setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path="+filepath.Join(t.TempDir(), "nobus"))
		}, "cannot reach the system bus"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.bus(t)
			path := filepath.Join(t.TempDir(), "resolv.conf")
			cfg := Config{Mode: Auto, Link: "lo", Servers: servers, Path: path}
			st, err := Prepare(cfg)
			if err != nil {
				t.Fatal(err)
			}
			if st.Backend != File || st.Path != path {
				t.Fatalf("Auto: %+v; want the file backend on %s", st, path)
			}
			cfg.Mode = Resolved
			if _, err := Prepare(cfg); err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("Resolved: %v; want an error with %q", err, tc.err)
			}
		})
	}
}

func TestResolvedNoLink(t *testing.T) {
	verifyNoLeaks(t)
	serve(t, startBus(t), newResolved{&fakeResolved{}})
	for _, link := range []string{"", "mpvpn-nosuch0"} {
		_, err := Prepare(Config{Mode: Resolved, Link: link, Servers: servers, Path: filepath.Join(t.TempDir(), "r")})
		if err == nil {
			t.Errorf("Prepare with link %q: no error", link)
		}
	}
	// A TUN recreated between Prepare and Apply is not the journalled one.
	err := Apply(State{Backend: Resolved, Link: "mpvpn-nosuch0", Ifindex: 1 << 30, Servers: servers}, nil)
	if err == nil {
		t.Error("Apply on a vanished link: no error")
	}
}

// resolved gone while the link is still there: Undo cannot revert, and
// says so rather than claim success.
func TestResolvedUndoNotRunning(t *testing.T) {
	verifyNoLeaks(t)
	startBus(t)
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	msg, err := Undo(State{Backend: Resolved, Link: "lo", Ifindex: lo.Index}, nil)
	if err == nil || !strings.Contains(err.Error(), "RevertLink") {
		t.Fatalf("Undo: %q, %v; want a RevertLink error", msg, err)
	}
}
