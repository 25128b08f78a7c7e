//go:build linux

package udprelay

import (
	"context"
	"io"
	"sync"
)

// queue holds encoded messages on their way to the stream, at most max
// bytes of them: put never blocks, and fails when the queue is full.
type queue struct {
	max   int
	mu    sync.Mutex
	bytes int
	msgs  [][]byte
	ready chan struct{} // one token: something was put
}

func newQueue(max int) *queue { return &queue{max: max, ready: make(chan struct{}, 1)} }

// put queues m unless that would exceed the bound.
func (q *queue) put(m []byte) bool {
	q.mu.Lock()
	if q.bytes+len(m) > q.max {
		q.mu.Unlock()
		return false
	}
	q.msgs = append(q.msgs, m)
	q.bytes += len(m)
	q.mu.Unlock()
	select {
	case q.ready <- struct{}{}:
	default:
	}
	return true
}

// take removes what is queued, up to about limit bytes (one message at
// least), appended to b.
func (q *queue) take(b []byte, limit int) []byte {
	q.mu.Lock()
	defer q.mu.Unlock()
	i := 0
	for ; i < len(q.msgs); i++ {
		m := q.msgs[i]
		if i > 0 && len(b)+len(m) > limit {
			break
		}
		b = append(b, m...)
		q.bytes -= len(m)
		q.msgs[i] = nil
	}
	q.msgs = q.msgs[i:]
	if len(q.msgs) == 0 {
		q.msgs = nil // let the array go
	}
	return b
}

// reset drops everything queued and returns how many messages that was.
func (q *queue) reset() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := len(q.msgs)
	q.msgs, q.bytes = nil, 0
	return n
}

// coalesce is how much one write to the stream carries at most: about one
// tunnel frame, so that a burst of small datagrams costs one frame and
// one syscall rather than one each.
const coalesce = 32 << 10

// drain writes what is queued to w, coalesced, until ctx is done or a
// write fails.
func (q *queue) drain(ctx context.Context, w io.Writer) error {
	var buf []byte
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-q.ready:
		}
		for {
			buf = q.take(buf[:0], coalesce)
			if len(buf) == 0 {
				break
			}
			if _, err := w.Write(buf); err != nil {
				return err
			}
		}
		if cap(buf) > 2*coalesce {
			buf = nil // one huge datagram: do not keep its buffer
		}
	}
}
