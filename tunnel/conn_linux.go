package tunnel

import (
	"io"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// tryReader reads a socket without blocking, through its file descriptor:
// one read(2), and "would block" told apart from data, EOF and errors.
// Its callback is made once, so a read allocates nothing.
type tryReader struct {
	rc  syscall.RawConn
	fn  func(fd uintptr) bool
	p   []byte
	n   int
	err error
}

func newTryReader(tc *net.TCPConn) *tryReader {
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	t := &tryReader{rc: rc}
	t.fn = func(fd uintptr) bool {
		for {
			t.n, t.err = unix.Read(int(fd), t.p)
			if t.err != unix.EINTR {
				return true // never wait: the caller decides
			}
		}
	}
	return t
}

// read reads into p. wouldBlock means nothing is there now.
func (t *tryReader) read(p []byte) (n int, wouldBlock bool, err error) {
	t.p = p
	// RawConn.Read checks the read deadline and whether the conn is
	// closed before it calls fn (Go 1.26 internal/poll RawRead).
	err = t.rc.Read(t.fn)
	t.p = nil
	switch {
	case err != nil:
		return 0, false, err
	case t.err == unix.EAGAIN:
		return 0, true, nil
	case t.err != nil:
		return 0, false, os.NewSyscallError("read", t.err)
	case t.n == 0:
		return 0, false, io.EOF
	}
	return t.n, false, nil
}

// lazyReader reads a socket into a batch's pooled buffer, which it takes
// only once data is there and gives back when it must wait, so a relay
// waiting on an idle source holds no buffer (issue 8: ReadFrom held one
// 64 KiB buffer for the life of every flow).
type lazyReader struct {
	rc   syscall.RawConn
	fn   func(fd uintptr) bool
	b    *batch
	wait bool
	tail bool // read into the rest of the last frame, not a new one
	n    int
	err  error
}

func newLazyReader(tc *net.TCPConn) *lazyReader {
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	l := &lazyReader{rc: rc}
	l.fn = func(fd uintptr) bool {
		l.b.take()
		// space() only for a new frame: a full batch has none.
		var dst []byte
		if l.tail {
			dst = l.b.rest()
		} else {
			dst = l.b.space()
		}
		for {
			l.n, l.err = unix.Read(int(fd), dst)
			switch l.err {
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				if !l.wait {
					return true
				}
				// Wait for data without the buffer (RawConn.Read
				// parks until the fd is readable, then calls fn
				// again). Waiting happens only for a batch's
				// first frame.
				l.b.release()
				return false
			}
			return true
		}
	}
	return l
}

// read reads the batch's next frame from the socket and returns its
// size, or an error (io.EOF at the end). With wait false it returns at
// once, wouldBlock if the socket holds nothing. With tail it reads into
// the rest of the batch's last frame instead (never waiting then).
func (l *lazyReader) read(wait, tail bool) (n int, wouldBlock bool, err error) {
	l.wait, l.tail = wait && !tail, tail
	err = l.rc.Read(l.fn)
	switch {
	case err != nil:
		return 0, false, err
	case l.err == unix.EAGAIN:
		return 0, true, nil
	case l.err != nil:
		return 0, false, os.NewSyscallError("read", l.err)
	case l.n == 0:
		return 0, false, io.EOF
	}
	return l.n, false, nil
}
