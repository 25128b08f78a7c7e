//go:build linux

// Package relay copies bytes between the two halves of a proxied TCP flow,
// carrying half-closes across: the client side (netstack ↔ tunnel) and the
// concentrator side (tunnel ↔ destination) relay the same way.
package relay

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// BufSize is the copy buffer per direction. 64 KiB matches the largest
// frame the tunnel carries and a full TSO segment, so one read fills one
// frame on the hot path.
const BufSize = 64 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, BufSize); return &b }}

// closeWriter is implemented by *net.TCPConn, gonet's TCPConn and tunnel.Conn.
type closeWriter interface{ CloseWrite() error }

// Stats is what one Relay call moved.
type Stats struct {
	AtoB, BtoA int64 // bytes
}

// aborter is a conn that can close with a reset: tunnel.Conn, the
// netstack's app conns.
type aborter interface{ Abort() error }

// reset closes c so that its peer sees a reset, not an end of stream.
func reset(c net.Conn) {
	switch c := c.(type) {
	case aborter:
		c.Abort()
	case *net.TCPConn:
		c.SetLinger(0)
		c.Close()
	default:
		c.Close()
	}
}

// Relay copies a→b and b→a until both directions have ended, then closes
// both conns. A clean EOF in one direction is forwarded as a half-close
// (CloseWrite) so the other direction keeps flowing, as TCP allows; any
// other error tears the whole flow down at once, with a reset on both
// sides, so a reset or an AEAD failure on one side never leaves the other
// hanging, and never looks to it like a clean end (a FIN would: an app
// that does not know the length of what it reads would take a cut stream
// for a whole one).
func Relay(a, b net.Conn) (Stats, error) {
	var (
		once       sync.Once
		wg         sync.WaitGroup
		errs       [2]error
		atob, btoa atomic.Int64
	)
	closeBoth := func() {
		once.Do(func() {
			a.Close()
			b.Close()
		})
	}
	abort := func() {
		once.Do(func() {
			reset(a)
			reset(b)
		})
	}
	// finish ends direction i, whose copy returned err.
	finish := func(i int, dst net.Conn, err error) {
		defer wg.Done()
		errs[i] = err
		if err != nil {
			abort()
			return
		}
		if cw, ok := dst.(closeWriter); ok {
			if err := cw.CloseWrite(); err != nil {
				errs[i] = err
				abort()
			}
			return
		}
		// No half-close on this conn type: closing is the only way to
		// pass the EOF on.
		closeBoth()
	}
	// a→b in a goroutine, b→a in the caller's: a blocked goroutine
	// costs an idle flow a stack (issue 11's memory budget), and the
	// caller waits anyway. If a can park, a→b holds no goroutine at all
	// while a has nothing to read, and each burst of its bytes is copied
	// by a fresh goroutine, whose stack is small again.
	var src net.Conn = a
	copyAtoB := func() {
		n, err := copyHalf(b, src)
		atob.Add(n)
		if errors.Is(err, errParked) {
			return // resumed by a's Park
		}
		finish(0, b, err)
	}
	if p, ok := a.(Parker); ok {
		src = &parkingReader{Conn: a, p: p, resume: copyAtoB}
	}
	wg.Add(2)
	go copyAtoB()
	n, err := copyHalf(a, b)
	btoa.Add(n)
	finish(1, a, err)
	wg.Wait()
	closeBoth()
	return Stats{AtoB: atob.Load(), BtoA: btoa.Load()}, errors.Join(ignoreClosed(errs[0]), ignoreClosed(errs[1]))
}

// Parker is a conn that can wait for its next bytes without a goroutine
// blocked on it (the netstack's conns: gVisor calls back when data comes).
type Parker interface {
	// Park arranges for resume to be called, in a new goroutine, once
	// the conn has something to read, has failed or is closed, and
	// reports true; or, if it has something to read already, arranges
	// nothing and reports false. resume is the same function on every
	// call for one conn.
	Park(resume func()) bool
}

// errParked ends a copy whose source parked; the copy resumes later.
var errParked = errors.New("relay: source parked")

// parkingReader is the source of a copy that ends, with errParked, where
// it would wait. Its WaitRead is what the tunnel's Conn.ReadFrom calls
// before each read, before it takes a buffer.
type parkingReader struct {
	net.Conn
	p      Parker
	resume func()
}

func (r *parkingReader) WaitRead() error {
	if r.p.Park(r.resume) {
		return errParked
	}
	return nil
}

// Readable passes on the conn's own Readable (see stack's appConn), which
// the tunnel's ReadFrom uses to batch frames; a conn without one reports
// false, and ReadFrom then sends a frame per read.
func (r *parkingReader) Readable() bool {
	rd, ok := r.Conn.(interface{ Readable() bool })
	return ok && rd.Readable()
}

func copyHalf(dst, src net.Conn) (int64, error) {
	// A conn that frames its own bytes (tunnel.Conn) copies best with its
	// own WriteTo/ReadFrom. *net.TCPConn is excluded on purpose: with a
	// non-socket on the other side its ReadFrom/WriteTo fall back to
	// io.Copy with a fresh 32 KiB buffer per call (Go 1.26), which is what
	// the pool is here to avoid.
	if _, tcp := src.(*net.TCPConn); !tcp {
		if wt, ok := src.(io.WriterTo); ok {
			return wt.WriteTo(dst)
		}
	}
	if _, tcp := dst.(*net.TCPConn); !tcp {
		// One that can send its end of stream with the last bytes
		// (tunnel.Conn) does; finish's CloseWrite is then a no-op.
		if rc, ok := dst.(readFromAndCloseWriter); ok {
			return rc.ReadFromAndCloseWrite(src)
		}
		if rf, ok := dst.(io.ReaderFrom); ok {
			return rf.ReadFrom(src)
		}
	}
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	return io.CopyBuffer(writerOnly{dst}, readerOnly{src}, *bp)
}

// readFromAndCloseWriter copies until the source's EOF and then closes
// its write side, as ReadFrom then CloseWrite would (tunnel.Conn).
type readFromAndCloseWriter interface {
	ReadFromAndCloseWrite(io.Reader) (int64, error)
}

// writerOnly and readerOnly hide ReadFrom/WriteTo so io.CopyBuffer uses
// the pooled buffer.
type writerOnly struct{ io.Writer }
type readerOnly struct{ io.Reader }

// ignoreClosed drops the error the second direction sees after the first
// one aborted the flow: it is a consequence, not a cause.
func ignoreClosed(err error) error {
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}
