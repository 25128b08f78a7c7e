package stack_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/goleak"

	"github.com/mpvpn/mpvpn/stack"
	"github.com/mpvpn/mpvpn/tun"
	"github.com/mpvpn/mpvpn/tun/tuntest"
)

// The real-TUN tests run in a network namespace of their own:
//
//	kernel TCP client ──► mvt0 (TUN, 10.77.77.1, fd00:77::1)
//	  routes 198.51.100.0/24, 2001:db8::/64 ──► netstack (this package)
//	                                               │ Dialer
//	                                               ▼
//	                        TCP servers on 127.0.0.1 in the same namespace
//
// The Dialer maps destination host .1 (or ::1) to 127.0.0.1 at the same
// port, and fails the others: .2 EHOSTUNREACH, .3 ENETUNREACH, .4
// ETIMEDOUT.
var (
	tunPrefix4 = netip.MustParsePrefix("198.51.100.0/24")
	tunPrefix6 = netip.MustParsePrefix("2001:db8::/64")
)

func destAddr(v6 bool, host byte, port int) string {
	ip := netip.AddrFrom4([4]byte{198, 51, 100, host})
	if v6 {
		a := tunPrefix6.Addr().As16()
		a[15] = host
		ip = netip.AddrFrom16(a)
	}
	return netip.AddrPortFrom(ip, uint16(port)).String()
}

type tunEnv struct {
	ns *tuntest.NetNS
	st *stack.Stack
	wg sync.WaitGroup // server goroutines
}

// nsDialer is the netstack's upstream: loopback servers in the namespace.
type nsDialer struct{ ns *tuntest.NetNS }

func (d nsDialer) DialTCP(ctx context.Context, _, dst netip.AddrPort) (net.Conn, error) {
	var host byte
	if dst.Addr().Is4() {
		host = dst.Addr().As4()[3]
	} else {
		host = dst.Addr().As16()[15]
	}
	switch host {
	case 1:
	case 2:
		return nil, fmt.Errorf("test dial %v: %w", dst, syscall.EHOSTUNREACH)
	case 3:
		return nil, fmt.Errorf("test dial %v: %w", dst, syscall.ENETUNREACH)
	case 4:
		return nil, fmt.Errorf("test dial %v: %w", dst, syscall.ETIMEDOUT)
	default:
		return nil, fmt.Errorf("test dial %v: %w", dst, syscall.ECONNREFUSED)
	}
	var c net.Conn
	err := d.ns.Do(func() (err error) {
		c, err = (&net.Dialer{}).DialContext(ctx, "tcp", "127.0.0.1:"+strconv.Itoa(int(dst.Port())))
		return err
	})
	return c, err
}

// newTUNEnv opens a real TUN of the given MTU in a fresh namespace and
// starts a Stack on it. Everything is closed by t's cleanups, in order,
// and goroutine leaks are checked last.
func newTUNEnv(t testing.TB, mtu int, log *slog.Logger) *tunEnv {
	t.Helper()
	return newTUNEnvUDP(t, mtu, log, nil)
}

// newTUNEnvUDP is newTUNEnv with a UDPHandler.
func newTUNEnvUDP(t testing.TB, mtu int, log *slog.Logger, udp stack.UDPHandler) *tunEnv {
	t.Helper()
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
	ns := tuntest.NewNetNS(t)
	var dev *tun.Device
	err := ns.Do(func() (err error) {
		dev, err = tun.Open(tun.Config{
			Name:  "mvt0",
			MTU:   mtu,
			Addrs: []netip.Prefix{netip.MustParsePrefix("10.77.77.1/32"), netip.MustParsePrefix("fd00:77::1/128")},
		}, log)
		if err != nil {
			return err
		}
		link, err := netlink.LinkByName(dev.Name())
		if err != nil {
			return err
		}
		for _, p := range []netip.Prefix{tunPrefix4, tunPrefix6} {
			if err := netlink.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipNet(p)}); err != nil {
				return fmt.Errorf("route %v: %w", p, err)
			}
		}
		return nil
	})
	if err != nil {
		if dev != nil {
			dev.Close()
		}
		tuntest.CannotRun(t, "cannot set up the TUN: %v", err)
	}
	t.Cleanup(func() { dev.Close() })
	st, err := stack.New(stack.Config{Device: dev.Inner(), MTU: mtu, Dialer: nsDialer{ns}, UDP: udp, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	env := &tunEnv{ns: ns, st: st}
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("stack Close: %v", err)
		}
		env.wg.Wait()
	})
	return env
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// serve starts a TCP server on 127.0.0.1 in the namespace, running handle
// for each connection (which it closes after), and returns its port.
func (e *tunEnv) serve(t testing.TB, handle func(*net.TCPConn)) int {
	t.Helper()
	var ln net.Listener
	if err := e.ns.Do(func() (err error) {
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			e.wg.Add(1)
			go func() {
				defer e.wg.Done()
				defer c.Close()
				handle(c.(*net.TCPConn))
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}

// dial connects a kernel TCP socket of the namespace (the "application").
func (e *tunEnv) dial(addr string) (*net.TCPConn, error) {
	var c net.Conn
	err := e.ns.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", addr, 10*time.Second)
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// echo copies back what it reads, then half-closes.
func echo(c *net.TCPConn) {
	io.Copy(c, c)
	c.CloseWrite()
}

func randomBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func TestTUN(t *testing.T) {
	e := newTUNEnv(t, tun.DefaultMTU, testLogger(t))
	echoPort := e.serve(t, echo)
	// replyAfterEOF reads until the client's FIN, then answers with the
	// SHA-256 of what it got followed by 4 MiB: the reply can only come
	// after the half-close went through, and must arrive in full.
	replyAfterEOF := e.serve(t, func(c *net.TCPConn) {
		h := sha256.New()
		if _, err := io.Copy(h, c); err != nil {
			return
		}
		c.Write(h.Sum(nil))
		c.Write(bytes.Repeat([]byte{0xa5}, 4<<20))
	})

	// resetAfterHello answers, then resets the connection: the app must
	// see the reset as a reset, not as the end of a complete reply.
	resetAfterHello := e.serve(t, func(c *net.TCPConn) {
		c.Write([]byte("hello"))
		time.Sleep(50 * time.Millisecond)
		c.SetLinger(0)
		c.Close()
	})

	for _, v6 := range []bool{false, true} {
		fam := map[bool]string{false: "IPv4", true: "IPv6"}[v6]

		t.Run(fam+"/upstream reset", func(t *testing.T) {
			c, err := e.dial(destAddr(v6, 1, resetAfterHello))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			got, err := io.ReadAll(c)
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("read ended with %v after %q, want ECONNRESET: the upstream was reset", err, got)
			}
		})

		t.Run(fam+"/10MiB both ways", func(t *testing.T) {
			c, err := e.dial(destAddr(v6, 1, echoPort))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(60 * time.Second))
			sent := randomBytes(t, 10<<20)
			errc := make(chan error, 1)
			go func() {
				_, err := c.Write(sent)
				if err == nil {
					err = c.CloseWrite()
				}
				errc <- err
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("read: %v", err)
			}
			if err := <-errc; err != nil {
				t.Fatalf("write: %v", err)
			}
			if !bytes.Equal(got, sent) {
				t.Fatalf("echo differs: got %d bytes, sent %d", len(got), len(sent))
			}
		})

		t.Run(fam+"/half-close", func(t *testing.T) {
			c, err := e.dial(destAddr(v6, 1, replyAfterEOF))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			sent := randomBytes(t, 1<<20)
			if _, err := c.Write(sent); err != nil {
				t.Fatal(err)
			}
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("read after our half-close: %v", err)
			}
			sum := sha256.Sum256(sent)
			if len(got) != len(sum)+4<<20 || !bytes.Equal(got[:len(sum)], sum[:]) {
				t.Fatalf("reply after half-close: %d bytes (hash ok: %v), want %d", len(got), len(got) >= len(sum) && bytes.Equal(got[:len(sum)], sum[:]), len(sum)+4<<20)
			}
		})

		for _, tt := range []struct {
			name string
			host byte
			port int
			want syscall.Errno
		}{
			{"refused", 1, 1, syscall.ECONNREFUSED}, // nothing listens on port 1
			{"host unreachable", 2, 80, syscall.EHOSTUNREACH},
			{"net unreachable", 3, 80, syscall.ENETUNREACH},
			{"timed out", 4, 80, syscall.EHOSTUNREACH},
		} {
			t.Run(fam+"/"+tt.name, func(t *testing.T) {
				start := time.Now()
				c, err := e.dial(destAddr(v6, tt.host, tt.port))
				if err == nil {
					c.Close()
					t.Fatalf("connect succeeded, want %v", tt.want)
				}
				if !errors.Is(err, tt.want) {
					t.Fatalf("connect: %v, want %v", err, tt.want)
				}
				if el := time.Since(start); el > 2*time.Second {
					t.Errorf("connect took %v to fail", el)
				}
			})
		}
	}

	waitFor(t, "flows to end", func() bool { st := e.st.Stats(); return st.Active == 0 && st.InFlight == 0 })
	st := e.st.Stats()
	t.Logf("stats: %+v", st)
	// Three forwarded flows per family (echo, half-close, reset).
	if st.Forwarded != 6 || st.Refused != 2 || st.Failed != 6 {
		t.Errorf("stats %+v, want Forwarded 6, Refused 2, Failed 6", st)
	}
}

// BenchmarkStackThroughput measures bulk TCP through the real TUN and the
// netstack, per TUN MTU: "up" is the kernel client sending (TUN read
// path, netstack receive, relay to a loopback sink), "down" the kernel
// client receiving (loopback source, relay, netstack send, TUN write
// path). Run as root:
//
//	go test -run '^$' -bench StackThroughput -benchtime 2s ./stack/
func BenchmarkStackThroughput(b *testing.B) {
	const chunk = 1 << 20
	for _, mtu := range []int{1500, 9000, tun.DefaultMTU} {
		b.Run(fmt.Sprintf("mtu=%d", mtu), func(b *testing.B) {
			e := newTUNEnv(b, mtu, nil)
			sink := e.serve(b, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
			source := e.serve(b, func(c *net.TCPConn) {
				buf := make([]byte, chunk)
				for {
					if _, err := c.Write(buf); err != nil {
						return
					}
				}
			})
			report := func(b *testing.B) {
				b.ReportMetric(float64(b.N)*chunk*8/b.Elapsed().Seconds()/1e9, "Gbit/s")
			}
			b.Run("up", func(b *testing.B) {
				c, err := e.dial(destAddr(false, 1, sink))
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				buf := make([]byte, chunk)
				b.SetBytes(chunk)
				b.ResetTimer()
				for range b.N {
					if _, err := c.Write(buf); err != nil {
						b.Fatal(err)
					}
				}
				report(b)
			})
			b.Run("down", func(b *testing.B) {
				c, err := e.dial(destAddr(false, 1, source))
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				buf := make([]byte, chunk)
				b.SetBytes(chunk)
				b.ResetTimer()
				for range b.N {
					if _, err := io.ReadFull(c, buf); err != nil {
						b.Fatal(err)
					}
				}
				report(b)
			})
		})
	}
}
