//go:build !linux

package tunnel

import (
	"errors"
	"net"
	"syscall"
)

// mpvpn runs on Linux; these stubs only keep the package building
// elsewhere (editors, go vet with another GOOS).

type dialAttempt struct {
	attempts    int
	lastMPTCP   bool
	fastOpenErr error
}

var errNotLinux = errors.New("not supported on this OS")

func controlDial(rc syscall.RawConn, mark uint32, fastOpen bool, st *dialAttempt) error {
	st.attempts++
	if mark != 0 {
		return errNotLinux
	}
	if fastOpen {
		st.fastOpenErr = errNotLinux
	}
	return nil
}

type listenAttempt struct {
	attempts    int
	fastOpenErr error
}

func controlListen(rc syscall.RawConn, fastOpen bool, st *listenAttempt) error {
	st.attempts++
	if fastOpen {
		st.fastOpenErr = errNotLinux
	}
	return nil
}

func isMPTCPSocket(sc syscall.Conn) bool { return false }

func fastOpenSysctl() (int, error) { return 0, errNotLinux }

func limitUnsent(net.Conn) error { return nil }

type tryReader struct{}

func newTryReader(*net.TCPConn) *tryReader { return nil }

func (*tryReader) read([]byte) (int, bool, error) { return 0, false, errNotLinux }

type lazyReader struct{}

func newLazyReader(*net.TCPConn, int) *lazyReader { return nil }

func (*lazyReader) read() (*[]byte, int, error) { return nil, 0, errNotLinux }

func msg1Queued(net.Conn) func() bool { return nil }
