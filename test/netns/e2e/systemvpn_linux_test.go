package e2e

// End-to-end tests of the system-VPN features (issue 9): route-all, split
// tunnelling with --exclude, per-app rules by uid and cgroup, `mpvpn
// exec`, the kill switch, and crash safety with all of them on.
//
// What the tests add to the topology, inside its own namespaces only:
//
//   - a direct path (openDirectPath): the concentrator forwards, and the
//     internet host routes back through it, so traffic that leaves an
//     uplink outside the tunnel reaches the destination, which logs the
//     client's uplink address (or ISP B's NAT address) instead of the
//     concentrator's. Without it a leak would be invisible at the
//     destination.
//   - IPv6 on the concentrator ↔ internet link (addIPv6Internet).
//   - a private LAN on wan0 (addLAN), for --allow-lan.
//
// The cgroup tests run the client and every program that must sit in a
// cgroup through withCgroup2: `ip netns exec` gives a process a fresh
// /sys without the host's cgroup2 mount, so the shell mounts cgroup2 in
// that process's own mount namespace (private to it) first. The hierarchy
// is the host's: every cgroup a test makes is below a top-level name of
// its own (mpvpn-test-<prefix>, the client's, and mpvpn-test-<prefix>-apps,
// the test's), removed when the test ends.

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/cgroup"
	"github.com/mpvpn/mpvpn/internal/netnstest"
	"github.com/mpvpn/mpvpn/test/netns/internal/netns"
	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// Addresses the tests add.
var (
	// dest2 is a second HTTP server on the internet host (lo of P-inet),
	// for destinations excluded from the tunnel.
	dest2 = netip.MustParseAddr("198.51.100.20")
	// IPv6: the concentrator ↔ internet link, and the internet host's
	// server address on its lo.
	concInet6 = netip.MustParsePrefix("2001:db8:3::1/64")
	inetConc6 = netip.MustParsePrefix("2001:db8:3::2/64")
	dest6     = netip.MustParseAddr("2001:db8:100::10")
	// IPv6 on wan0 (addIPv6Uplink): the client and ISP A.
	client6 = netip.MustParsePrefix("2001:db8:a::2/64")
	ispA6   = netip.MustParsePrefix("2001:db8:a::1/64")
	// The private LAN on wan0 (the firewall allows only private LAN
	// prefixes; the topology's own uplink networks are public ones).
	lanClient = netip.MustParsePrefix("192.168.50.2/24")
	lanGW     = netip.MustParsePrefix("192.168.50.1/24")
)

// uids the per-app tests run programs as (setpriv; no passwd entry needed).
const (
	uidTunnel  = 1001
	uidDirect  = 1002
	uidBlock   = 1003
	uidNoRules = 1004
)

// atOnce bounds "refused at once": a refusal takes milliseconds, a
// connection that is dropped instead would take curl's -m (20 s).
const atOnce = 2 * time.Second

// newSysEnv is newEnv without a client, with a prefix known before the
// topology exists, so that the test's cgroups are removed after the
// topology (and every process in it) is gone, whatever happened.
func newSysEnv(t *testing.T, o options) *env {
	t.Helper()
	if o.topo.Prefix == "" {
		o.topo.Prefix = topo.NewPrefix()
	}
	name := "mpvpn-test-" + o.topo.Prefix
	t.Cleanup(func() { removeTestCgroups(t, name) })
	o.noClient = true
	e := newEnv(t, o)
	if e.cgroupName() != name {
		t.Fatalf("the harness names the client's cgroup %q, want %q", e.cgroupName(), name)
	}
	// The client namespace's own resolv.conf, which route-all's DNS hook
	// rewrites while the client runs (never the host's).
	if err := e.tp.SetResolvConf(e.tp.Client, clientResolvConf); err != nil {
		t.Fatal(err)
	}
	return e
}

// clientResolvConf is the client namespace's resolv.conf before mpvpn: a
// resolver on the LAN side of ISP A, as DHCP would leave it.
const clientResolvConf = "# the client namespace's own (mpvpn's tests)\nnameserver 192.0.2.1\noptions timeout:1 attempts:1\n"

// cgroupMount is where the host (this test process) sees cgroup v2.
func cgroupMount(t *testing.T) string {
	t.Helper()
	m, err := cgroup.Mount()
	if err != nil {
		failOrSkip(t, fmt.Sprintf("the cgroup tests need cgroup v2: %v", err))
	}
	return m
}

// failOrSkip fails under CI=true and skips otherwise.
func failOrSkip(t *testing.T, msg string) {
	t.Helper()
	netnstest.CannotRun(t, "%s", msg)
}

// needTools fails (CI) or skips when a tool a test runs is missing.
func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			failOrSkip(t, "this test needs "+tool)
		}
	}
}

// removeTestCgroups removes what is left of the test's own top-level
// cgroups (name and name-*), deepest first, only with rmdir: a cgroup that
// still has processes stays, and the test fails.
func removeTestCgroups(t *testing.T, name string) {
	m, err := cgroup.Mount()
	if err != nil {
		return
	}
	tops, _ := filepath.Glob(filepath.Join(m, name))
	more, _ := filepath.Glob(filepath.Join(m, name+"-*"))
	for _, top := range append(tops, more...) {
		var dirs []string
		filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := syscall.Rmdir(dirs[i]); err != nil {
				t.Errorf("test cgroup %s left behind: %v", dirs[i], err)
			}
		}
	}
}

// cgroupWrap mounts cgroup2 in the mount namespace `ip netns exec` made
// for this process, then runs the command.
const cgroupWrap = `mount -t cgroup2 none /sys/fs/cgroup && exec "$@"`

func withCgroup2(args ...string) []string {
	return append([]string{"sh", "-c", cgroupWrap, "sh"}, args...)
}

// inCgroup runs args in the cgroup at path (relative to the cgroup2
// mount), joined by the shell before it execs them.
func inCgroup(path string, args ...string) []string {
	return append([]string{"sh", "-c",
		`mount -t cgroup2 none /sys/fs/cgroup && echo $$ > "/sys/fs/cgroup$0/cgroup.procs" && exec "$@"`, path}, args...)
}

// asUID runs args as uid (and gid) n with no supplementary groups.
func asUID(n int, args ...string) []string {
	return append([]string{"setpriv", fmt.Sprintf("--reuid=%d", n), fmt.Sprintf("--regid=%d", n), "--clear-groups"}, args...)
}

// openDirectPath lets traffic that leaves an uplink outside the tunnel
// reach the internet host: the concentrator forwards, and the internet
// host routes everything back through it.
func (e *env) openDirectPath(t *testing.T) {
	t.Helper()
	if err := netns.Sysctl(e.tp.Conc, "net.ipv4.ip_forward", "1"); err != nil {
		t.Fatal(err)
	}
	e.tp.Exec(e.tp.Inet, "ip", "route", "add", "default", "via", "198.18.3.1")
}

// startHTTP serves e.www on addr:80 of the internet host (one more
// server next to the harness's on DestAddr).
func (e *env) startHTTP(t *testing.T, name string, addr netip.Addr) *topo.Proc {
	t.Helper()
	script := httpServer
	if addr.Is6() {
		script = "import socket, http.server\nhttp.server.ThreadingHTTPServer.address_family = socket.AF_INET6\n" + httpServer
	}
	p := e.tp.Start(e.tp.Inet, name, "python3", "-c", script, e.www, addr.String(), "80")
	p.WaitListen(netip.AddrPortFrom(addr, 80).String())
	return p
}

// addDest2 adds dest2 to the internet host and serves HTTP on it.
func (e *env) addDest2(t *testing.T) *topo.Proc {
	t.Helper()
	e.tp.Exec(e.tp.Inet, "ip", "addr", "add", netip.PrefixFrom(dest2, 32).String(), "dev", "lo")
	return e.startHTTP(t, "http2", dest2)
}

// addIPv6Internet gives the concentrator ↔ internet link IPv6, the
// internet host dest6 with an HTTP server, and the concentrator a route
// to it. The client side is left as the topology has it: no IPv6 but
// link-local addresses, no IPv6 route.
func (e *env) addIPv6Internet(t *testing.T) *topo.Proc {
	t.Helper()
	tp := e.tp
	tp.Exec(tp.Conc, "ip", "-6", "addr", "add", concInet6.String(), "dev", "inet", "nodad")
	tp.Exec(tp.Inet, "ip", "-6", "addr", "add", inetConc6.String(), "dev", "conc", "nodad")
	tp.Exec(tp.Inet, "ip", "-6", "addr", "add", netip.PrefixFrom(dest6, 128).String(), "dev", "lo", "nodad")
	tp.Exec(tp.Conc, "ip", "-6", "route", "add", netip.PrefixFrom(dest6, 128).String(), "via", inetConc6.Addr().String())
	return e.startHTTP(t, "http6", dest6)
}

// addIPv6Uplink gives wan0 IPv6 (2001:db8:a::2/64, default route via
// ISP A's 2001:db8:a::1) and a direct IPv6 path from it to dest6: ISP A
// and the concentrator forward IPv6, the internet host routes back. Call
// it after addIPv6Internet. A client on this host has IPv6 outside the
// tunnel, so an IPv6 leak would reach the destination.
func (e *env) addIPv6Uplink(t *testing.T) {
	t.Helper()
	tp := e.tp
	for _, c := range []struct {
		ns   string
		args []string
	}{
		{tp.ISPA, []string{"addr", "add", ispA6.String(), "dev", "cust", "nodad"}},
		{tp.ISPA, []string{"addr", "add", "2001:db8:1::1/64", "dev", "bb", "nodad"}},
		{tp.ISPA, []string{"route", "add", "default", "via", "2001:db8:1::2"}},
		{tp.Conc, []string{"addr", "add", "2001:db8:1::2/64", "dev", "ispa", "nodad"}},
		{tp.Conc, []string{"route", "add", ispA6.Masked().String(), "via", "2001:db8:1::1"}},
		{tp.Inet, []string{"route", "add", "default", "via", concInet6.Addr().String()}},
		{tp.Client, []string{"addr", "add", client6.String(), "dev", "wan0", "nodad"}},
		{tp.Client, []string{"route", "add", "default", "via", ispA6.Addr().String(), "dev", "wan0", "metric", "100"}},
	} {
		tp.Exec(c.ns, append([]string{"ip", "-6"}, c.args...)...)
	}
	for _, ns := range []string{tp.ISPA, tp.Conc} {
		if err := netns.Sysctl(ns, "net.ipv6.conf.all.forwarding", "1"); err != nil {
			t.Fatal(err)
		}
	}
}

// addLAN puts a private LAN on wan0: the client 192.168.50.2/24, ISP A's
// side 192.168.50.1/24 with an HTTP server on port 8080.
func (e *env) addLAN(t *testing.T) *topo.Proc {
	t.Helper()
	tp := e.tp
	tp.Exec(tp.Client, "ip", "addr", "add", lanClient.String(), "dev", "wan0")
	tp.Exec(tp.ISPA, "ip", "addr", "add", lanGW.String(), "dev", "cust")
	p := tp.Start(tp.ISPA, "http-lan", "python3", "-c", httpServer, e.www, lanGW.Addr().String(), "8080")
	p.WaitListen(netip.AddrPortFrom(lanGW.Addr(), 8080).String())
	return p
}

// urlOf is the URL of index.html on addr:80, with a marker in the query
// that finds the request in the server's log.
func urlOf(addr netip.Addr, marker string) string {
	return "http://" + netip.AddrPortFrom(addr, 80).String() + "/index.html?" + marker
}

// sourcesOf returns the source addresses server p logged for the
// requests carrying marker.
func sourcesOf(p *topo.Proc, marker string) []string {
	re := regexp.MustCompile(`(?m)^(\S+) - - \[[^\]]*\] "GET /[^" ]*\?` + regexp.QuoteMeta(marker) + ` HTTP/1.1" 200`)
	var out []string
	for _, m := range re.FindAllStringSubmatch(p.Log(), -1) {
		out = append(out, m[1])
	}
	return out
}

// run runs args in the client namespace and returns the exit code, the
// output and how long it took. Without SUDO_UID and SUDO_GID: under sudo,
// `mpvpn exec` would run its program as the sudo user, and a setpriv
// after it could not change uid.
func (e *env) run(t *testing.T, args ...string) (int, string, time.Duration) {
	t.Helper()
	cmd := e.tp.Cmd(e.tp.Client, args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "SUDO_UID=") && !strings.HasPrefix(kv, "SUDO_GID=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	start := time.Now()
	out, err := cmd.CombinedOutput()
	took := time.Since(start)
	if err == nil {
		return 0, string(out), took
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), string(out), took
	}
	t.Fatalf("%v: %v", args, err)
	return -1, "", took
}

// curlArgs is a curl command line wrapped by wrap (setpriv, a cgroup,
// mpvpn exec), with extra arguments (the URL among them). -g: IPv6
// literals in URLs are not globs.
func curlArgs(wrap []string, extra ...string) []string {
	return append(append(append([]string(nil), wrap...), "curl", "-gsS", "-m", "20"), extra...)
}

// want is where a request should end up.
type want int

const (
	viaTunnel want = iota // the destination sees the concentrator
	direct                // the destination sees the client's uplink (or ISP B's NAT)
	refused               // curl exit 7, connection refused, at once
)

func (w want) String() string {
	return [...]string{"through the tunnel", "directly", "refused"}[w]
}

// expectSource runs a curl (wrap, then extra curl arguments, then the URL
// for addr with marker) and checks where it ended up.
func (e *env) expectSource(t *testing.T, what string, srv *topo.Proc, addr netip.Addr, w want, wrap []string, extra ...string) {
	t.Helper()
	marker := strings.NewReplacer(" ", "-", "/", "-", ":", "-", ",", "").Replace(what)
	url := urlOf(addr, marker)
	if w == refused {
		extra = append(extra, "-v") // "connect to ... failed: Connection refused"
	}
	code, out, took := e.run(t, curlArgs(wrap, append(extra, url)...)...)
	switch w {
	case refused:
		if code != 7 || !strings.Contains(out, "Connection refused") || took > atOnce {
			t.Errorf("%s: curl exit %d after %v: %q; want exit 7, connection refused, within %v", what, code, took.Round(time.Millisecond), out, atOnce)
		}
		if src := sourcesOf(srv, marker); len(src) > 0 {
			t.Errorf("%s: blocked, yet the destination saw it from %v", what, src)
		}
		t.Logf("%s: refused in %v", what, took.Round(time.Millisecond))
		return
	}
	if code != 0 || out != "hello from the internet\n" {
		t.Errorf("%s: curl exit %d: %q; want the served body", what, code, out)
		return
	}
	src := sourcesOf(srv, marker)
	var ok bool
	switch w {
	case viaTunnel:
		ok = len(src) == 1 && (src[0] == topo.ConcAddr.String() || src[0] == concInet6.Addr().String())
	case direct:
		ok = len(src) == 1 && e.clientAddr(src[0])
	}
	if !ok {
		t.Errorf("%s: the destination saw %v; want one request %s", what, src, w)
		return
	}
	t.Logf("%s: %s, the destination saw %s", what, w, src[0])
}

// clientAddr reports whether a is an address of the client's uplinks as
// the internet sees it (its own, or ISP B's NAT).
func (e *env) clientAddr(a string) bool {
	if a == client6.Addr().String() {
		return true
	}
	for _, u := range e.tp.Uplinks {
		if a == u.Addr.String() || a == u.Public.String() {
			return true
		}
	}
	return false
}

// routeGet is `ip route get` in the client namespace.
func (e *env) routeGet(t *testing.T, args ...string) string {
	t.Helper()
	ipArgs := []string{"ip"}
	for _, a := range args {
		if p, err := netip.ParseAddr(a); err == nil && p.Is6() {
			ipArgs = append(ipArgs, "-6")
			break
		}
	}
	return strings.TrimSpace(e.tp.Output(e.tp.Client, append(append(ipArgs, "route", "get"), args...)...))
}

// stopClient stops the client with SIGTERM and waits for a clean exit.
func (e *env) stopClient(t *testing.T) {
	t.Helper()
	if err := e.client.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := e.client.Wait(15 * time.Second); err != nil {
		t.Fatalf("the client did not exit cleanly: %v\n%s", err, tail(e.client.Log(), 30))
	}
}

// killClient kills the client with SIGKILL and waits for it to be gone.
func (e *env) killClient(t *testing.T) {
	t.Helper()
	if err := e.client.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.client.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the client survived SIGKILL for 10 s")
	}
}

// key is the client's key file.
func (e *env) key() string { return filepath.Join(e.dir, "client.key") }

// TestRouteAll: with --route-all and no --route, an app's flow to a
// destination nothing routes into the TUN goes through the tunnel, whose
// subflows leave through both uplinks; so does a socket bound to an
// uplink's address; and IPv6 is routed into the TUN.
func TestRouteAll(t *testing.T) {
	e := newSysEnv(t, options{topo: shaped()})
	tp := e.tp
	http6 := e.addIPv6Internet(t)
	e.noRoute = true
	e.startClient(t, e.key(), "--route-all")

	// Nothing routes DestNet into the TUN in particular: only the default.
	if all := tp.Output(tp.Client, "ip", "route", "show", "table", "all"); strings.Contains(all, "198.51.100.") {
		t.Errorf("a route for the destination network exists, so this is not route-all:\n%s", all)
	}
	if r := e.routeGet(t, topo.DestAddr.String()); !strings.Contains(r, "dev mpvpn0") {
		t.Errorf("ip route get %s: %q, want dev mpvpn0", topo.DestAddr, r)
	}

	t.Run("app flow through the tunnel on both uplinks", func(t *testing.T) {
		e.expectSource(t, "route-all get", e.http, topo.DestAddr, viaTunnel, nil)
		const size = 8 << 20
		before, after := e.download(t, "big", e.randomFile(t, "big", size), "60")
		total, share := shares(before.rx, after.rx)
		t.Logf("download of %d bytes: %d bytes received on the uplinks, wan0 %.0f%%, wan1 %.0f%%", size, total, 100*share[0], 100*share[1])
		if total < size {
			t.Errorf("only %d bytes crossed the uplinks for a %d-byte download", total, size)
		}
		for i, s := range share {
			if s < 0.1 {
				t.Errorf("wan%d carried %.0f%% of the download: the tunnel's subflows do not use both uplinks", i, 100*s)
			}
		}
		st, raw := e.status(t, "--socket", e.clientSocket())
		for _, u := range st.Uplinks {
			if u.Subflows < 1 || u.RxBytes == 0 {
				t.Errorf("status: uplink %s has %d subflows and %d bytes received:\n%s", u.Name, u.Subflows, u.RxBytes, raw)
			}
		}
		if len(st.Uplinks) != 2 {
			t.Errorf("status shows %d uplinks, want 2:\n%s", len(st.Uplinks), raw)
		}
	})

	t.Run("socket bound to an uplink address", func(t *testing.T) {
		for _, u := range tp.Uplinks {
			if r := e.routeGet(t, topo.DestAddr.String(), "from", u.Addr.String()); !strings.Contains(r, "dev mpvpn0") {
				t.Errorf("ip route get %s from %s: %q, want dev mpvpn0", topo.DestAddr, u.Addr, r)
			}
			e.expectSource(t, "bound to "+u.Addr.String(), e.http, topo.DestAddr, viaTunnel, nil, "--interface", u.Addr.String())
		}
	})

	t.Run("IPv6", func(t *testing.T) {
		addrs := tp.Output(tp.Client, "ip", "-6", "addr", "show", "dev", "mpvpn0")
		if !strings.Contains(addrs, "fd6d:7076::1/128") {
			t.Errorf("the TUN lacks fd6d:7076::1/128 with --route-all:\n%s", addrs)
		}
		r := e.routeGet(t, dest6.String())
		if !strings.Contains(r, "dev mpvpn0") {
			t.Fatalf("ip -6 route get %s: %q, want dev mpvpn0", dest6, r)
		}
		t.Logf("ip -6 route get %s: %s", dest6, r)
		e.expectSource(t, "IPv6 get", http6, dest6, viaTunnel, nil, "-6")
		// A bulk transfer, bytes intact.
		const size = 4 << 20
		sum := e.randomFile(t, "big6", size)
		out := filepath.Join(t.TempDir(), "big6")
		if code, msg := e.curl(t, "-6", "-g", "-m", "60", "-o", out, "http://["+dest6.String()+"]/big6"); code != 0 {
			t.Fatalf("IPv6 download: curl exit %d: %s", code, msg)
		}
		if got := fileSum(t, out); got != sum {
			t.Fatalf("IPv6 download: sha256 %s, want %s", got, sum)
		}
		t.Logf("IPv6 download of %d bytes through the tunnel: intact", size)
	})
}

// TestSplitTunnel: --exclude destinations leave directly, --route ones
// through the tunnel, in split mode and with --route-all.
func TestSplitTunnel(t *testing.T) {
	excl := netip.PrefixFrom(dest2, 32).String()
	for _, tc := range []struct {
		name  string
		route bool // the harness's --route DestNet
		args  []string
	}{
		{"route and exclude", true, []string{"--exclude", excl}},
		{"route-all and exclude", false, []string{"--route-all", "--exclude", excl}},
		{"route-all, route and exclude", false, []string{"--route-all", "--route", topo.DestNet.String(), "--exclude", excl}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newSysEnv(t, options{topo: topo.Options{NoEmu: true}})
			e.openDirectPath(t)
			http2 := e.addDest2(t)
			// The control: without a client both destinations are reached
			// directly, and the servers tell.
			e.expectSource(t, "no client, dest", e.http, topo.DestAddr, direct, nil)
			e.expectSource(t, "no client, dest2", http2, dest2, direct, nil)

			e.noRoute = !tc.route
			e.startClient(t, e.key(), tc.args...)
			if r := e.routeGet(t, topo.DestAddr.String()); !strings.Contains(r, "dev mpvpn0") {
				t.Errorf("ip route get %s: %q, want dev mpvpn0", topo.DestAddr, r)
			}
			if r := e.routeGet(t, dest2.String()); !strings.Contains(r, "dev wan0") {
				t.Errorf("ip route get %s (excluded): %q, want dev wan0 (main's default)", dest2, r)
			}
			e.expectSource(t, "routed", e.http, topo.DestAddr, viaTunnel, nil)
			e.expectSource(t, "excluded", http2, dest2, direct, nil)
			// A socket bound to the uplink's address: the same decisions.
			a := e.tp.Uplinks[topo.A].Addr.String()
			e.expectSource(t, "routed, bound to wan0's address", e.http, topo.DestAddr, viaTunnel, nil, "--interface", a)
			e.expectSource(t, "excluded, bound to wan0's address", http2, dest2, direct, nil, "--interface", a)
			e.stopClient(t)
		})
	}
}

// appCgroups creates the test's own cgroups for --rule cgroup:...
// selectors, before the client resolves them: {tunnel,direct,block} and
// direct/below under the test's top-level name <client's cgroup>-apps. It
// returns the paths relative to the cgroup2 mount, by action.
func (e *env) appCgroups(t *testing.T) map[string]string {
	t.Helper()
	m := cgroupMount(t)
	top := e.cgroupName() + "-apps"
	out := map[string]string{}
	for _, k := range []string{"tunnel", "direct", "block"} {
		if err := os.MkdirAll(filepath.Join(m, top, k), 0o755); err != nil {
			t.Fatal(err)
		}
		out[k] = "/" + top + "/" + k
	}
	if err := os.Mkdir(filepath.Join(m, top, "direct", "below"), 0o755); err != nil {
		t.Fatal(err)
	}
	return out
}

// clientCgroups lists the client's cgroup tree as the host sees it
// (directories relative to the cgroup2 mount), "" when there is none.
func (e *env) clientCgroups(t *testing.T) string {
	t.Helper()
	m := cgroupMount(t)
	var dirs []string
	filepath.WalkDir(filepath.Join(m, e.cgroupName()), func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, strings.TrimPrefix(p, m))
		}
		return nil
	})
	return strings.Join(dirs, "\n")
}

// TestPerAppRules: in one run, programs as different uids and in
// different cgroups, and under `mpvpn exec`, go through the tunnel,
// directly or nowhere as their rules say, and the destination sees the
// two sources; a blocked one is refused at once. Once with --route-all
// (the default is the tunnel) and once with no route at all (the default
// is direct; only tunnel rules send anything into the TUN).
func TestPerAppRules(t *testing.T) {
	needTools(t, "setpriv")
	for _, mode := range []struct {
		name string
		args []string
		dflt want // a program no rule matches
	}{
		{"route-all", []string{"--route-all"}, viaTunnel},
		{"rules only", nil, direct},
	} {
		t.Run(mode.name, func(t *testing.T) {
			e := newSysEnv(t, options{topo: topo.Options{NoEmu: true}})
			e.openDirectPath(t)
			http6 := e.addIPv6Internet(t)
			cg := e.appCgroups(t)
			args := append([]string(nil), mode.args...)
			args = append(args,
				"--rule", fmt.Sprintf("uid:%d=tunnel", uidTunnel),
				"--rule", fmt.Sprintf("uid:%d=direct", uidDirect),
				"--rule", fmt.Sprintf("uid:%d=block", uidBlock),
				"--rule", "cgroup:"+cg["tunnel"]+"=tunnel",
				"--rule", "cgroup:"+cg["direct"]+"=direct",
				"--rule", "cgroup:"+cg["block"]+"=block")
			e.noRoute = true
			e.clientWrap = withCgroup2()
			e.startClient(t, e.key(), args...)
			if strings.Contains(e.client.Log(), "no cgroup v2") {
				t.Fatalf("the client saw no cgroup v2 (the wrapper's mount did not work):\n%s", tail(e.client.Log(), 20))
			}
			if got, want := e.clientCgroups(t), "/"+e.cgroupName(); !strings.Contains(got, want+"/tunnel") || !strings.Contains(got, want+"/direct") || !strings.Contains(got, want+"/block") {
				t.Fatalf("the client's cgroups for mpvpn exec: %q, want %s/{tunnel,direct,block}", got, want)
			}
			mpvpnExec := func(kind string, inner ...string) []string {
				return append(withCgroup2(bin.mpvpn, "exec", "--"+kind, "--cgroup", e.cgroupName(), "--"), inner...)
			}
			srv, dst := e.http, topo.DestAddr
			for _, c := range []struct {
				what string
				wrap []string
				w    want
			}{
				{"root, no rule", nil, mode.dflt},
				{fmt.Sprintf("uid %d, no rule", uidNoRules), asUID(uidNoRules), mode.dflt},
				{fmt.Sprintf("uid %d tunnel", uidTunnel), asUID(uidTunnel), viaTunnel},
				{fmt.Sprintf("uid %d direct", uidDirect), asUID(uidDirect), direct},
				{fmt.Sprintf("uid %d block", uidBlock), asUID(uidBlock), refused},
				{"cgroup tunnel", inCgroup(cg["tunnel"]), viaTunnel},
				{"cgroup direct", inCgroup(cg["direct"]), direct},
				{"cgroup block", inCgroup(cg["block"]), refused},
				// A cgroup rule matches the cgroup and everything below it.
				{"cgroup below direct", inCgroup(cg["direct"] + "/below"), direct},
				// The first match wins: the uid rules come first.
				{"cgroup direct, uid tunnel", inCgroup(cg["direct"], asUID(uidTunnel)...), viaTunnel},
				{"mpvpn exec --tunnel", mpvpnExec("tunnel"), viaTunnel},
				{"mpvpn exec --direct", mpvpnExec("direct"), direct},
				{"mpvpn exec --block", mpvpnExec("block"), refused},
				// mpvpn exec's rules come first: they win over the user's.
				{fmt.Sprintf("mpvpn exec --tunnel, uid %d block", uidBlock), mpvpnExec("tunnel", asUID(uidBlock)...), viaTunnel},
				{fmt.Sprintf("mpvpn exec --direct, uid %d tunnel", uidTunnel), mpvpnExec("direct", asUID(uidTunnel)...), direct},
				{fmt.Sprintf("mpvpn exec --block, uid %d direct", uidDirect), mpvpnExec("block", asUID(uidDirect)...), refused},
			} {
				e.expectSource(t, c.what, srv, dst, c.w, c.wrap)
			}
			if mode.dflt == viaTunnel {
				// IPv6, which only the tunnel gives this client.
				e.expectSource(t, "IPv6, root, no rule", http6, dest6, viaTunnel, nil, "-6")
				e.expectSource(t, fmt.Sprintf("IPv6, uid %d tunnel", uidTunnel), http6, dest6, viaTunnel, asUID(uidTunnel), "-6")
				e.expectSource(t, fmt.Sprintf("IPv6, uid %d block", uidBlock), http6, dest6, refused, asUID(uidBlock), "-6")
				e.expectSource(t, "IPv6, mpvpn exec --block", http6, dest6, refused, mpvpnExec("block"), "-6")
				// Direct, with no IPv6 route outside the tunnel: it must
				// not go through the tunnel (it goes nowhere).
				code, out, took := e.run(t, curlArgs(asUID(uidDirect), "-6", "-m", "3", urlOf(dest6, "ipv6-direct"))...)
				if code == 0 || len(sourcesOf(http6, "ipv6-direct")) > 0 {
					t.Errorf("IPv6, uid %d direct, no IPv6 outside the tunnel: curl exit %d: %q; the destination saw %v", uidDirect, code, out, sourcesOf(http6, "ipv6-direct"))
				}
				t.Logf("IPv6, uid %d direct, no IPv6 outside the tunnel: curl exit %d after %v: %s", uidDirect, code, took.Round(time.Millisecond), strings.TrimSpace(out))
			}
			// The destination saw both sources in this one run.
			seen := map[string]bool{}
			for _, m := range regexp.MustCompile(`(?m)^(\S+) - - `).FindAllStringSubmatch(srv.Log(), -1) {
				seen[m[1]] = true
			}
			if !seen[topo.ConcAddr.String()] || !seen[e.tp.Uplinks[topo.A].Addr.String()] {
				t.Errorf("the destination saw %v; want both the concentrator and the client's uplink", seen)
			}

			e.stopClient(t)
			if got := e.clientCgroups(t); got != "" {
				t.Errorf("the stopped client left its cgroups behind:\n%s", got)
			}
		})
	}
}

// capture records what leaves the client's uplinks (tcpdump -Q out on
// each, in the client namespace: after netfilter, so a packet the kill
// switch rejects is never seen).
type capture struct {
	e     *env
	procs []*topo.Proc
	files []string
}

func (e *env) startCapture(t *testing.T) *capture {
	t.Helper()
	c := &capture{e: e}
	dir := t.TempDir()
	for _, u := range e.tp.Uplinks {
		f := filepath.Join(dir, u.Iface+".pcap")
		// -Z root: the file is in the test's directory. --immediate-mode
		// and -U: each packet is read and written as it comes; without
		// them libpcap hands packets over in blocks, and tcpdump stopped
		// loses the last second or so (the positive control caught that).
		p := e.tp.Start(e.tp.Client, "tcpdump-"+u.Iface, "tcpdump", "-i", u.Iface, "-Q", "out", "-nn", "--immediate-mode", "-U", "-Z", "root", "-w", f)
		e.waitLog(t, p, "listening on", 10*time.Second)
		c.procs = append(c.procs, p)
		c.files = append(c.files, f)
	}
	return c
}

// packet is one captured packet, as tcpdump -nn -t prints it.
type packet struct{ iface, line string }

func (p packet) String() string { return p.iface + ": " + p.line }

// stop ends the capture and returns every packet it saw.
func (c *capture) stop(t *testing.T) []packet {
	t.Helper()
	var out []packet
	for i, p := range c.procs {
		p.Stop()
		b, err := exec.Command("tcpdump", "-nn", "-t", "-r", c.files[i]).Output()
		if err != nil {
			t.Fatalf("tcpdump -r %s: %v\n%s", c.files[i], err, p.Log())
		}
		for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			if l != "" {
				out = append(out, packet{c.e.tp.Uplinks[i].Iface, l})
			}
		}
	}
	return out
}

// to reports whether p is an IPv4 or IPv6 packet to addr (any port).
func (p packet) to(addr netip.Addr) bool {
	return regexp.MustCompile(` > ` + regexp.QuoteMeta(addr.String()) + `[.:]`).MatchString(p.line)
}

// toPort reports whether p is to addr:port.
func (p packet) toPort(addr netip.Addr, port int) bool {
	return strings.Contains(p.line, fmt.Sprintf(" > %s.%d: ", addr, port))
}

// killSwitchAllows is what the kill switch lets leave an uplink: ARP (not
// IP), mpvpn's own sockets (the tunnel and the probes, to the
// concentrator's port), NDP and MLD, and with the LAN allowed, the LAN
// (but DNS) and link-local multicast.
func killSwitchAllows(p packet, lan bool) bool {
	l := p.line
	switch {
	case strings.HasPrefix(l, "ARP"):
		return true
	case p.toPort(topo.ConcAddr, 7100):
		return true
	case strings.HasPrefix(l, "IP6 ") && regexp.MustCompile(`ICMP6, (neighbor (solicitation|advertisement)|router (solicitation|advertisement)|redirect|multicast listener)`).MatchString(l):
		return true
	case lan && regexp.MustCompile(` > (192\.168\.50\.\d+|224\.0\.0\.\d+|255\.255\.255\.255)(\.\d+)?: `).MatchString(l):
		return !regexp.MustCompile(` > 192\.168\.50\.\d+\.53: `).MatchString(l)
	}
	return false
}

// leakProbes are Mullvad's send_guest_probes in this topology: TCP, UDP
// and ICMP, IPv4 and IPv6, to the destination (a public address):
// unbound, bound to an uplink's address, and bound to an uplink's device
// (SO_BINDTODEVICE, which routing cannot stop); and DNS to the LAN.
func (e *env) leakProbes(t *testing.T) {
	t.Helper()
	dst, dst6 := topo.DestAddr.String(), dest6.String()
	udp := `import socket, sys
a = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_DGRAM)
if sys.argv[3]:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[3].encode())
s.sendto(b"mpvpn leak probe", (a, int(sys.argv[2])))`
	for _, args := range [][]string{
		{"curl", "-gsS", "-m", "3", "http://" + dst + "/probe-bound-dev", "--interface", "wan0"},
		{"curl", "-gsS", "-m", "3", "http://" + dst + "/probe-bound-addr", "--interface", e.tp.Uplinks[topo.B].Addr.String()},
		{"curl", "-gsS", "-m", "3", "http://[" + dst6 + "]/probe6-bound-dev", "--interface", "wan0"},
		{"curl", "-gsS", "-m", "3", "http://[" + dst6 + "]/probe6-bound-addr", "--interface", client6.Addr().String()},
		{"python3", "-c", udp, dst, "53", ""},
		{"python3", "-c", udp, dst, "9", "wan1"},
		{"python3", "-c", udp, dst6, "53", ""},
		{"python3", "-c", udp, dst6, "9", "wan0"},
		{"ping", "-c", "1", "-W", "1", dst},
		{"ping", "-c", "1", "-W", "1", "-I", "wan0", dst},
		{"ping", "-6", "-c", "1", "-W", "1", dst6},
		{"ping", "-6", "-c", "1", "-W", "1", "-I", "wan0", dst6},
		{"python3", "-c", udp, lanGW.Addr().String(), "53", ""},
	} {
		code, out, _ := e.run(t, args...)
		t.Logf("probe %s %s: exit %d %s", args[0], strings.Join(args[len(args)-3:], " "), code, tail(strings.TrimSpace(out), 1))
	}
}

// TestKillSwitch (SECURITY.md §4): with --kill-switch (and --route-all),
// a socket bound to an uplink is refused while the client runs; a client
// killed with SIGKILL during a transfer leaves nothing but what the kill
// switch allows leaving the uplinks (a capture on both shows it), an
// app's new connection is refused at once, IPv4 and IPv6, and `mpvpn
// down` brings direct connectivity back. With --allow-lan the (private)
// LAN stays reachable, DNS to it does not. The positive control (Mullvad's
// test_disconnected_state): the same client killed without --kill-switch,
// and the same probes are seen leaving an uplink.
func TestKillSwitch(t *testing.T) {
	needTools(t, "tcpdump", "ping")
	for _, mode := range []struct {
		name       string
		killSwitch bool
		allowLAN   bool
	}{
		{"kill switch", true, false},
		{"kill switch, allow LAN", true, true},
		{"no kill switch (positive control)", false, false},
	} {
		t.Run(mode.name, func(t *testing.T) { testKillSwitch(t, mode.killSwitch, mode.allowLAN) })
	}
}

func testKillSwitch(t *testing.T, killSwitch, allowLAN bool) {
	e := newSysEnv(t, options{topo: topo.Options{NoEmu: true}})
	tp := e.tp
	e.openDirectPath(t)
	http6 := e.addIPv6Internet(t)
	e.addIPv6Uplink(t)
	lanSrv := e.addLAN(t)
	lanURL := func(marker string) string {
		return "http://" + netip.AddrPortFrom(lanGW.Addr(), 8080).String() + "/index.html?" + marker
	}
	// The control: without a client, IPv4 and IPv6 reach the destination
	// directly.
	e.expectSource(t, "no client", e.http, topo.DestAddr, direct, nil)
	e.expectSource(t, "no client, IPv6", http6, dest6, direct, nil, "-6")

	args := []string{"--route-all"}
	if killSwitch {
		args = append(args, "--kill-switch")
	}
	if allowLAN {
		args = append(args, "--allow-lan")
	}
	e.noRoute = true
	e.startClient(t, e.key(), args...)
	e.expectSource(t, "connected", e.http, topo.DestAddr, viaTunnel, nil)
	e.expectSource(t, "connected, IPv6", http6, dest6, viaTunnel, nil, "-6")

	// Connected: a socket bound to an uplink's device skips the routes
	// into the TUN (routing cannot stop it); only the kill switch does.
	w := direct
	if killSwitch {
		w = refused
	}
	e.expectSource(t, "connected, bound to wan0", e.http, topo.DestAddr, w, nil, "--interface", "wan0")
	e.expectSource(t, "connected, IPv6, bound to wan0", http6, dest6, w, nil, "-6", "--interface", "wan0")
	if allowLAN {
		code, out := e.curl(t, "-m", "5", lanURL("connected-lan"))
		if src := sourcesOf(lanSrv, "connected-lan"); code != 0 || len(src) != 1 || src[0] != lanClient.Addr().String() {
			t.Errorf("connected, --allow-lan: the LAN: curl exit %d %q, the LAN server saw %v; want it reached directly from %s", code, out, src, lanClient.Addr())
		}
	}

	// A transfer through the tunnel when the client dies.
	e.randomFile(t, "big", 32<<20)
	dl := tp.Start(tp.Client, "curl-transfer", "curl", "-sS", "-o", "/dev/null", "--limit-rate", "2M", "-m", "60", destURL("big"))
	capt := e.startCapture(t)
	// Under way: a quarter MiB on the uplinks (waited for, up to 5 s: a
	// loaded machine may take a while to start curl and the capture).
	before := e.uplinkBytes()
	started := time.Now()
	var rx uint64
	for time.Since(started) < 5*time.Second {
		time.Sleep(50 * time.Millisecond)
		during := e.uplinkBytes()
		if rx = during.rx[0] + during.rx[1] - before.rx[0] - before.rx[1]; rx >= 256<<10 {
			break
		}
	}
	e.killClient(t)
	if done, _ := dl.Exited(); done {
		t.Fatalf("the transfer had ended before the client was killed:\n%s", dl.Log())
	}
	if rx < 256<<10 {
		t.Errorf("only %d bytes arrived on the uplinks in the %v before the kill: no transfer under way", rx, time.Since(started).Round(time.Millisecond))
	}
	t.Logf("kill -9 during the transfer (%d bytes received on the uplinks in the %v before)", rx, time.Since(started).Round(time.Millisecond))

	// New connections from an app, IPv4 and IPv6.
	if killSwitch {
		e.expectSource(t, "killed", e.http, topo.DestAddr, refused, nil)
		e.expectSource(t, "killed, IPv6", http6, dest6, refused, nil, "-6")
		e.expectSource(t, "killed, bound to wan0's address", e.http, topo.DestAddr, refused, nil, "--interface", tp.Uplinks[topo.A].Addr.String())
	} else {
		// Fail-open: the destination sees the client itself.
		e.expectSource(t, "killed", e.http, topo.DestAddr, direct, nil)
		e.expectSource(t, "killed, IPv6", http6, dest6, direct, nil, "-6")
	}
	if allowLAN {
		code, out := e.curl(t, "-m", "5", lanURL("killed-lan"))
		if src := sourcesOf(lanSrv, "killed-lan"); code != 0 || len(src) != 1 {
			t.Errorf("killed, --allow-lan: the LAN: curl exit %d %q, the LAN server saw %v; want it still reachable", code, out, src)
		}
	}
	e.leakProbes(t)
	time.Sleep(300 * time.Millisecond) // the transfer's own retransmissions, if any
	pkts := capt.stop(t)
	dl.Stop()

	var toConc, toDest, toDest6, toLAN, toLANDNS int
	var leaks []packet
	for _, p := range pkts {
		switch {
		case p.toPort(topo.ConcAddr, 7100):
			toConc++
		case p.toPort(lanGW.Addr(), 8080):
			toLAN++
		case p.to(topo.DestAddr):
			toDest++
		case p.to(dest6):
			toDest6++
		case p.toPort(lanGW.Addr(), 53):
			toLANDNS++
		}
		if !killSwitchAllows(p, allowLAN) {
			leaks = append(leaks, p)
		}
	}
	t.Logf("captured %d packets leaving the uplinks: %d to the concentrator, %d to the destination, %d to its IPv6 address, %d to the LAN's web server, %d DNS to the LAN; %d outside what the kill switch allows",
		len(pkts), toConc, toDest, toDest6, toLAN, toLANDNS, len(leaks))
	if allowLAN && toLAN == 0 {
		t.Errorf("with --allow-lan the capture saw nothing of the LAN flows it allows")
	}
	// The capture saw the tunnel before the kill: it sees traffic.
	if toConc == 0 {
		t.Errorf("the capture saw nothing of the tunnel's own traffic before the kill: it proves nothing:\n%s", joinPackets(pkts, 30))
	}
	if killSwitch {
		if len(leaks) > 0 {
			t.Errorf("with the kill switch, %d packets left the uplinks that it does not allow:\n%s", len(leaks), joinPackets(leaks, 30))
		}
	} else if toDest == 0 || toDest6 == 0 || toLANDNS == 0 {
		// The positive control: the same probes are seen.
		t.Errorf("without the kill switch the probes were not all seen leaving (%d to the destination, %d to its IPv6 address, %d DNS to the LAN): the capture would miss a leak:\n%s",
			toDest, toDest6, toLANDNS, joinPackets(leaks, 60))
	}

	// mpvpn down: direct connectivity back.
	out, err := tp.Cmd(tp.Client, bin.mpvpn, "down", "--journal", e.clientJournal()).CombinedOutput()
	if err != nil {
		t.Fatalf("mpvpn down: %v\n%s", err, out)
	}
	if got := strings.Contains(string(out), "nftables table inet mpvpn-killswitch"); got != killSwitch {
		t.Errorf("mpvpn down (kill switch %v) says it removed it: %v:\n%s", killSwitch, got, out)
	}
	e.expectSource(t, "after mpvpn down", e.http, topo.DestAddr, direct, nil)
	e.expectSource(t, "after mpvpn down, IPv6", http6, dest6, direct, nil, "-6")
}

func joinPackets(pkts []packet, max int) string {
	var b strings.Builder
	for i, p := range pkts {
		if i == max {
			fmt.Fprintf(&b, "... and %d more\n", len(pkts)-max)
			break
		}
		b.WriteString(p.String() + "\n")
	}
	return b.String()
}

// fullState is hostState plus the nftables ruleset and the client's
// cgroup tree: everything a client with every feature on changes.
func (e *env) fullState(t *testing.T) string {
	t.Helper()
	tp := e.tp
	return hostState(t, tp, tp.Client) +
		"$ nft list ruleset\n" + tp.Output(tp.Client, "nft", "list", "ruleset") +
		"$ ls -l /etc/resolv.conf; cat /etc/resolv.conf\n" + tp.Output(tp.Client, "sh", "-c", "ls -ln /etc/resolv.conf | cut -d' ' -f1,3,4; cat /etc/resolv.conf") +
		"$ cgroups of " + e.cgroupName() + "\n" + e.clientCgroups(t) + "\n"
}

// TestCrashSafetyAllFeatures is TestCrashSafety with every feature on:
// route-all, an exclusion, a direct uid rule, a cgroup block rule, the
// kill switch and mpvpn exec's cgroups. A client killed with SIGKILL
// during a transfer leaves all of it behind; the next start then a stop,
// or `mpvpn down` alone, puts the host back exactly: routes, rules,
// MPTCP, sysctls, nftables, cgroups.
func TestCrashSafetyAllFeatures(t *testing.T) {
	for _, then := range []string{"start again, then stop", "mpvpn down", "mpvpn down without cgroup2, then with"} {
		t.Run(then, func(t *testing.T) {
			e := newSysEnv(t, options{topo: topo.Options{NoEmu: true}})
			tp := e.tp
			cg := e.appCgroups(t)
			e.randomFile(t, "big", 32<<20)
			e.noRoute = true
			e.clientWrap = withCgroup2()
			args := []string{"--route-all", "--exclude", netip.PrefixFrom(dest2, 32).String(),
				"--rule", fmt.Sprintf("uid:%d=direct", uidDirect), "--rule", "cgroup:" + cg["block"] + "=block", "--kill-switch"}
			before := e.fullState(t)

			e.startClient(t, e.key(), args...)
			if strings.Contains(e.client.Log(), "no cgroup v2") {
				t.Fatalf("the client saw no cgroup v2:\n%s", tail(e.client.Log(), 20))
			}
			e.expectSource(t, "through the client", e.http, topo.DestAddr, viaTunnel, nil)
			e.expectSource(t, "blocked cgroup", e.http, topo.DestAddr, refused, inCgroup(cg["block"]))
			dl := tp.Start(tp.Client, "curl", "curl", "-s", "-o", "/dev/null", "--limit-rate", "1M", "-m", "30", destURL("big"))
			time.Sleep(300 * time.Millisecond)
			e.killClient(t)
			dl.Stop()
			crashed := e.fullState(t)
			if crashed == before {
				t.Fatal("the killed client left nothing behind: the test would prove nothing")
			}
			for _, want := range []string{"lookup 7100", "lookup 7200", "/proc/sys/net/mptcp/blackhole_timeout:0", "nameserver 10.77.77.53",
				"table inet mpvpn-killswitch", "table inet mpvpn {", "/" + e.cgroupName() + "/tunnel"} {
				if !strings.Contains(crashed, want) {
					t.Errorf("after kill -9 the host lacks %q, which the client had set:\n%s", want, crashed)
				}
			}

			switch then {
			case "start again, then stop":
				e.startClient(t, e.key(), args...)
				e.expectSource(t, "through the restarted client", e.http, topo.DestAddr, viaTunnel, nil)
				e.stopClient(t)
			case "mpvpn down without cgroup2, then with":
				// A plain `ip netns exec` sees no cgroup2 (its /sys is
				// fresh): mpvpn down cannot tell whether the cgroups are
				// there, so it must fail and keep the journal, not report
				// them gone; everything else it undoes.
				out, err := tp.Cmd(tp.Client, bin.mpvpn, "down", "--journal", e.clientJournal()).CombinedOutput()
				t.Logf("mpvpn down without cgroup2: %v\n%s", err, out)
				if err == nil || !strings.Contains(string(out), "cgroup") {
					t.Errorf("mpvpn down without cgroup2 in its mount namespace: %v, want a failure that names the cgroups:\n%s", err, out)
				}
				if _, serr := os.Stat(e.clientJournal()); serr != nil {
					t.Errorf("mpvpn down without cgroup2 removed the journal (%v): the cgroups would be forgotten", serr)
				}
				if got := e.clientCgroups(t); got == "" {
					t.Errorf("the cgroups are gone after a mpvpn down that could not see them")
				}
				fallthrough
			case "mpvpn down":
				// Through the wrapper: it sees cgroup2 where the client did.
				out, err := tp.Cmd(tp.Client, withCgroup2(bin.mpvpn, "down", "--journal", e.clientJournal())...).CombinedOutput()
				if err != nil {
					t.Fatalf("mpvpn down: %v\n%s", err, out)
				}
				t.Logf("mpvpn down:\n%s", out)
				wants := []string{"cgroup /sys/fs/cgroup/" + e.cgroupName() + "\n"}
				if then == "mpvpn down" {
					wants = append(wants, "nftables table inet mpvpn-killswitch", "nftables table inet mpvpn\n", "rule 7230: from all lookup 7200 (IPv6)")
				}
				for _, want := range wants {
					if !strings.Contains(string(out), "removed: "+want) {
						t.Errorf("mpvpn down did not say it removed %q:\n%s", strings.TrimSpace(want), out)
					}
				}
				out, err = tp.Cmd(tp.Client, withCgroup2(bin.mpvpn, "down", "--journal", e.clientJournal())...).CombinedOutput()
				if err != nil || !strings.Contains(string(out), "nothing to remove") {
					t.Errorf("a second mpvpn down: %v\n%s", err, out)
				}
			}
			if got := e.fullState(t); got != before {
				t.Errorf("after kill -9 and %s the host is not as it was:\nbefore:\n%s\nafter:\n%s", then, before, got)
			}
		})
	}
}

// TestCleanStopAllFeatures: a client with every feature on (the
// dashboard on a unix socket too) that is stopped (SIGTERM) puts the host
// back exactly, the kill switch included (the user stopped the VPN),
// removes its journal and the dashboard's socket, and direct connectivity
// is back.
func TestCleanStopAllFeatures(t *testing.T) {
	e := newSysEnv(t, options{topo: topo.Options{NoEmu: true}})
	e.openDirectPath(t)
	cg := e.appCgroups(t)
	e.noRoute = true
	e.clientWrap = withCgroup2()
	before := e.fullState(t)
	uiSock := filepath.Join(e.sockDir, "ui.sock")
	e.startClient(t, e.key(), "--route-all", "--exclude", netip.PrefixFrom(dest2, 32).String(),
		"--rule", fmt.Sprintf("uid:%d=direct", uidDirect), "--rule", "cgroup:"+cg["block"]+"=block", "--kill-switch",
		"--ui", "unix:"+uiSock)
	e.expectSource(t, "through the client", e.http, topo.DestAddr, viaTunnel, nil)
	// The dashboard on its unix socket, behind the kill switch.
	st := e.fetchStatus(t, e.clientSocket())
	if _, query, ok := strings.Cut(st.UI, " /"); !ok || !strings.HasPrefix(st.UI, "unix:"+uiSock+" ") {
		t.Errorf("status: dashboard %q, want unix:%s /?token=…", st.UI, uiSock)
	} else if out, err := e.tp.Run(e.tp.Client, "curl", "-sS", "-m", "5", "--unix-socket", uiSock, "http://mpvpn/"+query); err != nil || !strings.Contains(out, `data-uplink="wan0"`) {
		t.Errorf("the dashboard on %s: %v\n%s", uiSock, err, out)
	}
	e.stopClient(t)
	if _, err := os.Lstat(uiSock); !os.IsNotExist(err) {
		t.Errorf("the stopped client left its dashboard's socket %s (%v)", uiSock, err)
	}
	if strings.Contains(e.client.Log(), "level=WARN msg=cleanup") {
		t.Errorf("the client's cleanup failed:\n%s", tail(e.client.Log(), 15))
	}
	if got := e.fullState(t); got != before {
		t.Errorf("the stopped client left changes behind:\nbefore:\n%s\nafter:\n%s", before, got)
	}
	if _, err := os.Stat(e.clientJournal()); !os.IsNotExist(err) {
		t.Errorf("the stopped client kept its journal (%v): it could not undo everything", err)
	}
	e.expectSource(t, "after the stop", e.http, topo.DestAddr, direct, nil)
}
