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
