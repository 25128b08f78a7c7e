//go:build linux

package probe

import (
	"sync"
	"time"
)

// How long samples of the server's clock count, for ServerNow.
const (
	// clockWindow is how far back ServerNow looks for the best sample.
	// Each estimate runs at this host's clock rate since its sample, so
	// a short window bounds how far a rate difference (tens of ppm:
	// under a millisecond in 10 s) can carry an estimate past the
	// server's clock; it is still a hundred probes of one path at the
	// default interval, enough for one of them to have had a short
	// one-way delay.
	clockWindow = 10 * time.Second
	// clockSlotWidth is the granularity of that window: the window
	// keeps the best sample of each second, not every sample, so that
	// its cost does not grow with paths or probe rate. A sample counts
	// for 10 to 11 s.
	clockSlotWidth = time.Second
	clockSlots     = int(clockWindow/clockSlotWidth) + 1
	// clockMaxAge is how old the latest sample may be before ServerNow
	// gives up and the caller falls back to its own clock: a minute
	// without a reply on any path means the concentrator is not being
	// reached anyway.
	clockMaxAge = 60 * time.Second
	// horizonMargin is how far past the horizon ServerNow is at least,
	// since the tunnel refuses a stamp at or before it.
	horizonMargin = time.Microsecond
)

// serverClock estimates the concentrator's clock from authenticated
// replies. A reply says what the server's clock read when it answered, and
// it arrived afterwards, so server + (time since it arrived) is never
// ahead of the server's clock. The elapsed time is measured on this host's
// monotonic clock, so a step of this host's wall clock changes nothing.
// The estimate of the sample with the shortest one-way delay is the
// closest; that is the largest one.
//
// Times are kept as nanoseconds since base on the monotonic clock; an
// offset is a sample's server time minus its arrival, so that its
// estimate at t is offset + t, and the best sample is the one with the
// largest offset.
type serverClock struct {
	base time.Time // with its monotonic reading

	mu    sync.Mutex
	have  bool
	last  clockSample // the most recently received sample
	slots [clockSlots]clockSlot
}

type clockSample struct {
	at      int64 // ns since base
	off     int64
	horizon int64 // Unix ns, 0: none
}

// clockSlot is the best sample received in one second.
type clockSlot struct {
	n   int64 // the second, counted from base; valid if set
	off int64
	set bool
}

func (c *serverClock) since(t time.Time) int64 { return int64(t.Sub(c.base)) }

// add records a reply's server clock and horizon (Unix ns), received at
// at (a time.Now reading, monotonic).
func (c *serverClock) add(server, horizon int64, at time.Time) {
	s := clockSample{at: c.since(at), horizon: horizon}
	s.off = server - s.at
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.have && s.horizon != c.last.horizon {
		if s.at < c.last.at {
			// A late reply from before the concentrator's
			// last restart, overtaken by one from after it.
			return
		}
		// The concentrator restarted: its new clock may be behind
		// the old one, whose samples would then put the estimate
		// ahead of it. Forget them.
		c.slots = [clockSlots]clockSlot{}
	}
	if !c.have || s.at >= c.last.at {
		c.last, c.have = s, true
	}
	n := s.at / int64(clockSlotWidth)
	sl := &c.slots[n%int64(clockSlots)]
	if !sl.set || sl.n != n {
		*sl = clockSlot{n: n, off: s.off, set: true}
	} else if s.off > sl.off {
		sl.off = s.off
	}
}

// at returns the estimate of the server's clock at now (a time.Now
// reading), and the horizon of the latest reply; ok is false when there is
// no sample of the last clockMaxAge.
func (c *serverClock) at(now time.Time) (server, horizon int64, ok bool) {
	server, horizon, _, ok = c.atAge(now)
	return server, horizon, ok
}

// atAge is at, with how long ago the latest reply arrived.
func (c *serverClock) atAge(now time.Time) (server, horizon int64, age time.Duration, ok bool) {
	t := c.since(now)
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.have || t-c.last.at > int64(clockMaxAge) {
		return 0, 0, 0, false
	}
	age = time.Duration(t - c.last.at)
	// The latest sample counts even when it is older than the window,
	// so that a minute of silence still gives an estimate.
	best := c.last.off
	oldest := (t - int64(clockWindow)) / int64(clockSlotWidth)
	for i := range c.slots {
		if sl := &c.slots[i]; sl.set && sl.n >= oldest && sl.off > best {
			best = sl.off
		}
	}
	server = best + t
	if h := c.last.horizon; h != 0 && server < h+int64(horizonMargin) {
		server = h + int64(horizonMargin)
	}
	return server, c.last.horizon, age, true
}

// ServerNow returns the concentrator's clock as this client knows it from
// the authenticated replies of the last 10 s on all paths: a lower bound,
// never ahead of it (but for a difference in the two clocks' rates), and
// behind by about the shortest one-way delay of those replies. It is at
// least just past the replay horizon of the latest reply, so that a
// handshake stamped with it is accepted at once after the concentrator
// restarts. ok is false when no reply arrived in the last 60 s; the
// caller then has nothing better than its own clock.
//
// It takes a mutex and reads the clock, nothing more: cheap enough for
// every new connection.
func (p *Prober) ServerNow() (time.Time, bool) {
	server, _, ok := p.clock.at(time.Now())
	if !ok {
		return time.Time{}, false
	}
	return time.Unix(0, server), true
}

// ServerNowAge is ServerNow, with how long ago the latest reply came:
// replies come every probe interval on every live path, so an old one
// means the concentrator is not answering (it may be restarting, with a
// new horizon that a stamp made now would miss).
func (p *Prober) ServerNowAge() (time.Time, time.Duration, bool) {
	server, _, age, ok := p.clock.atAge(time.Now())
	if !ok {
		return time.Time{}, 0, false
	}
	return time.Unix(0, server), age, true
}

// ServerHorizon returns the replay horizon of the latest authenticated
// reply (zero if none was sent, or no reply arrived in the last 60 s): the
// concentrator refuses every handshake stamped at or before it.
func (p *Prober) ServerHorizon() time.Time {
	_, h, ok := p.clock.at(time.Now())
	if !ok || h == 0 {
		return time.Time{}
	}
	return time.Unix(0, h)
}
