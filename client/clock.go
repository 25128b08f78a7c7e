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
// handshake timeout instead.
func concentratorClock(pr interface{ ServerNow() (time.Time, bool) }, started time.Time) func() time.Time {
	return func() time.Time {
		for {
			if t, ok := pr.ServerNow(); ok {
				return t
			}
			if time.Since(started) >= firstReplyWait {
				return time.Now()
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// firstReplyWait: how long after start new flows wait for the first probe
// reply, when none has come yet.
const firstReplyWait = 2 * time.Second
