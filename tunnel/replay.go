package tunnel

import (
	"container/heap"
	"sync"
)

// replayCache remembers the ephemeral public key of every accepted msg1
// until that msg1's timestamp leaves the replay window, after which the
// timestamp check alone refuses it. It is exact (a map, never a Bloom
// filter: a false positive would refuse a legitimate flow) and its memory
// is bounded by time, plus a hard cap on entries for a flood of valid
// handshakes. Parallel flows reach the server out of order over different
// paths, so a per-peer "greatest timestamp so far" rule as WireGuard's
// cannot work here.
type replayCache struct {
	mu   sync.Mutex
	max  int
	seen map[[KeySize]byte]struct{}
	exp  expiryHeap
}

type replayResult int

const (
	replayFresh replayResult = iota
	replaySeen
	replayFull
)

// ~100 bytes per entry (map slot + heap entry): 1<<20 entries ≈ 100 MiB,
// enough for ~17 000 new flows/s with the default ±30 s window.
const defaultReplayMax = 1 << 20

func newReplayCache(max int) *replayCache {
	return &replayCache{max: max, seen: make(map[[KeySize]byte]struct{})}
}

// add records key until expiry (Unix nanoseconds) and reports whether it
// was new. Entries whose expiry is not after now are dropped first.
func (c *replayCache) add(key [KeySize]byte, expiry, now int64) replayResult {
	c.mu.Lock()
	defer c.mu.Unlock()
	for len(c.exp) > 0 && c.exp[0].at <= now {
		e := heap.Pop(&c.exp).(replayEntry)
		delete(c.seen, e.key)
	}
	if cap(c.exp) > 1024 && len(c.exp) < cap(c.exp)/4 {
		// A flood is over: give the heap's memory back. (The map
		// does not shrink in Go 1.26; rebuilding it is the only way.)
		c.exp = append(expiryHeap(nil), c.exp...)
		seen := make(map[[KeySize]byte]struct{}, len(c.exp))
		for _, e := range c.exp {
			seen[e.key] = struct{}{}
		}
		c.seen = seen
	}
	if _, ok := c.seen[key]; ok {
		return replaySeen
	}
	if len(c.seen) >= c.max {
		return replayFull
	}
	c.seen[key] = struct{}{}
	heap.Push(&c.exp, replayEntry{at: expiry, key: key})
	return replayFresh
}

func (c *replayCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.seen)
}

type replayEntry struct {
	at  int64
	key [KeySize]byte
}

type expiryHeap []replayEntry

func (h expiryHeap) Len() int           { return len(h) }
func (h expiryHeap) Less(i, j int) bool { return h[i].at < h[j].at }
func (h expiryHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *expiryHeap) Push(x any)        { *h = append(*h, x.(replayEntry)) }
func (h *expiryHeap) Pop() any {
	old := *h
	e := old[len(old)-1]
	*h = old[:len(old)-1]
	return e
}
