//go:build linux

package client

import "time"

// concentratorClock is the clock a client stamps its handshakes with: the
// concentrator's, as the prober learns it from authenticated replies
// (never ahead of it, and past its horizon after a restart), or this
// host's own when no reply has come. In the first firstReplyWait after
// the client started, a flow waits for that first reply (one round trip)
// rather than stamp with a clock that may be off: the concentrator is
// silent to a stamp it refuses, and the app would see a reset after the
// handshake timeout instead. For the same reason, when the latest reply
// is older than staleReply (the concentrator stopped answering for a
// moment: restarting, say, when its next reply carries a new horizon), a
// flow waits up to staleWait for a fresh one.
func concentratorClock(pr serverClock, started time.Time) func() time.Time {
	return func() time.Time {
		first := time.Now()
		for {
			t, age, ok := pr.ServerNowAge()
			if ok && (age < staleReply || time.Since(first) >= staleWait) {
				return t
			}
			if !ok && time.Since(started) >= firstReplyWait {
				return time.Now()
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// serverClock is the prober's view of the concentrator's clock.
type serverClock interface {
	ServerNowAge() (time.Time, time.Duration, bool)
}

const (
	// firstReplyWait: how long after start new flows wait for the first
	// probe reply, when none has come yet.
	firstReplyWait = 2 * time.Second
	// staleReply: a reply older than this is stale, three probe
	// intervals (100 ms each, on every path).
	staleReply = 300 * time.Millisecond
	// staleWait: how long a new flow waits for a fresh reply then.
	staleWait = time.Second
)
