//go:build linux

package tunnel

// bucket is a token bucket kept in nanoseconds of credit, so taking a
// token is integer arithmetic and allocates nothing. Not safe for
// concurrent use: the owner's mutex guards it.
type bucket struct {
	cost   int64 // nanoseconds of credit one token costs (1e9 / rate)
	max    int64 // burst × cost
	credit int64
	last   int64 // the clock's nanoseconds at the last refill
}

func newBucket(rate, burst int) bucket {
	cost := int64(1e9) / int64(max(rate, 1))
	return bucket{cost: cost, max: cost * int64(burst), credit: cost * int64(burst)}
}

// take reports whether a token was available at now (nanoseconds of a
// clock that does not step back).
func (b *bucket) take(now int64) bool {
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
