package e2e

import (
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// TestCrashSafety (issue 9): a client killed with SIGKILL while it carries
// a flow leaves its changes on the host (the sysctls among them), and
// either the next start or `mpvpn down` alone puts the host back exactly
// as it was before the first start: routes in every table, rules, MPTCP
// endpoints and limits, nftables, the sysctls.
func TestCrashSafety(t *testing.T) {
	for _, then := range []string{"start again, then stop", "mpvpn down"} {
		t.Run(then, func(t *testing.T) {
			e := newEnv(t, options{topo: topo.Options{NoEmu: true}, noClient: true})
			tp := e.tp
			key := e.dir + "/client.key"
			e.randomFile(t, "big", 32<<20)
			before := hostState(t, tp, tp.Client)

			e.startClient(t, key)
			if code, out := e.curl(t, "-m", "20", destURL("index.html")); code != 0 {
				t.Fatalf("curl through the client: exit %d: %s", code, out)
			}
			// A transfer under way when it dies.
			dl := tp.Start(tp.Client, "curl", "curl", "-s", "-o", "/dev/null", "--limit-rate", "1M", "-m", "30", destURL("big"))
			time.Sleep(300 * time.Millisecond)
			e.client.Signal(syscall.SIGKILL)
			e.client.Wait(10 * time.Second)
			dl.Stop()
			crashed := hostState(t, tp, tp.Client)
			if crashed == before {
				t.Fatal("the killed client left nothing behind: the test would prove nothing")
			}
			for _, want := range []string{"lookup 7100", "/proc/sys/net/mptcp/blackhole_timeout:0"} {
				if !strings.Contains(crashed, want) {
					t.Errorf("after kill -9 the host lacks %q, which the client had set:\n%s", want, crashed)
				}
			}

			switch then {
			case "start again, then stop":
				e.startClient(t, key)
				if code, out := e.curl(t, "-m", "20", destURL("index.html")); code != 0 {
					t.Fatalf("curl through the restarted client: exit %d: %s", code, out)
				}
				e.client.Signal(syscall.SIGTERM)
				if err := e.client.Wait(15 * time.Second); err != nil {
					t.Fatalf("the restarted client did not exit cleanly: %v\n%s", err, e.client.Log())
				}
			case "mpvpn down":
				out, err := tp.Cmd(tp.Client, bin.mpvpn, "down", "--journal", e.clientJournal()).CombinedOutput()
				if err != nil {
					t.Fatalf("mpvpn down: %v\n%s", err, out)
				}
				t.Logf("mpvpn down:\n%s", out)
				if !strings.Contains(string(out), "removed: sysctl net.mptcp.blackhole_timeout") {
					t.Errorf("mpvpn down did not say it put blackhole_timeout back:\n%s", out)
				}
				// And again: nothing left.
				out, err = tp.Cmd(tp.Client, bin.mpvpn, "down", "--journal", e.clientJournal()).CombinedOutput()
				if err != nil || !strings.Contains(string(out), "nothing to remove") {
					t.Errorf("a second mpvpn down: %v\n%s", err, out)
				}
			}
			if got := hostState(t, tp, tp.Client); got != before {
				t.Errorf("after kill -9 and %s the host is not as it was:\nbefore:\n%s\nafter:\n%s", then, before, got)
			}
		})
	}
}

// TestSecondClientRefused: a second client on the same journal refuses to
// start, before it changes anything, and names the first.
func TestSecondClientRefused(t *testing.T) {
	e := newEnv(t, options{topo: topo.Options{NoEmu: true}})
	out, err := e.tp.Cmd(e.tp.Client, bin.mpvpn, "client", "--server", "203.0.113.1:7100", "--server-key", e.serverPub,
		"--key", e.dir+"/client.key", "--route", "198.51.100.0/24", "--tun", "mpvpn1",
		"--control", e.sockDir+"/second.sock", "--journal", e.clientJournal()).CombinedOutput()
	var ee *exec.ExitError
	if !errorsAs(err, &ee) || !strings.Contains(string(out), "another mpvpn client is running (pid") {
		t.Fatalf("a second client: %v\n%s", err, out)
	}
}
