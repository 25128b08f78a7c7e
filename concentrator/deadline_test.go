//go:build linux

package concentrator

import (
	"context"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/tunnel"
)

// Config.HandshakeDeadline reaches the tunnel server: a connection that
// sends garbage is reset at that deadline, not at the 5 s default.
func TestHandshakeDeadline(t *testing.T) {
	key, peer := testKey(t), testKey(t)
	cfg := Config{Listen: "127.0.0.1:0", Key: key, Peers: []tunnel.PublicKey{peer.Public()}}

	bad := cfg
	bad.HandshakeDeadline = -time.Second
	if _, err := Listen(context.Background(), bad); err == nil {
		t.Fatal("Listen accepted a negative handshake deadline")
	}

	const deadline = 300 * time.Millisecond
	cfg.HandshakeDeadline = deadline
	srv := serveTest(t, cfg)

	start := time.Now()
	c, err := net.Dial("tcp", srv.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, c)
	elapsed := time.Since(start)
	if n != 0 {
		t.Errorf("got %d bytes back, want 0", n)
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("closed with %v, want a reset", err)
	}
	if elapsed < deadline || elapsed > deadline+2*time.Second {
		t.Errorf("closed after %v, want at the %v deadline", elapsed, deadline)
	}
}

// serveTest listens with cfg and serves until the test ends.
func serveTest(t *testing.T, cfg Config) *Server {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	srv, err := Listen(ctx, cfg)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return srv
}

func testKey(t *testing.T) tunnel.PrivateKey {
	t.Helper()
	k, err := tunnel.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}
