//go:build linux

package client

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/pathmgr"
)

type fakeUplinks struct {
	mu    sync.Mutex
	up    bool
	since time.Time
}

func (f *fakeUplinks) set(up bool) { f.setAt(up, time.Now()) }
func (f *fakeUplinks) setAt(up bool, since time.Time) {
	f.mu.Lock()
	f.up, f.since = up, since
	f.mu.Unlock()
}
func (f *fakeUplinks) Status() []pathmgr.Status {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := pathmgr.StateDown
	if f.up {
		st = pathmgr.StateUp
	}
	return []pathmgr.Status{{State: pathmgr.StateWithdrawn, Since: time.Unix(1, 0)}, {State: st, Since: f.since}}
}

type fakeFlows struct{ aborts atomic.Int32 }

func (f *fakeFlows) AbortAll() int { f.aborts.Add(1); return 1 }

// Flows are reset once when every uplink stays down for the bound, and not
// at all when one comes back in time.
func TestResetWhenAllDown(t *testing.T) {
	// Wide margins both ways: a loaded machine oversleeps.
	tests := []struct {
		name       string
		bound      time.Duration
		downFor    time.Duration // then an uplink comes back
		wantResets int32
	}{
		{"back in time", 5 * time.Second, 50 * time.Millisecond, 0},
		{"down too long", 50 * time.Millisecond, 500 * time.Millisecond, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			up := &fakeUplinks{up: true}
			flows := &fakeFlows{}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() {
				defer close(done)
				resetWhenAllDown(ctx, up, flows, tt.bound, time.Millisecond, slog.New(slog.DiscardHandler))
			}()
			time.Sleep(10 * time.Millisecond)
			up.set(false)
			time.Sleep(tt.downFor)
			up.set(true)
			time.Sleep(200 * time.Millisecond) // up again: no further reset
			cancel()
			<-done
			if got := flows.aborts.Load(); got != tt.wantResets {
				t.Errorf("%d resets, want %d", got, tt.wantResets)
			}
		})
	}
}

// The outage is dated from when the last uplink went down, not from the
// tick that noticed it: an outage that began long before (here, before
// the watchdog even started) resets at once.
func TestResetWhenAllDownDatesTheOutage(t *testing.T) {
	up := &fakeUplinks{}
	up.setAt(false, time.Now().Add(-time.Minute))
	flows := &fakeFlows{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		resetWhenAllDown(ctx, up, flows, 30*time.Second, 10*time.Millisecond, slog.New(slog.DiscardHandler))
	}()
	deadline := time.Now().Add(5 * time.Second)
	for flows.aborts.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	if got := flows.aborts.Load(); got != 1 {
		t.Fatalf("%d resets for an outage older than the bound, want 1 at once", got)
	}
}
