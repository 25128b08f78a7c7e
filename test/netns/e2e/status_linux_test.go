package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/test/netns/linkemu"
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
	UDP *struct {
		Streams     uint64 `json:"streams"`
		Flows       int    `json:"flows"`
		Up          uint64 `json:"up"`
		Down        uint64 `json:"down"`
		Refused     uint64 `json:"refused"`
		Dropped     uint64 `json:"dropped"`
		Pings       uint64 `json:"pings"`
		Echoes      uint64 `json:"echoes"`
		PathOut     uint64 `json:"path_out"`
		PathIn      uint64 `json:"path_in"`
		Unreachable uint64 `json:"unreachable"`
	} `json:"udp"`
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

	t.Run("uplink bytes match the interfaces", func(t *testing.T) { e.checkUplinkBytes(t, size, sum) })
}

// Tolerances of checkUplinkBytes. Per packet, an interface counts what the
// MPTCP byte counters (MPTCP_FULL_INFO's per-subflow bytes_received and
// bytes_acked, which `status --json` adds up per uplink) do not: the
// Ethernet header (14), IPv4 (20; never options here) and TCP (20) with
// its options, at most 40. Every segment of an established MPTCP subflow
// carries timestamps (12 with their padding) and a DSS option with at
// least a 32-bit data ACK (8), so its headers are 74-94 bytes (~88-90
// measured on average: data segments carry a 64-bit mapping too). The
// check takes the packet counts from the interface as well, and wants the
// JSON within uplinkBytesTol of the payload those two bounds leave.
// Besides the flow, each uplink carries the probes (a ~40-byte UDP
// datagram each way every 100 ms, ~82-byte frames: ~1 kB/s per
// direction; 8 bytes each above minHeader), a few ARPs and MPTCP's own
// handshakes: uplinkBytesExtra allows for a minute of them.
const (
	minHeader        = 14 + 20 + 20 + 12 + 8
	maxHeader        = 14 + 20 + 60
	uplinkBytesTol   = 0.05
	uplinkBytesExtra = 64 << 10
)

// checkUplinkBytes moves tens of MiB each way over one flow and compares
// each uplink's bytes in `status --json` with its interface's counters in
// the client namespace (wan0, wan1), both ways, and checks that each
// uplink carried at least minShare of them.
//
// A is made 40 Mbit/s (B stays at 20): with unequal shares, bytes counted
// on the wrong uplink cannot pass. The flow stays open, idle, while the
// last reading is taken: the client samples its subflows once a second
// and what a subflow carried after its last sample is never counted once
// it has closed (package uplinkstats), which would make a flow that just
// ended up to a second's worth short.
func (e *env) checkUplinkBytes(t *testing.T, bigSize int, bigSum string) {
	e.tp.UpdateLink(topo.A, linkemu.Both, "rate=40mbit")
	deadline := time.Now().Add(15 * time.Second)
	for {
		st, raw := e.status(t, "--socket", e.clientSocket())
		if st.Uplinks[0].State == "up" && st.Uplinks[1].State == "up" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the uplinks are not both up:\n%s", raw)
		}
		time.Sleep(100 * time.Millisecond)
	}
	const upSize = 24 << 20
	upSum := e.randomFile(t, "up", upSize)
	up, err := os.ReadFile(filepath.Join(e.www, "up"))
	if err != nil {
		t.Fatal(err)
	}
	nd := e.openNetDev(t, e.tp.Client)

	before := e.uplinkReading(t, nd)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn, err := topo.Dial(ctx, e.tp.Client, nil, "tcp", netip.AddrPortFrom(topo.DestAddr, 80).String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(2 * time.Minute))
	// One HTTP/1.1 connection, kept alive: the file "big" down, upSize
	// up (the server answers with the SHA-256 of what it got).
	br := bufio.NewReader(conn)
	roundTrip := func(method, name string, body []byte) []byte {
		t.Helper()
		req, err := http.NewRequest(method, destURL(name), bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/octet-stream")
		if err := req.Write(conn); err != nil {
			t.Fatalf("%s %s: %v", method, name, err)
		}
		resp, err := http.ReadResponse(br, req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, name, err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("%s %s: %s, %d bytes: %v", method, name, resp.Status, len(b), err)
		}
		return b
	}
	got := sha256.Sum256(roundTrip(http.MethodGet, "big", nil))
	if hex.EncodeToString(got[:]) != bigSum {
		t.Fatalf("GET big over the kept-alive connection: sha256 %x, want %s", got, bigSum)
	}
	if got := strings.TrimSpace(string(roundTrip(http.MethodPost, "upload", up))); got != upSum {
		t.Fatalf("POST: the server got sha256 %s, want %s", got, upSum)
	}
	after := e.uplinkReading(t, nd)
	conn.Close()

	for d, dir := range []string{"rx", "tx"} {
		var js [2]uint64
		for i := range js {
			js[i] = after.json[i][d] - before.json[i][d]
		}
		total, share := shares([2]uint64{}, js)
		t.Logf("%s: %d bytes in status --json, wan0 %.0f%%, wan1 %.0f%%", dir, total, 100*share[0], 100*share[1])
		if want := uint64([2]int{bigSize, upSize}[d]); total < want {
			t.Errorf("%s: status --json counts %d bytes on the uplinks, want at least %d", dir, total, want)
		}
		for i, ul := range e.tp.Uplinks {
			wire, pkts := after.iface[i].bytes(d)-before.iface[i].bytes(d), after.iface[i].packets(d)-before.iface[i].packets(d)
			lo := (1 - uplinkBytesTol) * (float64(wire) - maxHeader*float64(pkts))
			hi := (1+uplinkBytesTol)*(float64(wire)-minHeader*float64(pkts)) + uplinkBytesExtra
			t.Logf("%s %s: status --json %d bytes; interface %d bytes in %d packets (%.1f bytes a packet more than the JSON); want %.0f-%.0f",
				ul.Iface, dir, js[i], wire, pkts, float64(int64(wire)-int64(js[i]))/float64(max(pkts, 1)), lo, hi)
			if float64(js[i]) < lo || float64(js[i]) > hi {
				t.Errorf("%s %s: status --json says %d bytes, the interface's %d bytes in %d packets leave %.0f-%.0f",
					ul.Iface, dir, js[i], wire, pkts, lo, hi)
			}
			if share[i] < minShare {
				t.Errorf("%s %s: carried %.0f%% of the bytes, want at least %.0f%%", ul.Iface, dir, 100*share[i], 100*minShare)
			}
		}
	}
}

// uplinkReading is each uplink's bytes in `status --json` ([uplink][rx,
// tx]) and its interface's counters, read together.
type uplinkReading struct {
	json  [2][2]uint64
	iface [2]ifaceCounters
}

// uplinkReading waits until the status has settled (two readings more
// than a sampling interval apart agree: every byte so far is counted),
// then reads the interfaces.
func (e *env) uplinkReading(t *testing.T, nd *netDev) uplinkReading {
	t.Helper()
	read := func() (r uplinkReading) {
		st, raw := e.status(t, "--socket", e.clientSocket())
		if len(st.Uplinks) != 2 || st.Uplinks[0].Name != e.tp.Uplinks[topo.A].Iface || st.Uplinks[1].Name != e.tp.Uplinks[topo.B].Iface {
			t.Fatalf("status lists other uplinks than wan0 and wan1:\n%s", raw)
		}
		for i, u := range st.Uplinks {
			r.json[i] = [2]uint64{u.RxBytes, u.TxBytes}
		}
		return r
	}
	r := read()
	for range 20 {
		time.Sleep(1100 * time.Millisecond) // the client samples every second
		next := read()
		if next.json == r.json {
			for i, ul := range e.tp.Uplinks {
				c, err := nd.read(ul.Iface)
				if err != nil {
					t.Fatal(err)
				}
				next.iface[i] = c
			}
			return next
		}
		r = next
	}
	t.Fatal("the uplinks' bytes in status --json never settled")
	return r
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
