//go:build linux

package tunnel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

// plainTCPListener is a listener that refuses MPTCP, to force a fallback.
func plainTCPListener(t testing.TB) net.Listener {
	t.Helper()
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// TestDialTCP: a full handshake over loopback, data both ways at once,
// and a half-close in each direction, in both orders; over MPTCP and
// over a plain TCP listener, which the client must notice and count.
func TestDialTCP(t *testing.T) {
	for _, tt := range []struct {
		name        string
		listen      func(testing.TB) net.Listener
		mptcp       bool
		serverFirst bool
	}{
		{"MPTCP/client closes first", func(t testing.TB) net.Listener { return listenMPTCP(t, false) }, true, false},
		{"MPTCP/server closes first", func(t testing.TB) net.Listener { return listenMPTCP(t, false) }, true, true},
		{"plain TCP fallback", plainTCPListener, false, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			requireMPTCP(t)
			ln := tt.listen(t)
			up, down := randBytes(t, 2<<20+3), randBytes(t, 1<<20+5)
			type result struct {
				flow *Flow
				got  []byte
				err  error
			}
			res := make(chan result, 1)
			p := newPair(t, ServerConfig{Logger: testLogger(t)}, ClientConfig{Server: lnAddr(ln), Logger: testLogger(t)})
			serve(t, p.srv, ln, func(_ context.Context, f *Flow) {
				c, err := f.Accept()
				if err != nil {
					res <- result{err: err}
					return
				}
				defer c.Close()
				if tt.serverFirst {
					c.Write(down)
					c.CloseWrite()
					got, err := io.ReadAll(c)
					res <- result{f, got, err}
					return
				}
				var wg sync.WaitGroup
				wg.Add(1)
				go func() { defer wg.Done(); c.Write(down); c.CloseWrite() }()
				got, err := io.ReadAll(c)
				wg.Wait()
				res <- result{f, got, err}
			})

			c, err := p.cli.DialTCP(context.Background(), testDst)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if c.MultipathTCP() != tt.mptcp {
				t.Errorf("MultipathTCP() = %v, want %v", c.MultipathTCP(), tt.mptcp)
			}
			var gotDown []byte
			var downErr error
			if tt.serverFirst {
				gotDown, downErr = io.ReadAll(c) // the server's EOF comes first
				c.Write(up)
				c.CloseWrite()
			} else {
				var wg sync.WaitGroup
				wg.Add(1)
				go func() { defer wg.Done(); gotDown, downErr = io.ReadAll(c) }()
				c.Write(up)
				c.CloseWrite()
				wg.Wait()
			}
			r := <-res
			if r.err != nil || !bytes.Equal(r.got, up) {
				t.Fatalf("server got %d bytes, %v; want %d", len(r.got), r.err, len(up))
			}
			if downErr != nil || !bytes.Equal(gotDown, down) {
				t.Fatalf("client got %d bytes, %v; want %d", len(gotDown), downErr, len(down))
			}
			if r.flow.Peer != p.clientKey.Public() || r.flow.Dst != testDst || !r.flow.Remote.Addr().IsLoopback() {
				t.Errorf("flow = %+v", r.flow)
			}
			if r.flow.MultipathTCP != tt.mptcp {
				t.Errorf("Flow.MultipathTCP = %v, want %v", r.flow.MultipathTCP, tt.mptcp)
			}
			cs := p.cli.Stats()
			wantFallbacks := uint64(0)
			if !tt.mptcp {
				wantFallbacks = 1
			}
			if cs.Dials != 1 || cs.Connected != 1 || cs.Fallbacks != wantFallbacks || cs.Active != 1 {
				t.Errorf("client stats %+v", cs)
			}
			var bySrc uint64
			for _, n := range cs.FallbacksBySource {
				bySrc += n
			}
			if bySrc != wantFallbacks || (!tt.mptcp && cs.FallbacksBySource[netip.MustParseAddr("127.0.0.1")] != 1) {
				t.Errorf("fallbacks by source %v, want %d from 127.0.0.1", cs.FallbacksBySource, wantFallbacks)
			}
			if got := p.cli.Conns(); len(got) != 1 || got[0] != c {
				t.Errorf("Conns() = %v, want the one flow", got)
			}
			c.Close()
			if cs := p.cli.Stats(); cs.Active != 0 {
				t.Errorf("Active = %d after Close", cs.Active)
			}
			if got := p.cli.Conns(); len(got) != 0 {
				t.Errorf("Conns() after Close = %v", got)
			}
			if ss := p.srv.Stats(); ss.Flows != 1 || ss.Fallbacks != wantFallbacks {
				t.Errorf("server stats %+v", ss)
			}
			if ps := p.srv.PeerStats(); len(ps) != 1 || ps[0].Key != p.clientKey.Public() || ps[0].Total != 1 || ps[0].LastSeen.IsZero() {
				t.Errorf("peer stats %+v", ps)
			}
		})
	}
}

// TestVerdicts: every refusal reaches the client as a *VerdictError that
// is the right errno.
func TestVerdicts(t *testing.T) {
	ln := listenMPTCP(t, false)
	p := newPair(t, ServerConfig{}, ClientConfig{Server: lnAddr(ln)})
	var refuseErr atomic.Value
	serve(t, p.srv, ln, func(_ context.Context, f *Flow) {
		switch v := Verdict(f.Dst.Port()); v {
		case 100: // no decision at all
			return
		case 101:
			if err := f.Refuse(Connected); err == nil {
				refuseErr.Store("Refuse(Connected) accepted")
			}
			f.Refuse(Refused)
			if err := f.Refuse(Refused); err == nil {
				refuseErr.Store("second Refuse accepted")
			}
			if _, err := f.Accept(); err == nil {
				refuseErr.Store("Accept after Refuse accepted")
			}
		default:
			f.Refuse(v)
		}
	})
	for _, tt := range []struct {
		port  uint16
		want  Verdict
		errno syscall.Errno
	}{
		{uint16(Refused), Refused, syscall.ECONNREFUSED},
		{uint16(Unreachable), Unreachable, syscall.EHOSTUNREACH},
		{uint16(TimedOut), TimedOut, syscall.ETIMEDOUT},
		{uint16(NotAllowed), NotAllowed, syscall.EACCES},
		{uint16(Limited), Limited, syscall.EAGAIN},
		{100, Unreachable, syscall.EHOSTUNREACH},
		{101, Refused, syscall.ECONNREFUSED},
	} {
		dst := netip.AddrPortFrom(testDst.Addr(), tt.port)
		_, err := p.cli.DialTCP(context.Background(), dst)
		ve, ok := errors.AsType[*VerdictError](err)
		if !ok || ve.Verdict != tt.want || ve.Dst != dst {
			t.Errorf("port %d: err = %v, want VerdictError %s", tt.port, err, tt.want)
			continue
		}
		if !errors.Is(err, tt.errno) {
			t.Errorf("port %d: %v is not %v", tt.port, err, tt.errno)
		}
	}
	if s, _ := refuseErr.Load().(string); s != "" {
		t.Error(s)
	}
	if cs := p.cli.Stats(); cs.Rejected != 7 || cs.Failures != 0 || cs.Connected != 0 {
		t.Errorf("client stats %+v", cs)
	}
}

// TestDialService: a service request reaches the server as a Flow with
// Service set and no destination, carries bytes both ways once accepted,
// and a refusal comes back as a VerdictError naming the service.
func TestDialService(t *testing.T) {
	requireMPTCP(t)
	ln := listenMPTCP(t, false)
	p := newPair(t, ServerConfig{Logger: testLogger(t)}, ClientConfig{Server: lnAddr(ln), Logger: testLogger(t)})
	type seen struct {
		peer    PublicKey
		dst     netip.AddrPort
		service Service
	}
	flows := make(chan seen, 2)
	refuse := atomic.Bool{}
	serve(t, p.srv, ln, func(_ context.Context, f *Flow) {
		flows <- seen{f.Peer, f.Dst, f.Service}
		if refuse.Load() {
			f.Refuse(NotAllowed)
			return
		}
		c, err := f.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	})
	c, err := p.cli.DialService(context.Background(), ServiceResolver)
	if err != nil {
		t.Fatal(err)
	}
	if f := <-flows; f.service != ServiceResolver || f.dst.IsValid() || f.peer != p.clientKey.Public() {
		t.Errorf("server saw %+v, want the resolver service and no destination", f)
	}
	msg := []byte("\x00\x05hello")
	c.Write(msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo: %q, %v", got, err)
	}
	c.Close()

	refuse.Store(true)
	_, err = p.cli.DialService(context.Background(), ServiceResolver)
	ve, ok := errors.AsType[*VerdictError](err)
	if !ok || ve.Service != ServiceResolver || ve.Verdict != NotAllowed || !errors.Is(err, syscall.EACCES) {
		t.Fatalf("refused service: %v", err)
	}
	if !strings.Contains(err.Error(), "resolver") {
		t.Errorf("error %q does not name the service", err)
	}
	<-flows
	if _, err := p.cli.DialService(context.Background(), Service(3)); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("unknown service: %v, want EINVAL", err)
	}
}

type probe struct {
	name  string
	send  func(c net.Conn) // writes the probe; errors are ignored
	after time.Duration    // for slow probes: keep sending this long
}

func garbage(n int) func(net.Conn) {
	return func(c net.Conn) {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(i*7 + 3)
		}
		c.Write(b)
	}
}

// TestProbesGetSilence: whatever a peer that cannot authenticate sends,
// it gets not one byte back and the connection closes at the handshake
// deadline, not before, the same way every time.
func TestProbesGetSilence(t *testing.T) {
	const deadline = time.Second
	ln := listenMPTCP(t, false)
	p := newPair(t, ServerConfig{HandshakeDeadline: deadline}, ClientConfig{Server: lnAddr(ln)})
	var handled atomic.Int64
	serve(t, p.srv, ln, func(_ context.Context, f *Flow) { handled.Add(1); f.Refuse(Refused) })

	_, valid, err := p.cli.msg1(testDst)
	if err != nil {
		t.Fatal(err)
	}
	strangerKey := mustKey(t)
	stranger, err := NewClient(ClientConfig{Server: lnAddr(ln), Key: strangerKey, ServerKey: p.serverKey.Public()})
	if err != nil {
		t.Fatal(err)
	}
	_, fromStranger, err := stranger.msg1(testDst)
	if err != nil {
		t.Fatal(err)
	}
	goodMAC := append([]byte(nil), valid...)
	goodMAC[40] ^= 1 // Noise fails, mac1 recomputed to pass
	m := mac1(&p.srv.mac1, goodMAC[:msg1NoiseSize])
	copy(goodMAC[msg1NoiseSize:], m[:])

	// The byte-at-a-time writer may be the one to meet the reset: the
	// kernel reports a socket's error once, to whichever call comes
	// first, and the reader then sees a plain end of stream.
	var byteErr atomic.Value
	probes := []probe{
		{name: "nothing", send: func(net.Conn) {}},
		{name: "nothing, then FIN", send: func(c net.Conn) { c.(*net.TCPConn).CloseWrite() }},
	}
	for _, n := range []int{1, 49, 50, 51, msg1Size - 1, msg1Size, msg1Size + 1, 4096, 65536} {
		probes = append(probes, probe{name: fmt.Sprintf("%d bytes", n), send: garbage(n)})
	}
	probes = append(probes,
		probe{name: "msg1 size, then FIN", send: func(c net.Conn) { garbage(msg1Size)(c); c.(*net.TCPConn).CloseWrite() }},
		probe{name: "byte at a time", send: func(c net.Conn) {
			for i := 0; i < 200; i++ {
				if _, err := c.Write([]byte{byte(i)}); err != nil {
					byteErr.Store(err)
					return
				}
				time.Sleep(10 * time.Millisecond)
			}
		}},
		probe{name: "valid mac1, bad handshake", send: func(c net.Conn) { c.Write(goodMAC) }},
		probe{name: "msg1 from an unknown client key", send: func(c net.Conn) { c.Write(fromStranger) }},
		probe{name: "msg1 from an unknown key, then more", send: func(c net.Conn) { c.Write(append(fromStranger, make([]byte, 1000)...)) }},
	)

	// All probes at once (t.Parallel would run only GOMAXPROCS at a
	// time), then one subtest each for the verdict.
	type outcome struct {
		n       int64
		err     error
		elapsed time.Duration
	}
	outcomes := make([]outcome, len(probes))
	var wg sync.WaitGroup
	for i, pr := range probes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				outcomes[i] = outcome{err: err}
				return
			}
			defer c.Close()
			go pr.send(c)
			n, err := io.Copy(io.Discard, c)
			outcomes[i] = outcome{n, err, time.Since(start)}
		}()
	}
	wg.Wait()
	closeTimes := map[string]time.Duration{}
	for i, pr := range probes {
		o := outcomes[i]
		closeTimes[pr.name] = o.elapsed
		t.Run(pr.name, func(t *testing.T) {
			if o.n != 0 {
				t.Errorf("got %d bytes back, want 0", o.n)
			}
			reset := errors.Is(o.err, syscall.ECONNRESET)
			if werr, _ := byteErr.Load().(error); pr.name == "byte at a time" && o.err == nil && (errors.Is(werr, syscall.ECONNRESET) || errors.Is(werr, syscall.EPIPE)) {
				reset = true
			}
			if !reset {
				t.Errorf("closed with %v, want a reset (as every rejected connection)", o.err)
			}
			if o.elapsed < deadline {
				t.Errorf("closed after %v, before the %v deadline", o.elapsed, deadline)
			}
			if o.elapsed > deadline+3*time.Second {
				t.Errorf("closed after %v, long after the %v deadline", o.elapsed, deadline)
			}
		})
	}
	lo, hi := time.Hour, time.Duration(0)
	for _, d := range closeTimes {
		lo, hi = min(lo, d), max(hi, d)
	}
	t.Logf("close times %v … %v (spread %v) over %d probes", lo, hi, hi-lo, len(closeTimes))
	if n := handled.Load(); n != 0 {
		t.Fatalf("handler called %d times for probes", n)
	}
	s := p.srv.Stats()
	if s.UnknownPeer != 2 || s.BadHandshake != 1 || s.Flows != 0 {
		t.Errorf("server stats %+v", s)
	}
}

// TestUnknownClientKey: a real client whose key the server does not list
// gets ErrHandshake after the server's deadline and no handler runs.
func TestUnknownClientKey(t *testing.T) {
	const deadline = 500 * time.Millisecond
	ln := listenMPTCP(t, false)
	p := newPair(t, ServerConfig{HandshakeDeadline: deadline}, ClientConfig{Server: lnAddr(ln), Key: mustKey(t)})
	var handled atomic.Int64
	serve(t, p.srv, ln, func(_ context.Context, f *Flow) { handled.Add(1); f.Refuse(Refused) })
	start := time.Now()
	_, err := p.cli.DialTCP(context.Background(), testDst)
	elapsed := time.Since(start)
	if !errors.Is(err, ErrHandshake) {
		t.Fatalf("err = %v, want ErrHandshake", err)
	}
	t.Logf("after %v: %v", elapsed, err)
	if elapsed < deadline {
		t.Errorf("failed after %v, before the server's deadline", elapsed)
	}
	if handled.Load() != 0 || p.srv.Stats().UnknownPeer != 1 || p.cli.Stats().Failures != 1 {
		t.Errorf("handled %d, server %+v, client %+v", handled.Load(), p.srv.Stats(), p.cli.Stats())
	}
}

// TestWrongServerKey: a client with the wrong server key fails with a
// clear error, whether the server closes at its deadline or stays silent
// past the client's HandshakeTimeout.
func TestWrongServerKey(t *testing.T) {
	t.Run("server closes at its deadline", func(t *testing.T) {
		const deadline = 500 * time.Millisecond
		ln := listenMPTCP(t, false)
		p := newPair(t, ServerConfig{HandshakeDeadline: deadline}, ClientConfig{Server: lnAddr(ln), ServerKey: mustKey(t).Public()})
		serve(t, p.srv, ln, func(_ context.Context, f *Flow) { t.Error("handler called"); f.Refuse(Refused) })
		start := time.Now()
		_, err := p.cli.DialTCP(context.Background(), testDst)
		elapsed := time.Since(start)
		if !errors.Is(err, ErrHandshake) || !strings.Contains(err.Error(), "ServerKey") {
			t.Fatalf("err = %v, want ErrHandshake naming ServerKey", err)
		}
		t.Logf("after %v: %v", elapsed, err)
		if elapsed > deadline+3*time.Second {
			t.Errorf("took %v", elapsed)
		}
		if s := p.srv.Stats(); s.BadMAC != 1 {
			t.Errorf("server stats %+v, want one bad mac1", s)
		}
	})
	t.Run("server silent", func(t *testing.T) {
		const timeout = 500 * time.Millisecond
		ln := listenMPTCP(t, false)
		held := make(chan net.Conn, 1)
		go func() {
			c, err := ln.Accept()
			if err == nil {
				held <- c
			}
		}()
		defer func() {
			select {
			case c := <-held:
				c.Close()
			default:
			}
		}()
		p := newPair(t, ServerConfig{}, ClientConfig{Server: lnAddr(ln), ServerKey: mustKey(t).Public(), HandshakeTimeout: timeout})
		start := time.Now()
		_, err := p.cli.DialTCP(context.Background(), testDst)
		elapsed := time.Since(start)
		if !errors.Is(err, ErrHandshake) || !errors.Is(err, syscall.ETIMEDOUT) {
			t.Fatalf("err = %v, want ErrHandshake and ETIMEDOUT", err)
		}
		t.Logf("after %v: %v", elapsed, err)
		if elapsed < timeout || elapsed > timeout+2*time.Second {
			t.Errorf("failed after %v, want about %v", elapsed, timeout)
		}
	})
}

// TestConcentratorDown: nothing listens; the error is the connect error,
// ECONNREFUSED (Go's MPTCP dial retried with plain TCP and got the same).
func TestConcentratorDown(t *testing.T) {
	requireMPTCP(t)
	ln := plainTCPListener(t)
	addr := lnAddr(ln)
	ln.Close()
	p := newPair(t, ServerConfig{}, ClientConfig{Server: addr})
	start := time.Now()
	_, err := p.cli.DialTCP(context.Background(), testDst)
	if !errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, ErrHandshake) {
		t.Fatalf("err = %v, want ECONNREFUSED", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("took %v", d)
	}
	if s := p.cli.Stats(); s.Failures != 1 {
		t.Errorf("client stats %+v", s)
	}
}

// TestDialCancel: the caller's context ends the wait for a verdict.
func TestDialCancel(t *testing.T) {
	ln := listenMPTCP(t, false)
	p := newPair(t, ServerConfig{}, ClientConfig{Server: lnAddr(ln)})
	serve(t, p.srv, ln, func(ctx context.Context, f *Flow) {
		<-ctx.Done() // decides only at shutdown
	})
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := p.cli.DialTCP(ctx, testDst)
	if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrHandshake) {
		t.Fatalf("err = %v, want the caller's deadline", err)
	}
}

// TestReplayOverNetwork: the same msg1 on new connections gets silence;
// only the first reaches the handler.
func TestReplayOverNetwork(t *testing.T) {
	const deadline = 400 * time.Millisecond
	ln := listenMPTCP(t, false)
	p := newPair(t, ServerConfig{HandshakeDeadline: deadline, MaxHalfOpenPerAddr: 1000, MaxHalfOpen: 1000}, ClientConfig{Server: lnAddr(ln)})
	var handled atomic.Int64
	serve(t, p.srv, ln, func(_ context.Context, f *Flow) { handled.Add(1); f.Refuse(Refused) })
	_, m1, err := p.cli.msg1(testDst)
	if err != nil {
		t.Fatal(err)
	}
	send := func() (int64, error) {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			return 0, err
		}
		defer c.Close()
		c.Write(m1)
		return io.Copy(io.Discard, c)
	}
	if n, _ := send(); n != msg2Size {
		t.Fatalf("original msg1: %d bytes back, want msg2 (%d)", n, msg2Size)
	}
	var wg sync.WaitGroup
	var back atomic.Int64
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, _ := send()
			back.Add(n)
		}()
	}
	wg.Wait()
	if handled.Load() != 1 || back.Load() != 0 {
		t.Fatalf("handler called %d times, %d bytes answered to replays", handled.Load(), back.Load())
	}
	if s := p.srv.Stats(); s.Replayed != 50 {
		t.Errorf("server stats %+v", s)
	}
}

// TestReplayMany: 10 000 replays of one msg1 (over in-memory pipes, many
// at once) reach the handler exactly once between them, the original.
func TestReplayMany(t *testing.T) {
	const replays = 10000
	ln := newPipeListener()
	p := newPair(t, ServerConfig{HandshakeDeadline: 10 * time.Second, MaxHalfOpen: 2 * replays, MaxHalfOpenPerAddr: 2 * replays}, ClientConfig{})
	var handled atomic.Int64
	serve(t, p.srv, ln, func(_ context.Context, f *Flow) { handled.Add(1); f.Refuse(Refused) })
	_, m1, err := p.cli.msg1(testDst)
	if err != nil {
		t.Fatal(err)
	}
	send := func() (net.Conn, error) {
		c, err := ln.Dial()
		if err != nil {
			return nil, err
		}
		// net.Pipe is synchronous: when Write returns, the server has
		// read all of msg1.
		if _, err := c.Write(m1); err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	}
	c, err := send()
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := io.Copy(io.Discard, c); n != msg2Size {
		t.Fatalf("original msg1: %d bytes back, want msg2", n)
	}
	c.Close()

	var wg sync.WaitGroup
	var failed atomic.Int64
	sem := make(chan struct{}, 1000)
	for range replays {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := send()
			if err != nil {
				failed.Add(1)
				return
			}
			// Hang up at once; the server stays silent until its
			// deadline (or the end of the test) either way.
			c.Close()
		}()
	}
	wg.Wait()
	if failed.Load() != 0 {
		t.Fatalf("%d replays could not be sent", failed.Load())
	}
	waitFor(t, "all replays judged", func() bool { return p.srv.Stats().Replayed == replays })
	if handled.Load() != 1 {
		t.Fatalf("handler called %d times for one msg1 and %d replays, want 1", handled.Load(), replays)
	}
}

// waitFor polls cond until it holds or the test times out.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// holdOpen dials from src and returns the connection, silent.
func holdOpen(t testing.TB, ln net.Listener, src string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
	c, err := d.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// closedWithin reports whether the server closed c within d.
func closedWithin(c net.Conn, d time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(d))
	_, err := c.Read(make([]byte, 1))
	return !errors.Is(err, os.ErrDeadlineExceeded)
}

// TestHalfOpenEviction: a newcomer is never refused. Over MaxHalfOpen,
// or over MaxHalfOpenPerAddr from one address, the oldest unauthenticated
// connection (of all, or of that address) is closed at once instead, and
// a real client still gets through a table full of silent connections.
func TestHalfOpenEviction(t *testing.T) {
	const deadline = 3 * time.Second
	t.Run("global", func(t *testing.T) {
		ln := listenMPTCP(t, false)
		p := newPair(t, ServerConfig{HandshakeDeadline: deadline, MaxHalfOpen: 2, MaxHalfOpenPerAddr: 2, MaxHalfOpenPerSite: 2}, ClientConfig{Server: lnAddr(ln)})
		serve(t, p.srv, ln, echoAccept)
		first := holdOpen(t, ln, "127.0.0.1")
		waitFor(t, "1 half-open", func() bool { return p.srv.Stats().HalfOpen == 1 })
		second := holdOpen(t, ln, "127.0.0.2")
		waitFor(t, "2 half-open", func() bool { return p.srv.Stats().HalfOpen == 2 })
		third := holdOpen(t, ln, "127.0.0.3")
		if !closedWithin(first, time.Second) {
			t.Fatal("the oldest connection was not evicted when a third arrived at MaxHalfOpen=2")
		}
		if closedWithin(second, 200*time.Millisecond) || closedWithin(third, 200*time.Millisecond) {
			t.Fatal("a younger connection was closed")
		}
		// A real client evicts the oldest too, and gets its flow.
		c, err := p.cli.DialTCP(context.Background(), testDst)
		if err != nil {
			t.Fatalf("a real client with the table full of silent connections: %v", err)
		}
		c.Close()
		if !closedWithin(second, time.Second) {
			t.Fatal("the real client's connection did not evict the oldest")
		}
		if s := p.srv.Stats(); s.Evicted != 2 || s.Flows != 1 {
			t.Errorf("Evicted = %d, Flows = %d; want 2, 1", s.Evicted, s.Flows)
		}
	})
	t.Run("per address", func(t *testing.T) {
		ln := listenMPTCP(t, false)
		// Under load at two of four: the share of one per address counts.
		p := newPair(t, ServerConfig{HandshakeDeadline: deadline, MaxHalfOpen: 4, MaxHalfOpenPerAddr: 1, MaxHalfOpenPerSite: 1}, ClientConfig{})
		serve(t, p.srv, ln, echoAccept)
		first := holdOpen(t, ln, "127.0.0.1")
		opened := time.Now()
		waitFor(t, "1 half-open", func() bool { return p.srv.Stats().HalfOpen == 1 })
		other := holdOpen(t, ln, "127.0.0.2")
		waitFor(t, "2 half-open", func() bool { return p.srv.Stats().HalfOpen == 2 })
		second := holdOpen(t, ln, "127.0.0.1")
		if !closedWithin(first, time.Second) {
			t.Fatal("the older connection from 127.0.0.1 was not evicted")
		}
		if closedWithin(other, 200*time.Millisecond) {
			t.Fatal("a connection from another address was evicted")
		}
		// The survivors are closed at their deadline, not before.
		second.SetReadDeadline(time.Now().Add(deadline + 2*time.Second))
		io.Copy(io.Discard, second)
		if time.Since(opened) < deadline {
			t.Fatal("a surviving connection closed before its deadline")
		}
		waitFor(t, "slots released", func() bool { return p.srv.Stats().HalfOpen == 0 })
		if s := p.srv.Stats(); s.Evicted != 1 || s.Incomplete != 2 {
			t.Errorf("Evicted = %d, Incomplete = %d; want 1, 2", s.Evicted, s.Incomplete)
		}
	})
}

// TestHalfOpenShares: the table's bookkeeping, by address: IPv4 per
// address, IPv6 per /64 and per /48, oldest first, and never an entry
// whose msg1 is being checked.
func TestHalfOpenShares(t *testing.T) {
	type step struct {
		src     string
		checked bool        // mark the new entry as being checked
		ready   func() bool // its first message is queued
		evicted []int       // indices of earlier steps evicted by this one
	}
	yes := func() bool { return true }
	tests := []struct {
		name                  string
		max, perAddr, perSite int
		steps                 []step
	}{
		{"IPv4 per address", 4, 2, 4, []step{
			{src: "192.0.2.1"}, {src: "192.0.2.1"}, {src: "192.0.2.2"},
			{src: "192.0.2.1", evicted: []int{0}}, {src: "192.0.2.1", evicted: []int{1}},
		}},
		{"IPv6 per /64", 4, 2, 4, []step{
			{src: "2001:db8:1:1::1"}, {src: "2001:db8:1:1::2"}, {src: "2001:db8:1:2::1"},
			{src: "2001:db8:1:1:ffff::9", evicted: []int{0}},
		}},
		{"IPv6 per /48", 6, 5, 3, []step{
			{src: "2001:db8:1:1::1"}, {src: "2001:db8:1:2::1"}, {src: "2001:db8:2::1"}, {src: "2001:db8:1:3::1"},
			{src: "2001:db8:1:4::1", evicted: []int{0}}, {src: "2001:db8:2::2"},
		}},
		{"global, oldest first", 3, 3, 3, []step{
			{src: "192.0.2.1"}, {src: "192.0.2.2"}, {src: "192.0.2.3"},
			{src: "192.0.2.4", evicted: []int{0}}, {src: "192.0.2.5", evicted: []int{1}},
		}},
		{"an entry being checked is not evicted", 2, 2, 2, []step{
			{src: "192.0.2.1", checked: true}, {src: "192.0.2.2"},
			{src: "192.0.2.3", evicted: []int{1}}, {src: "192.0.2.4", evicted: []int{2}},
		}},
		{"IPv4-mapped is IPv4", 2, 1, 2, []step{
			{src: "192.0.2.1"}, {src: "::ffff:192.0.2.1", evicted: []int{0}},
		}},
		{"a ready entry is passed over", 4, 2, 4, []step{
			{src: "192.0.2.1", ready: yes}, {src: "192.0.2.1"},
			{src: "192.0.2.1", evicted: []int{1}}, {src: "192.0.2.1", ready: yes, evicted: []int{2}},
			// Only ready ones left: over the share, for now.
			{src: "192.0.2.1", ready: yes}, {src: "192.0.2.1"},
		}},
		{"shares only under load", 10, 1, 10, []step{
			{src: "192.0.2.1"}, {src: "192.0.2.1"}, {src: "192.0.2.1"}, {src: "192.0.2.1"}, {src: "192.0.2.1"},
			// Half full: now the share counts, and it is 5 over.
			{src: "192.0.2.1", evicted: []int{0, 1, 2, 3, 4}},
		}},
		{"never over twice the table", 2, 2, 2, []step{
			{src: "192.0.2.1", ready: yes}, {src: "192.0.2.2", ready: yes}, {src: "192.0.2.3", ready: yes},
			{src: "192.0.2.4", ready: yes}, {src: "192.0.2.5", ready: yes, evicted: []int{0}},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHalfOpen(tt.max, tt.perAddr, tt.perSite)
			evicted := map[int]bool{} // by the evict callbacks
			live := 0
			for i, st := range tt.steps {
				before := len(evicted)
				e, n := h.admit(netip.MustParseAddr(st.src), func() { evicted[i] = true }, st.ready)
				if st.checked && !h.check(e) {
					t.Fatalf("step %d: check of a fresh entry failed", i)
				}
				if n != len(st.evicted) || len(evicted)-before != n {
					t.Errorf("step %d (%s): %d evictions (%d callbacks), want %d", i, st.src, n, len(evicted)-before, len(st.evicted))
				}
				for _, j := range st.evicted {
					if !evicted[j] {
						t.Errorf("step %d (%s): entry %d not evicted; evicted so far: %v", i, st.src, j, evicted)
					}
				}
				live += 1 - n
				if h.len() != live {
					t.Errorf("step %d: %d entries, want %d", i, h.len(), live)
				}
			}
		})
	}
}

// TestMaxFlowsPerPeer: over the limit the verdict is Limited (EAGAIN);
// closing a flow frees its slot.
func TestMaxFlowsPerPeer(t *testing.T) {
	ln := listenMPTCP(t, false)
	p := newPair(t, ServerConfig{MaxFlowsPerPeer: 2}, ClientConfig{Server: lnAddr(ln)})
	var handled atomic.Int64
	serve(t, p.srv, ln, func(ctx context.Context, f *Flow) { handled.Add(1); echoAccept(ctx, f) })
	var conns []*Conn
	for range 2 {
		c, err := p.cli.DialTCP(context.Background(), testDst)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	_, err := p.cli.DialTCP(context.Background(), testDst)
	if ve, ok := errors.AsType[*VerdictError](err); !ok || ve.Verdict != Limited || !errors.Is(err, syscall.EAGAIN) {
		t.Fatalf("third flow: %v, want Limited/EAGAIN", err)
	}
	if handled.Load() != 2 {
		t.Fatalf("handler called %d times, want 2 (not for the limited flow)", handled.Load())
	}
	conns[0].Close()
	waitFor(t, "slot freed", func() bool { return p.srv.Stats().Active == 1 })
	c, err := p.cli.DialTCP(context.Background(), testDst)
	if err != nil {
		t.Fatalf("after a close: %v", err)
	}
	c.Close()
	if s := p.srv.Stats(); s.Limited != 1 {
		t.Errorf("server stats %+v", s)
	}
}

// TestServeShutdown: cancelling Serve ends half-open connections and
// flows at once (not at the handshake deadline) and leaves no goroutine.
func TestServeShutdown(t *testing.T) {
	defer goleak.VerifyNone(t)
	ln := listenMPTCP(t, false)
	p := newPair(t, ServerConfig{HandshakeDeadline: time.Minute}, ClientConfig{Server: lnAddr(ln)})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.srv.Serve(ctx, ln, echoAccept) }()

	idle, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	flow, err := p.cli.DialTCP(context.Background(), testDst)
	if err != nil {
		t.Fatal(err)
	}
	defer flow.Close()
	waitFor(t, "half-open", func() bool { return p.srv.Stats().HalfOpen == 1 })

	start := time.Now()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("shutdown took %v", d)
	}
	if _, err := flow.Read(make([]byte, 1)); err == nil || err == io.EOF {
		t.Errorf("flow read after shutdown: %v, want a truncation", err)
	}
}

// TestServeListenerClosed: closing the listener ends Serve with an error.
func TestServeListenerClosed(t *testing.T) {
	ln := listenMPTCP(t, false)
	p := newPair(t, ServerConfig{}, ClientConfig{})
	done := make(chan error, 1)
	go func() { done <- p.srv.Serve(context.Background(), ln, echoAccept) }()
	time.Sleep(20 * time.Millisecond)
	ln.Close()
	if err := <-done; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Serve = %v, want net.ErrClosed", err)
	}
}

// AbortAll resets every open flow: the concentrator's side reads a reset
// (not a clean end), and the client has no flows left.
func TestAbortAll(t *testing.T) {
	requireMPTCP(t)
	ln := listenMPTCP(t, false)
	p := newPair(t, ServerConfig{Logger: testLogger(t)}, ClientConfig{Server: lnAddr(ln), Logger: testLogger(t)})
	errs := make(chan error, 3)
	serve(t, p.srv, ln, func(_ context.Context, f *Flow) {
		c, err := f.Accept()
		if err != nil {
			errs <- err
			return
		}
		defer c.Close()
		_, err = io.ReadAll(c)
		errs <- err
	})
	for range 3 {
		c, err := p.cli.DialTCP(context.Background(), testDst)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	if n := p.cli.AbortAll(); n != 3 {
		t.Fatalf("AbortAll = %d, want 3", n)
	}
	for range 3 {
		select {
		case err := <-errs:
			if err == nil {
				t.Error("the concentrator saw a clean end, want a reset")
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the concentrator never saw the flows end")
		}
	}
	if cs := p.cli.Stats(); cs.Active != 0 || len(p.cli.Conns()) != 0 {
		t.Errorf("after AbortAll: %+v, %d conns", cs, len(p.cli.Conns()))
	}
}

// Both ends bound their unsent queue (TCP_NOTSENT_LOWAT), so data re-sent
// after a subflow dies does not wait behind megabytes of it.
func TestNotSentLowat(t *testing.T) {
	requireMPTCP(t)
	ln := listenMPTCP(t, false)
	p := newPair(t, ServerConfig{Logger: testLogger(t)}, ClientConfig{Server: lnAddr(ln), Logger: testLogger(t)})
	got := make(chan int, 1)
	serve(t, p.srv, ln, func(_ context.Context, f *Flow) {
		c, err := f.Accept()
		if err != nil {
			got <- -1
			return
		}
		defer c.Close()
		got <- lowat(t, c.TCP())
	})
	c, err := p.cli.DialTCP(context.Background(), testDst)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if v := lowat(t, c.TCP()); v != notSentLowat {
		t.Errorf("client TCP_NOTSENT_LOWAT = %d, want %d", v, notSentLowat)
	}
	if v := <-got; v != notSentLowat {
		t.Errorf("server TCP_NOTSENT_LOWAT = %d, want %d", v, notSentLowat)
	}
}

func lowat(t *testing.T, c *net.TCPConn) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var gerr error
	rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT) })
	if gerr != nil {
		t.Fatalf("getsockopt TCP_NOTSENT_LOWAT: %v", gerr)
	}
	return v
}
