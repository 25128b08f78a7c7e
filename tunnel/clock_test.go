//go:build linux

package tunnel_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/probe"
	"github.com/mpvpn/mpvpn/tunnel"
)

// TestClientClockOff (issue 8, item 2): a client whose clock is 30 s off
// the concentrator's, either way, still connects, because it stamps its
// handshakes in the concentrator's clock as its probe replies tell it;
// with its own clock the same client is refused (the positive control
// that the skew is real). The concentrator accepts stamps from 30 s
// behind to 1 s ahead of its own clock only, and none before its horizon.
func TestClientClockOff(t *testing.T) {
	for _, skew := range []time.Duration{-30 * time.Second, 30 * time.Second} {
		t.Run("server "+skew.String(), func(t *testing.T) {
			serverKey, clientKey := newKey(t), newKey(t)
			srv, err := tunnel.NewServer(tunnel.ServerConfig{Key: serverKey, Peers: []tunnel.PublicKey{clientKey.Public()}, HandshakeDeadline: 300 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			// The server's host clock is skew off this one's.
			tunnel.SkewServerClock(srv, skew)
			ln, err := tunnel.Listen(context.Background(), "127.0.0.1:0", false)
			if err != nil {
				t.Fatal(err)
			}
			addr := ln.Addr().(*net.TCPAddr).AddrPort()
			pc, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(addr))
			if err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			resp, err := probe.NewResponder(probe.ResponderConfig{Key: serverKey, Peers: []tunnel.PublicKey{clientKey.Public()}, Now: srv.Now, Horizon: srv.Horizon})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			served := make(chan struct{}, 2)
			go func() {
				defer func() { served <- struct{}{} }()
				srv.Serve(ctx, ln, func(_ context.Context, f *tunnel.Flow) { f.Refuse(tunnel.Refused) })
			}()
			go func() { defer func() { served <- struct{}{} }(); resp.Serve(ctx, pc) }()
			defer func() { cancel(); <-served; <-served }()

			pr, err := probe.NewProber(probe.ProberConfig{Server: addr, Key: clientKey, ServerKey: serverKey.Public()})
			if err != nil {
				t.Fatal(err)
			}
			defer pr.Close()
			pr.SetPath("lo", netip.MustParseAddr("127.0.0.1"))
			deadline := time.Now().Add(5 * time.Second)
			for _, ok := pr.ServerNow(); !ok; _, ok = pr.ServerNow() {
				if time.Now().After(deadline) {
					t.Fatalf("no probe reply: %+v, responder %+v", pr.Status(), resp.Stats())
				}
				time.Sleep(10 * time.Millisecond)
			}

			dial := func(now func() time.Time) error {
				c, err := tunnel.NewClient(tunnel.ClientConfig{Server: addr, ServerKey: serverKey.Public(), Key: clientKey, HandshakeTimeout: 3 * time.Second, Now: now})
				if err != nil {
					t.Fatal(err)
				}
				_, err = c.DialTCP(context.Background(), netip.MustParseAddrPort("198.51.100.10:80"))
				return err
			}
			// The handler refuses every flow: a Refused verdict proves
			// the handshake was accepted; silence that it was not.
			stamped := func() time.Time { t, _ := pr.ServerNow(); return t }
			if err := dial(stamped); !isVerdict(err, tunnel.Refused) {
				t.Errorf("stamped in the concentrator's clock: %v, want the handshake accepted", err)
			}
			if err := dial(time.Now); !errors.Is(err, tunnel.ErrHandshake) {
				t.Errorf("stamped in its own clock, %v off: %v, want the handshake refused", skew, err)
			}
			if st := srv.Stats(); st.BadTime != 1 || st.Flows != 1 {
				t.Errorf("server: %d refused by time, %d flows; want 1 and 1", st.BadTime, st.Flows)
			}
		})
	}
}

func isVerdict(err error, v tunnel.Verdict) bool {
	ve, ok := errors.AsType[*tunnel.VerdictError](err)
	return ok && ve.Verdict == v
}

func newKey(t *testing.T) tunnel.PrivateKey {
	t.Helper()
	k, err := tunnel.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}
