//go:build linux

package control

import (
	"context"
	"io"
	"math"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// scrape fetches /metrics and returns each sample, keyed by its name and
// labels as exposed ("mpvpn_uplink_up{uplink=\"wlan0\"}").
func scrape(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	// No keep-alive: an idle connection would outlive the test.
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s\n%s", resp.Status, body)
	}
	samples := make(map[string]float64)
	for _, line := range strings.Split(string(body), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("bad sample %q: %v", line, err)
		}
		samples[line[:i]] = v
	}
	return samples
}

func TestServeMetrics(t *testing.T) {
	tests := []struct {
		name string
		s    Status
		want map[string]float64
	}{
		{
			name: "client",
			s:    clientStatus(),
			want: map[string]float64{
				`mpvpn_info{role="client",version="v0.4.0"}`:          1,
				`mpvpn_start_time_seconds`:                            float64(t0.Unix()),
				`mpvpn_uplink_up{uplink="wlan0"}`:                     1,
				`mpvpn_uplink_up{uplink="wwan0"}`:                     0,
				`mpvpn_uplink_up{uplink="eth1"}`:                      0,
				`mpvpn_uplink_state{state="up",uplink="wlan0"}`:       1,
				`mpvpn_uplink_state{state="down",uplink="wlan0"}`:     0,
				`mpvpn_uplink_state{state="down",uplink="wwan0"}`:     1,
				`mpvpn_uplink_state{state="withdrawn",uplink="eth1"}`: 1,
				`mpvpn_uplink_backup{uplink="wwan0"}`:                 1,
				`mpvpn_uplink_backup{uplink="wlan0"}`:                 0,
				`mpvpn_uplink_transitions_total{uplink="wwan0"}`:      7,
				`mpvpn_uplink_rx_bytes_total{uplink="wlan0"}`:         3 << 30,
				`mpvpn_uplink_tx_bytes_total{uplink="wlan0"}`:         5 << 20,
				`mpvpn_uplink_rx_bytes_total{uplink="wwan0"}`:         1536,
				`mpvpn_uplink_subflows{uplink="wlan0"}`:               2,
				`mpvpn_uplink_rtt_seconds{uplink="wlan0"}`:            0.0234,
				`mpvpn_uplink_rtt_seconds{uplink="eth1"}`:             0,
				`mpvpn_uplink_fallbacks_total{uplink="wlan0"}`:        1,
				`mpvpn_uplink_probe_up{uplink="wlan0"}`:               1,
				`mpvpn_uplink_probe_up{uplink="wwan0"}`:               0,
				`mpvpn_uplink_probe_rtt_seconds{uplink="wlan0"}`:      0.0215,
				`mpvpn_flows_active`:                                  4,
				`mpvpn_flows_total`:                                   120,
				`mpvpn_flows_failed_total`:                            2,
				`mpvpn_flows_rejected_total`:                          1,
				`mpvpn_flows_fallback_total`:                          3,
				`mpvpn_flows_aes_gcm_total`:                           117,
				`mpvpn_rx_bytes_total`:                                3<<30 + 1536,
				`mpvpn_tx_bytes_total`:                                5<<20 + 100,
				`mpvpn_stack_syns_in_flight`:                          6,
				`mpvpn_stack_syn_limited_total`:                       51,
			},
		},
		{
			name: "server",
			s:    serverStatus(),
			want: map[string]float64{
				`mpvpn_info{role="server",version=""}`:         1,
				`mpvpn_flows_active`:                           2,
				`mpvpn_flows_total`:                            9,
				`mpvpn_peer_flows_active{peer="peerA"}`:        2,
				`mpvpn_peer_flows_active{peer="peerB"}`:        0,
				`mpvpn_peer_flows_total{peer="peerA"}`:         7,
				`mpvpn_peer_flows_total{peer="peerB"}`:         2,
				`mpvpn_peer_last_seen_seconds{peer="peerA"}`:   float64(t0.Add(time.Hour).Unix()),
				`mpvpn_peer_flows_limited_total{peer="peerA"}`: 41,
				`mpvpn_peer_flows_limited_total{peer="peerB"}`: 0,
				`mpvpn_peer_replay_full_total{peer="peerA"}`:   42,
				`mpvpn_peer_replay_full_total{peer="peerB"}`:   0,

				`mpvpn_handshakes_accepted_total`:                         1234,
				`mpvpn_handshakes_half_open`:                              3,
				`mpvpn_handshakes_evicted_total`:                          5,
				`mpvpn_handshakes_rejected_total{reason="incomplete"}`:    11,
				`mpvpn_handshakes_rejected_total{reason="bad_mac"}`:       12,
				`mpvpn_handshakes_rejected_total{reason="bad_handshake"}`: 13,
				`mpvpn_handshakes_rejected_total{reason="unknown_peer"}`:  14,
				`mpvpn_handshakes_rejected_total{reason="bad_payload"}`:   15,
				`mpvpn_handshakes_rejected_total{reason="bad_time"}`:      16,
				`mpvpn_handshakes_rejected_total{reason="replayed"}`:      17,
				`mpvpn_handshakes_rejected_total{reason="replay_full"}`:   18,
				`mpvpn_flows_limited_total{limit="peer"}`:                 21,
				`mpvpn_flows_limited_total{limit="rate"}`:                 22,
				`mpvpn_flows_limited_total{limit="server"}`:               23,
				`mpvpn_flows_limited_total{limit="files"}`:                24,
				`mpvpn_flows_limited_total{limit="accept_files"}`:         0,
				`mpvpn_flow_verdicts_total{verdict="connected"}`:          31,
				`mpvpn_flow_verdicts_total{verdict="refused"}`:            32,
				`mpvpn_flow_verdicts_total{verdict="unreachable"}`:        33,
				`mpvpn_flow_verdicts_total{verdict="timed_out"}`:          34,
				`mpvpn_flow_verdicts_total{verdict="not_allowed"}`:        35,
			},
		},
		{
			// Nothing has happened yet: every reason, limit and verdict
			// is there at 0, so that rate() sees the first one.
			name: "server, quiet",
			s: func() Status {
				s := serverStatus()
				s.Handshakes, s.Verdicts = &Handshakes{}, &Verdicts{}
				return s
			}(),
			want: map[string]float64{
				`mpvpn_handshakes_accepted_total`:                         0,
				`mpvpn_handshakes_half_open`:                              0,
				`mpvpn_handshakes_evicted_total`:                          0,
				`mpvpn_handshakes_rejected_total{reason="incomplete"}`:    0,
				`mpvpn_handshakes_rejected_total{reason="bad_mac"}`:       0,
				`mpvpn_handshakes_rejected_total{reason="bad_handshake"}`: 0,
				`mpvpn_handshakes_rejected_total{reason="unknown_peer"}`:  0,
				`mpvpn_handshakes_rejected_total{reason="bad_payload"}`:   0,
				`mpvpn_handshakes_rejected_total{reason="bad_time"}`:      0,
				`mpvpn_handshakes_rejected_total{reason="replayed"}`:      0,
				`mpvpn_handshakes_rejected_total{reason="replay_full"}`:   0,
				`mpvpn_flows_limited_total{limit="peer"}`:                 0,
				`mpvpn_flows_limited_total{limit="rate"}`:                 0,
				`mpvpn_flows_limited_total{limit="server"}`:               0,
				`mpvpn_flows_limited_total{limit="files"}`:                0,
				`mpvpn_flows_limited_total{limit="accept_files"}`:         0,
				`mpvpn_flow_verdicts_total{verdict="connected"}`:          0,
				`mpvpn_flow_verdicts_total{verdict="refused"}`:            0,
				`mpvpn_flow_verdicts_total{verdict="unreachable"}`:        0,
				`mpvpn_flow_verdicts_total{verdict="timed_out"}`:          0,
				`mpvpn_flow_verdicts_total{verdict="not_allowed"}`:        0,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var gets atomic.Int64
			get := func() Status { gets.Add(1); return tt.s }
			ctx, cancel := context.WithCancel(context.Background())
			m, err := ServeMetrics(ctx, "127.0.0.1:0", NewCollector(get), nil)
			if err != nil {
				t.Fatal(err)
			}
			got := scrape(t, m.Addr().String())
			cancel()
			if err := m.Wait(); err != nil {
				t.Errorf("Wait: %v", err)
			}

			if n := gets.Load(); n != 1 {
				t.Errorf("get called %d times for one scrape", n)
			}
			for k, v := range tt.want {
				g, ok := got[k]
				switch {
				case !ok:
					t.Errorf("no sample %s", k)
				case math.Abs(g-v) > 1e-9*math.Max(1, math.Abs(v)): // ms to s is not exact
					t.Errorf("%s = %v, want %v", k, g, v)
				}
			}
			serverOnly := []string{"mpvpn_peer_", "mpvpn_handshakes_", "mpvpn_flows_limited_", "mpvpn_flow_verdicts_"}
			clientOnly := []string{"mpvpn_uplink_", "mpvpn_stack_"}
			hasPrefix := func(k string, prefixes []string) bool {
				return slices.ContainsFunc(prefixes, func(p string) bool { return strings.HasPrefix(k, p) })
			}
			for k := range got {
				if tt.s.Role == "server" && hasPrefix(k, clientOnly) {
					t.Errorf("server exposes %s", k)
				}
				if tt.s.Role == "client" && hasPrefix(k, serverOnly) {
					t.Errorf("client exposes %s", k)
				}
			}
			// A reason, limit or verdict the test does not list is one
			// added without a test.
			for k := range got {
				if hasPrefix(k, []string{"mpvpn_handshakes_rejected_total", "mpvpn_flows_limited_total", "mpvpn_flow_verdicts_total"}) {
					if _, ok := tt.want[k]; !ok {
						t.Errorf("unexpected series %s", k)
					}
				}
			}
			if _, ok := tt.want[`mpvpn_peer_last_seen_seconds{peer="peerB"}`]; !ok {
				if _, ok := got[`mpvpn_peer_last_seen_seconds{peer="peerB"}`]; ok {
					t.Error("a peer never seen has a last-seen time")
				}
			}
			// The runtime and process collectors are there too.
			for _, k := range []string{"go_goroutines", "process_start_time_seconds"} {
				if _, ok := got[k]; !ok {
					t.Errorf("no %s", k)
				}
			}
		})
	}
}

func TestCollectorLint(t *testing.T) {
	for _, get := range []func() Status{clientStatus, serverStatus} {
		problems, err := testutil.CollectAndLint(NewCollector(get))
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range problems {
			t.Errorf("lint: %s: %s", p.Metric, p.Text)
		}
	}
	s := clientStatus()
	s.Uplinks = append(s.Uplinks, s.Uplinks[0]) // listed twice: reported once
	s.Uplinks[3].State = "testing"              // a state we do not know
	s.Uplinks[3].Name = "ppp0"
	s.Uplinks = append(s.Uplinks, s.Uplinks[0])
	if n := testutil.CollectAndCount(NewCollector(func() Status { return s }), "mpvpn_uplink_up"); n != 4 {
		t.Errorf("%d mpvpn_uplink_up series, want 4", n)
	}
	want := `
# HELP mpvpn_uplink_state 1 for the uplink's current state, 0 for the others.
# TYPE mpvpn_uplink_state gauge
mpvpn_uplink_state{state="down",uplink="ppp0"} 0
mpvpn_uplink_state{state="testing",uplink="ppp0"} 1
mpvpn_uplink_state{state="up",uplink="ppp0"} 0
mpvpn_uplink_state{state="withdrawn",uplink="ppp0"} 0
`
	s.Uplinks = s.Uplinks[3:4]
	if err := testutil.CollectAndCompare(NewCollector(func() Status { return s }), strings.NewReader(want), "mpvpn_uplink_state"); err != nil {
		t.Error(err)
	}
}

func TestMetricsPortTaken(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	m, err := ServeMetrics(context.Background(), ln.Addr().String(), NewCollector(clientStatus), nil)
	if err == nil {
		m.Close()
		t.Fatal("ServeMetrics on a taken port succeeded")
	}
	if !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("error %q does not say the port is taken", err)
	}
}

func TestMetricsClose(t *testing.T) {
	m, err := ServeMetrics(context.Background(), "127.0.0.1:0", NewCollector(clientStatus), nil)
	if err != nil {
		t.Fatal(err)
	}
	scrape(t, m.Addr().String())
	if err := m.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	select {
	case <-m.Done():
	default:
		t.Error("not done after Close")
	}
}
