package tunnel

import (
	"bufio"
	"context"
	"errors"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/mpvpn/mpvpn/internal/netnstest"

	"golang.org/x/sys/unix"
)

// withNetns runs fn inside a network namespace of its own (see
// internal/netnstest).
func withNetns(t *testing.T, fn func()) {
	t.Helper()
	netnstest.RequireMPTCP(t)
	netnstest.Run(t, fn)
}

// setSysctl writes a sysctl of the current thread's network namespace.
func setSysctl(t *testing.T, name, value string) {
	t.Helper()
	path := "/proc/sys/" + strings.ReplaceAll(name, ".", "/")
	if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
		t.Fatalf("sysctl %s=%s: %v", name, value, err)
	}
}

// netstat reads a TcpExt/MPTcpExt counter of this thread's namespace.
func netstat(t *testing.T, name string) uint64 {
	t.Helper()
	f, err := os.Open("/proc/thread-self/net/netstat")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		keys := strings.Fields(sc.Text())
		if !sc.Scan() {
			break
		}
		vals := strings.Fields(sc.Text())
		prefix := strings.TrimSuffix(keys[0], ":")
		for i, k := range keys[1:] {
			if prefix+k == name && i+1 < len(vals) {
				v, _ := strconv.ParseUint(vals[i+1], 10, 64)
				return v
			}
		}
	}
	t.Fatalf("counter %s not found", name)
	return 0
}

// TestFastOpen: with net.ipv4.tcp_fastopen=3, the first flow fetches a
// cookie and later ones carry msg1 in the SYN, still over MPTCP. Then,
// with the server gone and a cookie cached, the refusal that Fast Open
// moves from connect to the first Read or Write is still reported as
// ECONNREFUSED.
func TestFastOpen(t *testing.T) {
	withNetns(t, func() {
		setSysctl(t, "net.ipv4.tcp_fastopen", "3")
		ln, err := Listen(context.Background(), "127.0.0.1:0", true)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		if notes := ln.(*listener).notes; len(notes) != 0 {
			t.Errorf("listener warnings: %v", notes)
		}
		p := newPair(t, ServerConfig{Logger: testLogger(t)}, ClientConfig{Server: lnAddr(ln), FastOpen: true, Logger: testLogger(t)})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- p.srv.Serve(ctx, ln, echoAccept) }()
		var once sync.Once
		stop := func() { once.Do(func() { cancel(); <-done }) }
		defer stop()

		passive0 := netstat(t, "TcpExtTCPFastOpenPassive")
		for i := range 4 {
			c, err := p.cli.DialTCP(context.Background(), testDst)
			if err != nil {
				t.Fatalf("flow %d: %v", i, err)
			}
			if !c.MultipathTCP() {
				t.Errorf("flow %d is not MPTCP", i)
			}
			msg := []byte("hello " + strconv.Itoa(i))
			c.Write(msg)
			c.CloseWrite()
			got, err := io.ReadAll(c)
			c.Close()
			if err != nil || string(got) != string(msg) {
				t.Fatalf("flow %d echo: %q %v", i, got, err)
			}
		}
		passive := netstat(t, "TcpExtTCPFastOpenPassive") - passive0
		t.Logf("TCPFastOpenPassive +%d, TCPFastOpenActive %d, MPTcpExtMPCapableSYNRX %d",
			passive, netstat(t, "TcpExtTCPFastOpenActive"), netstat(t, "MPTcpExtMPCapableSYNRX"))
		if passive < 3 {
			t.Errorf("%d of 4 flows carried data in the SYN, want at least 3 (all but the cookie request)", passive)
		}
		if s := p.cli.Stats(); s.Fallbacks != 0 || s.Connected != 4 {
			t.Errorf("client stats %+v", s)
		}

		stop()
		_, err = p.cli.DialTCP(context.Background(), testDst)
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("server gone, cookie cached: %v, want ECONNREFUSED", err)
		}
		t.Logf("server gone: %v", err)
	})
}

func TestMark(t *testing.T) {
	withNetns(t, func() {
		ln, err := Listen(context.Background(), "127.0.0.1:0", false)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		p := newPair(t, ServerConfig{}, ClientConfig{Server: lnAddr(ln), Mark: 0x4d50})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- p.srv.Serve(ctx, ln, echoAccept) }()
		defer func() { cancel(); <-done }()
		c, err := p.cli.DialTCP(context.Background(), testDst)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		rc, err := c.TCP().SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var mark int
		var gerr error
		rc.Control(func(fd uintptr) { mark, gerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK) })
		if gerr != nil || mark != 0x4d50 {
			t.Fatalf("SO_MARK = %#x, %v; want 0x4d50", mark, gerr)
		}
		if !c.MultipathTCP() {
			t.Error("not MPTCP")
		}
	})
}
