//go:build linux

package relay

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
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
