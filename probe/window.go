//go:build linux

package probe

// window is a sliding replay window over one client's counters, the
// bitmap of RFC 6479 as wireguard-go's replay package has it: a ring of
// 64-bit blocks, of which all but one are always valid, so it accepts any
// counter not seen before and no more than windowSize behind the highest
// one seen. It is not safe for concurrent use; the peer's mutex guards it.
type window struct {
	last   uint64
	blocks [windowBlocks]uint64
}

const (
	windowBlocks = 64
	windowSize   = (windowBlocks - 1) * 64 // 4032 counters
)

// accept reports whether counter is new and within the window, and if so
// records it. Call it only for authenticated requests.
func (w *window) accept(counter uint64) bool {
	if w.last >= windowSize && counter < w.last-windowSize {
		return false // too old to tell: refuse
	}
	idx := counter >> 6
	if counter > w.last {
		cur := w.last >> 6
		diff := idx - cur
		if diff > windowBlocks {
			diff = windowBlocks
		}
		for i := uint64(1); i <= diff; i++ {
			w.blocks[(cur+i)%windowBlocks] = 0
		}
		w.last = counter
	}
	bit := uint64(1) << (counter & 63)
	b := &w.blocks[idx%windowBlocks]
	if *b&bit != 0 {
		return false
	}
	*b |= bit
	return true
}

// bucket is a token bucket kept in nanoseconds of credit, so taking a
// token is integer arithmetic and allocates nothing. It is not safe for
// concurrent use.
type bucket struct {
	cost   int64 // nanoseconds of credit one token costs (1e9 / rate)
	max    int64 // burst × cost
	credit int64
	last   int64 // Unix nanoseconds of the last refill
}

func newBucket(rate, burst int) bucket {
	cost := int64(1e9) / int64(rate)
	return bucket{cost: cost, max: cost * int64(burst), credit: cost * int64(burst)}
}

// take reports whether a token was available at now (Unix nanoseconds).
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
