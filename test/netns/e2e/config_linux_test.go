package e2e

import (
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// hostState is everything of a namespace that mpvpn might change: links,
// addresses, routes in every table, rules, MPTCP endpoints and limits, and
// the sysctls it sets.
func hostState(t *testing.T, tp *topo.Topology, ns string) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{
		{"ip", "-o", "link", "show"},
		{"ip", "-o", "addr", "show"},
		{"ip", "route", "show", "table", "all"},
		{"ip", "-6", "route", "show", "table", "all"},
		{"ip", "rule", "show"},
		{"ip", "-6", "rule", "show"},
		{"ip", "mptcp", "endpoint", "show"},
		{"ip", "mptcp", "limits", "show"},
		{"sh", "-c", "grep -H . /proc/sys/net/mptcp/* /proc/sys/net/ipv4/tcp_fastopen /proc/sys/net/ipv4/conf/*/rp_filter"},
	} {
		out := tp.Output(ns, args...)
		// Link statistics and state flags move on their own.
		if args[1] == "-o" && args[2] == "link" {
			var lines []string
			for _, l := range strings.Split(out, "\n") {
				if f := strings.Fields(l); len(f) > 1 {
					lines = append(lines, f[1])
				}
			}
			out = strings.Join(lines, "\n")
		}
		// IPv6 link-local addresses and their routes come and go with
		// duplicate address detection, whatever mpvpn does.
		var kept []string
		for _, l := range strings.Split(out, "\n") {
			if !strings.Contains(l, "fe80::") && !strings.Contains(l, "ff00::/8") {
				kept = append(kept, l)
			}
		}
		out = strings.Join(kept, "\n")
		b.WriteString("$ " + strings.Join(args, " ") + "\n" + out + "\n")
	}
	return b.String()
}

// Bad configuration is one clear line and a non-zero exit, before anything
// on the host is changed; a client that ran and stopped leaves the host as
// it found it.
func TestConfigErrorsLeaveHostUntouched(t *testing.T) {
	e := newEnv(t, options{noClient: true})
	tp := e.tp
	key := filepath.Join(e.dir, "client.key")

	// An uplink with an address but no default route (no gateway).
	tp.Exec(tp.Client, "ip", "link", "add", "wan2", "type", "veth", "peer", "name", "wan2p")
	tp.Exec(tp.Client, "ip", "addr", "add", "192.0.2.200/24", "dev", "wan2")
	tp.Exec(tp.Client, "ip", "link", "set", "wan2", "up")
	tp.Exec(tp.Client, "ip", "link", "set", "wan2p", "up")

	before := hostState(t, tp, tp.Client)
	concBefore := hostState(t, tp, tp.Conc)
	client := func(extra ...string) []string {
		args := []string{bin.mpvpn, "client", "--server", "203.0.113.1:7100", "--server-key", e.serverPub, "--key", key, "--route", "198.51.100.0/24",
			"--control", filepath.Join(e.sockDir, "cfg-client.sock"), "--journal", filepath.Join(e.sockDir, "cfg-client.journal")}
		return append(args, extra...)
	}
	tests := []struct {
		name string
		ns   string
		args []string
		want string
	}{
		{"unknown uplink", tp.Client, client("--uplink", "wan0", "--uplink", "wan9"), "wan9"},
		{"uplink without gateway", tp.Client, client("--uplink", "wan0", "--uplink", "wan2"), "wan2"},
		{"unreadable key", tp.Client, client("--uplink", "wan0", "--key", "/nonexistent/client.key"), "no such file"},
		{"TUN name taken", tp.Client, client("--uplink", "wan0", "--tun", "wan2p"), "wan2p"},
		{"dashboard off the loopback", tp.Client, client("--uplink", "wan0", "--ui", "0.0.0.0:9511"), "not a loopback address"},
		{"server dashboard off the loopback", tp.Conc, []string{bin.mpvpn, "server", "--listen", "0.0.0.0:7101", "--key", filepath.Join(e.dir, "server.key"), "--peer", e.clientPub, "--control", filepath.Join(e.sockDir, "cfg-server.sock"), "--ui", "203.0.113.1:9512"}, "not a loopback address"},
		{"port in use", tp.Conc, []string{bin.mpvpn, "server", "--listen", "0.0.0.0:7100", "--key", filepath.Join(e.dir, "server.key"), "--peer", e.clientPub, "--control", filepath.Join(e.sockDir, "cfg-server.sock")}, "address already in use"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, err := exec.Command("ip", append([]string{"netns", "exec", tc.ns}, tc.args...)...).CombinedOutput()
			var ee *exec.ExitError
			if err == nil || !errorsAs(err, &ee) || ee.ExitCode() != 1 {
				t.Fatalf("exit %v, want 1; output:\n%s", err, out)
			}
			msg := strings.TrimRight(string(out), "\n")
			if strings.Count(msg, "\n") != 0 || !strings.HasPrefix(msg, "mpvpn: ") || !strings.Contains(msg, tc.want) {
				t.Fatalf("output %q, want one line \"mpvpn: …\" mentioning %q", msg, tc.want)
			}
			t.Log(msg)
		})
	}
	if got := hostState(t, tp, tp.Client); got != before {
		t.Errorf("a failed start changed the client's host:\nbefore:\n%s\nafter:\n%s", before, got)
	}
	if got := hostState(t, tp, tp.Conc); got != concBefore {
		t.Errorf("a failed start changed the concentrator's host:\nbefore:\n%s\nafter:\n%s", concBefore, got)
	}

	// A client that ran, carried a flow and was stopped puts everything back.
	e.startClient(t, key)
	if code, out := e.curl(t, "-m", "20", destURL("index.html")); code != 0 {
		t.Fatalf("curl through the client: exit %d: %s", code, out)
	}
	running := hostState(t, tp, tp.Client)
	for _, want := range []string{"mpvpn0", "lookup 7100", "lookup 7101", "lookup 7200", "dev wan0", "dev wan1"} {
		if !strings.Contains(running, want) {
			t.Errorf("while running, the client's host lacks %q:\n%s", want, running)
		}
	}
	if err := e.client.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := e.client.Wait(15 * time.Second); err != nil {
		t.Fatalf("client did not exit cleanly on SIGTERM: %v\n%s", err, e.client.Log())
	}
	if got := hostState(t, tp, tp.Client); got != before {
		t.Errorf("the stopped client left changes behind:\nbefore:\n%s\nafter:\n%s", before, got)
	}
}

func errorsAs(err error, target **exec.ExitError) bool {
	ee, ok := err.(*exec.ExitError)
	if ok {
		*target = ee
	}
	return ok
}
