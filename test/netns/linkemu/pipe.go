//go:build linux

package linkemu

import (
	"math/rand/v2"
	"time"
)

// Stats count what one direction of the wire did, in frames and bytes
// (Ethernet frames, header included).
type Stats struct {
	RxFrames uint64 `json:"rx_frames"` // frames that arrived at the wire
	RxBytes  uint64 `json:"rx_bytes"`
	TxFrames uint64 `json:"tx_frames"` // frames delivered out of the far interface
	TxBytes  uint64 `json:"tx_bytes"`

	DropLoss      uint64 `json:"drop_loss"`      // random loss (Params.Loss)
	DropQueue     uint64 `json:"drop_queue"`     // tail drop: the bottleneck queue was full
	DropBlackhole uint64 `json:"drop_blackhole"` // dropped while Blackhole was on
	DropOversize  uint64 `json:"drop_oversize"`  // bigger than maxFrame (an offload left on)
	DropError     uint64 `json:"drop_error"`     // the far interface refused it (down, backlog full)

	QueuedFrames int `json:"queued_frames"` // inside the wire right now
	QueuedBytes  int `json:"queued_bytes"`
}

// Dropped sums every kind of drop.
func (s Stats) Dropped() uint64 {
	return s.DropLoss + s.DropQueue + s.DropBlackhole + s.DropOversize + s.DropError
}

// verdict is what pipe.arrive decided about a frame.
type verdict int

const (
	accepted verdict = iota
	lost
	queueFull
	blackholed
)

// maxFramesInside bounds memory: 64 Ki frames of 2 KiB buffers is 128 MiB,
// far more than any sane rate × delay product in the tests.
const maxFramesInside = 1 << 16

// frame is a frame inside the wire, due out at at.
type frame struct {
	at  time.Time
	seq uint64 // arrival order; ties on at go out in arrival order
	b   []byte
}

// pipe models one direction of the link. It computes, when a frame arrives,
// when it will leave: the bottleneck is a FIFO served by a token bucket, so a
// frame's departure only depends on the frames ahead of it and can be fixed
// on arrival (changing Rate later affects frames that arrive later). Delay
// and jitter are added on top, and the frame waits in a heap ordered by its
// delivery time. Time is passed in, so tests drive it with a fake clock.
//
// pipe is not safe for concurrent use; the wire holds a mutex around it.
type pipe struct {
	p   Params
	rng *rand.Rand

	tokens     float64   // token bucket content in bytes, as of tokensAt
	tokensAt   time.Time // zero: the bucket is full
	lastDepart time.Time // when the last accepted frame left the bottleneck
	lastAt     time.Time // latest delivery time handed out (keeps order)
	seq        uint64

	h     []frame // min-heap on (at, seq)
	bytes int     // bytes of the frames in h
	st    Stats

	// flushed holds buffers a Blackhole dropped, for the wire's loop to
	// reuse (the loop owns the buffers; Set runs on other goroutines).
	flushed [][]byte
}

func newPipe(p Params, seed uint64) *pipe {
	return &pipe{p: p, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

// setParams changes the parameters. Turning Blackhole on empties the wire
// (the frames inside are counted as blackholed); their buffers are appended
// to freed for the caller to reuse.
func (q *pipe) setParams(p Params, freed [][]byte) [][]byte {
	if p.Blackhole && !q.p.Blackhole {
		for _, f := range q.h {
			freed = append(freed, f.b)
			q.st.DropBlackhole++
		}
		clear(q.h)
		q.h = q.h[:0]
		q.bytes = 0
	}
	q.p = p
	return freed
}

// arrive offers a frame that arrived at now. If it is accepted the pipe
// keeps b until popDue hands it back; otherwise b is the caller's again.
// head reports that the frame is now the next one due, so a sleeping
// writer must be woken.
func (q *pipe) arrive(now time.Time, b []byte) (v verdict, head bool) {
	size := len(b)
	q.st.RxFrames++
	q.st.RxBytes += uint64(size)
	if q.p.Blackhole {
		q.st.DropBlackhole++
		return blackholed, false
	}
	if len(q.h) >= maxFramesInside {
		q.st.DropQueue++
		return queueFull, false
	}
	depart := now
	if q.p.Rate > 0 {
		bps := float64(q.p.Rate) / 8
		start := now
		if q.lastDepart.After(now) {
			// Frames are still waiting for the bottleneck; what they hold
			// is roughly the time the last one leaves, in bytes.
			backlog := q.p.bytesIn(q.lastDepart.Sub(now))
			if backlog+float64(size) > q.p.queueLimit() {
				q.st.DropQueue++
				return queueFull, false
			}
			start = q.lastDepart
		}
		tokens := q.p.burst()
		if !q.tokensAt.IsZero() {
			tokens = min(tokens, q.tokens+q.p.bytesIn(start.Sub(q.tokensAt)))
		}
		if tokens >= float64(size) {
			depart = start
			tokens -= float64(size)
		} else {
			wait := time.Duration((float64(size) - tokens) / bps * float64(time.Second))
			depart = start.Add(wait)
			tokens = 0
		}
		q.tokens, q.tokensAt, q.lastDepart = tokens, depart, depart
	}
	if q.p.Loss > 0 && q.rng.Float64() < q.p.Loss {
		q.st.DropLoss++
		return lost, false
	}
	at := depart.Add(q.p.Delay)
	if q.p.Jitter > 0 {
		at = at.Add(time.Duration(q.rng.Int64N(int64(q.p.Jitter) + 1)))
	}
	if !q.p.Reorder && at.Before(q.lastAt) {
		at = q.lastAt
	}
	if at.After(q.lastAt) {
		q.lastAt = at
	}
	q.seq++
	q.push(frame{at: at, seq: q.seq, b: b})
	q.bytes += size
	return accepted, q.h[0].seq == q.seq
}

// next returns when the next frame is due; ok is false when the wire is
// empty.
func (q *pipe) next() (at time.Time, ok bool) {
	if len(q.h) == 0 {
		return time.Time{}, false
	}
	return q.h[0].at, true
}

// popDue appends the frames due at now (in delivery order) to out. The
// caller reports what happened to them with delivered.
func (q *pipe) popDue(now time.Time, out [][]byte) [][]byte {
	for len(q.h) > 0 && !q.h[0].at.After(now) {
		f := q.pop()
		q.bytes -= len(f.b)
		out = append(out, f.b)
	}
	return out
}

// delivered accounts for frames popDue handed out: ok frames of okBytes were
// written, failed ones were refused by the far interface.
func (q *pipe) delivered(ok, okBytes, failed int) {
	q.st.TxFrames += uint64(ok)
	q.st.TxBytes += uint64(okBytes)
	q.st.DropError += uint64(failed)
}

func (q *pipe) stats() Stats {
	s := q.st
	s.QueuedFrames = len(q.h)
	s.QueuedBytes = q.bytes
	return s
}

func (q *pipe) less(i, j int) bool {
	if q.h[i].at.Equal(q.h[j].at) {
		return q.h[i].seq < q.h[j].seq
	}
	return q.h[i].at.Before(q.h[j].at)
}

// push and pop are a plain binary heap: container/heap would box every frame
// into an interface, an allocation per packet.
func (q *pipe) push(f frame) {
	q.h = append(q.h, f)
	for i := len(q.h) - 1; i > 0; {
		parent := (i - 1) / 2
		if !q.less(i, parent) {
			break
		}
		q.h[i], q.h[parent] = q.h[parent], q.h[i]
		i = parent
	}
}

func (q *pipe) pop() frame {
	top := q.h[0]
	last := len(q.h) - 1
	q.h[0] = q.h[last]
	q.h[last] = frame{}
	q.h = q.h[:last]
	for i := 0; ; {
		l, r, m := 2*i+1, 2*i+2, i
		if l < len(q.h) && q.less(l, m) {
			m = l
		}
		if r < len(q.h) && q.less(r, m) {
			m = r
		}
		if m == i {
			break
		}
		q.h[i], q.h[m] = q.h[m], q.h[i]
		i = m
	}
	return top
}
