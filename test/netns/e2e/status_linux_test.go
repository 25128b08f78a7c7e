package e2e

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// statusJSON is the part of `mpvpn status --json` the test reads.
type statusJSON struct {
	Role    string `json:"role"`
	Uplinks []struct {
		Name     string  `json:"name"`
		State    string  `json:"state"`
		RxBytes  uint64  `json:"rx_bytes"`
		TxBytes  uint64  `json:"tx_bytes"`
		RxRate   float64 `json:"rx_bps"`
		Subflows int     `json:"subflows"`
		RTT      float64 `json:"rtt_ms"`
		Probe    bool    `json:"probe_alive"`
	} `json:"uplinks"`
	Flows struct {
		Active int64  `json:"active"`
		Total  uint64 `json:"total"`
	} `json:"flows"`
	Peers []struct {
		Key        string `json:"key"`
		TotalFlows uint64 `json:"total_flows"`
	} `json:"peers"`
}

func (e *env) status(t *testing.T, args ...string) (statusJSON, string) {
	t.Helper()
	out, err := exec.Command(bin.mpvpn, append([]string{"status", "--json"}, args...)...).Output()
	if err != nil {
		t.Fatalf("mpvpn status --json %v: %v", args, err)
	}
	var st statusJSON
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("status JSON: %v\n%s", err, out)
	}
	return st, string(out)
}

// `mpvpn status --json` shows both uplinks with bytes during a flow and
// the right state after a cut; the human table names them; the metrics
// endpoint serves the same numbers; the concentrator answers on its side.
func TestStatusAndMetrics(t *testing.T) {
	e := newEnv(t, options{topo: outageNet(), clientArgs: []string{"--metrics", "127.0.0.1:9510"}})
	const size = 32 << 20
	sum := e.randomFile(t, "big", size)
	out := filepath.Join(t.TempDir(), "big")
	dl := e.tp.Start(e.tp.Client, "curl", "curl", "-sS", "-m", "120", "-o", out, destURL("big"))
	waitSize(t, dl, out, size/3)
	time.Sleep(1500 * time.Millisecond) // a sample or two during the flow

	st, raw := e.status(t, "--socket", e.clientSocket())
	if st.Role != "client" || len(st.Uplinks) != 2 || st.Flows.Active < 1 {
		t.Fatalf("status during the flow:\n%s", raw)
	}
	for _, u := range st.Uplinks {
		if u.State != "up" || u.RxBytes == 0 || u.Subflows < 1 || u.RTT <= 0 || !u.Probe || u.RxRate <= 0 {
			t.Errorf("uplink %s during the flow: %+v", u.Name, u)
		}
	}
	table, err := exec.Command(bin.mpvpn, "status", "--socket", e.clientSocket()).Output()
	if err != nil || !strings.Contains(string(table), "wan0") || !strings.Contains(string(table), "wan1") {
		t.Errorf("mpvpn status: %v\n%s", err, table)
	}

	e.tp.LinkDown(topo.A)
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, raw = e.status(t, "--socket", e.clientSocket())
		if st.Uplinks[0].State == "down" && st.Uplinks[1].State == "up" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after cutting A:\n%s", raw)
		}
		time.Sleep(100 * time.Millisecond)
	}
	e.tp.LinkUp(topo.A)
	if err := dl.Wait(2 * time.Minute); err != nil {
		t.Fatalf("curl: %v", err)
	}
	if got := fileSum(t, out); got != sum {
		t.Fatalf("sha256 %s, want %s", got, sum)
	}

	// Metrics: the same numbers as the JSON once nothing moves (two equal
	// status readings around the scrape).
	var metrics string
	for try := 0; ; try++ {
		a, _ := e.status(t, "--socket", e.clientSocket())
		metrics = e.tp.Output(e.tp.Client, "curl", "-sS", "http://127.0.0.1:9510/metrics")
		b, _ := e.status(t, "--socket", e.clientSocket())
		if fmt.Sprint(a.Uplinks) == fmt.Sprint(b.Uplinks) {
			st = b
			break
		}
		if try > 20 {
			t.Fatal("the status never settled")
		}
		time.Sleep(500 * time.Millisecond)
	}
	for _, u := range st.Uplinks {
		for name, want := range map[string]uint64{"mpvpn_uplink_rx_bytes_total": u.RxBytes, "mpvpn_uplink_tx_bytes_total": u.TxBytes} {
			got, ok := metricValue(metrics, name, `uplink="`+u.Name+`"`)
			if !ok || uint64(got) != want {
				t.Errorf("%s{uplink=%q} = %v (found %v), JSON says %d", name, u.Name, got, ok, want)
			}
		}
	}
	if got, ok := metricValue(metrics, "mpvpn_flows_total", ""); !ok || uint64(got) != st.Flows.Total {
		t.Errorf("mpvpn_flows_total = %v, JSON says %d", got, st.Flows.Total)
	}

	// The concentrator's side.
	ss, raw := e.status(t, "--socket", e.serverSocket())
	if ss.Role != "server" || len(ss.Peers) != 1 || ss.Peers[0].Key != e.clientPub || ss.Peers[0].TotalFlows < 1 {
		t.Errorf("server status:\n%s", raw)
	}
}

// metricValue finds `name{...label...} value` in a Prometheus text page.
func metricValue(page, name, label string) (float64, bool) {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `(\{[^}]*\})? (\S+)$`)
	for _, m := range re.FindAllStringSubmatch(page, -1) {
		if label != "" && !strings.Contains(m[1], label) {
			continue
		}
		v, err := strconv.ParseFloat(m[2], 64)
		return v, err == nil
	}
	return 0, false
}
