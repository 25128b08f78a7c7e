package probe

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/internal/netnstest"
)

// A responder bound to the wildcard address answers from the address each
// request was sent to, not the one the route would pick: 127.0.0.2 here,
// where a reply routed to 127.0.0.1 would otherwise leave from 127.0.0.1.
// (On a concentrator: its public address, not a transit one, so the
// client's CGNAT mapping matches the reply.)
func TestServeRepliesFromTheAddressAsked(t *testing.T) {
	tests := []struct{ network, listen, to string }{
		{"udp4", "0.0.0.0:0", "127.0.0.2"},
		{"udp4", "0.0.0.0:0", "127.0.0.1"},
		{"udp6", "[::]:0", "::1"},
	}
	for _, tt := range tests {
		t.Run(tt.to, func(t *testing.T) {
			tr := newTestResponder(t, ResponderConfig{})
			tr.r.now = time.Now
			pc, err := net.ListenPacket(tt.network, tt.listen)
			if err != nil {
				netnstest.CannotRun(t, "no %s: %v", tt.network, err)
			}
			defer pc.Close()
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- tr.r.Serve(ctx, pc) }()
			defer func() {
				cancel()
				if err := <-done; err != nil {
					t.Errorf("Serve: %v", err)
				}
			}()

			c, err := net.ListenUDP(tt.network, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			port := pc.LocalAddr().(*net.UDPAddr).Port
			to := netip.AddrPortFrom(netip.MustParseAddr(tt.to), uint16(port))
			if _, err := c.WriteToUDPAddrPort(tr.client.request(time.Now(), 7), to); err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			buf := make([]byte, 100)
			_, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				t.Fatalf("no reply: %v", err)
			}
			if from.Addr().Unmap() != to.Addr() {
				t.Errorf("reply from %s, want from %s", from, to)
			}
		})
	}
}
