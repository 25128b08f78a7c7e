//go:build linux

package concentrator

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"syscall"
	"testing"

	"github.com/mpvpn/mpvpn/tunnel"
)

// TestVerdictFor: each dial error reaches the client's app as what it
// is; running out of file descriptors is a limit of this host's, never
// "unreachable".
func TestVerdictFor(t *testing.T) {
	s := &Server{log: slog.New(slog.DiscardHandler)}
	for _, tt := range []struct {
		err  error
		want tunnel.Verdict
	}{
		{fmt.Errorf("dial: %w", syscall.ECONNREFUSED), tunnel.Refused},
		{fmt.Errorf("dial: %w", ErrNotAllowed), tunnel.NotAllowed},
		{fmt.Errorf("dial: %w", context.DeadlineExceeded), tunnel.TimedOut},
		{fmt.Errorf("dial: %w", os.ErrDeadlineExceeded), tunnel.TimedOut},
		{fmt.Errorf("dial: %w", syscall.EHOSTUNREACH), tunnel.Unreachable},
		{fmt.Errorf("socket: %w", syscall.EMFILE), tunnel.Limited},
		{fmt.Errorf("socket: %w", syscall.ENFILE), tunnel.Limited},
	} {
		if got := s.verdictFor(tt.err); got != tt.want {
			t.Errorf("%v: verdict %s, want %s", tt.err, got, tt.want)
		}
	}
	if n := s.outOfFiles.Load(); n != 2 {
		t.Errorf("out of files counted %d times, want 2", n)
	}
}
