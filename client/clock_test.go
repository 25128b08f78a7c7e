//go:build linux

package client

import (
	"testing"
	"time"
)

type fakeServerClock struct {
	from time.Time // ServerNow is known from then on
	at   time.Time // and says this
}

func (f fakeServerClock) ServerNow() (time.Time, bool) {
	if time.Now().Before(f.from) {
		return time.Time{}, false
	}
	return f.at, true
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
