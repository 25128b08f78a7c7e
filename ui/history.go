//go:build linux

package ui

import (
	"sync"
	"time"

	"github.com/mpvpn/mpvpn/control"
)

// sample is one point of the page's graphs and timelines.
type sample struct {
	T       int64      `json:"t"` // Unix milliseconds
	Uplinks []upSample `json:"uplinks,omitempty"`
	Flows   int64      `json:"flows"` // open now
}

// upSample is one uplink at a sample.
type upSample struct {
	Name     string  `json:"name"`
	State    string  `json:"state"`
	Reason   string  `json:"reason,omitempty"`
	Backup   bool    `json:"backup,omitempty"`
	Rx       float64 `json:"rx"` // bits per second
	Tx       float64 `json:"tx"`
	RTT      float64 `json:"rtt"` // ms
	ProbeRTT float64 `json:"probe_rtt"`
}

func sampleOf(st control.Status) sample {
	sm := sample{T: time.Now().UnixMilli(), Flows: st.Flows.Active}
	for _, u := range st.Uplinks {
		sm.Uplinks = append(sm.Uplinks, upSample{Name: u.Name, State: u.State, Reason: u.Reason, Backup: u.Backup,
			Rx: u.RxRate, Tx: u.TxRate, RTT: u.RTT, ProbeRTT: u.ProbeRTT})
	}
	return sm
}

// history keeps the newest samples, numbered from 1, with the status the
// newest was taken from, and wakes the event streams when one is added:
// every page's stream sends that one status, not one of its own.
type history struct {
	mu     sync.Mutex
	ring   []sample
	next   int    // where the next sample goes in ring
	seq    uint64 // the newest sample's number
	status control.Status
	added  chan struct{}
}

func newHistory(n int) *history {
	return &history{ring: make([]sample, 0, n), added: make(chan struct{})}
}

func (h *history) add(s sample, st control.Status) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.status = st
	if len(h.ring) < cap(h.ring) {
		h.ring = append(h.ring, s)
	} else {
		h.ring[h.next] = s
	}
	h.next = (h.next + 1) % cap(h.ring)
	h.seq++
	close(h.added)
	h.added = make(chan struct{})
}

// since returns the samples after number seq, oldest first (as many as
// are kept), the newest one's status and its number.
func (h *history) since(seq uint64) ([]sample, control.Status, uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := min(uint64(len(h.ring)), h.seq-min(seq, h.seq))
	out := make([]sample, 0, n)
	// The oldest kept is at next once the ring is full, at 0 before
	// (next is then len(ring)): either way n back from next.
	for i := int(n); i > 0; i-- {
		out = append(out, h.ring[(h.next-i+cap(h.ring))%cap(h.ring)])
	}
	return out, h.status, h.seq
}

// wait returns a channel closed once a sample after number seq exists.
func (h *history) wait(seq uint64) <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.seq > seq {
		c := make(chan struct{})
		close(c)
		return c
	}
	return h.added
}
