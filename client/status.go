//go:build linux

package client

import (
	"context"
	"net/netip"
	"time"

	"github.com/mpvpn/mpvpn/control"
	"github.com/mpvpn/mpvpn/dnsrelay"
	"github.com/mpvpn/mpvpn/internal/uplinkstats"
	"github.com/mpvpn/mpvpn/mptcpinfo"
	"github.com/mpvpn/mpvpn/pathmgr"
	"github.com/mpvpn/mpvpn/probe"
	"github.com/mpvpn/mpvpn/stack"
	"github.com/mpvpn/mpvpn/tunnel"
	"github.com/mpvpn/mpvpn/udprelay"
)

// stats samples the subflows of every open flow once per interval,
// so that bytes, rates, subflows and RTT can be told per uplink.
type stats struct {
	tc    *tunnel.Client
	pm    *pathmgr.Manager
	pr    *probe.Prober
	meter *uplinkstats.Meter
	start time.Time
	srv   netip.AddrPort
	// version is shown by `mpvpn status`.
	version string
	// netstack is the netstack's counters ((*stack.Stack).Stats): a func
	// so that the mapping can be tested without a TUN.
	netstack func() stack.Stats
	dns      func() dnsrelay.ForwarderStats
	udp      func() udprelay.ClientStats
}

func (s *stats) run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			conns := s.tc.Conns()
			flows := make([]uplinkstats.Flow, 0, len(conns))
			for _, c := range conns {
				tcp := c.TCP()
				if tcp == nil {
					continue
				}
				info, err := mptcpinfo.GetConn(tcp)
				if err != nil {
					continue // closed meanwhile
				}
				flows = append(flows, uplinkstats.Flow{ID: c.ID(), Subflows: info.Subflows})
			}
			s.meter.Update(now, flows)
		}
	}
}

func (s *stats) status() control.Status {
	ts := s.tc.Stats()
	probes := map[string]probe.PathStatus{}
	for _, p := range s.pr.Status() {
		probes[p.Name] = p
	}
	st := control.Status{
		Role:           "client",
		Version:        s.version,
		Started:        s.start,
		Server:         s.srv.String(),
		NetlinkChanges: s.pm.Changes(),
		Flows: control.Flows{
			Active:    ts.Active,
			Total:     ts.Connected,
			Failed:    ts.Failures,
			Rejected:  ts.Rejected,
			Fallbacks: ts.Fallbacks,
			Ciphers:   tunnel.CiphersOf(ts.OffersAES),
			AESGCM:    ts.AESGCM,
		},
		Pool: &control.Pool{Ready: int64(ts.Pooled), Hits: ts.PoolHits, Stale: ts.PoolStale, Expired: ts.PoolExpired, Dials: ts.PoolDials, Failures: ts.PoolFailures, Reused: ts.PoolReused},
	}
	if s.netstack != nil {
		st.Stack = stackStatus(s.netstack())
	}
	if s.dns != nil {
		d := s.dns()
		st.DNS = &control.DNS{Streams: d.Dials, Queries: d.Queries, Failed: d.Failed, Dropped: d.Dropped}
	}
	if s.udp != nil {
		u := s.udp()
		st.UDP = &control.UDP{Streams: u.Dials, Flows: int64(u.Flows), Up: u.Up, Down: u.Down, UpBytes: u.UpBytes, DownBytes: u.DownBytes, Refused: u.Refused, Dropped: u.Dropped,
			Pings: u.Pings, Echoes: u.Echoes, PathOut: u.PathOut, PathIn: u.PathIn, Unreachable: u.Unreachable}
	}
	for _, u := range s.pm.Status() {
		cu := control.Uplink{
			Name:        u.Name,
			State:       u.State.String(),
			Reason:      u.Reason,
			Backup:      u.Backup,
			Since:       u.Since,
			Transitions: u.Transitions,
		}
		if u.Addr.IsValid() {
			cu.Addr = u.Addr.String()
			m := s.meter.Get(u.Addr)
			cu.RxBytes, cu.TxBytes = m.RxBytes, m.TxBytes
			cu.RxRate, cu.TxRate = m.RxRate, m.TxRate
			cu.Subflows = m.Subflows
			cu.RTT = float64(m.RTT) / float64(time.Millisecond)
			cu.Fallbacks = ts.FallbacksBySource[u.Addr]
			st.Flows.RxBytes += m.RxBytes
			st.Flows.TxBytes += m.TxBytes
		}
		if u.Gateway.IsValid() {
			cu.Gateway = u.Gateway.String()
		}
		if p, ok := probes[u.Name]; ok {
			cu.ProbeAlive = p.Known && p.Alive
			cu.ProbeRTT = float64(p.RTT) / float64(time.Millisecond)
			cu.ProbesSent, cu.ProbesReceived = p.Sent, p.Received
		}
		st.Uplinks = append(st.Uplinks, cu)
	}
	return st
}

// stackStatus is the client's netstack as `mpvpn status` shows it.
func stackStatus(ss stack.Stats) *control.Stack {
	return &control.Stack{InFlight: ss.InFlight, SYNLimited: ss.Limited, TimeWaitRetired: ss.TimeWaitRetired}
}
