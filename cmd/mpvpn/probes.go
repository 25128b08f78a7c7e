//go:build linux

package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"

	"github.com/mpvpn/mpvpn/concentrator"
	"github.com/mpvpn/mpvpn/probe"
	"github.com/mpvpn/mpvpn/tunnel"
)

// serveProbes answers the clients' liveness probes on the UDP port of the
// same number as the tunnel listener of srv, until ctx is done or stop is
// called (stop waits for the responder to end). The replies carry the
// tunnel server's clock and horizon, in which the clients stamp their
// handshakes.
func serveProbes(ctx context.Context, srv *concentrator.Server, key tunnel.PrivateKey, peers []tunnel.PublicKey, log *slog.Logger) (stop func(), err error) {
	addr := srv.Addr()
	ta, ok := addr.(*net.TCPAddr)
	if !ok {
		return nil, fmt.Errorf("liveness probes: listener address %v is not TCP", addr)
	}
	pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: ta.IP, Port: ta.Port})
	if err != nil {
		return nil, fmt.Errorf("liveness probes on udp %s: %w", ta, err)
	}
	// The UDP relay's packets over the clients' uplinks share the port.
	sessions := srv.UDPSessions()
	r, err := probe.NewResponder(probe.ResponderConfig{Key: key, Peers: peers, Logger: log, Now: srv.Now, Horizon: srv.Horizon,
		Other: sessions.HandlePacket})
	if err != nil {
		pc.Close()
		return nil, err
	}
	sessions.Send = r.Send
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := r.Serve(ctx, pc); err != nil {
			log.Error("liveness probe responder stopped", "err", err)
		}
	}()
	return func() {
		cancel()
		<-done
		pc.Close()
	}, nil
}
