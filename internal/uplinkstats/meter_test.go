//go:build linux

package uplinkstats

import (
	"net/netip"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/mptcpinfo"
)

func sf(id uint32, local string, rx, tx uint64, rtt time.Duration) mptcpinfo.Subflow {
	return mptcpinfo.Subflow{ID: id, Local: netip.MustParseAddrPort(local), BytesReceived: rx, BytesAcked: tx, RTT: rtt, State: mptcpinfo.StateEstablished}
}

func closed(s mptcpinfo.Subflow) mptcpinfo.Subflow { s.State = 7; return s } // TCP_CLOSE

func TestMeter(t *testing.T) {
	a, b := netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("100.64.0.2")
	t0 := time.Unix(1000, 0)
	type want struct {
		addr     netip.Addr
		rx, tx   uint64
		rxRate   float64
		subflows int
		rtt      time.Duration
	}
	steps := []struct {
		name  string
		at    time.Duration
		flows []Flow
		want  []want
	}{
		{"two flows, two uplinks", 0, []Flow{
			{1, []mptcpinfo.Subflow{sf(1, "192.0.2.2:1000", 100, 10, 20*time.Millisecond), sf(2, "100.64.0.2:1001", 50, 5, 50*time.Millisecond)}},
			{2, []mptcpinfo.Subflow{sf(1, "192.0.2.2:1002", 300, 30, 40*time.Millisecond)}},
		}, []want{{a, 400, 40, 0, 2, 30 * time.Millisecond}, {b, 50, 5, 0, 1, 50 * time.Millisecond}}},
		{"a second later, more bytes", time.Second, []Flow{
			{1, []mptcpinfo.Subflow{sf(1, "192.0.2.2:1000", 1100, 10, 20*time.Millisecond), sf(2, "100.64.0.2:1001", 50, 5, 50*time.Millisecond)}},
			{2, []mptcpinfo.Subflow{sf(1, "192.0.2.2:1002", 300, 30, 40*time.Millisecond)}},
		}, []want{{a, 1400, 40, 8000, 2, 30 * time.Millisecond}, {b, 50, 5, 0, 1, 50 * time.Millisecond}}},
		{"A's subflow of flow 1 withdrawn, flow 2 ended: totals keep their bytes", 2 * time.Second, []Flow{
			{1, []mptcpinfo.Subflow{sf(2, "100.64.0.2:1001", 250, 5, 50*time.Millisecond)}},
		}, []want{{a, 1400, 40, 0, 0, 0}, {b, 250, 5, 1600, 1, 50 * time.Millisecond}}},
		{"a closed first subflow still listed: its bytes count, it is not open", 2500 * time.Millisecond, []Flow{
			{1, []mptcpinfo.Subflow{sf(2, "100.64.0.2:1001", 250, 5, 50*time.Millisecond), closed(sf(9, "192.0.2.2:1009", 0, 0, time.Millisecond))}},
		}, []want{{a, 1400, 40, 0, 0, 0}, {b, 250, 5, 0, 1, 50 * time.Millisecond}}},
		{"A back with a new subflow on flow 1", 3 * time.Second, []Flow{
			{1, []mptcpinfo.Subflow{sf(2, "100.64.0.2:1001", 250, 5, 50*time.Millisecond), sf(3, "192.0.2.2:1003", 100, 0, 25*time.Millisecond)}},
		}, []want{{a, 1500, 40, 1600, 1, 25 * time.Millisecond}, {b, 250, 5, 0, 1, 50 * time.Millisecond}}},
	}
	m := New()
	for _, st := range steps {
		m.Update(t0.Add(st.at), st.flows)
		for _, w := range st.want {
			got := m.Get(w.addr)
			if got.RxBytes != w.rx || got.TxBytes != w.tx || got.RxRate != w.rxRate || got.Subflows != w.subflows || got.RTT != w.rtt {
				t.Errorf("%s: %s = %+v, want %+v", st.name, w.addr, got, w)
			}
		}
	}
	if got := m.Get(netip.MustParseAddr("203.0.113.9")); got != (Uplink{}) {
		t.Errorf("unknown address: %+v", got)
	}
}
