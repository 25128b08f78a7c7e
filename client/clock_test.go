//go:build linux

package client

import (
	"testing"
	"time"
)

type fakeServerClock struct {
	from time.Time // ServerNow is known from then on
	at   time.Time // and says this
	// fresh: from then on the latest reply is new; before, it is a
	// second old (zero: always new).
	fresh time.Time
}

func (f fakeServerClock) ServerNowAge() (time.Time, time.Duration, bool) {
	if time.Now().Before(f.from) {
		return time.Time{}, 0, false
	}
	if time.Now().Before(f.fresh) {
		return f.at, time.Second, true
	}
	return f.at, 0, true
}

// TestConcentratorClock: a flow stamps in the concentrator's clock when the
// prober knows it; right after start it waits for the first reply rather
// than stamp with its own clock; later, with no reply, it uses its own.
func TestConcentratorClock(t *testing.T) {
	server := time.Unix(1_800_000_000, 0)
	tests := []struct {
		name      string
		started   time.Duration // before now
		known     time.Duration // ServerNow known after this, from now
		wantOwn   bool
		wantWaitd bool
	}{
		{"known", time.Minute, 0, false, false},
		{"just started, first reply soon", 0, 100 * time.Millisecond, false, true},
		{"long started, no reply", time.Minute, time.Hour, true, false},
		{"just started, no reply in time", firstReplyWait - 200*time.Millisecond, time.Hour, true, true},
	}
	// A stale reply: wait for a fresh one, but not for ever.
	for _, tt := range []struct {
		name    string
		fresh   time.Duration
		minWait time.Duration
		maxWait time.Duration
	}{
		{"stale, then fresh", 150 * time.Millisecond, 100 * time.Millisecond, staleWait},
		{"stale for good", time.Hour, staleWait, staleWait + 500*time.Millisecond},
	} {
		t.Run(tt.name, func(t *testing.T) {
			now := time.Now()
			clock := concentratorClock(fakeServerClock{from: now, at: server, fresh: now.Add(tt.fresh)}, now.Add(-time.Minute))
			got := clock()
			waited := time.Since(now)
			if !got.Equal(server) || waited < tt.minWait || waited > tt.maxWait {
				t.Fatalf("got %v after %v, want the concentrator's clock after %v to %v", got, waited, tt.minWait, tt.maxWait)
			}
		})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			now := time.Now()
			clock := concentratorClock(fakeServerClock{from: now.Add(tt.known), at: server}, now.Add(-tt.started))
			got := clock()
			waited := time.Since(now)
			if own := !got.Equal(server); own != tt.wantOwn {
				t.Fatalf("got %v: own clock %v, want %v", got, own, tt.wantOwn)
			}
			if w := waited >= 50*time.Millisecond; w != tt.wantWaitd {
				t.Fatalf("waited %v", waited)
			}
		})
	}
}
