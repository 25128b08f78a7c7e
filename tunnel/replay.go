//go:build linux

package tunnel

import (
	"container/heap"
	"sync"
)

// replayCache remembers the ephemeral public key of every msg1 that
// passed authentication and the timestamp check, until that msg1's
// timestamp leaves the replay window, after which the timestamp check
// alone refuses it. It is exact (a map, never a Bloom filter: a false
// positive would refuse a legitimate flow) and its memory is bounded by
// time, plus a hard cap on entries for a flood of valid handshakes.
// Parallel flows reach the server out of order over different paths, so a
// per-peer "greatest timestamp so far" rule as WireGuard's cannot work
// here.
//
// Each peer has its own cache: a peer flooding handshakes (a stolen key,
// a runaway client) fills only its own and so refuses only itself; it
// never refuses another peer (issue 8: with one shared cache, one key
// stamping at +30 s locked every client out).
//
// Times are the server's own clock (Server.Now), which never steps, so a
// wall-clock step can neither empty the cache early nor keep it long.
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

// ~100 bytes per entry (map slot + heap entry): the default per-peer cap
// of 1<<16 entries is about 6.5 MiB, enough for a peer opening ~2000 new
// flows a second for the whole 31 s window.
const defaultPeerReplayMax = 1 << 16

func newReplayCache(max int) *replayCache {
	return &replayCache{max: max, seen: make(map[[KeySize]byte]struct{})}
}

// add records key until expiry (Unix nanoseconds: the last instant at
// which the timestamp check would still accept its message) and reports
// whether it was new. Entries whose expiry is before now are dropped
// first; one expiring exactly now is kept, as the timestamp check still
// accepts its message now.
func (c *replayCache) add(key [KeySize]byte, expiry, now int64) replayResult {
	c.mu.Lock()
	defer c.mu.Unlock()
	for len(c.exp) > 0 && c.exp[0].at < now {
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
