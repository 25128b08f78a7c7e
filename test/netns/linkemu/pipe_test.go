//go:build linux

package linkemu

import (
	"math"
	"slices"
	"testing"
	"time"
)

var t0 = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)

const ms = time.Millisecond

// arrival is a frame of size bytes arriving at t0+at.
type arrival struct {
	at   time.Duration
	size int
}

func burst(n, size int) []arrival {
	a := make([]arrival, n)
	for i := range a {
		a[i] = arrival{0, size}
	}
	return a
}

// feed offers the arrivals in order and returns, per accepted frame in
// delivery order, its delivery time relative to t0.
func feed(q *pipe, as []arrival) (deliveries []time.Duration, verdicts []verdict) {
	for _, a := range as {
		v, _ := q.arrive(t0.Add(a.at), make([]byte, a.size))
		verdicts = append(verdicts, v)
	}
	for len(q.h) > 0 {
		deliveries = append(deliveries, q.pop().at.Sub(t0))
	}
	return deliveries, verdicts
}

func TestPipeSchedule(t *testing.T) {
	// 8 Mbit/s is one byte per microsecond: a 1000-byte frame takes 1 ms.
	const rate = 8_000_000
	tests := []struct {
		name     string
		p        Params
		arrivals []arrival
		want     []time.Duration
	}{
		{
			name:     "unlimited passes at once",
			arrivals: burst(3, 1000),
			want:     []time.Duration{0, 0, 0},
		},
		{
			name:     "delay only",
			p:        Params{Delay: 10 * ms},
			arrivals: []arrival{{0, 100}, {ms, 100}, {5 * ms, 1500}},
			want:     []time.Duration{10 * ms, 11 * ms, 15 * ms},
		},
		{
			name:     "token bucket one frame deep serialises",
			p:        Params{Rate: rate, Burst: 1000},
			arrivals: burst(4, 1000),
			want:     []time.Duration{0, ms, 2 * ms, 3 * ms},
		},
		{
			name:     "burst passes back to back, then the rate",
			p:        Params{Rate: rate, Burst: 3000},
			arrivals: burst(5, 1000),
			want:     []time.Duration{0, 0, 0, ms, 2 * ms},
		},
		{
			name:     "bucket refills while idle",
			p:        Params{Rate: rate, Burst: 1000},
			arrivals: []arrival{{0, 1000}, {0, 1000}, {10 * ms, 1000}, {10 * ms, 500}},
			want:     []time.Duration{0, ms, 10 * ms, 10*ms + 500*time.Microsecond},
		},
		{
			name:     "rate then delay",
			p:        Params{Rate: rate, Burst: 1000, Delay: 20 * ms},
			arrivals: burst(3, 1000),
			want:     []time.Duration{20 * ms, 21 * ms, 22 * ms},
		},
		{
			name:     "frame bytes count, not just payload",
			p:        Params{Rate: rate, Burst: 64},
			arrivals: []arrival{{0, 64}, {0, 1514}},
			want:     []time.Duration{0, 1514 * time.Microsecond},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, _ := feed(newPipe(tt.p, 1), tt.arrivals)
			if !slices.Equal(got, tt.want) {
				t.Errorf("deliveries %v, want %v", got, tt.want)
			}
		})
	}
}

func TestPipeTailDrop(t *testing.T) {
	tests := []struct {
		name     string
		p        Params
		arrivals []arrival
		accepted int
	}{
		{
			// The first frame leaves at once on the burst; each later one
			// waits behind lastDepart. Accepted while backlog+size ≤ 10000:
			// departures at 0..10 ms, 11 frames.
			name:     "queue of ten frames",
			p:        Params{Rate: 8_000_000, Burst: 1000, Queue: 10000},
			arrivals: burst(30, 1000),
			accepted: 11,
		},
		{
			name:     "default queue is 100 ms at the rate",
			p:        Params{Rate: 8_000_000, Burst: 1000}, // 100 ms = 100000 bytes
			arrivals: burst(300, 1000),
			accepted: 101,
		},
		{
			name:     "default queue has a floor of ten full frames",
			p:        Params{Rate: 8_000, Burst: 1514}, // 100 ms = 100 bytes
			arrivals: burst(30, 1514),
			accepted: 11,
		},
		{
			name:     "the queue drains with time",
			p:        Params{Rate: 8_000_000, Burst: 1000, Queue: 2000},
			arrivals: append(burst(5, 1000), arrival{2 * ms, 1000}, arrival{2 * ms, 1000}, arrival{2 * ms, 1000}),
			accepted: 3 + 2,
		},
		{
			name:     "no rate, no queue limit",
			p:        Params{Queue: 1000},
			arrivals: burst(100, 1000),
			accepted: 100,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := newPipe(tt.p, 1)
			got, verdicts := feed(q, tt.arrivals)
			if len(got) != tt.accepted {
				t.Errorf("accepted %d, want %d (verdicts %v)", len(got), tt.accepted, verdicts)
			}
			st := q.stats()
			if st.DropQueue != uint64(len(tt.arrivals)-tt.accepted) || st.RxFrames != uint64(len(tt.arrivals)) {
				t.Errorf("stats %+v", st)
			}
		})
	}
}

func TestPipeLoss(t *testing.T) {
	const n = 20000
	tests := []struct {
		loss     float64
		min, max float64
	}{
		{0, 0, 0},
		{1, 1, 1},
		{0.25, 0.23, 0.27},
		{0.01, 0.005, 0.015},
	}
	for _, tt := range tests {
		q := newPipe(Params{Loss: tt.loss}, 7)
		as := make([]arrival, n)
		for i := range as {
			as[i] = arrival{time.Duration(i) * time.Microsecond, 100}
		}
		got, _ := feed(q, as)
		frac := float64(n-len(got)) / n
		if frac < tt.min || frac > tt.max {
			t.Errorf("loss %v: lost %.4f, want [%v, %v]", tt.loss, frac, tt.min, tt.max)
		}
		if st := q.stats(); st.DropLoss != uint64(n-len(got)) {
			t.Errorf("loss %v: DropLoss %d, lost %d", tt.loss, st.DropLoss, n-len(got))
		}
	}
}

func TestPipeLossStillUsesTheRate(t *testing.T) {
	// A lost frame went through the bottleneck: the next one waits for it.
	q := newPipe(Params{Rate: 8_000_000, Burst: 1000, Loss: 1}, 1)
	q.arrive(t0, make([]byte, 1000))
	q.p.Loss = 0
	got, _ := feed(q, []arrival{{0, 1000}})
	if want := []time.Duration{ms}; !slices.Equal(got, want) {
		t.Errorf("deliveries %v, want %v", got, want)
	}
}

func TestPipeJitter(t *testing.T) {
	const delay, jitter = 5 * ms, 5 * ms
	// Dense arrivals, 10 µs apart: jitter would reorder them freely.
	dense := make([]arrival, 2000)
	for i := range dense {
		dense[i] = arrival{time.Duration(i) * 10 * time.Microsecond, 100}
	}
	// Sparse ones, 100 ms apart: each sees the full jitter range.
	sparse := make([]arrival, 200)
	for i := range sparse {
		sparse[i] = arrival{time.Duration(i) * 100 * ms, 100}
	}

	t.Run("order kept", func(t *testing.T) {
		q := newPipe(Params{Delay: delay, Jitter: jitter}, 3)
		var seqs []uint64
		for _, a := range dense {
			q.arrive(t0.Add(a.at), make([]byte, a.size))
		}
		var last time.Time
		for len(q.h) > 0 {
			f := q.pop()
			if f.at.Before(last) {
				t.Fatalf("delivery times go back: %v after %v", f.at, last)
			}
			last = f.at
			seqs = append(seqs, f.seq)
		}
		if !slices.IsSorted(seqs) {
			t.Error("frames reordered without Reorder")
		}
	})
	t.Run("reorder when asked", func(t *testing.T) {
		q := newPipe(Params{Delay: delay, Jitter: jitter, Reorder: true}, 3)
		var seqs []uint64
		for _, a := range dense {
			q.arrive(t0.Add(a.at), make([]byte, a.size))
		}
		for len(q.h) > 0 {
			seqs = append(seqs, q.pop().seq)
		}
		if slices.IsSorted(seqs) {
			t.Error("no reordering with Reorder and jitter ≫ spacing")
		}
	})
	t.Run("range", func(t *testing.T) {
		q := newPipe(Params{Delay: delay, Jitter: jitter}, 3)
		var extra []time.Duration
		for i, a := range sparse {
			q.arrive(t0.Add(a.at), make([]byte, a.size))
			f := q.pop()
			d := f.at.Sub(t0.Add(sparse[i].at))
			if d < delay || d > delay+jitter {
				t.Fatalf("frame %d delayed %v, want [%v, %v]", i, d, delay, delay+jitter)
			}
			extra = append(extra, d-delay)
		}
		lo, hi := slices.Min(extra), slices.Max(extra)
		if lo > jitter/5 || hi < jitter*4/5 {
			t.Errorf("jitter spans [%v, %v] of [0, %v]", lo, hi, jitter)
		}
	})
}

func TestPipeBlackhole(t *testing.T) {
	q := newPipe(Params{Delay: 10 * ms}, 1)
	for range 3 {
		q.arrive(t0, make([]byte, 100))
	}
	freed := q.setParams(Params{Delay: 10 * ms, Blackhole: true}, nil)
	if len(freed) != 3 || len(q.h) != 0 || q.bytes != 0 {
		t.Fatalf("blackhole on: freed %d, inside %d frames/%d bytes; want the 3 frames flushed", len(freed), len(q.h), q.bytes)
	}
	if v, _ := q.arrive(t0.Add(ms), make([]byte, 100)); v != blackholed {
		t.Errorf("arrival during blackhole: verdict %v", v)
	}
	if freed := q.setParams(Params{Delay: 10 * ms}, nil); len(freed) != 0 {
		t.Errorf("blackhole off freed %d frames", len(freed))
	}
	if v, head := q.arrive(t0.Add(2*ms), make([]byte, 100)); v != accepted || !head {
		t.Errorf("arrival after blackhole: verdict %v head %v", v, head)
	}
	st := q.stats()
	want := Stats{RxFrames: 5, RxBytes: 500, DropBlackhole: 4, QueuedFrames: 1, QueuedBytes: 100}
	if st != want {
		t.Errorf("stats %+v, want %+v", st, want)
	}
}

func TestPipePopDue(t *testing.T) {
	q := newPipe(Params{Delay: 10 * ms}, 1)
	q.arrive(t0, []byte{1})
	q.arrive(t0.Add(ms), []byte{2})
	if at, ok := q.next(); !ok || !at.Equal(t0.Add(10*ms)) {
		t.Fatalf("next = %v, %v", at, ok)
	}
	if got := q.popDue(t0.Add(10*ms-1), nil); len(got) != 0 {
		t.Fatalf("popped %d frames before they were due", len(got))
	}
	got := q.popDue(t0.Add(20*ms), nil)
	if len(got) != 2 || got[0][0] != 1 || got[1][0] != 2 {
		t.Fatalf("popDue = %v", got)
	}
	if _, ok := q.next(); ok {
		t.Error("next reports a frame in an empty pipe")
	}
	q.delivered(1, 1, 1)
	if st := q.stats(); st.TxFrames != 1 || st.TxBytes != 1 || st.DropError != 1 || st.Dropped() != 1 {
		t.Errorf("stats %+v", st)
	}
}

func TestPipeRateChange(t *testing.T) {
	// Frames already queued keep their schedule; later ones use the new rate.
	q := newPipe(Params{Rate: 8_000_000, Burst: 1000}, 1)
	q.arrive(t0, make([]byte, 1000))
	q.arrive(t0, make([]byte, 1000)) // leaves at 1 ms
	q.setParams(Params{Rate: 16_000_000, Burst: 1000}, nil)
	q.arrive(t0, make([]byte, 1000)) // behind it, at 2 bytes/µs: 1.5 ms
	got, _ := feed(q, nil)
	want := []time.Duration{0, ms, 1500 * time.Microsecond}
	if !slices.Equal(got, want) {
		t.Errorf("deliveries %v, want %v", got, want)
	}
}

func TestPipeThroughputMatchesRate(t *testing.T) {
	// Offer twice the rate for a simulated second: what gets through the
	// bottleneck is the rate (plus the burst), the rest is tail-dropped.
	for _, rate := range []uint64{1e6, 20e6, 60e6, 1e9} {
		p := Params{Rate: rate}
		q := newPipe(p, 1)
		gap := time.Duration(float64(time.Second) * 1514 * 8 / float64(2*rate))
		var delivered int
		now := t0
		for now.Before(t0.Add(time.Second)) {
			q.arrive(now, make([]byte, 1514))
			delivered += 1514 * len(q.popDue(now, nil))
			now = now.Add(gap)
		}
		got := float64(delivered) * 8
		if math.Abs(got-float64(rate)) > 0.02*float64(rate)+p.burst()*8 {
			t.Errorf("rate %s: %.0f bit/s through in 1 s", FormatRate(rate), got)
		}
	}
}
