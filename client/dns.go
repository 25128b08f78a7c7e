//go:build linux

package client

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mpvpn/mpvpn/dnsrelay"
	"github.com/mpvpn/mpvpn/probe"
	"github.com/mpvpn/mpvpn/stack"
	"github.com/mpvpn/mpvpn/tunnel"
	"github.com/mpvpn/mpvpn/udprelay"
)

// DefaultDNSAddr is where mpvpn's resolver answers (UDP and TCP port 53)
// unless --dns-address says otherwise, next to the TUN's own address;
// DefaultDNSAddr6 too when the TUN has an IPv6 address. Routing sends
// them into the TUN in every mode; they never leave the host.
var (
	DefaultDNSAddr  = netip.MustParseAddr("10.77.77.53")
	DefaultDNSAddr6 = netip.MustParseAddr("fd6d:7076::53")
)

// dnsPort is the only port the resolver addresses answer on.
const dnsPort = 53

// netstackDialer is the netstack's Dialer: a flow to a resolver address
// is answered here, by the DNS forwarder; every other flow goes through
// the tunnel, where the app's source address stays on this host and only
// the destination travels.
type netstackDialer struct {
	c   *tunnel.Client
	dns *dnsrelay.Forwarder
	// resolvers are the --dns-address values.
	resolvers []netip.Addr
}

func (d netstackDialer) DialTCP(ctx context.Context, _, dst netip.AddrPort) (net.Conn, error) {
	if slices.Contains(d.resolvers, dst.Addr().Unmap()) {
		if dst.Port() != dnsPort {
			return nil, fmt.Errorf("%s is mpvpn's resolver, which answers on port %d only: %w", dst.Addr(), dnsPort, syscall.ECONNREFUSED)
		}
		app, mine := localPipe(dst)
		go d.dns.ServeStream(mine)
		return app, nil
	}
	c, err := d.c.DialTCP(ctx, dst)
	if err != nil {
		// Not a typed nil: the stack checks the interface against nil.
		return nil, err
	}
	return c, nil
}

// udpHandler takes the netstack's datagrams: those to port 53 of a
// resolver address go to the DNS forwarder; with QUIC blocked, those to
// port 443 are refused at once (a port unreachable), so browsers fall
// back to TCP, which mpvpn spreads over every uplink; the rest go to the
// UDP relay.
type udpHandler struct {
	dns       *dnsrelay.Forwarder
	relay     *udprelay.Client
	resolvers []netip.Addr
	quicBlock bool
}

func (h udpHandler) HandleUDP(src, dst netip.AddrPort, payload []byte) bool {
	if slices.Contains(h.resolvers, dst.Addr().Unmap()) {
		if dst.Port() != dnsPort {
			return false
		}
		return h.dns.HandleUDP(src, dst, payload)
	}
	if h.quicBlock && dst.Port() == quicPort {
		return false
	}
	return h.relay.HandleUDP(src, dst, payload)
}

// quicPort is where browsers speak QUIC (HTTP/3).
const quicPort = 443

// newRelay is the client's UDP relay: its datagrams go through the
// tunnel's datagram service, the answers back into the netstack.
func newRelay(tc *tunnel.Client, st *atomic.Pointer[stack.Stack], pr *probe.Prober, cfg Config) (*udprelay.Client, error) {
	return udprelay.NewClient(udprelay.ClientConfig{
		Transport:      cfg.UDPTransport,
		Server:         cfg.Server,
		ServerAlt:      cfg.ServerAlt,
		Mark:           cfg.Mark,
		DuplicateBelow: cfg.UDPDuplicate,
		// The live uplinks, as the liveness probes judge them: a path
		// the probes find dead is left within about half a second.
		Paths: func() []udprelay.Path {
			var ps []udprelay.Path
			for _, s := range pr.Status() {
				if s.Known && s.Alive && s.Src.IsValid() {
					ps = append(ps, udprelay.Path{Name: s.Name, Addr: s.Src, RTT: s.RTT})
				}
			}
			return ps
		},
		Dial: func(ctx context.Context) (net.Conn, error) {
			c, err := tc.DialService(ctx, tunnel.ServiceDatagrams)
			if err != nil {
				return nil, err
			}
			return c, nil
		},
		Write: func(src, dst netip.AddrPort, payload []byte) error {
			s := st.Load()
			if s == nil {
				return fmt.Errorf("no netstack yet")
			}
			return s.WriteUDP(src, dst, payload)
		},
		Refused: func(app, dst netip.AddrPort) {
			if s := st.Load(); s != nil {
				s.UnreachableUDP(app, dst, stack.UnreachableProhibited)
			}
		},
		Unreachable: func(app, dst netip.AddrPort, why int) {
			s := st.Load()
			if s == nil {
				return
			}
			w := stack.UnreachableProhibited
			switch why {
			case udprelay.UnreachablePort:
				w = stack.UnreachablePort
			case udprelay.UnreachableHost:
				w = stack.UnreachableHost
			case udprelay.UnreachableNet:
				w = stack.UnreachableNet
			}
			s.UnreachableUDP(app, dst, w)
		},
		EchoReply: func(src, dst netip.Addr, id, seq uint16, data []byte) error {
			s := st.Load()
			if s == nil {
				return fmt.Errorf("no netstack yet")
			}
			return s.WriteEchoReply(src, dst, id, seq, data)
		},
		Logger: cfg.Logger.With("part", "udp"),
	})
}

// newForwarder is the client's DNS forwarder: its queries go through the
// tunnel to the concentrator's resolver, its UDP answers back into the
// netstack once there is one (st is set before any route sends a packet
// into the TUN).
func newForwarder(tc *tunnel.Client, st *atomic.Pointer[stack.Stack], cfg Config) (*dnsrelay.Forwarder, error) {
	return dnsrelay.NewForwarder(dnsrelay.ForwarderConfig{
		Dial: func(ctx context.Context) (net.Conn, error) {
			c, err := tc.DialService(ctx, tunnel.ServiceResolver)
			if err != nil {
				return nil, err
			}
			return c, nil
		},
		UDP: func(src, dst netip.AddrPort, payload []byte) error {
			s := st.Load()
			if s == nil {
				return fmt.Errorf("no netstack yet")
			}
			return s.WriteUDP(src, dst, payload)
		},
		Logger: cfg.Logger.With("part", "dns"),
	})
}

// localPipe is a connected pair of in-memory stream conns, as net.Pipe,
// with half-close: an app that shuts down its sending side after its
// query (as DNS over TCP allows) still reads the answer.
func localPipe(addr netip.AddrPort) (app, mine net.Conn) {
	ar, bw := io.Pipe() // mine → app
	br, aw := io.Pipe() // app → mine
	a := net.TCPAddrFromAddrPort(addr)
	return &pipeConn{r: ar, w: aw, addr: a}, &pipeConn{r: br, w: bw, addr: a}
}

type pipeConn struct {
	r    *io.PipeReader
	w    *io.PipeWriter
	addr net.Addr
}

func (p *pipeConn) Read(b []byte) (int, error)  { return p.r.Read(b) }
func (p *pipeConn) Write(b []byte) (int, error) { return p.w.Write(b) }

// CloseWrite ends this side's stream: the other side reads io.EOF.
func (p *pipeConn) CloseWrite() error { return p.w.Close() }

func (p *pipeConn) Close() error {
	p.w.Close()
	p.r.Close()
	return nil
}

func (p *pipeConn) LocalAddr() net.Addr              { return p.addr }
func (p *pipeConn) RemoteAddr() net.Addr             { return p.addr }
func (p *pipeConn) SetDeadline(time.Time) error      { return nil }
func (p *pipeConn) SetReadDeadline(time.Time) error  { return nil }
func (p *pipeConn) SetWriteDeadline(time.Time) error { return nil }
