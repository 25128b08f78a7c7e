//go:build linux

package tunnel

import (
	"os"
	"slices"
	"sync"
)

// reserveFiles is how many descriptors a Server holds in reserve.
const reserveFiles = 16

// fdReserve holds a few descriptors (of /dev/null) so that a Server out
// of them can still accept a connection and answer it Limited instead of
// leaving the client to time out as if the concentrator were unreachable
// (issue 11). One spare is not enough: whatever frees a descriptor
// (a Limited connection closing) races every dial for it, and a dial
// that wins leaves no spare for the next accept. So the reserve is a
// handful, refilled whenever a descriptor is free, and while it is not
// full the concentrator dials nothing (Server.FilesScarce): descriptors
// that free up go to the reserve, not to new flows.
type fdReserve struct {
	mu    sync.Mutex
	files []*os.File
}

// refill opens spares until the reserve is full or none is left to open.
// It reports whether the reserve is full.
func (r *fdReserve) refill() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for len(r.files) < reserveFiles {
		f, err := os.Open(os.DevNull)
		if err != nil {
			return false
		}
		r.files = append(r.files, f)
	}
	return true
}

// release closes one spare so that the caller's next open or accept can
// have its descriptor; false if the reserve is empty. The lowest-numbered
// one: a new descriptor takes the lowest free number, and RLIMIT_NOFILE
// bounds numbers, not a count, so after the limit was lowered (prlimit,
// or the tests) a higher spare could be above it and freeing it would
// give accept nothing.
func (r *fdReserve) release() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.files) == 0 {
		return false
	}
	low := 0
	for i, f := range r.files {
		if f.Fd() < r.files[low].Fd() {
			low = i
		}
	}
	r.files[low].Close()
	r.files = slices.Delete(r.files, low, low+1)
	return true
}

// full reports whether the reserve holds all its spares, refilling it
// first if not.
func (r *fdReserve) full() bool {
	r.mu.Lock()
	n := len(r.files)
	r.mu.Unlock()
	return n == reserveFiles || r.refill()
}

func (r *fdReserve) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, f := range r.files {
		f.Close()
	}
	r.files = nil
}
