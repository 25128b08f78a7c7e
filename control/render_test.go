//go:build linux

package control

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestRender(t *testing.T) {
	now := t0.Add(26*time.Hour + 3*time.Minute + 4*time.Second)
	prev := clientStatus()
	prev.Uplinks[1].RxBytes -= 1000   // 8000 bits over 2 s: 4.0 kbit/s
	prev.Uplinks[1].TxBytes -= 100    // 400 bit/s
	prev.Flows.RxBytes -= 250_000_000 // 1.0 Gbit/s over 2 s

	tests := []struct {
		name    string
		s       Status
		prev    *Status
		want    []string
		wantNot []string
	}{
		{
			name: "client",
			s:    clientStatus(),
			want: []string{
				"mpvpn client v0.4.0", "203.0.113.7:443", "up 1d2h\n",
				"4 active", "120 total", "2 failed", "1 rejected", "3 on plain TCP, 117 sealed with aes-256-gcm (offers: aes-256-gcm, chacha20-poly1305); rx",
				"UPLINK", "STATE", "RX-RATE", "TX-RATE", "SUBFLOWS", "RTT", "PROBE",
				"wlan0", "up", "192.168.1.20", "3.0 GiB", "5.0 MiB", "12.5 Mbit/s", "640.0 kbit/s",
				"23 ms", "ok 22 ms",
				"wwan0", "down (backup): probe lost", "1.5 KiB", "100 B", "lost",
				"eth1", "withdrawn: no carrier",
				"stack: 6 SYNs in flight, 51 refused over the in-flight cap, 3 reopened a port in TIME_WAIT\n",
			},
			wantNot: []string{"PEER", "handshakes:", "verdicts:", "dashboard:"},
		},
		{
			name: "client with previous",
			s:    clientStatus(),
			prev: &prev,
			want: []string{
				"12.5 Mbit/s", "640.0 kbit/s", // its own rates win
				"4.0 kbit/s", "400 bit/s", // worked out for wwan0
				"now rx 1.0 Gbit/s, tx 0 bit/s",
			},
		},
		{
			name: "client with the dashboard",
			s:    func() Status { s := clientStatus(); s.UI = "http://127.0.0.1:9511/?token=abc"; return s }(),
			want: []string{"dashboard: http://127.0.0.1:9511/?token=abc\n"},
		},
		{
			name: "server",
			s:    serverStatus(),
			want: []string{
				"mpvpn server", "listening on 0.0.0.0:443", "PEER", "peerA", "peerB", "never", "1d1h ago", "2 active",
				"handshakes: 1234 accepted, 3 half-open, 5 evicted; rejected: ",
				// Every reason, with its own value, in a fixed order.
				"rejected: incomplete 11, bad_mac 12, bad_handshake 13, unknown_peer 14, " +
					"bad_payload 15, bad_time 16, replayed 17, replay_full 18; ",
				"; limited: peer 21, rate 22, server 23, files 24\n",
				"verdicts: 31 connected, 32 refused, 33 unreachable, 34 timed out, 35 not allowed\n",
				"LIMITED", "REPLAY-FULL",
			},
			wantNot: []string{"UPLINK", "stack:"},
		},
		{
			name: "server, a few reasons",
			s: func() Status {
				s := serverStatus()
				s.Handshakes = &Handshakes{Accepted: 40, Rejected: Rejected{BadMAC: 12, Replayed: 3}, Limited: Limited{Rate: 2}}
				return s
			}(),
			want:    []string{"handshakes: 40 accepted, 0 half-open, 0 evicted; rejected: bad_mac 12, replayed 3; limited: rate 2\n"},
			wantNot: []string{"incomplete", "bad_time", "peer 0"},
		},
		{
			name: "server, quiet",
			s: func() Status {
				s := serverStatus()
				s.Handshakes = &Handshakes{}
				s.Verdicts = &Verdicts{}
				return s
			}(),
			want: []string{
				"handshakes: 0 accepted, 0 half-open, 0 evicted; rejected: none; limited: none\n",
				"verdicts: 0 connected, 0 refused, 0 unreachable, 0 timed out, 0 not allowed\n",
			},
		},
		{
			name:    "empty",
			s:       Status{},
			want:    []string{"mpvpn -", "0 active"},
			wantNot: []string{"handshakes:", "verdicts:", "stack:"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b strings.Builder
			if err := renderAt(&b, tt.s, tt.prev, 2*time.Second, now); err != nil {
				t.Fatal(err)
			}
			out := b.String()
			for _, w := range tt.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
			for _, w := range tt.wantNot {
				if strings.Contains(out, w) {
					t.Errorf("output has %q:\n%s", w, out)
				}
			}
		})
	}
}

// Each peer's row has its own limited and replay-full counts, in their
// columns.
func TestRenderPeerRows(t *testing.T) {
	var b strings.Builder
	if err := renderAt(&b, serverStatus(), nil, 0, t0.Add(2*time.Hour)); err != nil {
		t.Fatal(err)
	}
	rows := map[string][]string{}
	for _, line := range strings.Split(b.String(), "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			rows[f[0]] = f
		}
	}
	for _, tt := range []struct {
		key  string
		want []string
	}{
		{"PEER", []string{"PEER", "ACTIVE", "TOTAL", "LIMITED", "REPLAY-FULL", "LAST-SEEN"}},
		{"peerA", []string{"peerA", "2", "7", "41", "42", "1h0m", "ago"}},
		{"peerB", []string{"peerB", "0", "2", "0", "0", "never"}},
	} {
		if got := rows[tt.key]; !reflect.DeepEqual(got, tt.want) {
			t.Errorf("row %s = %q, want %q\n%s", tt.key, got, tt.want, b.String())
		}
	}
}

func TestRenderUplinkRows(t *testing.T) {
	var b strings.Builder
	if err := Render(&b, clientStatus(), nil, 0); err != nil {
		t.Fatal(err)
	}
	rows := map[string]string{}
	for _, line := range strings.Split(b.String(), "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			rows[f[0]] = line
		}
	}
	for _, u := range clientStatus().Uplinks {
		row, ok := rows[u.Name]
		if !ok {
			t.Errorf("no row for %s:\n%s", u.Name, b.String())
			continue
		}
		if !strings.Contains(row, u.State) {
			t.Errorf("row for %s lacks its state %q: %s", u.Name, u.State, row)
		}
	}
}

func TestHuman(t *testing.T) {
	bytes := []struct {
		n    uint64
		want string
	}{
		{0, "0 B"}, {1023, "1023 B"}, {1024, "1.0 KiB"}, {1536, "1.5 KiB"},
		{5 << 20, "5.0 MiB"}, {3 << 30, "3.0 GiB"}, {2 << 40, "2.0 TiB"},
	}
	for _, tt := range bytes {
		if got := humanBytes(tt.n); got != tt.want {
			t.Errorf("humanBytes(%d) = %q, want %q", tt.n, got, tt.want)
		}
	}
	rates := []struct {
		bps  float64
		want string
	}{
		{0, "0 bit/s"}, {-5, "0 bit/s"}, {999, "999 bit/s"}, {1000, "1.0 kbit/s"},
		{640_000, "640.0 kbit/s"}, {12_500_000, "12.5 Mbit/s"}, {2.5e9, "2.5 Gbit/s"},
	}
	for _, tt := range rates {
		if got := humanRate(tt.bps); got != tt.want {
			t.Errorf("humanRate(%v) = %q, want %q", tt.bps, got, tt.want)
		}
	}
	durations := []struct {
		d    time.Duration
		want string
	}{
		{0, "0s"}, {-time.Second, "0s"}, {42 * time.Second, "42s"},
		{59*time.Minute + 59*time.Second + 600*time.Millisecond, "1h0m"},
		{184 * time.Second, "3m4s"}, {90 * time.Minute, "1h30m"}, {48 * time.Hour, "2d0h"}, {49*time.Hour + time.Second, "2d1h"},
	}
	for _, tt := range durations {
		if got := humanDuration(tt.d); got != tt.want {
			t.Errorf("humanDuration(%v) = %q, want %q", tt.d, got, tt.want)
		}
	}
}

func TestRenderFlows(t *testing.T) {
	now := t0.Add(time.Hour)
	flows := []OpenFlow{
		{Peer: "cli1=", Client: "192.0.2.2:40000", Dst: "198.51.100.10:443", Since: now.Add(-90 * time.Second)},
		{Peer: "cli2=", Client: "198.18.2.1:41000", Dst: "[2001:db8::10]:80", Since: now.Add(-2 * time.Second)},
	}
	tests := []struct {
		name string
		s    Status
		want []string
	}{
		{"all listed", Status{Role: "server", Flows: Flows{Active: 2}, OpenFlows: flows},
			[]string{"open flows: 2\n", "  cli1=  from 192.0.2.2:40000  to 198.51.100.10:443  for 1m30s\n", "  cli2=  from 198.18.2.1:41000  to [2001:db8::10]:80  for 2s\n"}},
		{"server, with bytes", Status{Role: "server", Flows: Flows{Active: 1}, OpenFlows: []OpenFlow{
			{Peer: "cli1=", Client: "192.0.2.2:40000", Dst: "198.51.100.10:80", Since: now.Add(-time.Second), RxBytes: 1 << 20, TxBytes: 3 << 20,
				Paths: []FlowPath{{Uplink: "192.0.2.2", Subflows: 1, RxBytes: 1 << 20, TxBytes: 1 << 20}, {Uplink: "100.64.0.1", Subflows: 1, TxBytes: 2 << 20}}},
		}}, []string{"  cli1=  from 192.0.2.2:40000  to 198.51.100.10:80  for 1s  in 1.0 MiB  out 3.0 MiB  192.0.2.2 50% (1 subflow), 100.64.0.1 50% (1 subflow)\n"}},
		{"more open than listed", Status{Role: "server", Flows: Flows{Active: 5000}, OpenFlows: flows[:1]},
			[]string{"open flows: 5000 (the oldest 1 listed)\n", "cli1="}},
		{"none", Status{Role: "server"}, []string{"open flows: 0\n"}},
		{"client", Status{Role: "client", Flows: Flows{Active: 2}, OpenFlows: []OpenFlow{
			{Dst: "198.51.100.10:443", Since: now.Add(-3 * time.Second), RxBytes: 3 << 20, TxBytes: 1 << 20, RxRate: 12.5e6, TxRate: 1e6,
				Paths: []FlowPath{{Uplink: "wan0", Subflows: 1, RxBytes: 3 << 20}, {Uplink: "wan1", Subflows: 2, TxBytes: 1 << 20}}},
			{Dst: "dns", Since: now},
		}}, []string{
			"  to 198.51.100.10:443  for 3s  down 3.0 MiB (12.5 Mbit/s)  up 1.0 MiB (1.0 Mbit/s)  wan0 75% (1 subflow), wan1 25% (2 subflows)\n",
			"  to dns  for 0s  down 0 B (0 bit/s)  up 0 B (0 bit/s)  no subflow\n",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b strings.Builder
			if err := renderFlowsAt(&b, tt.s, now); err != nil {
				t.Fatal(err)
			}
			for _, w := range tt.want {
				if !strings.Contains(b.String(), w) {
					t.Errorf("missing %q in:\n%s", w, b.String())
				}
			}
		})
	}
}
