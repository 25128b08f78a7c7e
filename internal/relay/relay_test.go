//go:build linux

package relay

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// tcpPair returns two connected loopback TCP conns.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() { c, err := ln.Accept(); ch <- res{c, err} }()
	c1, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	return c1.(*net.TCPConn), r.c.(*net.TCPConn)
}

// TestRelay runs client ⇄ [a relay b] ⇄ server and checks bytes and
// half-close in both directions.
func TestRelay(t *testing.T) {
	defer goleak.VerifyNone(t)
	tests := []struct {
		name          string
		up, down      int  // bytes client→server, server→client
		clientClosesW bool // client half-closes first, server replies after EOF
	}{
		{"empty", 0, 0, true},
		{"upload then reply after EOF", 1 << 20, 3 << 20, true},
		{"large both ways", 8 << 20, 8 << 20, true},
		{"server speaks first", 0, 1 << 20, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			client, a := tcpPair(t)
			b, server := tcpPair(t)
			done := make(chan error, 1)
			go func() { _, err := Relay(a, b); done <- err }()

			up := make([]byte, tc.up)
			down := make([]byte, tc.down)
			rand.Read(up)
			rand.Read(down)

			srvGot := make(chan []byte, 1)
			go func() {
				if !tc.clientClosesW {
					server.Write(down)
					server.CloseWrite()
				}
				got, _ := io.ReadAll(server)
				if tc.clientClosesW {
					// The reply is sent only after the client's EOF
					// arrived: a relay that does not forward the
					// half-close hangs here.
					server.Write(down)
					server.CloseWrite()
				}
				srvGot <- got
			}()
			if _, err := client.Write(up); err != nil {
				t.Fatal(err)
			}
			if tc.clientClosesW {
				client.CloseWrite()
			}
			client.SetReadDeadline(time.Now().Add(30 * time.Second))
			gotDown, err := io.ReadAll(client)
			if err != nil {
				t.Fatalf("client read: %v", err)
			}
			if !tc.clientClosesW {
				client.CloseWrite()
			}
			if !bytes.Equal(gotDown, down) {
				t.Errorf("server→client: got %d bytes, want %d (or content differs)", len(gotDown), len(down))
			}
			if got := <-srvGot; !bytes.Equal(got, up) {
				t.Errorf("client→server: got %d bytes, want %d (or content differs)", len(got), len(up))
			}
			if err := <-done; err != nil {
				t.Errorf("Relay: %v", err)
			}
			client.Close()
			server.Close()
		})
	}
}

// TestRelayResetTearsDown checks that a reset on one side ends the flow on
// the other instead of leaving it half-open forever.
func TestRelayResetTearsDown(t *testing.T) {
	defer goleak.VerifyNone(t)
	client, a := tcpPair(t)
	b, server := tcpPair(t)
	done := make(chan struct{})
	go func() { Relay(a, b); close(done) }()
	server.SetLinger(0) // Close sends RST
	server.Close()
	client.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.ReadAll(client)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("client still open 10 s after the far side was reset")
	}
	// A reset is passed on as a reset: an end of stream would tell the
	// client its data was complete.
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read ended with %v, want ECONNRESET", err)
	}
	<-done
	client.Close()
}

// parkConn is a Parker over a TCP conn, for the tests: readiness is a
// non-blocking MSG_PEEK, and a parked wait is a goroutine of the test's
// that blocks in a peek (the netstack's conns have gVisor's callback).
type parkConn struct {
	*net.TCPConn
	parks atomic.Int32
}

func (c *parkConn) readable() bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return true
	}
	ready := false
	rc.Read(func(fd uintptr) bool {
		var b [1]byte
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		ready = n > 0 || (err != nil && err != syscall.EAGAIN) || (err == nil && n == 0)
		return true
	})
	return ready
}

func (c *parkConn) Park(resume func()) bool {
	if c.readable() {
		return false
	}
	c.parks.Add(1)
	go func() {
		rc, _ := c.SyscallConn()
		rc.Read(func(fd uintptr) bool {
			var b [1]byte
			_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			return err != syscall.EAGAIN
		})
		resume()
	}()
	return true
}

// waitReadConn stands for the tunnel's Conn on the far side: its
// ReadFrom asks the source's WaitRead before every read, and returns its
// error as is.
type waitReadConn struct{ *net.TCPConn }

func (c waitReadConn) ReadFrom(r io.Reader) (int64, error) {
	w := r.(interface{ WaitRead() error })
	buf := make([]byte, 32<<10)
	var total int64
	for {
		if err := w.WaitRead(); err != nil {
			return total, err
		}
		n, err := r.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return total, werr
			}
			total += int64(n)
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// TestRelayParks: a source that can park is copied in bursts, each by a
// fresh resume, with every byte across the parks counted and delivered,
// its half-close passed on, and no goroutine left behind.
func TestRelayParks(t *testing.T) {
	defer goleak.VerifyNone(t)
	client, a := tcpPair(t)
	b, server := tcpPair(t)
	src := &parkConn{TCPConn: a}
	type result struct {
		st  Stats
		err error
	}
	done := make(chan result, 1)
	go func() { st, err := Relay(src, waitReadConn{b}); done <- result{st, err} }()

	const bursts, size = 5, 100 << 10
	want := make([]byte, bursts*size)
	rand.Read(want)
	got := make(chan []byte, 1)
	go func() { d, _ := io.ReadAll(server); got <- d }()
	// waitParks waits until the relay has parked n times in all.
	waitParks := func(n int32) {
		deadline := time.Now().Add(10 * time.Second)
		for src.parks.Load() < n {
			if time.Now().After(deadline) {
				t.Fatalf("the relay parked %d times, not %d", src.parks.Load(), n)
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitParks(1) // nothing sent yet
	for i := range bursts {
		p := src.parks.Load()
		if _, err := client.Write(want[i*size : (i+1)*size]); err != nil {
			t.Fatal(err)
		}
		waitParks(p + 1) // the burst is through, or part of it
	}
	client.CloseWrite()
	d := <-got
	if !bytes.Equal(d, want) {
		t.Errorf("server got %d bytes, want %d (or content differs)", len(d), len(want))
	}
	if n := src.parks.Load(); n < bursts {
		t.Errorf("the relay parked %d times over %d bursts, want at least %d", n, bursts, bursts)
	}
	server.CloseWrite() // the other direction ends too
	r := <-done
	if r.err != nil || r.st.AtoB != int64(len(want)) || r.st.BtoA != 0 {
		t.Errorf("Relay = %+v, %v; want %d bytes a→b, none back, no error", r.st, r.err, len(want))
	}
	client.Close()
	server.Close()
}
