//go:build linux

package tunnel

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"syscall"
)

// Listen opens the concentrator's MPTCP listener on addr ("host:port"),
// with TCP Fast Open (queue 256) when fastOpen is set.
//
// Two things can silently make it less than asked for, and Serve logs
// both at Warn: Go falls back to a plain TCP listener if creating the
// MPTCP one fails (Go 1.26, net/mptcpsock_linux.go), and Fast Open needs
// bit 0x2 of net.ipv4.tcp_fastopen, which the caller sets (the kernel
// reads it per SYN, so setting it after Listen is fine).
func Listen(ctx context.Context, addr string, fastOpen bool) (net.Listener, error) {
	var at listenAttempt
	lc := net.ListenConfig{KeepAliveConfig: keepAlive()}
	lc.SetMultipathTCP(true)
	lc.Control = func(_, _ string, rc syscall.RawConn) error {
		return controlListen(rc, fastOpen, &at)
	}
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		ln.Close()
		return nil, fmt.Errorf("tunnel: listen %s: got %T, want *net.TCPListener", addr, ln)
	}
	l := &listener{TCPListener: tl}
	if !isMPTCPSocket(tl) {
		l.warn("listener is plain TCP, not MPTCP: clients will fall back to single-path TCP", "addr", addr, "attempts", at.attempts)
	}
	if fastOpen {
		if at.fastOpenErr != nil {
			l.warn("TCP_FASTOPEN not set on the listener", "addr", addr, "err", at.fastOpenErr)
		}
	}
	return l, nil
}

// listener is a *net.TCPListener that remembers what went wrong while it
// was set up, for Serve to log with the server's logger.
type listener struct {
	*net.TCPListener
	once  sync.Once
	notes []note
}

type note struct {
	msg  string
	args []any
}

func (l *listener) warn(msg string, args ...any) {
	l.notes = append(l.notes, note{msg, args})
}

func (l *listener) report(log *slog.Logger) {
	l.once.Do(func() {
		for _, n := range l.notes {
			log.Warn(n.msg, n.args...)
		}
	})
}
