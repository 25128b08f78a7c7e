package stack_test

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestPortReuseAfterTimeWait: an app that connects again from the same
// port to the same destination, right after a flow the destination closed
// first (which leaves the netstack's endpoint in TIME_WAIT), is answered
// like any new flow: the SYN retires the TIME_WAIT endpoint instead of
// being dropped by it (the app would wait out TIME_WAIT through its SYN
// retransmissions) or, when TIME_WAIT ends with the SYN still queued,
// refused with a RST (issue 11's churn fault).
func TestPortReuseAfterTimeWait(t *testing.T) {
	for _, fam := range []struct {
		name   string
		v6     bool
		local  string
		rounds int
	}{{"IPv4", false, "10.77.77.1", 5}, {"IPv6", true, "fd00:77::1", 5}} {
		t.Run(fam.name, func(t *testing.T) {
			env := newTUNEnv(t, 1500, testLogger(t))
			// The destination speaks first and closes first.
			port := env.serve(t, func(c *net.TCPConn) { c.Write([]byte("bye")) })
			dst := destAddr(fam.v6, 1, port)
			const appPort = 43210
			for i := range fam.rounds {
				c, err := env.dialFrom(net.JoinHostPort(fam.local, strconv.Itoa(appPort)), dst)
				if err != nil {
					t.Fatalf("round %d: connect from port %d: %v", i, appPort, err)
				}
				c.SetDeadline(time.Now().Add(10 * time.Second))
				got, err := io.ReadAll(c)
				c.Close()
				if err != nil || string(got) != "bye" {
					t.Fatalf("round %d: read %q, %v; want bye and the destination's close", i, got, err)
				}
			}
			// Every round after the first met the previous round's
			// endpoint in TIME_WAIT (2 s; the rounds take milliseconds).
			st := env.st.Stats()
			if st.TimeWaitRetired < 1 || st.TimeWaitRetired > uint64(fam.rounds-1) {
				t.Errorf("TimeWaitRetired = %d after %d connections from one port, want 1..%d", st.TimeWaitRetired, fam.rounds, fam.rounds-1)
			}
			if st.Forwarded != uint64(fam.rounds) || st.Failed != 0 || st.Refused != 0 {
				t.Errorf("stats %+v, want %d forwarded, none failed or refused", st, fam.rounds)
			}
			t.Logf("%d of %d reuses retired a TIME_WAIT endpoint", st.TimeWaitRetired, fam.rounds-1)
		})
	}
}

// dialFrom connects a kernel socket of the namespace from the local
// address local (a fixed port) to addr. Until the app's previous socket
// on that port has seen its last ACK, bind or connect fails with
// EADDRINUSE or EADDRNOTAVAIL: those are retried for a while.
func (e *tunEnv) dialFrom(local, addr string) (*net.TCPConn, error) {
	la, err := net.ResolveTCPAddr("tcp", local)
	if err != nil {
		return nil, err
	}
	d := &net.Dialer{LocalAddr: la, Timeout: 10 * time.Second,
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
			}); err != nil {
				return err
			}
			return serr
		}}
	deadline := time.Now().Add(5 * time.Second)
	for {
		var c net.Conn
		err := e.ns.Do(func() (err error) {
			c, err = d.DialContext(context.Background(), "tcp", addr)
			return err
		})
		if err == nil {
			return c.(*net.TCPConn), nil
		}
		if !(errors.Is(err, syscall.EADDRINUSE) || errors.Is(err, syscall.EADDRNOTAVAIL)) || time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}
