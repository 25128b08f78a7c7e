//go:build linux

package tunnel

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

// TestRetryAfterNewHorizon: a handshake the concentrator refuses in
// silence, stamped before a horizon the client has learned since (a
// restart), is tried once more, stamped anew; without Horizon it fails.
func TestRetryAfterNewHorizon(t *testing.T) {
	requireMPTCP(t)
	for _, tt := range []struct {
		name        string
		withHorizon bool
	}{{"with Horizon", true}, {"without", false}} {
		t.Run(tt.name, func(t *testing.T) {
			ln := listenMPTCP(t, false)
			var calls atomic.Int32
			var srv *Server
			ccfg := ClientConfig{Server: lnAddr(ln), HandshakeTimeout: 5 * time.Second,
				// The first stamp is from before the restart, the next
				// from after the client learned of it.
				Now: func() time.Time {
					if calls.Add(1) == 1 {
						return srv.Horizon().Add(-10 * time.Millisecond)
					}
					return srv.Horizon().Add(time.Millisecond)
				}}
			if tt.withHorizon {
				ccfg.Horizon = func() time.Time { return srv.Horizon() }
			}
			p := newPair(t, ServerConfig{HandshakeDeadline: 200 * time.Millisecond}, ccfg)
			srv = p.srv
			srv.horizon = srv.Now().Add(-time.Second) // as a server started a moment ago
			serve(t, srv, ln, func(_ context.Context, f *Flow) {
				c, err := f.Accept()
				if err == nil {
					c.Close()
				}
			})
			c, err := p.cli.DialTCP(context.Background(), testDst)
			if tt.withHorizon {
				if err != nil {
					t.Fatalf("not retried past the new horizon: %v", err)
				}
				c.Close()
				if n := calls.Load(); n != 2 {
					t.Errorf("%d stamps, want 2", n)
				}
			} else if err == nil || !errors.Is(err, errNoAnswer) {
				t.Fatalf("without Horizon: %v, want the handshake closed without an answer", err)
			}
		})
	}
}
