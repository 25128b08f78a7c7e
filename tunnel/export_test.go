//go:build linux

package tunnel

import "time"

// SkewServerClock makes s behave as a server whose clock is d off this
// host's: its clock and its horizon both move, as they would on such a
// host. For the external tests (package tunnel_test).
func SkewServerClock(s *Server, d time.Duration) {
	start := s.start
	s.now = func() time.Time { return start.Add(d + time.Since(start)) }
	s.horizon = start.Add(d + s.cfg.FutureSkew)
}
