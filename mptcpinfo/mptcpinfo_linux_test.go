package mptcpinfo

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// cannotRun fails the test in CI (CI=true) and skips it elsewhere: a CI
// run that silently skipped the kernel tests would prove nothing.
func cannotRun(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("cannot run (and CI=true): "+format, args...)
	}
	t.Skipf(format, args...)
}

// withNetns runs fn on a locked OS thread inside a network namespace made
// for it, and puts the thread back and drops the namespace on every path
// (t.Fatal included); the same approach as pathmgr's helper. Sockets made
// and commands run from fn's goroutine live in the new namespace.
func withNetns(t *testing.T, fn func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		cannotRun(t, "needs root to create network namespaces")
	}
	if _, err := os.Stat("/proc/sys/net/mptcp/enabled"); err != nil {
		cannotRun(t, "the kernel has no MPTCP: %v", err)
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("current netns: %v", err)
	}
	ns, err := netns.New() // moves this thread into the new namespace
	if err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		cannotRun(t, "cannot create a network namespace: %v", err)
	}
	defer func() {
		if err := netns.Set(orig); err != nil {
			// Keep the thread locked: the runtime ends it with this
			// goroutine instead of reusing it in the wrong namespace.
			t.Errorf("back to the original netns: %v", err)
		} else {
			runtime.UnlockOSThread()
		}
		ns.Close()
		orig.Close()
	}()
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatalf("lo: %v", err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		t.Fatalf("lo up: %v", err)
	}
	fn()
}

// run execs a command (in the calling thread's namespace).
func run(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			cannotRun(t, "%s: %v", args[0], err)
		}
		t.Fatalf("%v: %v: %s", args, err, out)
	}
}

func addrPort(a net.Addr) netip.AddrPort {
	ap := a.(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// pair makes a listener and a connection to it, both from the calling
// (namespaced) thread, and returns the two ends. Everything is closed at
// the end of the test.
func pair(t *testing.T, network, laddr string, mptcpServer, mptcpClient bool, local string) (client, server *net.TCPConn) {
	t.Helper()
	var lc net.ListenConfig
	lc.SetMultipathTCP(mptcpServer)
	ln, err := lc.Listen(context.Background(), network, laddr)
	if err != nil {
		t.Fatalf("listen %s %s: %v", network, laddr, err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	d := net.Dialer{Timeout: 5 * time.Second}
	d.SetMultipathTCP(mptcpClient)
	if local != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(local)}
	}
	c, err := d.Dial(network, ln.Addr().String())
	if err != nil {
		t.Fatalf("dial %s: %v", ln.Addr(), err)
	}
	t.Cleanup(func() { c.Close() })
	s, ok := <-accepted
	if !ok {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// pingPong sends one byte each way, so both ends have an RTT sample and an
// MPTCP connection is fully established.
func pingPong(t *testing.T, c, s net.Conn) {
	t.Helper()
	b := []byte{1}
	for _, dir := range [][2]net.Conn{{c, s}, {s, c}} {
		if _, err := dir[0].Write(b); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(dir[1], b); err != nil {
			t.Fatal(err)
		}
	}
}

func mustGet(t *testing.T, c syscall.Conn) Info {
	t.Helper()
	info, err := GetConn(c)
	if err != nil {
		t.Fatalf("GetConn: %v", err)
	}
	return info
}

func sum(sfs []Subflow, f func(Subflow) uint64) uint64 {
	var n uint64
	for _, s := range sfs {
		n += f(s)
	}
	return n
}

func acked(s Subflow) uint64    { return s.BytesAcked }
func received(s Subflow) uint64 { return s.BytesReceived }

// eventually polls cond every 10ms for up to 5s.
func eventually(cond func() bool) bool {
	for deadline := time.Now().Add(5 * time.Second); ; {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// mibCounter reads one MPTcpExt counter of the namespace.
func mibCounter(t *testing.T, name string) int {
	t.Helper()
	out, err := exec.Command("nstat", "-az", "MPTcpExt"+name).Output()
	if err != nil {
		t.Logf("nstat: %v", err)
		return 0
	}
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "MPTcpExt"+name {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return 0
}

// TestSubflows opens an MPTCP connection between two addresses on lo in a
// fresh namespace, with a "subflow" endpoint on the second, moves some MiB
// each way and checks what Get reports on both ends.
func TestSubflows(t *testing.T) {
	withNetns(t, func() {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range []string{"10.0.0.1/24", "10.0.1.1/24"} {
			addr, err := netlink.ParseAddr(a)
			if err != nil {
				t.Fatal(err)
			}
			if err := netlink.AddrAdd(lo, addr); err != nil {
				t.Fatalf("add %s: %v", a, err)
			}
		}
		run(t, "ip", "mptcp", "limits", "set", "subflow", "2", "add_addr_accepted", "2")
		run(t, "ip", "mptcp", "endpoint", "add", "10.0.1.1", "dev", "lo", "subflow")

		c, s := pair(t, "tcp4", "10.0.0.1:0", true, true, "10.0.0.1")
		pingPong(t, c, s)

		var ci Info
		if !eventually(func() bool {
			ci = mustGet(t, c)
			return len(ci.Subflows) >= 2
		}) {
			// Seen on this project's firecracker 6.18 VM: the path manager
			// either never tries the join or has its kernel socket for it
			// refused (MPJoinSynTxCreatSkErr). Either way the premise of the
			// test is missing: fail in CI, skip elsewhere.
			cannotRun(t, "no second subflow within 5s (MPTcpExt MPJoinSynTx=%d, MPJoinSynTxCreatSkErr=%d); client info %+v",
				mibCounter(t, "MPJoinSynTx"), mibCounter(t, "MPJoinSynTxCreatSkErr"), ci)
		}

		const n = 8 << 20
		errc := make(chan error, 2)
		go func() { // client -> server
			_, err := c.Write(make([]byte, n))
			errc <- err
		}()
		go func() { // server: take it all, then answer as much
			if _, err := io.CopyN(io.Discard, s, n); err != nil {
				errc <- err
				return
			}
			_, err := s.Write(make([]byte, n))
			errc <- err
		}()
		if _, err := io.CopyN(io.Discard, c, n); err != nil {
			t.Fatalf("client read: %v", err)
		}
		for range 2 {
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
		}
		const total = n + 1 // and the ping

		var si Info
		ok := eventually(func() bool {
			ci, si = mustGet(t, c), mustGet(t, s)
			return sum(ci.Subflows, acked) >= total && sum(si.Subflows, acked) >= total &&
				ci.BytesAcked >= total && si.BytesAcked >= total
		})
		for _, side := range []struct {
			name string
			info Info
		}{{"client", ci}, {"server", si}} {
			t.Logf("%s: %d subflows (extra %d, total %d, max %d) token %#x flags %#x sent %d acked %d received %d retrans %d/%d bytes",
				side.name, len(side.info.Subflows), side.info.ExtraSubflows, side.info.SubflowsTotal, side.info.SubflowsMax,
				side.info.Token, side.info.Flags, side.info.BytesSent, side.info.BytesAcked, side.info.BytesReceived,
				side.info.Retransmits, side.info.BytesRetrans)
			for _, sf := range side.info.Subflows {
				t.Logf("  %s: %+v", side.name, sf)
			}
		}
		if !ok {
			t.Errorf("byte counters never covered the %d bytes each way", total)
		}

		for _, side := range []struct {
			name     string
			info     Info
			distinct func(Subflow) netip.Addr
		}{
			{"client", ci, func(s Subflow) netip.Addr { return s.Local.Addr() }},
			{"server", si, func(s Subflow) netip.Addr { return s.Remote.Addr() }},
		} {
			info := side.info
			if info.Fallback {
				t.Errorf("%s: Fallback set", side.name)
			}
			if len(info.Subflows) < 2 {
				t.Fatalf("%s: %d subflows, want >= 2", side.name, len(info.Subflows))
			}
			if info.Token == 0 || info.ExtraSubflows < 1 {
				t.Errorf("%s: token %#x, extra subflows %d", side.name, info.Token, info.ExtraSubflows)
			}
			ids := map[uint32]bool{}
			addrs := map[netip.Addr]bool{}
			for _, sf := range info.Subflows {
				ids[sf.ID] = true
				addrs[side.distinct(sf)] = true
				if sf.State != unix.BPF_TCP_ESTABLISHED {
					t.Errorf("%s: subflow %d in state %d", side.name, sf.ID, sf.State)
				}
				if sf.RTT <= 0 {
					t.Errorf("%s: subflow %d RTT %v", side.name, sf.ID, sf.RTT)
				}
				if !sf.Local.IsValid() || !sf.Remote.IsValid() {
					t.Errorf("%s: subflow %d addresses %v -> %v", side.name, sf.ID, sf.Local, sf.Remote)
				}
			}
			if len(ids) != len(info.Subflows) || len(addrs) != len(info.Subflows) {
				t.Errorf("%s: subflow ids %v / addresses %v not distinct", side.name, ids, addrs)
			}
		}
		if got := sum(si.Subflows, received); got < total {
			t.Errorf("server subflows received %d bytes in all, client sent %d", got, total)
		}
		if got := sum(ci.Subflows, received); got < total {
			t.Errorf("client subflows received %d bytes in all, server sent %d", got, total)
		}
		if si.BytesReceived < total || ci.BytesReceived < total {
			t.Errorf("MPTCP-level received: server %d, client %d, want >= %d", si.BytesReceived, ci.BytesReceived, total)
		}
		// The two ends list the same subflows, seen from either side.
		var cpaths, spaths [][2]netip.AddrPort
		for _, sf := range ci.Subflows {
			cpaths = append(cpaths, [2]netip.AddrPort{sf.Local, sf.Remote})
		}
		for _, sf := range si.Subflows {
			spaths = append(spaths, [2]netip.AddrPort{sf.Remote, sf.Local})
		}
		cmp := func(a, b [2]netip.AddrPort) int {
			if c := a[0].Compare(b[0]); c != 0 {
				return c
			}
			return a[1].Compare(b[1])
		}
		slices.SortFunc(cpaths, cmp)
		slices.SortFunc(spaths, cmp)
		if !slices.Equal(cpaths, spaths) {
			t.Errorf("client paths %v, server paths %v", cpaths, spaths)
		}
		// The initial subflow is the connection's own address pair.
		if want := [2]netip.AddrPort{addrPort(c.LocalAddr()), addrPort(c.RemoteAddr())}; !slices.Contains(cpaths, want) {
			t.Errorf("client paths %v lack the initial %v", cpaths, want)
		}

		rc, err := c.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		allocs := testing.AllocsPerRun(100, func() {
			if _, err := Get(rc); err != nil {
				t.Fatal(err)
			}
		})
		t.Logf("Get allocates %v times per call", allocs)
		if allocs > 1 {
			t.Errorf("Get allocates %v times per call, want 1 (the Subflows slice)", allocs)
		}
	})
}

// TestFallback: a plain TCP socket, or an MPTCP one whose peer is plain
// TCP, is reported as Fallback with the one path from TCP_INFO.
func TestFallback(t *testing.T) {
	for _, tc := range []struct {
		name          string
		network, addr string
		mptcpServer   bool
		mptcpClient   bool
	}{
		{"tcp4", "tcp4", "127.0.0.1:0", false, false},
		{"tcp6", "tcp6", "[::1]:0", false, false},
		{"mptcp client, tcp server", "tcp4", "127.0.0.1:0", false, true},
		{"tcp client, mptcp server", "tcp4", "127.0.0.1:0", true, false},
		{"mptcp6 client, tcp6 server", "tcp6", "[::1]:0", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			withNetns(t, func() {
				c, s := pair(t, tc.network, tc.addr, tc.mptcpServer, tc.mptcpClient, "")
				pingPong(t, c, s)
				for _, conn := range []*net.TCPConn{c, s} {
					info := mustGet(t, conn)
					t.Logf("%+v", info)
					if !info.Fallback || len(info.Subflows) != 1 {
						t.Fatalf("got Fallback=%v with %d subflows, want true with 1", info.Fallback, len(info.Subflows))
					}
					sf := info.Subflows[0]
					if want := addrPort(conn.LocalAddr()); sf.Local != want {
						t.Errorf("Local %v, want %v", sf.Local, want)
					}
					if want := addrPort(conn.RemoteAddr()); sf.Remote != want {
						t.Errorf("Remote %v, want %v", sf.Remote, want)
					}
					if sf.State != unix.BPF_TCP_ESTABLISHED || sf.RTT <= 0 {
						t.Errorf("state %d, RTT %v", sf.State, sf.RTT)
					}
					if sf.BytesAcked < 1 || sf.BytesReceived < 1 {
						t.Errorf("bytes acked %d, received %d, want >= 1", sf.BytesAcked, sf.BytesReceived)
					}
				}
			})
		})
	}
}

// TestClosed: Get on a closed socket is an error, not a panic.
func TestClosed(t *testing.T) {
	for _, tc := range []struct {
		name  string
		mptcp bool
	}{{"tcp", false}, {"mptcp", true}} {
		t.Run(tc.name, func(t *testing.T) {
			withNetns(t, func() {
				c, s := pair(t, "tcp4", "127.0.0.1:0", tc.mptcp, tc.mptcp, "")
				pingPong(t, c, s)
				rc, err := c.SyscallConn()
				if err != nil {
					t.Fatal(err)
				}
				c.Close()
				if info, err := Get(rc); err == nil {
					t.Fatalf("Get on a closed socket: %+v, no error", info)
				} else if !errors.Is(err, net.ErrClosed) {
					t.Logf("error (not net.ErrClosed): %v", err)
				}
				if _, err := GetConn(c); err == nil {
					t.Fatal("GetConn on a closed socket: no error")
				}
			})
		})
	}
}

// TestTCPInfoLayout checks the tcp_info offsets parse.go uses against
// golang.org/x/sys/unix's struct.
func TestTCPInfoLayout(t *testing.T) {
	var ti unix.TCPInfo
	for _, c := range []struct {
		name      string
		ours, sys uintptr
	}{
		{"state", tiState, unsafe.Offsetof(ti.State)},
		{"rtt", tiRTT, unsafe.Offsetof(ti.Rtt)},
		{"rttvar", tiRTTVar, unsafe.Offsetof(ti.Rttvar)},
		{"total_retrans", tiTotalRetrans, unsafe.Offsetof(ti.Total_retrans)},
		{"bytes_acked", tiBytesAcked, unsafe.Offsetof(ti.Bytes_acked)},
		{"bytes_received", tiBytesReceived, unsafe.Offsetof(ti.Bytes_received)},
	} {
		if c.ours != c.sys {
			t.Errorf("tcpi_%s at %d, unix.TCPInfo has it at %d", c.name, c.ours, c.sys)
		}
	}
	if tcpInfoUser < tcpInfoMin {
		t.Errorf("unix.TCPInfo is %d bytes, want >= %d", tcpInfoUser, tcpInfoMin)
	}
}
