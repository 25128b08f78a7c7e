//go:build linux

package concentrator

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/tunnel"
)

// syncBuffer is a bytes.Buffer safe for the server's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A fleet member whose connections arrive at the address it announces for
// joins says so, once (the kernel would announce nothing to join); one
// whose connections arrive elsewhere says nothing.
func TestFleetArrivalWarning(t *testing.T) {
	const warning = "came to the address this member announces for joins"
	for _, tc := range []struct {
		name     string
		announce []netip.Addr
		warns    int
	}{
		{"arrives at the announced address", []netip.Addr{netip.MustParseAddr("127.0.0.1")}, 1},
		{"arrives elsewhere", []netip.Addr{netip.MustParseAddr("127.0.0.2")}, 0},
		{"not in a fleet", nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key, peer := testKey(t), testKey(t)
			var logs syncBuffer
			srv := serveTest(t, Config{Listen: "127.0.0.1:0", Key: key, Peers: []tunnel.PublicKey{peer.Public()},
				FleetAnnounce: tc.announce, NoDNS: true, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
			cl := testClient(t, srv, key, peer)
			for range 3 {
				// Loopback is refused by policy, after the check.
				_, err := cl.DialTCP(context.Background(), netip.MustParseAddrPort("127.0.0.1:9"))
				if ve, ok := errors.AsType[*tunnel.VerdictError](err); !ok || ve.Verdict != tunnel.NotAllowed {
					t.Fatalf("flow: %v, want not allowed", err)
				}
			}
			if n := strings.Count(logs.String(), warning); n != tc.warns {
				t.Errorf("warned %d times, want %d; log:\n%s", n, tc.warns, logs.String())
			}
		})
	}
}

// OpenFlows lists a relayed flow while it is open, with its client and
// destination, and forgets it once it has ended.
func TestOpenFlows(t *testing.T) {
	key, peer := testKey(t), testKey(t)
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	srv := serveTest(t, Config{Listen: "127.0.0.1:0", Key: key, Peers: []tunnel.PublicKey{peer.Public()}, AllowPrivate: true, NoDNS: true})
	cl := testClient(t, srv, key, peer)
	dst := echo.Addr().(*net.TCPAddr).AddrPort()
	c, err := cl.DialTCP(context.Background(), dst)
	if err != nil {
		t.Fatal(err)
	}
	got := srv.OpenFlows(10)
	if len(got) != 1 || got[0].Dst != dst || got[0].Peer != peer.Public() || !got[0].Client.Addr().IsLoopback() {
		t.Fatalf("OpenFlows = %+v, want the one flow to %s from the peer", got, dst)
	}
	// Its bytes, from its subflows: 4 KiB each way (and the framing).
	msg := make([]byte, 4096)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, msg); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		got = srv.OpenFlows(10)
		if len(got) == 1 && got[0].RxBytes >= 4096 && got[0].TxBytes >= 4096 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("OpenFlows after 4 KiB each way: %+v", got)
		}
	}
	if p := got[0].Paths; len(p) != 1 || !p[0].Addr.IsLoopback() || p[0].Subflows != 1 || p[0].BytesReceived != got[0].RxBytes {
		t.Errorf("the flow's paths: %+v, want its one subflow from the loopback with all its bytes", p)
	}
	c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for len(srv.OpenFlows(10)) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("OpenFlows after the flow ended: %+v", srv.OpenFlows(10))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// testClient is a tunnel client of srv with key peer and no pool, past
// srv's start horizon: srv takes stamps up to a second ahead of its
// clock, the client stamps 0.9 s ahead, and srv has been up 0.15 s.
func testClient(t *testing.T, srv *Server, key, peer tunnel.PrivateKey) *tunnel.Client {
	t.Helper()
	cl, err := tunnel.NewClient(tunnel.ClientConfig{
		Server: srv.Addr().(*net.TCPAddr).AddrPort(), ServerKey: key.Public(), Key: peer, PoolSize: -1,
		Now: func() time.Time { return time.Now().Add(900 * time.Millisecond) },
	})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond)
	return cl
}
