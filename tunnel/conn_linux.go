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

// lazyReader reads a socket into a pooled frame buffer that it takes only
// once data is there and gives back when a read would block, so a relay
// waiting on an idle source holds no buffer (issue 8: ReadFrom held one
// 64 KiB buffer for the life of every flow).
type lazyReader struct {
	rc  syscall.RawConn
	fn  func(fd uintptr) bool
	max int
	bp  *[]byte
	n   int
	err error
}

func newLazyReader(tc *net.TCPConn, max int) *lazyReader {
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	l := &lazyReader{rc: rc, max: max}
	l.fn = func(fd uintptr) bool {
		if l.bp == nil {
			l.bp = writeBufPool.Get().(*[]byte)
		}
		for {
			l.n, l.err = unix.Read(int(fd), (*l.bp)[frameHeaderSize:frameHeaderSize+l.max])
			switch l.err {
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				// Wait for data without the buffer (RawConn.Read
				// parks until the fd is readable, then calls fn
				// again).
				writeBufPool.Put(l.bp)
				l.bp = nil
				return false
			}
			return true
		}
	}
	return l
}

// read returns a buffer holding n bytes at [frameHeaderSize:], now the
// caller's to put back in writeBufPool (nil if none was taken), or an
// error (io.EOF at the end).
func (l *lazyReader) read() (*[]byte, int, error) {
	err := l.rc.Read(l.fn)
	bp := l.bp
	l.bp = nil
	switch {
	case err != nil:
		return bp, 0, err
	case l.err != nil:
		return bp, 0, os.NewSyscallError("read", l.err)
	case l.n == 0:
		return bp, 0, io.EOF
	}
	return bp, l.n, nil
}
