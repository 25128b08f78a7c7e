//go:build linux

package tokenbucket

import (
	"testing"
	"time"
)

func TestBucket(t *testing.T) {
	const sec = int64(1e9)
	tests := []struct {
		name        string
		rate, burst int
		at          []int64 // nanoseconds of each Take
		want        []bool
	}{
		{"burst, then empty", 10, 3, []int64{1, 1, 1, 1}, []bool{true, true, true, false}},
		{"refill at the rate", 10, 1, []int64{1, 1, 1 + sec/10 - 1, 1 + sec/10}, []bool{true, false, false, true}},
		{"refill capped at the burst", 10, 2, []int64{1, 1, 1 + 10*sec, 1 + 10*sec, 1 + 10*sec}, []bool{true, true, true, true, false}},
		{"a clock step back refills nothing", 1, 1, []int64{sec, 1, sec, 2 * sec}, []bool{true, false, false, true}},
		{"rate 0 counts as 1", 0, 1, []int64{1, 1, 1 + sec}, []bool{true, false, true}},
		{"zero burst never gives", 10, 0, []int64{1, 1 + sec}, []bool{false, false}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := New(tt.rate, tt.burst)
			for i, now := range tt.at {
				if got := b.Take(now); got != tt.want[i] {
					t.Fatalf("Take #%d at %d = %v, want %v", i, now, got, tt.want[i])
				}
			}
		})
	}
}

func TestTakeAllocatesNothing(t *testing.T) {
	b := New(1e9, 1e9)
	var now int64 = 1
	if a := testing.AllocsPerRun(100, func() { now++; b.Take(now) }); a != 0 {
		t.Fatalf("%v allocations per Take", a)
	}
}

func TestBucketOverTime(t *testing.T) {
	b := New(100, 50)
	now := time.Unix(1000, 0).UnixNano()
	n := 0
	for range 1000 {
		if b.Take(now) {
			n++
		}
	}
	if n != 50 {
		t.Fatalf("burst: %d tokens, want 50", n)
	}
	now += int64(100 * time.Millisecond)
	n = 0
	for range 1000 {
		if b.Take(now) {
			n++
		}
	}
	if n != 10 {
		t.Fatalf("after 100ms: %d tokens, want 10", n)
	}
	now += int64(time.Hour)
	n = 0
	for range 1000 {
		if b.Take(now) {
			n++
		}
	}
	if n != 50 {
		t.Fatalf("after an hour: %d tokens, want the burst, 50", n)
	}
	// A clock that steps back gives nothing extra.
	now -= int64(time.Hour)
	if b.Take(now) {
		t.Fatal("token after the clock stepped back")
	}
}
