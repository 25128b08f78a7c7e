//go:build linux

package client

import (
	"cmp"
	"context"
	"net/netip"
	"slices"
	"sync"
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

	mu       sync.Mutex
	flows    []flowSample      // the open flows at the last sample
	flowPrev map[uint64]counts // each flow's bytes at the sample before
	flowAt   time.Time
}

// flowSample is one open flow at a sample, for the per-flow view.
type flowSample struct {
	id             uint64
	dst            string
	since          time.Time
	rx, tx         uint64
	rxRate, txRate float64
	paths          []mptcpinfo.AddrShare // by local address
}

type counts struct{ rx, tx uint64 }

// sampleFlow is c's flow with info's subflows summed per local address.
func sampleFlow(c *tunnel.Conn, info mptcpinfo.Info) flowSample {
	f := flowSample{id: c.ID(), dst: c.Dest(), since: c.Opened(), paths: info.ByAddr(false)}
	for _, a := range f.paths {
		f.rx += a.BytesReceived
		f.tx += a.BytesAcked
	}
	return f
}

// rate is the bits per second from prev to cur bytes over dt.
func rate(cur, prev uint64, dt time.Duration) float64 {
	if dt <= 0 || cur < prev {
		return 0
	}
	return 8 * float64(cur-prev) / dt.Seconds()
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
			samples := make([]flowSample, 0, len(conns))
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
				samples = append(samples, sampleFlow(c, info))
			}
			s.meter.Update(now, flows)
			s.storeFlows(now, samples)
		}
	}
}

// storeFlows keeps the flows sampled at now, with their rates since the
// sample before, oldest first.
func (s *stats) storeFlows(now time.Time, samples []flowSample) {
	slices.SortFunc(samples, func(a, b flowSample) int { return cmp.Or(a.since.Compare(b.since), cmp.Compare(a.id, b.id)) })
	s.mu.Lock()
	defer s.mu.Unlock()
	dt := now.Sub(s.flowAt)
	next := make(map[uint64]counts, len(samples))
	for i := range samples {
		f := &samples[i]
		if p, ok := s.flowPrev[f.id]; ok {
			f.rxRate, f.txRate = rate(f.rx, p.rx, dt), rate(f.tx, p.tx, dt)
		}
		next[f.id] = counts{f.rx, f.tx}
	}
	s.flows, s.flowPrev, s.flowAt = samples, next, now
}

// openFlows is the per-flow view of the last sample, at most
// control.MaxOpenFlows of it, each path named by the uplink that has its
// address (names maps them).
func (s *stats) openFlows(names map[netip.Addr]string) []control.OpenFlow {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]control.OpenFlow, 0, min(len(s.flows), control.MaxOpenFlows))
	for _, f := range s.flows[:min(len(s.flows), control.MaxOpenFlows)] {
		of := control.OpenFlow{Dst: f.dst, Since: f.since, RxBytes: f.rx, TxBytes: f.tx, RxRate: f.rxRate, TxRate: f.txRate}
		for _, p := range f.paths {
			name, ok := names[p.Addr]
			if !ok {
				name = p.Addr.String()
			}
			of.Paths = append(of.Paths, control.FlowPath{Uplink: name, Subflows: p.Subflows, RxBytes: p.BytesReceived, TxBytes: p.BytesAcked})
		}
		out = append(out, of)
	}
	return out
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
		Pool: &control.Pool{Ready: int64(ts.Pooled), Hits: ts.PoolHits, Stale: ts.PoolStale, Expired: ts.PoolExpired, Dials: ts.PoolDials, Failures: ts.PoolFailures, Reused: ts.PoolReused, Grow: int64(ts.PoolGrow)},
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
	ups := s.pm.Status()
	names := make(map[netip.Addr]string, len(ups))
	for _, u := range ups {
		if u.Addr.IsValid() {
			names[u.Addr.Unmap()] = u.Name
		}
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
	st.OpenFlows = s.openFlows(names)
	return st
}

// stackStatus is the client's netstack as `mpvpn status` shows it.
func stackStatus(ss stack.Stats) *control.Stack {
	return &control.Stack{InFlight: ss.InFlight, SYNLimited: ss.Limited, TimeWaitRetired: ss.TimeWaitRetired}
}
