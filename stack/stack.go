//go:build linux

// Package stack is the gVisor netstack bound to mpvpn's TUN device. It
// terminates every TCP flow the routed applications open, and hands each
// one to a Dialer — dialling first, so that an application sees "connected"
// only once the far end has accepted, and a refused or unreachable
// destination as a RST or an ICMP error, as it would without mpvpn. It
// hands every UDP datagram to a UDPHandler, and writes the handler's
// datagrams back into the TUN from whatever source they name (udp.go); a
// datagram the handler refuses gets an ICMP port unreachable. It knows
// nothing of MPTCP or cryptography: the Dialer and the UDPHandler do.
package stack

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	wgtun "golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// Dialer opens the upstream of one application flow. It returns only once
// the far end accepted, or an error that wraps one of the syscall errnos
// below; it must return soon after ctx is done.
//
// How the error reaches the application (errors.Is):
//
//	ECONNREFUSED, EACCES, EAGAIN       RST: connect() fails with ECONNREFUSED
//	EHOSTUNREACH, ETIMEDOUT, a timeout ICMP host unreachable: EHOSTUNREACH
//	ENETUNREACH                        ICMP net unreachable: ENETUNREACH
//	anything else                      RST
//
// In no case does the application's handshake complete.
//
// The returned conn should implement CloseWrite() error, so that an
// application's half-close reaches the far end; without it the flow is
// closed when the application stops sending.
type Dialer interface {
	DialTCP(ctx context.Context, src, dst netip.AddrPort) (net.Conn, error)
}

// Defaults for Config's zero values.
const (
	DefaultMTU         = 65000 // tun.DefaultMTU; when neither Config.MTU nor the device says
	DefaultMaxInFlight = 8192  // Tailscale's figure for Linux
	DefaultDialTimeout = 30 * time.Second
)

// Config configures a Stack.
type Config struct {
	// Device is the TUN (tun.Device.Inner()). New takes it over: Close
	// closes it, as that is the only way to interrupt its blocked Read.
	Device wgtun.Device
	// MTU of the device (0 asks the device); it sizes the read buffers,
	// so it must not be smaller than the TUN's own.
	MTU    int
	Dialer Dialer
	// UDP receives the UDP datagrams. nil refuses them all: each gets an
	// ICMP port unreachable, so that an application falls back (QUIC to
	// TCP) at once rather than after its timeouts.
	UDP UDPHandler
	// Echo takes the applications' pings (ICMP echo requests); nil:
	// they are dropped, never answered by the netstack itself.
	Echo   EchoHandler
	Logger *slog.Logger // nil: discard
	// MaxInFlight caps the SYNs being forwarded at once (dial under way or
	// app handshake not yet done), over all sources. A SYN beyond it gets
	// a RST without a dial. 0 means DefaultMaxInFlight.
	MaxInFlight int
	// DialTimeout bounds each Dialer.DialTCP call; 0 means
	// DefaultDialTimeout. Running out counts as ETIMEDOUT.
	DialTimeout time.Duration
}

// Stats are the Stack's counters.
type Stats struct {
	InFlight  int    // SYNs being forwarded now (dialling, or the app's handshake)
	Active    int    // flows being relayed now
	Forwarded uint64 // flows whose dial and handshake succeeded
	Refused   uint64 // dials refused (ECONNREFUSED, EACCES, EAGAIN): RST
	Failed    uint64 // dials or handshakes that failed otherwise: ICMP or RST
	Limited   uint64 // SYNs answered with a RST because MaxInFlight were in flight

	// TimeWaitRetired: new SYNs that found their 4-tuple's endpoint of
	// an earlier flow in TIME_WAIT and retired it (timewait.go).
	TimeWaitRetired uint64

	PacketsIn, PacketsOut uint64 // read from and written to the device

	UDPIn      uint64 // datagrams the UDPHandler took
	UDPRefused uint64 // datagrams refused (handler false, or none): ICMP port unreachable
	UDPOut     uint64 // datagrams WriteUDP queued for the device
}

// nicID is the netstack's one NIC: the TUN.
const nicID tcpip.NICID = 1

// Stack is a running netstack on a TUN device.
type Stack struct {
	dialer      Dialer
	udp         UDPHandler // nil: refuse every datagram
	log         *slog.Logger
	maxInFlight int
	dialTimeout time.Duration

	ip   *stack.Stack
	link *link
	fwd  *tcp.Forwarder

	ctx    context.Context // done when Close starts: pending dials give up
	cancel context.CancelFunc

	mu       sync.Mutex
	closed   bool
	pending  map[stack.TransportEndpointID]*pendingSYN
	dialing  int // pending entries that dial (Stats.InFlight)
	limiting int // pending entries only waiting for their RST
	flows    map[*flow]struct{}
	wg       sync.WaitGroup // one per forwarder goroutine

	forwarded, refused, failed, limited atomic.Uint64
	timeWaitRetired                     atomic.Uint64
	udpIn, udpRefused, udpOut           atomic.Uint64
	ipID                                atomic.Uint32 // IPv4 ID of WriteUDP's datagrams

	closeOnce sync.Once
	closeErr  error
}

// New starts a netstack on cfg.Device: IPv4 and IPv6, every address
// accepted (promiscuous) and usable as a source (spoofing), default
// routes of both families to the TUN, a TCP forwarder that dials
// before it answers a SYN, and every UDP datagram handed to cfg.UDP. On
// error nothing is left running and cfg.Device is left open.
func New(cfg Config) (*Stack, error) {
	if cfg.Device == nil {
		return nil, errors.New("stack: no device")
	}
	if cfg.Dialer == nil {
		return nil, errors.New("stack: no dialer")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	mtu := cfg.MTU
	if mtu == 0 {
		if m, err := cfg.Device.MTU(); err == nil && m > 0 {
			mtu = m
		} else {
			mtu = DefaultMTU
		}
	}
	if mtu < header.IPv6MinimumMTU || mtu > maxPacketSize {
		return nil, fmt.Errorf("stack: MTU %d is outside %d..%d", mtu, header.IPv6MinimumMTU, maxPacketSize)
	}
	if cfg.MaxInFlight < 0 || cfg.DialTimeout < 0 {
		return nil, errors.New("stack: negative MaxInFlight or DialTimeout")
	}
	s := &Stack{
		dialer:      cfg.Dialer,
		udp:         cfg.UDP,
		log:         log,
		maxInFlight: orDefault(cfg.MaxInFlight, DefaultMaxInFlight),
		dialTimeout: orDefault(cfg.DialTimeout, DefaultDialTimeout),
		pending:     make(map[stack.TransportEndpointID]*pendingSYN),
		flows:       make(map[*flow]struct{}),
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())

	s.ip = stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
		// Nothing in this stack talks to itself.
		HandleLocal: false,
	})
	fail := func(err error) (*Stack, error) {
		s.cancel()
		s.ip.Close()
		s.ip.Wait()
		return nil, err
	}
	if err := setTCPOptions(s.ip); err != nil {
		return fail(fmt.Errorf("stack: %w", err))
	}

	// gVisor's own in-flight limit drops SYNs silently; it is set above
	// anything handleTCP lets through (at most maxInFlight dialling plus
	// maxInFlight waiting for their RST), so that only ours applies.
	s.fwd = tcp.NewForwarder(s.ip, rcvBufDefault, 2*s.maxInFlight+1, s.serve)
	// Before CreateNIC: once the NIC exists, packets may arrive, and a
	// SYN that found no handler would get gVisor's RST.
	s.ip.SetTransportProtocolHandler(tcp.ProtocolNumber, s.handleTCP)
	s.ip.SetTransportProtocolHandler(udp.ProtocolNumber, s.handleUDP)

	s.link = newLink(cfg.Device, mtu, log)
	s.link.echo = cfg.Echo
	s.link.syn = s.retireTimeWait
	if err := s.ip.CreateNICWithOptions(nicID, s.link, stack.NICOptions{Name: "tun"}); err != nil {
		return fail(fmt.Errorf("stack: create NIC: %s", err))
	}
	// Promiscuous: accept packets for any destination, not just addresses
	// assigned to the NIC (every destination on the internet is "local"
	// to a terminating proxy). Spoofing: let the forwarded endpoints
	// answer from those destinations.
	if err := s.ip.SetPromiscuousMode(nicID, true); err != nil {
		return fail(fmt.Errorf("stack: promiscuous mode: %s", err))
	}
	if err := s.ip.SetSpoofing(nicID, true); err != nil {
		return fail(fmt.Errorf("stack: spoofing: %s", err))
	}
	s.ip.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})
	s.link.start()
	log.Info("netstack up", "mtu", mtu, "batch", s.link.batch, "max_in_flight", s.maxInFlight, "dial_timeout", s.dialTimeout)
	return s, nil
}

func orDefault[T int | time.Duration](v, def T) T {
	if v == 0 {
		return def
	}
	return v
}

// Stats returns the current counters.
func (s *Stack) Stats() Stats {
	s.mu.Lock()
	st := Stats{InFlight: s.dialing, Active: len(s.flows)}
	s.mu.Unlock()
	st.Forwarded = s.forwarded.Load()
	st.Refused = s.refused.Load()
	st.Failed = s.failed.Load()
	st.Limited = s.limited.Load()
	st.TimeWaitRetired = s.timeWaitRetired.Load()
	st.PacketsIn = s.link.rxPackets.Load()
	st.PacketsOut = s.link.txPackets.Load()
	st.UDPIn = s.udpIn.Load()
	st.UDPRefused = s.udpRefused.Load()
	st.UDPOut = s.udpOut.Load()
	return st
}

// Close stops the stack: pending dials are cancelled (their SYNs get a
// RST), relayed flows are closed, the device is closed, and every
// goroutine the stack started has ended when it returns. It waits for
// Dialer calls to return, which they must do once their context is done.
func (s *Stack) Close() error {
	s.closeOnce.Do(func() { s.closeErr = s.close() })
	return s.closeErr
}

func (s *Stack) close() error {
	s.mu.Lock()
	s.closed = true // from now on no SYN starts a forwarder goroutine
	flows := make([]*flow, 0, len(s.flows))
	for f := range s.flows {
		flows = append(flows, f)
	}
	s.mu.Unlock()

	s.cancel()
	for _, f := range flows {
		f.close()
	}
	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	// A forwarder goroutine may be in CreateEndpoint, which blocks until
	// the app finishes its handshake (minutes, if the app is gone). Wake
	// it until it has returned: its handshake may not have registered its
	// endpoint or its waiter yet the first time.
	for wait := true; wait; {
		s.interruptHandshakes()
		select {
		case <-done:
			wait = false
		case <-time.After(10 * time.Millisecond):
		}
	}
	s.ip.Close() // aborts what is left: TIME_WAIT, closing endpoints
	err := s.link.close()
	s.ip.Wait()
	s.log.Info("netstack closed")
	if err != nil {
		return fmt.Errorf("stack: %w", err)
	}
	return nil
}

// interruptHandshakes makes every pending CreateEndpoint return.
func (s *Stack) interruptHandshakes() {
	s.mu.Lock()
	for _, p := range s.pending {
		if p.wq != nil {
			p.wq.Notify(waiter.WritableEvents | waiter.EventHUp | waiter.EventErr)
		}
	}
	s.mu.Unlock()
	for _, ep := range s.ip.RegisteredEndpoints() {
		ep.Abort()
	}
}
