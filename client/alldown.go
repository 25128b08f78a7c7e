//go:build linux

package client

import (
	"context"
	"log/slog"
	"slices"
	"time"

	"github.com/mpvpn/mpvpn/pathmgr"
)

// resetWhenAllDown resets every flow once no uplink has been up for
// bound, until ctx is done. It looks every tick; the outage is dated from
// when the last uplink left the up state (pathmgr's Since), not from the
// tick that saw it, and the reset fires on a timer at exactly bound after
// that, so flows get what --all-down-timeout promises, neither a tick
// less nor up to two more. It resets once per outage: flows opened during
// it fail on their own.
func resetWhenAllDown(ctx context.Context, pm interface{ Status() []pathmgr.Status }, tc interface{ AbortAll() int }, bound, tick time.Duration, log *slog.Logger) {
	t := time.NewTicker(tick)
	defer t.Stop()
	var (
		downSince time.Time
		reset     bool
		timer     *time.Timer
		fire      <-chan time.Time
	)
	stopTimer := func() {
		if timer != nil {
			timer.Stop()
			timer, fire = nil, nil
		}
	}
	defer stopTimer()
	check := func(now time.Time) {
		st := pm.Status()
		if slices.ContainsFunc(st, func(s pathmgr.Status) bool { return s.State == pathmgr.StateUp }) {
			if !downSince.IsZero() {
				log.Info("an uplink is back", "all_down_for", now.Sub(downSince).Round(time.Millisecond).String())
			}
			downSince, reset = time.Time{}, false
			stopTimer()
			return
		}
		if downSince.IsZero() {
			// The last uplink to change state is the last one that
			// was up (or it changed between two states that are not
			// up, which only dates the outage later).
			for _, s := range st {
				if s.Since.After(downSince) {
					downSince = s.Since
				}
			}
			if downSince.IsZero() || downSince.After(now) {
				downSince = now
			}
			log.Warn("every uplink is down; flows wait for one to return", "up_to", bound.String())
		}
		if reset {
			return
		}
		if left := bound - now.Sub(downSince); left > 0 {
			if timer == nil {
				timer = time.NewTimer(left)
				fire = timer.C
			}
			return
		}
		reset = true
		stopTimer()
		n := tc.AbortAll()
		log.Warn("every uplink has been down too long; flows reset", "flows", n, "down_for", now.Sub(downSince).Round(time.Millisecond).String())
	}
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			check(now)
		case now := <-fire:
			timer, fire = nil, nil
			check(now)
		}
	}
}
