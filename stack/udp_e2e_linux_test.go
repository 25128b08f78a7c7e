package stack_test

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/mpvpn/mpvpn/stack"
	"github.com/mpvpn/mpvpn/tun"
)

// TestTUNUDP: kernel UDP sockets in the namespace send to addresses routed
// into the TUN (the topology of TestTUN). The handler echoes what is sent
// to host .1 with WriteUDP, from the address it was sent to, and refuses
// the rest. The connected socket reads the echo, so the kernel accepted
// the stack's checksums and took the reply as coming from the peer; a
// refused datagram's ICMP port unreachable makes its next read fail with
// ECONNREFUSED.
func TestTUNUDP(t *testing.T) {
	var st atomic.Pointer[stack.Stack]
	var echoErrs atomic.Int64
	h := udpFunc(func(src, dst netip.AddrPort, payload []byte) bool {
		if !tunPrefix4.Contains(dst.Addr()) && !tunPrefix6.Contains(dst.Addr()) {
			return false
		}
		if host := dst.Addr().AsSlice(); host[len(host)-1] != 1 {
			return false
		}
		if err := st.Load().WriteUDP(dst, src, payload); err != nil {
			echoErrs.Add(1)
			t.Errorf("echo %v→%v: %v", dst, src, err)
		}
		return true
	})
	e := newTUNEnvUDP(t, tun.DefaultMTU, testLogger(t), h)
	st.Store(e.st)

	dial := func(t *testing.T, addr string) *net.UDPConn {
		t.Helper()
		var c *net.UDPConn
		if err := e.ns.Do(func() error {
			raddr, err := net.ResolveUDPAddr("udp", addr)
			if err != nil {
				return err
			}
			c, err = net.DialUDP("udp", nil, raddr)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return c
	}

	var echoed, refused uint64
	for _, v6 := range []bool{false, true} {
		fam := map[bool]string{false: "IPv4", true: "IPv6"}[v6]
		ipHdr := header.IPv4MinimumSize
		if v6 {
			ipHdr = header.IPv6MinimumSize
		}
		for _, size := range []int{0, 1, 1400, tun.DefaultMTU - ipHdr - header.UDPMinimumSize} {
			t.Run(fam+"/echo "+strconv.Itoa(size), func(t *testing.T) {
				c := dial(t, destAddr(v6, 1, 7))
				sent := randomBytes(t, size)
				if _, err := c.Write(sent); err != nil {
					t.Fatal(err)
				}
				buf := make([]byte, 1<<16)
				n, err := c.Read(buf)
				if err != nil {
					t.Fatalf("read the echo: %v", err)
				}
				if !bytes.Equal(buf[:n], sent) {
					t.Fatalf("echo of %d bytes differs (%d bytes)", size, n)
				}
				echoed++
			})
		}

		t.Run(fam+"/burst", func(t *testing.T) {
			// Queued back to back, so wireguard's UDP GRO may coalesce
			// the replies: still one datagram each for the socket.
			const n = 64
			c := dial(t, destAddr(v6, 1, 8))
			for i := range n {
				if _, err := c.Write(append(bytes.Repeat([]byte{byte(i)}, 1000), byte(i))); err != nil {
					t.Fatal(err)
				}
			}
			seen := make(map[byte]bool)
			buf := make([]byte, 1<<16)
			for range n {
				k, err := c.Read(buf)
				if err != nil {
					t.Fatalf("read echo %d: %v", len(seen), err)
				}
				if k != 1001 || !bytes.Equal(buf[:k], append(bytes.Repeat([]byte{buf[0]}, 1000), buf[0])) {
					t.Fatalf("echo of %d bytes mangled", k)
				}
				seen[buf[0]] = true
			}
			if len(seen) != n {
				t.Fatalf("%d distinct echoes, want %d", len(seen), n)
			}
			echoed += n
		})

		t.Run(fam+"/refused", func(t *testing.T) {
			c := dial(t, destAddr(v6, 5, 9))
			start := time.Now()
			if _, err := c.Write([]byte("anyone?")); err != nil {
				t.Fatal(err)
			}
			_, err := c.Read(make([]byte, 100))
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("read after a refused datagram: %v, want ECONNREFUSED", err)
			}
			if el := time.Since(start); el > 2*time.Second {
				t.Errorf("refusal took %v", el)
			}
			refused++
		})
	}

	s := e.st.Stats()
	t.Logf("stats: %+v", s)
	if s.UDPIn != echoed || s.UDPOut != echoed || s.UDPRefused != refused || echoErrs.Load() != 0 {
		t.Errorf("stats %+v, want UDPIn = UDPOut = %d, UDPRefused %d", s, echoed, refused)
	}
}
