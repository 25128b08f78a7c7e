//go:build linux

package tunnel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestConnReuseAfterEOF: the bytes that follow the peer's end-of-stream
// frame in the same read go to the next flow when they can be its request
// frame, and are a protocol violation otherwise, or on a Conn that is not
// reused.
func TestConnReuseAfterEOF(t *testing.T) {
	tests := []struct {
		name     string
		reuse    bool
		extra    int // bytes after the request frame
		wantErr  error
		wantNext bool
	}{
		{name: "request frame after the end", reuse: true, wantNext: true},
		{name: "more than a request frame", reuse: true, extra: 1, wantErr: ErrBadFrame},
		{name: "not reused", reuse: false, wantErr: ErrBadFrame},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := newPair(t, ServerConfig{}, ClientConfig{})
			cs, _, ss, sr := p.handshake(t)
			var stream []byte
			seal := func(pt []byte) {
				buf := make([]byte, frameHeaderSize+len(pt)+tagSize)
				out, err := sealFrame(buf, cs, pt)
				if err != nil {
					t.Fatal(err)
				}
				stream = append(stream, out...)
			}
			seal([]byte("hello"))
			seal(nil) // end of stream
			var req [requestSize]byte
			putTarget(req[:], target{dst: testDst})
			seal(req[:])
			stream = append(stream, make([]byte, tt.extra)...)

			var got reusable
			handed := false
			c := newConn(&fakeConn{r: bytes.NewReader(stream)}, ss, sr, false, nil)
			if tt.reuse {
				c.afterEOF = requestFrameSize
				c.onReuse = func(r reusable) { got, handed = r, true }
			}
			b, err := io.ReadAll(c)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("ReadAll: %q, %v; want %v", b, err, tt.wantErr)
				}
				if handed {
					t.Fatal("a Conn that failed was handed on")
				}
				return
			}
			if err != nil || string(b) != "hello" {
				t.Fatalf("ReadAll: %q, %v", b, err)
			}
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			if err := c.Close(); err != nil || !handed {
				t.Fatalf("Close: %v, handed on: %v", err, handed)
			}
			if err := c.SetDeadline(time.Now()); err == nil {
				t.Error("SetDeadline on a Conn whose connection went on to another flow")
			}
			next, err := readRequestFrame(bytes.NewReader(got.after), got.keys.recv)
			if err != nil || next.dst != testDst {
				t.Fatalf("the next request: %v, %v", next, err)
			}
		})
	}
}

// TestConnReuseNeedsCleanEnd: a Conn is handed on only when both
// directions ended with their end-of-stream frames and nothing failed.
func TestConnReuseNeedsCleanEnd(t *testing.T) {
	tests := []struct {
		name      string
		readEnd   bool // the peer's end-of-stream frame was read
		closeW    bool // our end-of-stream frame was sent
		abort     bool
		wantReuse bool
	}{
		{name: "both ends", readEnd: true, closeW: true, wantReuse: true},
		{name: "peer still sending", closeW: true},
		{name: "ours not ended", readEnd: true},
		{name: "aborted", readEnd: true, closeW: true, abort: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := newPair(t, ServerConfig{}, ClientConfig{})
			cs, _, ss, sr := p.handshake(t)
			buf := make([]byte, frameHeaderSize+tagSize)
			eof, err := sealFrame(buf, cs, nil)
			if err != nil {
				t.Fatal(err)
			}
			raw := &fakeConn{r: bytes.NewReader(eof)}
			handed := false
			c := newConn(raw, ss, sr, false, nil)
			c.onReuse = func(reusable) { handed = true }
			if tt.readEnd {
				if _, err := io.ReadAll(c); err != nil {
					t.Fatal(err)
				}
			}
			if tt.closeW {
				if err := c.CloseWrite(); err != nil {
					t.Fatal(err)
				}
			}
			if tt.abort {
				c.Abort()
			} else {
				c.Close()
			}
			if handed != tt.wantReuse || raw.closed.Load() == tt.wantReuse {
				t.Errorf("handed on %v, closed %v; want handed on %v", handed, raw.closed.Load(), tt.wantReuse)
			}
		})
	}
}

// onePooled starts a server with handle on loopback MPTCP and a client
// (ccfg, with its Server, a pool of one, and a gate for Source) whose pool
// has filled; the gate is then off, so from here on only flows put
// connections back into the pool.
func onePooled(t *testing.T, scfg ServerConfig, ccfg ClientConfig, handle func(context.Context, *Flow)) pair {
	t.Helper()
	return onePooledWith(t, scfg, ccfg, handle, nil)
}

// onePooledWith is onePooled with prep run on the client before its
// first dial.
func onePooledWith(t *testing.T, scfg ServerConfig, ccfg ClientConfig, handle func(context.Context, *Flow), prep func(*Client)) pair {
	t.Helper()
	ln := listenMPTCP(t, false)
	var g gate
	ccfg.Server, ccfg.PoolSize, ccfg.Source = lnAddr(ln), 1, g.source
	p := newPair(t, scfg, ccfg)
	if prep != nil {
		prep(p.cli)
	}
	serve(t, p.srv, ln, handle)
	runPool(t, p.cli)
	waitFor(t, "the pool filled", func() bool { return p.cli.Stats().Pooled == 1 })
	g.off.Store(true)
	return p
}

// TestReuse: flows through a real client and server on loopback MPTCP.
// A flow that ended cleanly leaves its connection for the next flow; one
// that did not, or with reuse off, or after a Flush, does not; and a
// reused connection the concentrator closed is skipped like a stale
// pooled one. Every flow's bytes arrive. The concentrator answers each
// finished flow with a ready frame, which the client reads before the
// next verdict; a client from before ready frames gets none (any byte
// of one would fail its next flow or make the connection stale).
func TestReuse(t *testing.T) {
	tests := []struct {
		name      string
		noReuse   bool
		oldClient bool // reuses, but offers no ready frames
		poolIdle  time.Duration
		// between runs after the first flow, before the second.
		between func(t *testing.T, p pair)
		// wantConns: TCP connections the server accepted for the
		// flows (the pool's one included).
		wantConns  uint64
		wantReused uint64 // client: connections put back
		wantStale  uint64
	}{
		{name: "five flows, one connection", wantConns: 1, wantReused: 5},
		{name: "reuse off", noReuse: true, wantConns: 5},
		{name: "a client from before ready frames", oldClient: true, wantConns: 1, wantReused: 5},
		{name: "flushed", between: func(t *testing.T, p pair) { p.cli.Flush() }, wantConns: 2, wantReused: 5},
		{
			name: "closed by the concentrator at its PoolIdle", poolIdle: time.Second,
			between: func(t *testing.T, p pair) {
				waitFor(t, "the server closed the reused connection", func() bool { return p.srv.Stats().PoolUnused >= 1 })
			},
			wantConns: 2, wantReused: 5, wantStale: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := onePooledWith(t, ServerConfig{PoolIdle: tt.poolIdle}, ClientConfig{NoReuse: tt.noReuse}, echoAccept, func(c *Client) {
				if tt.oldClient {
					c.offerReady = false
				}
			})
			for i := range 5 {
				if err := echoOnce(t, p.cli); err != nil {
					t.Fatalf("flow %d: %v", i, err)
				}
				if i == 0 && tt.between != nil {
					tt.between(t, p)
				}
			}
			cs, ss := p.cli.Stats(), p.srv.Stats()
			if cs.Connected != 5 || cs.Failures != 0 || ss.Flows != 5 {
				t.Errorf("client %+v, server %+v: want 5 flows connected, none failed", cs, ss)
			}
			if ss.Accepted != tt.wantConns || cs.PoolReused != tt.wantReused || cs.PoolStale != tt.wantStale {
				t.Errorf("%d connections accepted, %d put back, %d stale; want %d, %d, %d", ss.Accepted, cs.PoolReused, cs.PoolStale, tt.wantConns, tt.wantReused, tt.wantStale)
			}
			if tt.noReuse {
				return
			}
			waitFor(t, "the server kept the connections", func() bool { return p.srv.Stats().Reused >= tt.wantReused })
			// The last flow's connection waits in the pool: its
			// ready frame comes (read with the end of stream, or
			// waiting to be read before the next verdict), and
			// nothing else, to an old client not even that.
			var pc *pooledConn
			waitFor(t, "the pooled connection idle, its end-of-stream frame answered", func() bool {
				if pc = pooledNow(p.cli); pc == nil {
					return false
				}
				alive, sending := peekConn(pc.tc, pc.owesReady)
				return alive && !sending
			})
			want := 0
			if pc.owesReady {
				want = readyFrameSize
			}
			if n := inq(t, pc.tc); n != want || tt.oldClient && pc.owesReady {
				t.Errorf("%d bytes wait on the pooled connection, owing a ready frame %v; want %d", n, pc.owesReady, want)
			}
		})
	}
}

// pooledNow is the client's first pooled connection, or nil.
func pooledNow(c *Client) *pooledConn {
	c.pool.mu.Lock()
	defer c.pool.mu.Unlock()
	if len(c.pool.ready) == 0 {
		return nil
	}
	return c.pool.ready[0]
}

// inq is how many bytes wait to be read on tc (SIOCINQ).
func inq(t *testing.T, tc *net.TCPConn) int {
	t.Helper()
	rc, err := tc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	n := -1
	rc.Control(func(fd uintptr) { n, err = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestReuseNotAfterFailure: a flow that ends with a reset or a
// truncated stream leaves nothing behind; the next flow dials afresh.
func TestReuseNotAfterFailure(t *testing.T) {
	tests := []struct {
		name   string
		handle func(context.Context, *Flow)
		client func(t *testing.T, p pair, c *Conn)
	}{
		{
			name:   "client aborts",
			handle: echoAccept,
			client: func(t *testing.T, p pair, c *Conn) {
				c.Write([]byte("ping"))
				c.CloseWrite()
				io.ReadAll(c)
				c.Abort()
			},
		},
		{
			name:   "the pool flushed during the flow (an uplink withdrawn)",
			handle: echoAccept,
			client: func(t *testing.T, p pair, c *Conn) {
				p.cli.Flush()
				c.Write([]byte("ping"))
				c.CloseWrite()
				if b, err := io.ReadAll(c); err != nil || string(b) != "ping" {
					t.Errorf("echo: %q, %v", b, err)
				}
				c.Close()
			},
		},
		{
			name: "server ends without its end-of-stream frame",
			handle: func(_ context.Context, f *Flow) {
				c, err := f.Accept()
				if err == nil {
					c.Write([]byte("partial"))
					c.Close()
				}
			},
			client: func(t *testing.T, p pair, c *Conn) {
				c.CloseWrite()
				// ErrTruncated, or a reset if our end-of-stream
				// frame was still unread when the server closed.
				if _, err := io.ReadAll(c); err == nil {
					t.Error("ReadAll: a stream without its end-of-stream frame read as complete")
				}
				c.Close()
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := onePooled(t, ServerConfig{}, ClientConfig{}, tt.handle)
			c, err := p.cli.DialTCP(context.Background(), testDst)
			if err != nil {
				t.Fatal(err)
			}
			tt.client(t, p, c)
			if st := p.cli.Stats(); st.PoolReused != 0 || st.Pooled != 0 {
				t.Errorf("after a failed flow: %d put back, %d pooled; want none", st.PoolReused, st.Pooled)
			}
		})
	}
}

// rcvBuf is SO_RCVBUF of c's socket. It does not fail the test itself,
// so a server's handler may call it too.
func rcvBuf(c *Conn) (int, error) {
	sc, ok := c.raw.(syscall.Conn)
	if !ok {
		return 0, fmt.Errorf("%T has no socket", c.raw)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, err
	}
	v := 0
	var serr error
	if err := rc.Control(func(fd uintptr) { v, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF) }); err != nil || serr != nil {
		return 0, fmt.Errorf("SO_RCVBUF: %v, %v", err, serr)
	}
	return v, nil
}

// TestPooledReceiveBuffer: a pooled connection, fresh or left by a
// finished flow, that waited longer than pooledWarm has its receive
// buffer set on both ends when the next flow takes it (the kernel's
// autotuning would keep it small, see servePooled); one taken at once is
// left to the autotuning.
func TestPooledReceiveBuffer(t *testing.T) {
	want := 2 * min(tcpRmemMax()/2, pooledRcvBuf) // the kernel doubles it
	if want <= 0 {
		cannotRun(t, "net.ipv4.tcp_rmem unreadable")
	}
	tests := []struct {
		name   string
		wait   time.Duration
		reused bool // the connection carried a flow before
		pinned bool
	}{
		{name: "taken at once", wait: 0, pinned: false},
		{name: "waited", wait: pooledWarm + 200*time.Millisecond, pinned: true},
		{name: "reused after a wait", wait: pooledWarm + 200*time.Millisecond, reused: true, pinned: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srvBuf := make(chan int, 2)
			handle := func(ctx context.Context, f *Flow) {
				c, err := f.Accept()
				if err != nil {
					return
				}
				v, err := rcvBuf(c)
				if err != nil {
					t.Error(err)
				}
				srvBuf <- v
				defer c.Close()
				io.Copy(c, c)
				c.CloseWrite()
				io.Copy(io.Discard, c)
			}
			p := onePooled(t, ServerConfig{}, ClientConfig{}, handle)
			if tt.reused {
				if err := echoOnce(t, p.cli); err != nil {
					t.Fatal(err)
				}
				<-srvBuf
				waitFor(t, "the connection put back", func() bool { return p.cli.Stats().Pooled == 1 })
			}
			time.Sleep(tt.wait)
			fc, err := p.cli.DialTCP(context.Background(), testDst)
			if err != nil {
				t.Fatal(err)
			}
			defer fc.Close()
			cli, err := rcvBuf(fc)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := fc.Write([]byte("ping")); err != nil {
				t.Fatal(err)
			}
			fc.CloseWrite()
			if b, err := io.ReadAll(fc); err != nil || string(b) != "ping" {
				t.Fatalf("echo: %q, %v", b, err)
			}
			srv := <-srvBuf
			if st := p.cli.Stats(); st.PoolHits < 1 || (tt.reused && st.PoolReused < 1) {
				t.Fatalf("the flow did not take the pooled connection: %+v", st)
			}
			if (cli == want) != tt.pinned || (srv == want) != tt.pinned {
				t.Errorf("SO_RCVBUF client %d, server %d; set to %d: %v, want %v", cli, srv, want, cli == want && srv == want, tt.pinned)
			}
		})
	}
}
