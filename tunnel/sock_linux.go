package tunnel

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// fastOpenQueue is the listener's TCP_FASTOPEN queue: how many Fast Open
// requests may wait for accept before the kernel falls back to a normal
// handshake for new ones (the MPTCP selftest uses 25; a concentrator sees
// bursts of flows).
const fastOpenQueue = 256

// dialAttempt records what Dialer.Control saw. Go's dialMPTCP retries with
// plain TCP after any error of the MPTCP attempt (Go 1.26,
// net/mptcpsock_linux.go), calling Control again; two attempts with the
// last one plain TCP means that happened.
type dialAttempt struct {
	attempts    int
	lastMPTCP   bool
	fastOpenErr error
}

func controlDial(rc syscall.RawConn, mark uint32, fastOpen bool, st *dialAttempt) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		st.attempts++
		proto, _ := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL)
		st.lastMPTCP = proto == unix.IPPROTO_MPTCP
		if mark != 0 {
			// SO_MARK on the MPTCP socket reaches every subflow, now
			// and later (net/mptcp/sockopt.c sync_socket_options).
			if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark)); err != nil {
				serr = fmt.Errorf("set SO_MARK %#x (needs CAP_NET_ADMIN): %w", mark, err)
				return
			}
		}
		// Best effort, like Fast Open: an older kernel without it on
		// MPTCP sockets only keeps more bytes queued.
		unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, notSentLowat)
		if fastOpen {
			// A failure here must not fail the dial: Go would then
			// retry with plain TCP and we would silently lose
			// MPTCP for the sake of Fast Open.
			if err := unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_FASTOPEN_CONNECT, 1); err != nil {
				st.fastOpenErr = err
			}
		}
	})
	if err != nil {
		return err
	}
	return serr
}

type listenAttempt struct {
	attempts    int
	fastOpenErr error
}

func controlListen(rc syscall.RawConn, fastOpen bool, st *listenAttempt) error {
	return rc.Control(func(fd uintptr) {
		st.attempts++
		if fastOpen {
			// As for dialing: never fail (Go would fall back to a
			// plain TCP listener), only remember.
			if err := unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_FASTOPEN, fastOpenQueue); err != nil {
				st.fastOpenErr = err
			}
		}
	})
}

// isMPTCPSocket reports whether the socket was created as MPTCP (for a
// listener; a connection's own state is (*net.TCPConn).MultipathTCP).
func isMPTCPSocket(sc syscall.Conn) bool {
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	var proto int
	rc.Control(func(fd uintptr) {
		proto, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL)
	})
	return proto == unix.IPPROTO_MPTCP
}

// fastOpenSysctl reads net.ipv4.tcp_fastopen of the caller's network
// namespace: bit 0x1 enables the client side, 0x2 the server side.
func fastOpenSysctl() (int, error) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_fastopen")
	if err != nil {
		return 0, err
	}
	v, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("net.ipv4.tcp_fastopen: %w", err)
	}
	return v, nil
}

// notSentLowat is TCP_NOTSENT_LOWAT on both ends' tunnel sockets: at most
// this much data sits in a connection's send queue not yet sent. Without a
// bound the relay fills the MPTCP socket's buffer, megabytes at a time, and
// when a subflow dies the data the concentrator re-sends on the others
// waits behind all of it: in the silent-outage test (20 Mbit/s uplinks,
// 2026-11-30, Linux 6.18, which supports the option on MPTCP sockets) the
// app-level stall went from 0.64 s to 0.47 s with 128 KiB. In-flight data
// is not limited, and one unshaped flow moved the same 2.8 / 2.3 Gbit/s
// (up / down) with 128 KiB as with the bound lifted, in one bench.sh run.
const notSentLowat = 128 << 10

// limitUnsent sets notSentLowat on an accepted connection.
func limitUnsent(c net.Conn) error {
	return setsockopt(c, func(fd int) error {
		return unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, notSentLowat)
	})
}

// setsockopt runs set on c's socket; a conn without one is left alone.
func setsockopt(c net.Conn, set func(fd int) error) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = set(int(fd)) }); err != nil {
		return err
	}
	return serr
}

// msg1Queued returns a function that reports whether a whole msg1 is
// waiting in c's receive queue (SIOCINQ, which MPTCP sockets answer too:
// checked on Linux 6.18, 2026-12), or nil if c has no file descriptor.
func msg1Queued(c net.Conn) func() bool {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	return func() bool {
		n := 0
		rc.Control(func(fd uintptr) { n, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
		return n >= msg1V0Size // the shorter of the two
	}
}

// pinReceiveBuffer sets c's receive buffer to size and so turns the
// kernel's autotuning off for it: SO_RCVBUFFORCE (CAP_NET_ADMIN, past
// net.core.rmem_max), else SO_RCVBUF. The kernel doubles the value.
func pinReceiveBuffer(c net.Conn, size int) error {
	if size <= 0 {
		return nil
	}
	return setsockopt(c, func(fd int) error {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, size); err == nil {
			return nil
		}
		return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, size)
	})
}

// tcpRmemMax is net.ipv4.tcp_rmem's maximum in this network namespace,
// the most receive-buffer autotuning would ever give a socket (0 if it
// cannot be read).
func tcpRmemMax() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_rmem")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) != 3 {
		return 0
	}
	n, _ := strconv.Atoi(f[2])
	return n
}
