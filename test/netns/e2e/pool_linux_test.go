package e2e

import (
	"encoding/json"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// poolJSON is the part of `mpvpn status --json` these tests read.
type poolJSON struct {
	Uplinks []struct {
		Name           string `json:"name"`
		State          string `json:"state"`
		ProbesSent     uint64 `json:"probes_sent"`
		ProbesReceived uint64 `json:"probes_received"`
	} `json:"uplinks"`
	Flows struct {
		Active int64  `json:"active"`
		Total  uint64 `json:"total"`
		Failed uint64 `json:"failed"`
	} `json:"flows"`
	Pool *struct {
		Ready  int64  `json:"ready"`
		Hits   uint64 `json:"hits"`
		Stale  uint64 `json:"stale"`
		Unused uint64 `json:"unused"`
	} `json:"pool"`
}

func (e *env) poolStatus(t *testing.T, socket string) poolJSON {
	t.Helper()
	out, err := exec.Command(bin.mpvpn, "status", "--json", "--socket", socket).Output()
	if err != nil {
		t.Fatalf("mpvpn status --json: %v", err)
	}
	var st poolJSON
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("status JSON: %v\n%s", err, out)
	}
	if st.Pool == nil {
		t.Fatalf("status has no pool:\n%s", out)
	}
	return st
}

// waitPool polls the client's status until cond holds.
func (e *env) waitPool(t *testing.T, what string, d time.Duration, cond func(poolJSON) bool) poolJSON {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		st := e.poolStatus(t, e.clientSocket())
		if cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("not %s within %v: %+v", what, d, st)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (e *env) getIndex(t *testing.T, what string) {
	t.Helper()
	if code, out := e.curl(t, "-m", "20", destURL("index.html")); code != 0 || out != "hello from the internet\n" {
		t.Fatalf("%s: curl exit %d, %q\nclient log:\n%s", what, code, out, tail(e.client.Log(), 30))
	}
}

// TestPoolAcrossRestart: the real client fills its pool before it routes
// anything, apps' flows take pooled connections, and a concentrator
// restart, which closes every pooled connection, costs no app flow: the
// client never hands a closed one to a flow, and dials afresh.
func TestPoolAcrossRestart(t *testing.T) {
	e := newEnv(t, options{topo: topo.Options{NoEmu: true}})
	st := e.poolStatus(t, e.clientSocket())
	if st.Pool.Ready == 0 {
		t.Fatalf("the client came up with an empty pool: %+v", st)
	}
	for i := range 10 {
		e.getIndex(t, "flow "+strconv.Itoa(i))
	}
	st = e.poolStatus(t, e.clientSocket())
	if st.Pool.Hits < 10 || st.Flows.Failed != 0 {
		t.Errorf("10 flows: %d took a pooled connection, %d failed; want 10 and 0", st.Pool.Hits, st.Flows.Failed)
	}
	srv := e.poolStatus(t, e.serverSocket())
	if srv.Pool.Ready == 0 {
		t.Errorf("the concentrator holds no pooled connection: %+v", srv)
	}

	if err := e.server.Stop(); err != nil {
		t.Logf("server exited with %v", err)
	}
	e.server = e.tp.Start(e.tp.Conc, "server", e.srvArgs...)
	e.server.WaitListen("0.0.0.0:7100")
	// At once, while the pool still holds what the old server closed.
	for i := range 10 {
		e.getIndex(t, "after the restart, flow "+strconv.Itoa(i))
	}
	after := e.poolStatus(t, e.clientSocket())
	if after.Flows.Failed != 0 {
		t.Errorf("%d flows failed across the restart, want 0\n%s", after.Flows.Failed, tail(e.client.Log(), 40))
	}
	if after.Pool.Stale == 0 && after.Pool.Hits == st.Pool.Hits {
		t.Errorf("no pooled connection found closed and none used after the restart: %+v", after.Pool)
	}
	e.waitPool(t, "the pool refilled from the new concentrator", 20*time.Second, func(s poolJSON) bool { return s.Pool.Ready > 0 })
	e.getIndex(t, "from the refilled pool")
}

// probesSent is each uplink's probe count.
func probesSent(st poolJSON) map[string]uint64 {
	m := map[string]uint64{}
	for _, u := range st.Uplinks {
		m[u.Name] = u.ProbesSent
	}
	return m
}

// TestIdleProbes: with no flow open the client probes each uplink at
// most once per --probe-idle-interval; with a flow open, ten times a
// second. An uplink that goes silently dark while idle is still found and
// withdrawn, and a flow that starts after that connects over the other;
// so does one that starts the moment it went dark.
func TestIdleProbes(t *testing.T) {
	const idle = time.Second
	e := newEnv(t, options{clientArgs: []string{"--probe-idle-interval", idle.String()}})
	e.waitUplinksUp(t)

	const window = 6 * time.Second
	time.Sleep(2 * time.Second) // the start's own flows are over
	before := probesSent(e.poolStatus(t, e.clientSocket()))
	time.Sleep(window)
	after := probesSent(e.poolStatus(t, e.clientSocket()))
	for _, u := range []string{"wan0", "wan1"} {
		n, most := after[u]-before[u], uint64(window/idle)+2
		t.Logf("%s: %d probes in %v idle", u, n, window)
		if n == 0 || n > most {
			t.Errorf("%s: %d probes in %v with no flow open, want 1 to %d", u, n, window, most)
		}
	}

	// A flow held open, without a byte: the busy cadence. (Active also
	// counts the client's own service flows, if it has any open.)
	a0 := e.poolStatus(t, e.clientSocket()).Flows.Active
	hold := e.tp.Start(e.tp.Client, "hold", "bash", "-c", "exec 3<>/dev/tcp/"+topo.DestAddr.String()+"/80; sleep 30")
	e.waitPool(t, "the held flow open", 10*time.Second, func(s poolJSON) bool { return s.Flows.Active > a0 })
	before = probesSent(e.poolStatus(t, e.clientSocket()))
	time.Sleep(2 * time.Second)
	after = probesSent(e.poolStatus(t, e.clientSocket()))
	for _, u := range []string{"wan0", "wan1"} {
		if n := after[u] - before[u]; n < 10 {
			t.Errorf("%s: %d probes in 2 s with a flow open, want about 20", u, n)
		}
	}
	hold.Stop()
	e.waitPool(t, "the held flow closed", 10*time.Second, func(s poolJSON) bool { return s.Flows.Active == a0 })

	wanState := func(s poolJSON) string {
		for _, u := range s.Uplinks {
			if u.Name == "wan0" {
				return u.State
			}
		}
		return ""
	}
	// Dark while idle: found within a few idle intervals, then a flow.
	e.tp.Blackhole(topo.A, true)
	e.waitPool(t, "wan0 withdrawn while idle", 20*time.Second, func(s poolJSON) bool { return wanState(s) != "up" })
	e.getIndex(t, "a flow after A went dark while idle")
	e.tp.Blackhole(topo.A, false)
	e.waitPool(t, "wan0 back", 20*time.Second, func(s poolJSON) bool { return wanState(s) == "up" })

	// Dark the moment a flow starts: it connects all the same.
	e.tp.Blackhole(topo.A, true)
	e.getIndex(t, "a flow the moment A went dark")
	e.waitPool(t, "wan0 withdrawn", 10*time.Second, func(s poolJSON) bool { return wanState(s) != "up" })
	e.tp.Blackhole(topo.A, false)
	if st := e.poolStatus(t, e.clientSocket()); st.Flows.Failed != 0 {
		t.Errorf("%d flows failed", st.Flows.Failed)
	}
}
