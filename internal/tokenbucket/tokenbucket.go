//go:build linux

// Package tokenbucket is a token bucket kept in nanoseconds of credit, so
// taking a token is integer arithmetic and allocates nothing: the probe
// responder's per-client and global reply rates, the tunnel server's
// per-client handshake rate.
package tokenbucket

// Bucket is not safe for concurrent use: its owner's mutex guards it. The
// zero value refuses every token; use New.
type Bucket struct {
	cost   int64 // nanoseconds of credit one token costs (1e9 / rate)
	max    int64 // burst × cost
	credit int64
	last   int64 // the clock's nanoseconds at the last refill
}

// New returns a full bucket of burst tokens refilled at rate per second
// (a rate below 1 counts as 1).
func New(rate, burst int) Bucket {
	cost := int64(1e9) / int64(max(rate, 1))
	return Bucket{cost: cost, max: cost * int64(burst), credit: cost * int64(burst)}
}

// Take reports whether a token was available at now, nanoseconds of a
// clock that does not step back (Unix nanoseconds of a server's own clock
// will do; a step back only refills nothing until it is caught up).
func (b *Bucket) Take(now int64) bool {
	if b.last != 0 {
		if d := now - b.last; d > 0 {
			b.credit += d
			if b.credit > b.max || b.credit < 0 {
				b.credit = b.max
			}
		}
	}
	b.last = now
	if b.credit < b.cost {
		return false
	}
	b.credit -= b.cost
	return true
}
