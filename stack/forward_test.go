//go:build linux

package stack_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/mpvpn/mpvpn/stack"
	"github.com/mpvpn/mpvpn/tun/tuntest"
)

// dialFunc adapts a function to stack.Dialer.
type dialFunc func(ctx context.Context, src, dst netip.AddrPort) (net.Conn, error)

func (f dialFunc) DialTCP(ctx context.Context, src, dst netip.AddrPort) (net.Conn, error) {
	return f(ctx, src, dst)
}

// recorder wraps a dial function and records its calls.
type recorder struct {
	mu    sync.Mutex
	calls [][2]netip.AddrPort
	fn    dialFunc
	// called receives one value per call, if not nil (buffered).
	called chan struct{}
}

func (r *recorder) DialTCP(ctx context.Context, src, dst netip.AddrPort) (net.Conn, error) {
	r.mu.Lock()
	r.calls = append(r.calls, [2]netip.AddrPort{src, dst})
	r.mu.Unlock()
	if r.called != nil {
		r.called <- struct{}{}
	}
	return r.fn(ctx, src, dst)
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.calls)
}

// hang dials until the context is done.
func hang(ctx context.Context, _, _ netip.AddrPort) (net.Conn, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

// testLogger logs to t at debug level.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// newStack starts a Stack on a channel TUN. The cleanups close it and
// then check that no goroutine was left behind.
func newStack(t *testing.T, cfg stack.Config) (*stack.Stack, *tuntest.Channel) {
	t.Helper()
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
	dev := tuntest.NewChannel(1500, 8)
	cfg.Device = dev
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	s, err := stack.New(cfg)
	if err != nil {
		dev.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s, dev
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

var (
	app4  = netip.MustParseAddrPort("10.77.77.1:40000")
	dest4 = netip.MustParseAddrPort("198.51.100.7:443")
	app6  = netip.MustParseAddrPort("[fd00:77::1]:40000")
	dest6 = netip.MustParseAddrPort("[2001:db8::7]:443")
)

// TestDialFailure: whatever the dial error, the app's handshake is never
// completed; the error decides between a RST and an ICMP error, and the
// in-flight count returns to zero (Complete was called).
func TestDialFailure(t *testing.T) {
	const (
		rst      = "RST"
		icmpHost = "ICMP host unreachable"
		icmpNet  = "ICMP net unreachable"
	)
	tests := []struct {
		name        string
		src, dst    netip.AddrPort
		err         error
		timeout     time.Duration // DialTimeout; the dialer hangs if err is nil
		want        string
		wantRefused uint64
		wantFailed  uint64
	}{
		{name: "refused", src: app4, dst: dest4, err: fmt.Errorf("dial: %w", syscall.ECONNREFUSED), want: rst, wantRefused: 1},
		{name: "refused v6", src: app6, dst: dest6, err: fmt.Errorf("dial: %w", syscall.ECONNREFUSED), want: rst, wantRefused: 1},
		{name: "not allowed", src: app4, dst: dest4, err: fmt.Errorf("policy: %w", syscall.EACCES), want: rst, wantRefused: 1},
		{name: "over a limit", src: app4, dst: dest4, err: fmt.Errorf("limit: %w", syscall.EAGAIN), want: rst, wantRefused: 1},
		{name: "host unreachable", src: app4, dst: dest4, err: fmt.Errorf("dial: %w", syscall.EHOSTUNREACH), want: icmpHost, wantFailed: 1},
		{name: "host unreachable v6", src: app6, dst: dest6, err: fmt.Errorf("dial: %w", syscall.EHOSTUNREACH), want: icmpHost, wantFailed: 1},
		{name: "net unreachable", src: app4, dst: dest4, err: fmt.Errorf("dial: %w", syscall.ENETUNREACH), want: icmpNet, wantFailed: 1},
		{name: "net unreachable v6", src: app6, dst: dest6, err: fmt.Errorf("dial: %w", syscall.ENETUNREACH), want: icmpNet, wantFailed: 1},
		{name: "timed out", src: app4, dst: dest4, err: fmt.Errorf("dial: %w", syscall.ETIMEDOUT), want: icmpHost, wantFailed: 1},
		{name: "dial timeout", src: app4, dst: dest4, timeout: 50 * time.Millisecond, want: icmpHost, wantFailed: 1},
		{name: "other error", src: app4, dst: dest4, err: errors.New("tunnel handshake failed"), want: rst, wantFailed: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fn := hang
			if tt.err != nil {
				fn = func(context.Context, netip.AddrPort, netip.AddrPort) (net.Conn, error) { return nil, tt.err }
			}
			d := &recorder{fn: fn}
			s, dev := newStack(t, stack.Config{Dialer: d, DialTimeout: tt.timeout})

			const seq = 1000
			dev.ToStack <- tcpSeg{src: tt.src, dst: tt.dst, seq: seq, flags: header.TCPFlagSyn}.encode()
			p := next(t, dev.FromStack, 5*time.Second)
			switch tt.want {
			case rst:
				if p.tcp == nil || p.tcp.flags != header.TCPFlagRst|header.TCPFlagAck || p.tcp.ack != seq+1 ||
					p.tcp.src != tt.dst || p.tcp.dst != tt.src {
					t.Fatalf("got %v, want a RST|ACK %v→%v ack %d", p, tt.dst, tt.src, seq+1)
				}
			case icmpHost, icmpNet:
				code := map[bool]map[string]uint8{
					false: {icmpHost: uint8(header.ICMPv4HostUnreachable), icmpNet: uint8(header.ICMPv4NetUnreachable)},
					true:  {icmpHost: uint8(header.ICMPv6AddressUnreachable), icmpNet: uint8(header.ICMPv6NetworkUnreachable)},
				}[tt.src.Addr().Is6()][tt.want]
				e := p.icmp
				if e == nil || e.code != code || e.src != tt.dst.Addr() || e.dst != tt.src.Addr() ||
					e.quotedSrc != tt.src || e.quotedDst != tt.dst || e.quotedSeq != seq {
					t.Fatalf("got %v, want %s (code %d) from %v quoting %v→%v seq %d", p, tt.want, code, tt.dst.Addr(), tt.src, tt.dst, seq)
				}
			}
			none(t, dev.FromStack, 100*time.Millisecond) // and certainly no SYN-ACK
			waitFor(t, "in-flight count back to 0", func() bool { return s.Stats().InFlight == 0 })
			st := s.Stats()
			if st.Refused != tt.wantRefused || st.Failed != tt.wantFailed || st.Forwarded != 0 || st.Active != 0 {
				t.Errorf("stats %+v, want Refused %d Failed %d", st, tt.wantRefused, tt.wantFailed)
			}
			if d.count() != 1 || d.calls[0] != [2]netip.AddrPort{tt.src, tt.dst} {
				t.Errorf("dialer calls %v, want one (%v, %v)", d.calls, tt.src, tt.dst)
			}
		})
	}
}

// TestDialFirst: the SYN-ACK leaves only after the dialer returned, the
// SYN's retransmissions meanwhile start no second dial, and the flow is
// then relayed both ways.
func TestDialFirst(t *testing.T) {
	for _, fam := range []struct {
		name     string
		src, dst netip.AddrPort
	}{{"IPv4", app4, dest4}, {"IPv6", app6, dest6}} {
		t.Run(fam.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			release := make(chan struct{})
			d := &recorder{called: make(chan struct{}, 4), fn: func(ctx context.Context, _, _ netip.AddrPort) (net.Conn, error) {
				select {
				case <-release:
				case <-ctx.Done():
					return nil, ctx.Err()
				}
				return (&net.Dialer{}).DialContext(ctx, "tcp", ln.Addr().String())
			}}
			s, dev := newStack(t, stack.Config{Dialer: d})

			const seq = 5000
			syn := tcpSeg{src: fam.src, dst: fam.dst, seq: seq, flags: header.TCPFlagSyn}.encode()
			dev.ToStack <- syn
			<-d.called
			if got := s.Stats().InFlight; got != 1 {
				t.Errorf("InFlight = %d during the dial, want 1", got)
			}
			// The app retransmits; the stack must stay silent and not dial
			// again.
			dev.ToStack <- syn
			dev.ToStack <- syn
			none(t, dev.FromStack, 200*time.Millisecond)

			close(release)
			up, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer up.Close()
			p := next(t, dev.FromStack, 5*time.Second)
			if p.tcp == nil || p.tcp.flags != header.TCPFlagSyn|header.TCPFlagAck || p.tcp.ack != seq+1 {
				t.Fatalf("got %v, want SYN-ACK ack %d", p, seq+1)
			}
			if n := d.count(); n != 1 {
				t.Errorf("%d dials for one SYN and its retransmissions, want 1", n)
			}
			iss := p.tcp.seq

			// Complete the handshake with data on the ACK.
			dev.ToStack <- tcpSeg{src: fam.src, dst: fam.dst, seq: seq + 1, ack: iss + 1,
				flags: header.TCPFlagAck | header.TCPFlagPsh, payload: []byte("ping")}.encode()
			buf := make([]byte, 4)
			up.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(up, buf); err != nil || string(buf) != "ping" {
				t.Fatalf("upstream read %q, %v; want ping", buf, err)
			}
			if _, err := up.Write([]byte("pong")); err != nil {
				t.Fatal(err)
			}
			var got []byte
			for len(got) < 4 {
				p := next(t, dev.FromStack, 5*time.Second)
				if p.tcp == nil {
					t.Fatalf("got %v, want data", p)
				}
				got = append(got, p.tcp.payload...)
			}
			if string(got) != "pong" {
				t.Fatalf("app got %q, want pong", got)
			}
			st := s.Stats()
			if st.InFlight != 0 || st.Active != 1 || st.Forwarded != 1 {
				t.Errorf("stats %+v, want InFlight 0, Active 1, Forwarded 1", st)
			}
		})
	}
}

// TestInFlightLimit: beyond MaxInFlight pending dials, a SYN gets a RST
// and the dialer is not called; Close cancels the pending dials.
func TestInFlightLimit(t *testing.T) {
	const max = 2
	d := &recorder{fn: hang, called: make(chan struct{}, 10)}
	s, dev := newStack(t, stack.Config{Dialer: d, MaxInFlight: max})

	syn := func(port uint16) tcpSeg {
		return tcpSeg{src: netip.AddrPortFrom(app4.Addr(), port), dst: dest4, seq: 77, flags: header.TCPFlagSyn}
	}
	for i := range max {
		dev.ToStack <- syn(50000 + uint16(i)).encode()
		<-d.called
	}
	waitFor(t, "InFlight == max", func() bool { return s.Stats().InFlight == max })
	for i := range 3 {
		seg := syn(51000 + uint16(i))
		dev.ToStack <- seg.encode()
		p := next(t, dev.FromStack, 5*time.Second)
		if p.tcp == nil || p.tcp.flags&header.TCPFlagRst == 0 || p.tcp.dst != seg.src {
			t.Fatalf("SYN %d over the limit: got %v, want a RST to %v", i, p, seg.src)
		}
	}
	st := s.Stats()
	if d.count() != max || st.Limited != 3 || st.InFlight != max {
		t.Fatalf("dials %d, stats %+v; want %d dials, Limited 3, InFlight %d", d.count(), st, max, max)
	}

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st.InFlight != 0 || st.Forwarded != 0 {
		t.Fatalf("after Close: %+v, want InFlight 0", st)
	}
}

// TestCloseDuringAppHandshake: the dial succeeded but the app never
// answers the SYN-ACK; Close must not wait for gVisor's handshake to time
// out (minutes).
func TestCloseDuringAppHandshake(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	d := &recorder{fn: func(ctx context.Context, _, _ netip.AddrPort) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", ln.Addr().String())
	}}
	s, dev := newStack(t, stack.Config{Dialer: d})
	dev.ToStack <- tcpSeg{src: app4, dst: dest4, seq: 9, flags: header.TCPFlagSyn}.encode()
	p := next(t, dev.FromStack, 5*time.Second)
	if p.tcp == nil || p.tcp.flags != header.TCPFlagSyn|header.TCPFlagAck {
		t.Fatalf("got %v, want SYN-ACK", p)
	}
	up, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	start := time.Now()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("Close took %v with a handshake pending", el)
	}
	// The upstream was closed: the flow never started.
	up.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := up.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("upstream read after Close: %v, want EOF", err)
	}
	if st := s.Stats(); st.InFlight != 0 || st.Forwarded != 0 || st.Failed != 1 {
		t.Errorf("stats %+v, want InFlight 0, Forwarded 0, Failed 1", st)
	}
}

// TestStrayACK: a segment for no flow gets gVisor's RST, and no dial.
func TestStrayACK(t *testing.T) {
	d := &recorder{fn: hang}
	_, dev := newStack(t, stack.Config{Dialer: d})
	dev.ToStack <- tcpSeg{src: app4, dst: dest4, seq: 1, ack: 12345, flags: header.TCPFlagAck}.encode()
	p := next(t, dev.FromStack, 5*time.Second)
	if p.tcp == nil || p.tcp.flags&header.TCPFlagRst == 0 || p.tcp.seq != 12345 {
		t.Fatalf("got %v, want a RST seq 12345", p)
	}
	if d.count() != 0 {
		t.Errorf("a stray ACK was dialled")
	}
}

func TestNewErrors(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	defer goleak.VerifyNone(t, ignore)
	d := &recorder{fn: hang}
	for _, tt := range []struct {
		name string
		cfg  stack.Config
	}{
		{"no device", stack.Config{Dialer: d}},
		{"no dialer", stack.Config{Device: tuntest.NewChannel(1500, 1)}},
		{"MTU too small", stack.Config{Device: tuntest.NewChannel(1500, 1), Dialer: d, MTU: 576}},
		{"MTU too large", stack.Config{Device: tuntest.NewChannel(1500, 1), Dialer: d, MTU: 70000}},
		{"negative limit", stack.Config{Device: tuntest.NewChannel(1500, 1), Dialer: d, MaxInFlight: -1}},
	} {
		if s, err := stack.New(tt.cfg); err == nil {
			s.Close()
			t.Errorf("%s: New succeeded", tt.name)
		}
	}
}

// TestDeviceClosedFirst: the device closed under a running stack (as when
// the caller closes the TUN before the stack) leaves Close working.
func TestDeviceClosedFirst(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	d := &recorder{fn: func(ctx context.Context, _, _ netip.AddrPort) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", ln.Addr().String())
	}}
	s, dev := newStack(t, stack.Config{Dialer: d})
	dev.ToStack <- tcpSeg{src: app4, dst: dest4, seq: 9, flags: header.TCPFlagSyn}.encode()
	p := next(t, dev.FromStack, 5*time.Second)
	if p.tcp == nil || p.tcp.flags != header.TCPFlagSyn|header.TCPFlagAck {
		t.Fatalf("got %v, want SYN-ACK", p)
	}
	dev.ToStack <- tcpSeg{src: app4, dst: dest4, seq: 10, ack: p.tcp.seq + 1, flags: header.TCPFlagAck}.encode()
	up, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	waitFor(t, "the flow to be relayed", func() bool { return s.Stats().Active == 1 })

	dev.Close()
	up.Write([]byte("data toward a closed TUN"))
	start := time.Now()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("Close took %v", el)
	}
}
