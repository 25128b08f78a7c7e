//go:build linux

package tunnel

import (
	"fmt"
	"net/netip"
	"syscall"
)

// Verdict is the concentrator's answer to a flow request, sent in msg2.
// The zero value is not a verdict: an all-zero payload never means
// "connected".
type Verdict uint8

// The verdicts. Each one but Connected maps to the errno a local connect
// would have produced (see Errno), so the client stack can answer the app
// as the destination would have.
const (
	Connected   Verdict = 1 // the concentrator reached the destination
	Refused     Verdict = 2 // the destination refused (RST): ECONNREFUSED
	Unreachable Verdict = 3 // no route / host or network unreachable: EHOSTUNREACH
	TimedOut    Verdict = 4 // the destination did not answer in time: ETIMEDOUT
	NotAllowed  Verdict = 5 // the concentrator's policy forbids the destination: EACCES
	Limited     Verdict = 6 // over a limit (e.g. flows per peer): EAGAIN
)

func (v Verdict) valid() bool { return v >= Connected && v <= Limited }

func (v Verdict) String() string {
	switch v {
	case Connected:
		return "connected"
	case Refused:
		return "refused"
	case Unreachable:
		return "unreachable"
	case TimedOut:
		return "timed out"
	case NotAllowed:
		return "not allowed"
	case Limited:
		return "limited"
	}
	return fmt.Sprintf("verdict(%d)", uint8(v))
}

// Errno is the errno that stands for v across package boundaries; 0 for
// Connected and EPROTO for a value that is not a verdict.
func (v Verdict) Errno() syscall.Errno {
	switch v {
	case Connected:
		return 0
	case Refused:
		return syscall.ECONNREFUSED
	case Unreachable:
		return syscall.EHOSTUNREACH
	case TimedOut:
		return syscall.ETIMEDOUT
	case NotAllowed:
		return syscall.EACCES
	case Limited:
		return syscall.EAGAIN
	}
	return syscall.EPROTO
}

// VerdictError is what Client.DialTCP returns when the concentrator
// answered with anything but Connected. It unwraps to the verdict's errno,
// so errors.Is(err, syscall.ECONNREFUSED) and the like hold.
type VerdictError struct {
	Verdict Verdict
	Dst     netip.AddrPort
	Service Service // for DialService; Dst is then zero
}

func (e *VerdictError) Error() string {
	if e.Service != 0 {
		return fmt.Sprintf("tunnel: concentrator answered %s for its %s", e.Verdict, e.Service)
	}
	return fmt.Sprintf("tunnel: concentrator answered %s for %s", e.Verdict, e.Dst)
}

func (e *VerdictError) Unwrap() error { return e.Verdict.Errno() }
