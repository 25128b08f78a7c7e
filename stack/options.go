//go:build linux

package stack

import (
	"fmt"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// TCP settings of the netstack. Every option mpvpn relies on is set
// explicitly, even where it equals gVisor's current default, so a gVisor
// upgrade that changes a default changes nothing here unnoticed. Facts
// about gVisor behaviour are dated "gVisor 2025-05": the pinned
// gvisor.dev/gvisor v0.0.0-20250503011706-39ed1f5ac29c.
//
// What the netstack terminates is a flow from an application on this very
// host, through a TUN: a link with a round trip of microseconds that loses
// nothing (the link endpoint blocks rather than drops). The settings are
// chosen for that link, not for the internet; the tunnel's kernel MPTCP
// sockets deal with the real paths.
const (
	// Receive buffer (gVisor's tcp_rmem): the window the netstack offers
	// the application, i.e. how much an app can send before the relay has
	// read it. The default is the initial window; with receive-buffer
	// moderation on, gVisor grows it up to the max as the relay drains it
	// (gVisor 2025-05, Endpoint.ModerateRecvBuf from gonet reads). 1 MiB
	// holds 16 segments at MTU 65000; 8 MiB is Tailscale's Linux figure,
	// reached only by flows that need it.
	rcvBufMin     = tcp.MinBufferSize // 4 KiB; unused by gVisor 2025-05 except for TCP_WINDOW_CLAMP
	rcvBufDefault = 1 << 20
	rcvBufMax     = 8 << 20

	// Send buffer (gVisor's tcp_wmem): how much of the upstream's bytes
	// the netstack holds for the application. gVisor 2025-05 does not
	// auto-tune it: the default is what every flow gets (the max only caps
	// SO_SNDBUF, which nothing here sets). Measured at MTU 65000: 1 MiB
	// and 4 MiB give the same ~16 Gbit/s toward the app, so 1 MiB, which
	// bounds the memory a slow reader can pin per flow.
	sndBufMin     = tcp.MinBufferSize
	sndBufDefault = 1 << 20
	sndBufMax     = tcp.MaxBufferSize // 4 MiB

	// Keepalive on every terminated flow. The peer is a local socket, so
	// a silent peer means something is really gone (its namespace deleted,
	// the TUN routes changed under it); without keepalive such a flow pins
	// two relay goroutines and an upstream connection until the upstream
	// side happens to notice, gVisor's default idle being 2 h
	// (tailscale/tailscale#4522). 60 s + 4 × 15 s drops it within 2 min.
	keepaliveIdle     = 60 * time.Second
	keepaliveInterval = 15 * time.Second
	keepaliveCount    = 4

	// TIME_WAIT. It exists to resend a lost final ACK and to keep old
	// duplicates out of a new incarnation of the 4-tuple; on a local
	// lossless link neither needs Linux's 60 s, and every TIME_WAIT
	// endpoint holds memory. A new SYN for a 4-tuple in TIME_WAIT
	// retires that endpoint (timewait.go), so the duration costs no app
	// a wait; 2 s still covers several retransmissions of the app's FIN
	// (Linux's minimum RTO is 200 ms).
	timeWaitTimeout = 2 * time.Second

	// FIN_WAIT_2 after a full close (TCP_LINGER2): Linux's 60 s.
	lingerTimeout = 60 * time.Second
)

// setTCPOptions applies the protocol-wide TCP options to s. Per-endpoint
// options (keepalive) are set on each flow in setFlowOptions.
func setTCPOptions(s *stack.Stack) error {
	opts := []struct {
		name string
		opt  tcpip.SettableTransportProtocolOption
	}{
		// SACK: on (gVisor 2025-05 default on). With 64 KiB segments a
		// single loss without SACK costs a window's worth of resends.
		{"SACK", ptr(tcpip.TCPSACKEnabled(true))},

		// Congestion control: reno. Tailscale pinned reno for an int
		// overflow in cubic's cwnd arithmetic (gvisor#11632). gVisor
		// 2025-05 has the uint64 fix in sendData, but its cubic still
		// converts an unclamped float window to int and can shrink cwnd
		// on plain ACKs (the RFC 9438 clamp came with gvisor#13958, 2026),
		// and a loss-free flow — every flow here — is exactly where cubic's
		// window grows without bound. Reno's window grows by the packets
		// acked, which cannot overflow; and on a microsecond link that
		// never loses, cubic's faster recovery has nothing to recover.
		{"congestion control reno", ptr(tcpip.CongestionControlOption("reno"))},

		// Loss detection: classic dupack/SACK recovery, RACK off.
		// Tailscale saw RACK stall and retransmit spuriously with this
		// generation of gVisor (tailscale#14934, 2025-02) and kept it
		// off until a gVisor fix of 2026-09 (tailscale#21303), newer than
		// our pin. A link that never loses gains nothing from RACK.
		{"RACK off", ptr(tcpip.TCPRecovery(0))},

		// Receive buffer moderation: on (gVisor 2025-05 default on), so a
		// flow's window grows from rcvBufDefault toward rcvBufMax as the
		// relay keeps up, instead of staying at the initial size.
		{"moderate receive buffer", ptr(tcpip.TCPModerateReceiveBufferOption(true))},
		{"receive buffer sizes", &tcpip.TCPReceiveBufferSizeRangeOption{Min: rcvBufMin, Default: rcvBufDefault, Max: rcvBufMax}},
		{"send buffer sizes", &tcpip.TCPSendBufferSizeRangeOption{Min: sndBufMin, Default: sndBufDefault, Max: sndBufMax}},

		// Nagle off (gVisor 2025-05 default off): the relay writes what
		// the upstream delivered, in chunks of up to 64 KiB; holding back
		// a small tail only adds latency to interactive flows. The app's
		// own kernel socket still applies its own Nagle on the way in.
		{"Nagle off", ptr(tcpip.TCPDelayEnabled(false))},

		{"TIME_WAIT timeout", ptr(tcpip.TCPTimeWaitTimeoutOption(timeWaitTimeout))},
		{"FIN_WAIT_2 timeout", ptr(tcpip.TCPLingerTimeoutOption(lingerTimeout))},

		// Retransmission timeouts and retries: Linux's values (gVisor
		// 2025-05 defaults: 200 ms min RTO, 120 s max, 15 retries), set so
		// that they stay Linux's.
		{"min RTO", ptr(tcpip.TCPMinRTOOption(tcp.MinRTO))},
		{"max RTO", ptr(tcpip.TCPMaxRTOOption(tcp.MaxRTO))},
		{"max retries", ptr(tcpip.TCPMaxRetriesOption(tcp.MaxRetries))},

		// SYN-ACK retries toward the app: gVisor's (and Linux's) 6.
		// Should the app vanish between its SYN and our SYN-ACK, the
		// forwarded flow's handshake gives up after ~2 min.
		{"SYN retries", ptr(tcpip.TCPSynRetriesOption(tcp.DefaultSynRetries))},

		// No SYN cookies: the forwarder decides on each SYN itself and
		// caps how many are pending (Config.MaxInFlight).
		{"SYN cookies off", ptr(tcpip.TCPAlwaysUseSynCookies(false))},
	}
	for _, o := range opts {
		if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, o.opt); err != nil {
			return fmt.Errorf("TCP option %s: %s", o.name, err)
		}
	}
	return nil
}

// setFlowOptions sets the per-endpoint options of a forwarded flow.
func setFlowOptions(ep tcpip.Endpoint) error {
	ep.SocketOptions().SetKeepAlive(true)
	idle := tcpip.KeepaliveIdleOption(keepaliveIdle)
	if err := ep.SetSockOpt(&idle); err != nil {
		return fmt.Errorf("keepalive idle: %s", err)
	}
	interval := tcpip.KeepaliveIntervalOption(keepaliveInterval)
	if err := ep.SetSockOpt(&interval); err != nil {
		return fmt.Errorf("keepalive interval: %s", err)
	}
	if err := ep.SetSockOptInt(tcpip.KeepaliveCountOption, keepaliveCount); err != nil {
		return fmt.Errorf("keepalive count: %s", err)
	}
	return nil
}

func ptr[T any](v T) *T { return &v }
