//go:build linux

package client

import (
	"net/netip"
	"reflect"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/control"
	"github.com/mpvpn/mpvpn/mptcpinfo"
	"github.com/mpvpn/mpvpn/stack"
)

func TestStackStatus(t *testing.T) {
	got := stackStatus(stack.Stats{InFlight: 3, Active: 9, Forwarded: 10, Limited: 7})
	if want := (&control.Stack{InFlight: 3, SYNLimited: 7}); !reflect.DeepEqual(got, want) {
		t.Errorf("stackStatus = %+v, want %+v", got, want)
	}
}

// The per-flow view: oldest first, rates from the sample before (none for
// a flow new since), each path named by its uplink or, when no uplink has
// its address now, by the address.
func TestOpenFlows(t *testing.T) {
	a, b, gone := netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("100.64.0.2"), netip.MustParseAddr("198.18.0.9")
	t0 := time.Unix(1000, 0)
	s := &stats{}
	s.storeFlows(t0, []flowSample{
		{id: 2, dst: "203.0.113.1:80", since: t0.Add(-time.Second), rx: 1000, tx: 100},
	})
	s.storeFlows(t0.Add(2*time.Second), []flowSample{
		{id: 3, dst: "dns", since: t0, rx: 10, tx: 10, paths: []mptcpinfo.AddrShare{{Addr: gone, BytesReceived: 10, BytesAcked: 10}}},
		{id: 2, dst: "203.0.113.1:80", since: t0.Add(-time.Second), rx: 251000, tx: 2100,
			paths: []mptcpinfo.AddrShare{{Addr: a, Subflows: 1, BytesReceived: 200000, BytesAcked: 2000}, {Addr: b, Subflows: 2, BytesReceived: 51000, BytesAcked: 100}}},
	})
	got := s.openFlows(map[netip.Addr]string{a: "wan0", b: "wan1"})
	want := []control.OpenFlow{
		{Dst: "203.0.113.1:80", Since: t0.Add(-time.Second), RxBytes: 251000, TxBytes: 2100, RxRate: 1e6, TxRate: 8000,
			Paths: []control.FlowPath{{Uplink: "wan0", Subflows: 1, RxBytes: 200000, TxBytes: 2000}, {Uplink: "wan1", Subflows: 2, RxBytes: 51000, TxBytes: 100}}},
		{Dst: "dns", Since: t0, RxBytes: 10, TxBytes: 10, Paths: []control.FlowPath{{Uplink: "198.18.0.9", RxBytes: 10, TxBytes: 10}}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("openFlows =\n%+v\nwant\n%+v", got, want)
	}
	s.storeFlows(t0.Add(3*time.Second), nil)
	if got := s.openFlows(nil); len(got) != 0 {
		t.Errorf("after the flows ended: %+v", got)
	}
}
