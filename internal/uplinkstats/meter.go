//go:build linux

// Package uplinkstats turns per-subflow counters of many MPTCP connections
// (sampled with package mptcpinfo) into per-uplink figures: bytes each
// way, current rate, subflow count and RTT. An uplink is known by the
// local address of its subflows.
//
// Subflows and connections come and go between samples (an uplink is
// withdrawn, a flow ends), and with them their counters: the meter keeps
// the last value seen of each, and when one disappears its bytes move to
// the uplink's retired total, so the per-uplink totals never go backwards.
// What a subflow carried between its last sample and its end is not
// counted (at most one sampling interval's worth).
package uplinkstats

import (
	"net/netip"
	"sync"
	"time"

	"github.com/mpvpn/mpvpn/mptcpinfo"
)

// Flow is one connection's subflows at a sample. ID tells flows apart
// across samples (the tunnel connection's ID).
type Flow struct {
	ID       uint64
	Subflows []mptcpinfo.Subflow
}

// Uplink is one local address's figures.
type Uplink struct {
	RxBytes, TxBytes uint64        // since the meter started
	RxRate, TxRate   float64       // bits per second over the last interval
	Subflows         int           // open now
	RTT              time.Duration // mean smoothed RTT of its open subflows
}

type key struct {
	flow  uint64
	id    uint32
	local netip.AddrPort
}

type counts struct{ rx, tx uint64 }

// Meter accumulates samples. Its methods are safe for concurrent use.
type Meter struct {
	mu      sync.Mutex
	last    map[key]counts
	retired map[netip.Addr]counts
	now     map[netip.Addr]Uplink
	at      time.Time
}

// New returns an empty Meter.
func New() *Meter {
	return &Meter{last: map[key]counts{}, retired: map[netip.Addr]counts{}, now: map[netip.Addr]Uplink{}}
}

// Update takes a sample of every open flow at time at.
func (m *Meter) Update(at time.Time, flows []Flow) {
	m.mu.Lock()
	defer m.mu.Unlock()
	seen := make(map[key]counts, len(m.last))
	cur := map[netip.Addr]Uplink{}
	var rttSum = map[netip.Addr]time.Duration{}
	for _, f := range flows {
		for _, sf := range f.Subflows {
			a := sf.Local.Addr().Unmap()
			k := key{f.ID, sf.ID, sf.Local}
			c := counts{rx: sf.BytesReceived, tx: sf.BytesAcked}
			seen[k] = c
			if sf.State != mptcpinfo.StateEstablished {
				// The kernel keeps a connection's first subflow
				// after it closed (it carries the socket's state):
				// its bytes count, it is not a path in use.
				continue
			}
			u := cur[a]
			u.Subflows++
			cur[a] = u
			rttSum[a] += sf.RTT
		}
	}
	for k, c := range m.last {
		if _, ok := seen[k]; !ok {
			r := m.retired[k.local.Addr().Unmap()]
			r.rx += c.rx
			r.tx += c.tx
			m.retired[k.local.Addr().Unmap()] = r
		}
	}
	m.last = seen
	totals := map[netip.Addr]counts{}
	for a, r := range m.retired {
		totals[a] = r
	}
	for k, c := range seen {
		a := k.local.Addr().Unmap()
		t := totals[a]
		t.rx += c.rx
		t.tx += c.tx
		totals[a] = t
	}
	dt := at.Sub(m.at).Seconds()
	next := map[netip.Addr]Uplink{}
	for a, t := range totals {
		u := cur[a]
		u.RxBytes, u.TxBytes = t.rx, t.tx
		if u.Subflows > 0 {
			u.RTT = rttSum[a] / time.Duration(u.Subflows)
		}
		if prev, ok := m.now[a]; ok && !m.at.IsZero() && dt > 0 {
			u.RxRate = 8 * float64(u.RxBytes-min(prev.RxBytes, u.RxBytes)) / dt
			u.TxRate = 8 * float64(u.TxBytes-min(prev.TxBytes, u.TxBytes)) / dt
		}
		next[a] = u
	}
	m.now, m.at = next, at
}

// Get returns the figures of local address a (zero if never seen).
func (m *Meter) Get(a netip.Addr) Uplink {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.now[a.Unmap()]
}
