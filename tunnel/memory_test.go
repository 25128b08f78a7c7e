//go:build linux

package tunnel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/flynn/noise"
)

// tcpPair returns two connected TCP sockets on loopback (plain TCP: what
// matters here is that they are *net.TCPConn with file descriptors).
func tcpPair(t testing.TB) (a, b *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan *net.TCPConn, 1)
	go func() {
		c, err := ln.AcceptTCP()
		if err != nil {
			ch <- nil
			return
		}
		ch <- c
	}()
	a, err = net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	b = <-ch
	if b == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// heapAfterGC is the live heap once sync.Pools are emptied (a pool keeps
// what it holds across one GC, in its victim cache, and drops it at the
// second).
func heapAfterGC() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// pinnedPerFlow starts n flows with start, lets them settle, and returns
// the live heap per flow that they hold while blocked. stop ends them.
func pinnedPerFlow(t *testing.T, n int, start func(i int) (stop func())) uint64 {
	t.Helper()
	base := heapAfterGC()
	stops := make([]func(), n)
	for i := range n {
		stops[i] = start(i)
	}
	time.Sleep(200 * time.Millisecond) // let every goroutine block
	after := heapAfterGC()
	for _, s := range stops {
		s()
	}
	if after < base {
		return 0
	}
	return (after - base) / uint64(n)
}

// TestIdleFlowPinsNoBuffer (issue 8, item 5): a relay waiting on an idle
// source holds no buffer: neither ReadFrom on a socket (it used to hold a
// 64 KiB frame buffer for the life of every flow), nor ReadFrom on a
// reader with WaitRead (the netstack's conns), nor WriteTo waiting for
// the next frame.
func TestIdleFlowPinsNoBuffer(t *testing.T) {
	const flows = 100
	// Far below one frame buffer (32 KiB): what an idle flow may hold
	// is its structs, sockets and cipher states.
	const limit = 8 << 10
	tests := []struct {
		name  string
		start func(t *testing.T) func()
	}{
		{"ReadFrom a socket", func(t *testing.T) func() {
			src, peer := tcpPair(t)
			out, _ := tcpPair(t)
			c := newConn(out, noise.UnsafeNewCipherState(cipherSuite, [32]byte{1}, 0), nil, false, nil)
			done := make(chan struct{})
			go func() { defer close(done); c.ReadFrom(src) }()
			return func() { peer.Close(); <-done; c.Close() }
		}},
		{"ReadFrom a WaitRead reader", func(t *testing.T) func() {
			src := newWaitReader()
			out, _ := tcpPair(t)
			c := newConn(out, noise.UnsafeNewCipherState(cipherSuite, [32]byte{1}, 0), nil, false, nil)
			done := make(chan struct{})
			go func() { defer close(done); c.ReadFrom(src) }()
			return func() { src.close(); <-done; c.Close() }
		}},
		{"WriteTo waiting for a frame", func(t *testing.T) func() {
			in, peer := tcpPair(t)
			c := newConn(in, nil, noise.UnsafeNewCipherState(cipherSuite, [32]byte{1}, 0), false, nil)
			done := make(chan struct{})
			go func() { defer close(done); c.WriteTo(io.Discard) }()
			return func() { peer.Close(); <-done; c.Close() }
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			per := pinnedPerFlow(t, flows, func(int) func() { return tt.start(t) })
			t.Logf("%d bytes of heap per idle flow", per)
			if per > limit {
				t.Errorf("%d bytes of heap per idle flow, want ≤ %d (no buffer)", per, limit)
			}
		})
	}
}

// waitReader is a reader with WaitRead that never has data until closed.
type waitReader struct {
	once sync.Once
	done chan struct{}
}

func newWaitReader() *waitReader { return &waitReader{done: make(chan struct{})} }
func (w *waitReader) close()     { w.once.Do(func() { close(w.done) }) }
func (w *waitReader) WaitRead() error {
	<-w.done
	return nil
}
func (w *waitReader) Read([]byte) (int, error) {
	select {
	case <-w.done:
		return 0, io.EOF
	default:
		panic("Read before WaitRead said data was there")
	}
}

// TestHalfFrame (issue 8, item 5): a peer that sends a frame's header and
// part of its body, then nothing, pins at most one frame's buffer while
// the reader waits, and only until the frame timeout, after which the
// Read fails with ErrFrameTimeout and the connection is closed.
func TestHalfFrame(t *testing.T) {
	half := func(peer *net.TCPConn, body int) {
		hdr := binary.BigEndian.AppendUint16(nil, maxCiphertext)
		peer.Write(append(hdr, make([]byte, body)...))
	}
	t.Run("memory", func(t *testing.T) {
		const flows = 50
		// One frame buffer (32 KiB) and the flow's own few KiB.
		const limit = frameBufSize + 8<<10
		for _, body := range []int{0, 1, maxCiphertext / 2, maxCiphertext - 1} {
			per := pinnedPerFlow(t, flows, func(int) func() {
				in, peer := tcpPair(t)
				c := newConn(in, nil, noise.UnsafeNewCipherState(cipherSuite, [32]byte{1}, 0), false, nil)
				done := make(chan struct{})
				go func() { defer close(done); c.Read(make([]byte, 1)) }()
				half(peer, body)
				return func() { peer.Close(); <-done; c.Close() }
			})
			t.Logf("body %d: %d bytes of heap per half-framed flow", body, per)
			if per > limit {
				t.Errorf("body %d: %d bytes of heap per half-framed flow, want ≤ %d (one frame)", body, per, limit)
			}
		}
	})
	for _, mode := range readModes {
		t.Run("timeout/"+mode.name, func(t *testing.T) {
			in, peer := tcpPair(t)
			c := newConn(in, nil, noise.UnsafeNewCipherState(cipherSuite, [32]byte{1}, 0), false, nil)
			c.SetFrameTimeout(300 * time.Millisecond)
			half(peer, 1000)
			start := time.Now()
			_, err := mode.read(c)
			took := time.Since(start)
			if !errors.Is(err, ErrFrameTimeout) {
				t.Fatalf("err = %v after %v, want ErrFrameTimeout", err, took)
			}
			// The connection is closed: the peer sees EOF or a reset.
			peer.SetReadDeadline(time.Now().Add(2 * time.Second))
			if _, err := peer.Read(make([]byte, 1)); errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatal("the connection was not closed after the frame timeout")
			}
			if n, err := c.Read(make([]byte, 1)); n != 0 || !errors.Is(err, ErrFrameTimeout) {
				t.Fatalf("Read after the timeout: %d, %v; want the same error (sticky)", n, err)
			}
		})
	}
	t.Run("the caller's deadline is not fatal", func(t *testing.T) {
		in, peer := tcpPair(t)
		stream, key := recordStream(t, bytes.Repeat([]byte("x"), 20000))
		c := newConn(in, nil, noise.UnsafeNewCipherState(cipherSuite, key, 0), false, nil)
		c.SetFrameTimeout(10 * time.Second)
		peer.Write(stream[:5000])
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := c.Read(make([]byte, 100)); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("err = %v, want the caller's deadline", err)
		}
		c.SetReadDeadline(time.Time{})
		peer.Write(stream[5000:])
		got, err := io.ReadAll(c)
		if err != nil || len(got) != 20000 {
			t.Fatalf("after the deadline: %d bytes, %v; want the whole stream", len(got), err)
		}
	})
	t.Run("a slow frame within the timeout", func(t *testing.T) {
		in, peer := tcpPair(t)
		msg := bytes.Repeat([]byte("slow"), 5000)
		stream, key := recordStream(t, msg)
		c := newConn(in, nil, noise.UnsafeNewCipherState(cipherSuite, key, 0), false, nil)
		c.SetFrameTimeout(2 * time.Second)
		go func() {
			// A byte at a time for the first hundred, then the rest:
			// slow, but well within the timeout.
			for i := range 100 {
				peer.Write(stream[i : i+1])
				time.Sleep(2 * time.Millisecond)
			}
			peer.Write(stream[100:])
		}()
		got, err := io.ReadAll(c)
		if err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("%d bytes, %v; want the message", len(got), err)
		}
	})
}

// TestReadFromWriteTimeout (issue 8, item 7): bytes ReadFrom took from its
// source and could not send, because of a write deadline, are reported
// and end the stream; a later Write does not carry on past a hole.
func TestReadFromWriteTimeout(t *testing.T) {
	out, _ := tcpPair(t) // the peer never reads
	c := newConn(out, noise.UnsafeNewCipherState(cipherSuite, [32]byte{1}, 0), nil, false, nil)
	c.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
	src := io.LimitReader(zeros{}, 64<<20)
	n, err := c.ReadFrom(src)
	if err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("ReadFrom = %d, %v; want the write deadline", n, err)
	}
	c.SetWriteDeadline(time.Time{})
	if _, err := c.Write([]byte("more")); err == nil {
		t.Fatal("Write after bytes were lost succeeded")
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }
