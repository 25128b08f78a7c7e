//go:build linux

package main

import (
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/concentrator"
	"github.com/mpvpn/mpvpn/tunnel"
)

// fillCounters sets every integer field of the struct v points to, nested
// structs included, to its own power of two, so that a value found in the
// output names its field (sums of other fields cannot make it). It returns
// each field's value by its path ("Tunnel.BadMAC").
func fillCounters(t *testing.T, v any) map[string]float64 {
	t.Helper()
	out := make(map[string]float64)
	bit := 0
	var fill func(prefix string, rv reflect.Value)
	fill = func(prefix string, rv reflect.Value) {
		for i := range rv.NumField() {
			f, name := rv.Field(i), prefix+rv.Type().Field(i).Name
			switch f.Kind() {
			case reflect.Struct:
				fill(name+".", f)
				continue
			case reflect.Int, reflect.Int64:
				f.SetInt(1 << bit)
			case reflect.Uint64:
				f.SetUint(1 << bit)
			default:
				continue // keys, times, maps: not counters
			}
			out[name] = float64(int64(1) << bit)
			bit++
		}
	}
	fill("", reflect.ValueOf(v).Elem())
	if bit > 52 {
		t.Fatalf("%d counters: more than a float64 holds exactly", bit)
	}
	return out
}

// numbers is every number in the JSON of v.
func numbers(t *testing.T, v any) map[float64]bool {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var doc any
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	out := make(map[float64]bool)
	var walk func(any)
	walk = func(x any) {
		switch x := x.(type) {
		case float64:
			out[x] = true
		case map[string]any:
			for _, y := range x {
				walk(y)
			}
		case []any:
			for _, y := range x {
				walk(y)
			}
		}
	}
	walk(doc)
	return out
}

// Every counter the concentrator and its tunnel server keep reaches
// `mpvpn status --json` (and so the table and the metrics, which read the
// same Status): a counter added to ServerStats and forgotten here fails.
func TestServerStatusShowsEveryCounter(t *testing.T) {
	var cs concentrator.Stats
	values := fillCounters(t, &cs)
	peer := tunnel.PeerStats{Key: tunnel.PublicKey{1}, Active: 3, Total: 5, Limited: 7, ReplayFull: 11, LastSeen: time.Unix(1, 0)}
	st := serverStatusOf(cs, []tunnel.PeerStats{peer}, "0.0.0.0:7100", time.Unix(0, 0))

	// The concentrator counts the same flows itself (Active, Flows).
	shownElsewhere := map[string]bool{"Tunnel.Flows": true, "Tunnel.Active": true}
	got := numbers(t, st)
	for name, v := range values {
		if !got[v] && !shownElsewhere[name] {
			t.Errorf("%s (%v) is not in the status", name, v)
		}
	}

	// And each in its place.
	ts := cs.Tunnel
	h, vd, p := st.Handshakes, st.Verdicts, st.Peers[0]
	for _, tt := range []struct {
		name      string
		got, want uint64
	}{
		{"flows.active", uint64(st.Flows.Active), uint64(cs.Active)},
		{"flows.total", st.Flows.Total, cs.Flows},
		{"flows.failed", st.Flows.Failed, cs.Refused + cs.Unreachable + cs.TimedOut},
		{"flows.rejected", st.Flows.Rejected, cs.NotAllowed + ts.Limited + ts.RateLimited + ts.Full + cs.OutOfFiles + ts.NoFiles},
		{"flows.fallbacks", st.Flows.Fallbacks, ts.Fallbacks},
		{"flows.rx_bytes", st.Flows.RxBytes, cs.BytesUp},
		{"flows.tx_bytes", st.Flows.TxBytes, cs.BytesDown},
		{"handshakes.accepted", h.Accepted, ts.Accepted},
		{"handshakes.half_open", uint64(h.HalfOpen), uint64(ts.HalfOpen)},
		{"handshakes.evicted", h.Evicted, ts.Evicted},
		{"rejected.incomplete", h.Rejected.Incomplete, ts.Incomplete},
		{"rejected.bad_mac", h.Rejected.BadMAC, ts.BadMAC},
		{"rejected.bad_handshake", h.Rejected.BadHandshake, ts.BadHandshake},
		{"rejected.unknown_peer", h.Rejected.UnknownPeer, ts.UnknownPeer},
		{"rejected.bad_payload", h.Rejected.BadPayload, ts.BadPayload},
		{"rejected.bad_time", h.Rejected.BadTime, ts.BadTime},
		{"rejected.replayed", h.Rejected.Replayed, ts.Replayed},
		{"rejected.replay_full", h.Rejected.ReplayFull, ts.ReplayFull},
		{"limited.peer", h.Limited.Peer, ts.Limited},
		{"limited.rate", h.Limited.Rate, ts.RateLimited},
		{"limited.server", h.Limited.Server, ts.Full},
		{"limited.files", h.Limited.Files, cs.OutOfFiles},
		{"limited.accept_files", h.Limited.AcceptFiles, ts.NoFiles},
		{"verdicts.connected", vd.Connected, cs.Connected},
		{"verdicts.refused", vd.Refused, cs.Refused},
		{"verdicts.unreachable", vd.Unreachable, cs.Unreachable},
		{"verdicts.timed_out", vd.TimedOut, cs.TimedOut},
		{"verdicts.not_allowed", vd.NotAllowed, cs.NotAllowed},
		{"peers[0].active_flows", uint64(p.ActiveFlows), uint64(peer.Active)},
		{"peers[0].total_flows", p.TotalFlows, peer.Total},
		{"peers[0].limited", p.Limited, peer.Limited},
		{"peers[0].replay_full", p.ReplayFull, peer.ReplayFull},
	} {
		if tt.got != tt.want {
			t.Errorf("%s = %d, want %d", tt.name, tt.got, tt.want)
		}
	}
	if p.Key != peer.Key.String() || !p.LastSeen.Equal(peer.LastSeen) {
		t.Errorf("peer %+v, want key %s last seen %v", p, peer.Key, peer.LastSeen)
	}
	if st.Role != "server" || st.Listen != "0.0.0.0:7100" || st.Stack != nil || len(st.Uplinks) != 0 {
		t.Errorf("status %+v", st)
	}
}
