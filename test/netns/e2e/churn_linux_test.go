package e2e

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// runtimeReading is what /metrics says of a process's Go runtime.
type runtimeReading struct{ goroutines, heap float64 }

func (e *env) runtimeOf(t *testing.T, ns, addr string) runtimeReading {
	t.Helper()
	page := e.tp.Output(ns, "curl", "-sS", "http://"+addr+"/metrics")
	g, ok1 := metricValue(page, "go_goroutines", "")
	// The heap the last GC found live: go_memstats_heap_inuse_bytes
	// swings by the garbage of a GC cycle (28 to 55 MiB over the same
	// state in one run), this does not.
	h, ok2 := metricValue(page, "go_gc_heap_live_bytes", "")
	if !ok1 || !ok2 {
		t.Fatalf("no go_goroutines or go_gc_heap_live_bytes in the metrics of %s", addr)
	}
	return runtimeReading{g, h}
}

// churn opens n flows through the client, 50 at a time, each a GET read
// to its end, and fails unless every one got its reply.
func (e *env) churn(t *testing.T, n int) {
	t.Helper()
	out := e.tp.Output(e.tp.Client, bin.newflows, "-url", destURL("index.html"), "-n", fmt.Sprint(n), "-parallel", "50", "-timeout", "20s", "-drain")
	var r struct {
		Tried, OK, Failed int
		Errors            []string
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("newflows: %v\n%s", err, out)
	}
	if r.OK != n || r.Failed != 0 {
		// What the client said of the flows it did not forward: every path
		// that answers a SYN with a reset logs one of these.
		var why []string
		for _, l := range strings.Split(e.client.Log(), "\n") {
			for _, m := range []string{`msg="dial failed"`, `msg="app handshake failed"`, `msg="SYN over the in-flight limit: RST"`, "level=WARN", "level=ERROR"} {
				if strings.Contains(l, m) {
					why = append(why, l)
					break
				}
			}
		}
		t.Fatalf("%d flows: %d answered, %d failed (%v); the client says:\n%s", n, r.OK, r.Failed, r.Errors, strings.Join(why[:min(len(why), 20)], "\n"))
	}
}

// TestFlowChurnNoLeak: 30 000 flows opened and closed in a loop leave
// the client and the concentrator where they were after the first
// thousand: goroutines back to that count, the live Go heap (as the last
// GC, during the churn's last flows, found it) within a bound far below
// what the flows would pin had any of them leaked (30 000 flows leaking
// even 1 KiB each would be 29 MiB).
func TestFlowChurnNoLeak(t *testing.T) {
	const (
		cliMetrics = "127.0.0.1:9521"
		srvMetrics = "127.0.0.1:9522"
	)
	e := newEnv(t, options{topo: topo.Options{NoEmu: true},
		clientArgs: []string{"--metrics", cliMetrics},
		serverArgs: []string{"--metrics", srvMetrics}})
	// 31 000 flows from one address to one destination port would wrap
	// the default 28 232 ephemeral ports within the destination's
	// TIME_WAIT: the namespace's own range is widened. (The client's
	// netstack copes with a reused port either way: see
	// TestPortReuseAfterTimeWait; before it, a SYN that met a TIME_WAIT
	// endpoint as it expired was refused, one or two in 30 000.)
	if out, err := e.tp.Run(e.tp.Client, "sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000"); err != nil {
		t.Fatalf("sysctl: %v %s", err, out)
	}
	idle := func() (cli, srv runtimeReading) {
		t.Helper()
		// Every flow closed on both ends, and a moment for the
		// relays' goroutines to return.
		deadline := time.Now().Add(30 * time.Second)
		for {
			c, s := e.poolStatus(t, e.clientSocket()), e.poolStatus(t, e.serverSocket())
			if c.Flows.Active == 0 && s.Flows.Active == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("flows still open: client %d, concentrator %d", c.Flows.Active, s.Flows.Active)
			}
			time.Sleep(200 * time.Millisecond)
		}
		time.Sleep(2 * time.Second)
		return e.runtimeOf(t, e.tp.Client, cliMetrics), e.runtimeOf(t, e.tp.Conc, srvMetrics)
	}
	e.churn(t, 1000)
	cli0, srv0 := idle()
	t.Logf("after 1000 flows: client %.0f goroutines, heap %.1f MiB; concentrator %.0f, %.1f MiB", cli0.goroutines, cli0.heap/(1<<20), srv0.goroutines, srv0.heap/(1<<20))
	e.churn(t, 30000)
	cli1, srv1 := idle()
	t.Logf("after 30000 more: client %.0f goroutines, heap %.1f MiB; concentrator %.0f, %.1f MiB", cli1.goroutines, cli1.heap/(1<<20), srv1.goroutines, srv1.heap/(1<<20))
	for _, c := range []struct {
		who    string
		before runtimeReading
		after  runtimeReading
	}{{"client", cli0, cli1}, {"concentrator", srv0, srv1}} {
		// The pool may be mid-refill, a few goroutines either way.
		if c.after.goroutines > c.before.goroutines+10 {
			t.Errorf("%s: %.0f goroutines after the churn, %.0f before", c.who, c.after.goroutines, c.before.goroutines)
		}
		// 32 MiB: the netstack's endpoints in TIME_WAIT (2 s, some
		// 500 at the churn's rate) are live at the last GC; measured
		// +3 to +16.5 MiB on the client with 10 s of TIME_WAIT. A flow's state leaked for each of
		// 30 000 flows, even 1.1 KiB of it, is more.
		if c.after.heap > c.before.heap+32<<20 {
			t.Errorf("%s: heap %.1f MiB after the churn, %.1f MiB before", c.who, c.after.heap/(1<<20), c.before.heap/(1<<20))
		}
	}
	if st := e.poolStatus(t, e.clientSocket()); st.Flows.Failed != 0 || st.Flows.Total < 31000 {
		t.Errorf("client: %d flows, %d failed", st.Flows.Total, st.Flows.Failed)
	}
}

// TestIdleFlowGoroutines: an idle flow holds one goroutine on the client
// (its download direction, blocked on the tunnel's socket; the upload
// direction parks on the netstack's callback) and two on the
// concentrator, whatever it carried before it went idle: goroutine
// stacks are most of an idle flow's memory (issue 11). 500 flows, each
// accepted end to end, sit idle while both ends are counted.
func TestIdleFlowGoroutines(t *testing.T) {
	const (
		cliMetrics = "127.0.0.1:9523"
		srvMetrics = "127.0.0.1:9524"
		flows      = 500
	)
	e := newEnv(t, options{topo: topo.Options{NoEmu: true},
		clientArgs: []string{"--metrics", cliMetrics},
		serverArgs: []string{"--metrics", srvMetrics}})
	dst := fmt.Sprintf("%s:9100", topo.DestAddr)
	srv := e.tp.Start(e.tp.Inet, "idle-serve", bin.idleflows, "serve", "-listen", dst)
	srv.WaitListen(dst)
	// One flow first, so the pool's refill and the uplinks' probes are
	// in the baseline.
	e.churn(t, 1)
	time.Sleep(2 * time.Second)
	cli0, srv0 := e.runtimeOf(t, e.tp.Client, cliMetrics), e.runtimeOf(t, e.tp.Conc, srvMetrics)
	dial := e.tp.Start(e.tp.Client, "idle-dial", bin.idleflows, "dial", "-addr", dst, "-n", fmt.Sprint(flows), "-batch", "100")
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(dial.Log(), fmt.Sprintf("ready %d ", flows)) {
		if strings.Contains(dial.Log(), "stuck") || time.Now().After(deadline) {
			t.Fatalf("the idle flows did not all open:\n%s", dial.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(2 * time.Second) // the last flows' handshakes behind them
	cli1, srv1 := e.runtimeOf(t, e.tp.Client, cliMetrics), e.runtimeOf(t, e.tp.Conc, srvMetrics)
	perCli := (cli1.goroutines - cli0.goroutines) / flows
	perSrv := (srv1.goroutines - srv0.goroutines) / flows
	t.Logf("per idle flow: client %.2f goroutines, %.1f KiB of live heap; concentrator %.2f, %.1f KiB",
		perCli, (cli1.heap-cli0.heap)/flows/1024, perSrv, (srv1.heap-srv0.heap)/flows/1024)
	// A few goroutines either way for the pool's refill and the like.
	if perCli > 1.05 {
		t.Errorf("client: %.2f goroutines per idle flow, want 1", perCli)
	}
	if perSrv > 2.05 {
		t.Errorf("concentrator: %.2f goroutines per idle flow, want 2", perSrv)
	}
	if perCli < 0.95 {
		t.Errorf("client: %.2f goroutines per idle flow: are the %d flows open?", perCli, flows)
	}
}
