//go:build linux

// Package concentrator is the server side of mpvpn: it accepts tunnel
// flows from authenticated clients, checks each destination against its
// policy, re-originates the TCP connection and relays the bytes.
package concentrator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"

	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vishvananda/netns"

	"github.com/mpvpn/mpvpn/dnsrelay"
	"github.com/mpvpn/mpvpn/internal/relay"
	"github.com/mpvpn/mpvpn/mptcpinfo"
	"github.com/mpvpn/mpvpn/tunnel"
	"github.com/mpvpn/mpvpn/udprelay"
)

// Config configures a concentrator.
type Config struct {
	Listen       string // host:port, e.g. "0.0.0.0:7100"
	Key          tunnel.PrivateKey
	Peers        []tunnel.PublicKey
	AllowPrivate bool
	// Deny lists destination prefixes refused always, even with
	// AllowPrivate (Policy.Deny).
	Deny     []netip.Prefix
	FastOpen bool
	// Cipher: whether clients' offers of AES-256-GCM are taken
	// (tunnel.ServerConfig.Cipher).
	Cipher tunnel.CipherPolicy
	// DialTimeout bounds the connect to the destination. It must stay
	// below the client's handshake timeout so the client hears "timed
	// out" from us rather than giving up on its own.
	DialTimeout time.Duration
	// HandshakeDeadline is the tunnel server's fixed handshake deadline
	// (tunnel.ServerConfig.HandshakeDeadline); 0 takes its default.
	HandshakeDeadline time.Duration
	// MaxFlowsPerPeer caps one client key's open flows
	// (tunnel.ServerConfig.MaxFlowsPerPeer); 0 takes its default.
	MaxFlowsPerPeer int
	// Limits of the tunnel server (tunnel.ServerConfig, same names); 0
	// takes its default.
	MaxFlows int
	// MaxPooledPerPeer and PoolIdle bound each client's pooled
	// connections (tunnel.ServerConfig); 0 takes the defaults.
	MaxPooledPerPeer                       int
	PoolIdle                               time.Duration
	PeerHandshakeRate, PeerHandshakeBurst  int
	MaxHalfOpen                            int
	MaxHalfOpenPerAddr, MaxHalfOpenPerSite int
	// FrameTimeout bounds how long a flow may wait in the middle of a
	// frame from its client (tunnel.Conn.SetFrameTimeout); 0 takes
	// tunnel.DefaultFrameTimeout.
	FrameTimeout time.Duration
	// DNSUpstream is the resolver that answers the clients' DNS queries
	// (the tunnel's resolver service); zero: the first nameserver of
	// ResolvConf. NoDNS turns the service off.
	DNSUpstream netip.AddrPort
	NoDNS       bool
	// UDPIdleTimeout and MaxUDPFlowsPerClient bound the datagram
	// service's flows (udprelay.ServerConfig); 0 takes its defaults.
	UDPIdleTimeout       time.Duration
	MaxUDPFlowsPerClient int
	ResolvConf           string // "": /etc/resolv.conf
	// FleetAnnounce: the addresses this member of a fleet announces for
	// its clients' joins (mpvpn server --vip, its --announce addresses
	// without a port). A connection that arrives at one of them is
	// warned about, once: the kernel never announces the address a
	// connection already uses, so its client has nothing to join.
	FleetAnnounce []netip.Addr
	Logger        *slog.Logger
}

// Stats are the concentrator's counters.
type Stats struct {
	Active      int64
	Flows       uint64 // authenticated flows handed to us
	Connected   uint64
	Refused     uint64 // destination refused
	Unreachable uint64
	TimedOut    uint64
	NotAllowed  uint64 // refused by policy; no dial was made
	// OutOfFiles: the dial found no file descriptor (EMFILE, ENFILE);
	// the client's app is answered Limited.
	OutOfFiles uint64
	// DNS: the resolver service's streams and queries.
	DNSStreams, DNSQueries, DNSFailed uint64
	// UDP: the datagram service (Up: client → destination); of it, the
	// packets on the uplinks' paths accepted and rejected.
	UDP                             udprelay.Stats
	UDPPathPackets, UDPPathRejected uint64
	BytesUp                         uint64 // client → destination
	BytesDown                       uint64 // destination → client
	Tunnel                          tunnel.ServerStats
}

// checkArrival warns, once, when a fleet member's connection came to the
// address it announces for joins: a balancer NATs the VIP to it, and
// Linux (6.18, 2026-12-03) then sends no ADD_ADDR for it, so the clients'
// flows stay on one subflow without a word from the kernel.
func (s *Server) checkArrival(f *tunnel.Flow) {
	if len(s.cfg.FleetAnnounce) == 0 || !slices.Contains(s.cfg.FleetAnnounce, f.Local.Addr().Unmap()) {
		return
	}
	if s.warnedArrival.CompareAndSwap(false, true) {
		s.log.Warn("a client's connection came to the address this member announces for joins: the kernel does not announce an address a connection already uses, so its clients cannot join and their flows stay on one uplink; have the balancer forward to another address of this host, or announce one with --ports",
			"local", f.Local.String(), "remote", f.Remote.String())
	}
}

// Server is a running concentrator.
type Server struct {
	cfg    Config
	log    *slog.Logger
	ln     net.Listener
	tun    *tunnel.Server
	policy *Policy
	own    *ownAddrs
	dialer net.Dialer

	serveCtx context.Context // Serve's: its end closes the relays
	relays   sync.WaitGroup  // the flows' relays, which Serve waits for
	openMu   sync.Mutex
	open     map[*FlowInfo]struct{} // the relayed flows, for OpenFlows

	active                                               atomic.Int64
	outOfFiles                                           atomic.Uint64
	warnedArrival                                        atomic.Bool
	flows, connected, refused, unreach, timedOut, denied atomic.Uint64
	bytesUp, bytesDown                                   atomic.Uint64
	dns                                                  *dnsrelay.Upstream // nil: no resolver service
	dnsStreams, dnsQueries, dnsFailed                    atomic.Uint64
	udp                                                  udprelay.Counters
	sessions                                             udprelay.Sessions
}

// UDPSessions are the datagram streams' path sessions, whose packets
// arrive on the UDP port the probes use: the probe responder hands them
// over (HandlePacket) and sends for them (Send, to be set before Serve).
func (s *Server) UDPSessions() *udprelay.Sessions { return &s.sessions }

// Listen binds the listener and prepares the server; nothing is served
// until Serve. A port in use fails here, before anything else happens.
func Listen(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 7 * time.Second
	}
	if len(cfg.Peers) == 0 {
		return nil, errors.New("no --peer: the concentrator would accept nobody")
	}
	lap, err := netip.ParseAddrPort(cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("--listen %q: want address:port, e.g. 0.0.0.0:7100: %w", cfg.Listen, err)
	}
	if cfg.HandshakeDeadline < 0 {
		return nil, fmt.Errorf("handshake deadline %v: must be positive", cfg.HandshakeDeadline)
	}
	for _, p := range cfg.Deny {
		if !p.IsValid() || p.Masked() != p {
			return nil, fmt.Errorf("deny %s: want a prefix without host bits", p)
		}
	}
	var dns *dnsrelay.Upstream
	if !cfg.NoDNS {
		up := cfg.DNSUpstream
		if !up.IsValid() {
			rc := cfg.ResolvConf
			if rc == "" {
				rc = "/etc/resolv.conf"
			}
			// A host without a resolver still serves flows; only
			// its clients' lookups are refused, and said so.
			if up, err = dnsrelay.UpstreamFromResolvConf(rc); err != nil {
				cfg.Logger.Warn("no resolver for the clients' DNS; their lookups will fail (give --dns-upstream)", "err", err)
			}
		} else if up.Port() == 0 {
			return nil, fmt.Errorf("--dns-upstream %s: want address:port", up)
		}
		// The upstream is the operator's choice, so the destination
		// policy (which would refuse a resolver on loopback or a private
		// network) does not apply to it.
		if up.IsValid() {
			dns = &dnsrelay.Upstream{Addr: up, Dialer: &net.Dialer{}}
		}
	}
	ts, err := tunnel.NewServer(tunnel.ServerConfig{
		Key:                cfg.Key,
		Peers:              cfg.Peers,
		HandshakeDeadline:  cfg.HandshakeDeadline,
		MaxFlowsPerPeer:    cfg.MaxFlowsPerPeer,
		MaxFlows:           cfg.MaxFlows,
		MaxPooledPerPeer:   cfg.MaxPooledPerPeer,
		PoolIdle:           cfg.PoolIdle,
		PeerHandshakeRate:  cfg.PeerHandshakeRate,
		PeerHandshakeBurst: cfg.PeerHandshakeBurst,
		MaxHalfOpen:        cfg.MaxHalfOpen,
		MaxHalfOpenPerAddr: cfg.MaxHalfOpenPerAddr,
		MaxHalfOpenPerSite: cfg.MaxHalfOpenPerSite,
		Cipher:             cfg.Cipher,
		Logger:             cfg.Logger,
	})
	if err != nil {
		return nil, err
	}
	// Before the listener: no flow can arrive before the set is known.
	own, err := startOwnAddrs(cfg.Logger, netns.None(), nil)
	if err != nil {
		return nil, fmt.Errorf("watch this host's own addresses: %w", err)
	}
	ln, err := tunnel.Listen(ctx, cfg.Listen, cfg.FastOpen)
	if err != nil {
		own.Close()
		return nil, fmt.Errorf("listen on %s: %w", cfg.Listen, err)
	}
	s := &Server{
		cfg: cfg,
		dns: dns,
		log: cfg.Logger,
		ln:  ln,
		tun: ts,
		own: own,
		policy: &Policy{
			AllowPrivate: cfg.AllowPrivate,
			Listen:       lap,
			Deny:         cfg.Deny,
			Own:          own.Snapshot,
		},
	}
	s.dialer = net.Dialer{
		Timeout: cfg.DialTimeout,
		// Short keepalives: a destination that vanishes must not pin a
		// relay goroutine for the kernel's default two hours
		// (tailscale#4522).
		KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: 60 * time.Second, Interval: 10 * time.Second, Count: 6},
		ControlContext:  s.control,
	}
	return s, nil
}

// Close closes the listener and stops watching the host's addresses, for
// a caller that gives up before Serve; Serve does both when it returns.
func (s *Server) Close() error {
	s.own.Close()
	return s.ln.Close()
}

// Addr is the listener's address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Now is the tunnel server's clock, and Horizon the latest handshake
// stamp it refuses however fresh: the probe responder sends both to the
// clients, which stamp their handshakes in this clock, after the horizon
// (tunnel.Server.Now, Horizon).
func (s *Server) Now() time.Time     { return s.tun.Now() }
func (s *Server) Horizon() time.Time { return s.tun.Horizon() }

// Serve handles flows until ctx is cancelled or the listener fails, then
// waits for the flows in progress to end.
func (s *Server) Serve(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The flows have ended when Serve returns (the relays waited for),
	// so no check needs the set after this.
	defer s.own.Close()
	go func() { <-ctx.Done(); s.ln.Close() }()
	s.serveCtx = ctx
	err := s.tun.Serve(ctx, s.ln, s.handle)
	stopped := ctx.Err() != nil
	// The relays outlive their handlers: end them, and wait.
	cancel()
	s.relays.Wait()
	if stopped {
		return nil
	}
	return err
}

// control runs on the socket about to connect: the last word on where it
// goes, whatever produced the address.
func (s *Server) control(_ context.Context, network, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("%w: unparsable %q", ErrNotAllowed, address)
	}
	return s.policy.Check(ap)
}

func (s *Server) handle(ctx context.Context, f *tunnel.Flow) {
	s.flows.Add(1)
	s.checkArrival(f)
	if f.Service != 0 {
		s.handleService(ctx, f)
		return
	}
	log := s.log.With("peer", f.Peer.String(), "dst", f.Dst.String())
	if err := s.policy.Check(f.Dst); err != nil {
		s.denied.Add(1)
		log.Info("flow refused by policy", "err", err)
		f.Refuse(tunnel.NotAllowed)
		return
	}
	up, err := s.dial(ctx, f.Dst)
	if err != nil {
		v := s.verdictFor(err)
		log.Debug("dial failed", "err", err, "verdict", v)
		f.Refuse(v)
		return
	}
	// Listed before the verdict goes out: a client that has its answer
	// finds its flow in the status.
	fi := s.opened(f)
	c, err := f.Accept()
	if err != nil {
		s.closed(fi)
		up.Close()
		log.Debug("accept failed", "err", err)
		return
	}
	c.SetFrameTimeout(s.cfg.FrameTimeout)
	s.openMu.Lock()
	fi.tcp = c.TCP()
	s.openMu.Unlock()
	s.connected.Add(1)
	s.active.Add(1)
	// The relay in a goroutine of its own: this one's stack grew through
	// the handshake and the dial, and a blocked goroutine keeps its
	// stack; an idle flow's memory is mostly its goroutines' stacks
	// (issue 11). Once handle returns, the tunnel server no longer closes
	// the flow when it stops, so the relay does (Serve waits for it).
	s.relays.Add(1)
	go func() {
		defer s.relays.Done()
		defer s.active.Add(-1)
		defer s.closed(fi)
		stop := context.AfterFunc(s.serveCtx, func() {
			c.Close()
			up.Close()
		})
		defer stop()
		st, err := relay.Relay(c, up)
		s.bytesUp.Add(uint64(st.AtoB))
		s.bytesDown.Add(uint64(st.BtoA))
		if err != nil {
			log.Debug("flow ended with error", "err", err, "up", st.AtoB, "down", st.BtoA)
		}
	}()
}

// handleService serves a flow that asks for one of the concentrator's
// services: the UDP relay, and the resolver when there is one.
func (s *Server) handleService(ctx context.Context, f *tunnel.Flow) {
	log := s.log.With("peer", f.Peer.String(), "service", f.Service.String())
	var serve func(c *tunnel.Conn) error
	switch {
	case f.Service == tunnel.ServiceDatagrams:
		// Each datagram's destination meets the policy.
		serve = func(c *tunnel.Conn) error {
			return udprelay.ServeStream(ctx, c, udprelay.ServerConfig{
				Check:       s.policy.Check,
				IdleTimeout: s.cfg.UDPIdleTimeout,
				MaxFlows:    s.cfg.MaxUDPFlowsPerClient,
				Counters:    &s.udp,
				Sessions:    &s.sessions,
				Logger:      log,
			})
		}
	case f.Service == tunnel.ServiceResolver && s.dns != nil:
		serve = func(c *tunnel.Conn) error {
			s.dnsStreams.Add(1)
			st, err := dnsrelay.ServeStream(ctx, c, s.dns, 0, log)
			s.dnsQueries.Add(st.Queries)
			s.dnsFailed.Add(st.Failed)
			return err
		}
	default:
		s.denied.Add(1)
		log.Info("service refused: not offered here")
		f.Refuse(tunnel.NotAllowed)
		return
	}
	// The services open sockets of their own (upstream resolvers, a
	// socket per UDP flow): none while descriptors are scarce.
	if s.tun.FilesScarce() {
		f.Refuse(s.verdictFor(errFilesScarce))
		return
	}
	c, err := f.Accept()
	if err != nil {
		log.Debug("accept failed", "err", err)
		return
	}
	defer c.Close()
	c.SetFrameTimeout(s.cfg.FrameTimeout)
	s.connected.Add(1)
	s.active.Add(1)
	defer s.active.Add(-1)
	// The services read until the stream ends: closing it is how a stop
	// reaches them.
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	if err := serve(c); err != nil {
		log.Debug("service stream ended with error", "err", err)
	}
}

// errFilesScarce is the dial error while the tunnel server's reserve of
// descriptors is not full: a dial would take a descriptor that an accept
// needs to answer a connection at all.
var errFilesScarce = fmt.Errorf("tunnel server's descriptor reserve not full: %w", syscall.EMFILE)

// dial connects to the destination, unless descriptors are scarce.
func (s *Server) dial(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	if s.tun.FilesScarce() {
		return nil, errFilesScarce
	}
	return s.dialer.DialContext(ctx, "tcp", dst.String())
}

// verdictFor maps a dial error to what the client's app will see, and
// counts it.
func (s *Server) verdictFor(err error) tunnel.Verdict {
	switch {
	case errors.Is(err, ErrNotAllowed):
		s.denied.Add(1)
		return tunnel.NotAllowed
	case errors.Is(err, syscall.EMFILE), errors.Is(err, syscall.ENFILE):
		// Not the destination's fault, and not "unreachable": a limit
		// of this host's, said as such.
		if s.outOfFiles.Add(1)%1000 == 1 {
			s.log.Warn("out of file descriptors: flows are refused as limited (raise LimitNOFILE / RLIMIT_NOFILE)", "err", err, "count", s.outOfFiles.Load())
		}
		return tunnel.Limited
	case errors.Is(err, syscall.ECONNREFUSED):
		s.refused.Add(1)
		return tunnel.Refused
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, syscall.ETIMEDOUT), errors.Is(err, os.ErrDeadlineExceeded):
		s.timedOut.Add(1)
		return tunnel.TimedOut
	default:
		s.unreach.Add(1)
		return tunnel.Unreachable
	}
}

// Stats returns a snapshot of the counters.
func (s *Server) Stats() Stats {
	pathIn, pathRejected := s.sessions.Stats()
	return Stats{
		UDPPathPackets:  pathIn,
		UDPPathRejected: pathRejected,
		Active:          s.active.Load(),
		Flows:           s.flows.Load(),
		Connected:       s.connected.Load(),
		Refused:         s.refused.Load(),
		Unreachable:     s.unreach.Load(),
		TimedOut:        s.timedOut.Load(),
		NotAllowed:      s.denied.Load(),
		DNSStreams:      s.dnsStreams.Load(),
		DNSQueries:      s.dnsQueries.Load(),
		DNSFailed:       s.dnsFailed.Load(),
		UDP:             s.udp.Stats(),
		BytesUp:         s.bytesUp.Load(),
		BytesDown:       s.bytesDown.Load(),
		Tunnel:          s.tun.Stats(),
	}
}

// Peers returns each configured client key's flow counters.
func (s *Server) Peers() []tunnel.PeerStats { return s.tun.PeerStats() }

// opened records a flow being relayed now, for OpenFlows; closed forgets it.
func (s *Server) opened(f *tunnel.Flow) *FlowInfo {
	fi := &FlowInfo{Peer: f.Peer, Client: f.Remote, Dst: f.Dst, Since: time.Now()}
	s.openMu.Lock()
	if s.open == nil {
		s.open = map[*FlowInfo]struct{}{}
	}
	s.open[fi] = struct{}{}
	s.openMu.Unlock()
	return fi
}

func (s *Server) closed(fi *FlowInfo) {
	s.openMu.Lock()
	delete(s.open, fi)
	s.openMu.Unlock()
}

// FlowInfo is an open flow as the concentrator relays it.
type FlowInfo struct {
	Peer   tunnel.PublicKey
	Client netip.AddrPort // the client connection's source (its uplink, or its NAT)
	Dst    netip.AddrPort
	Since  time.Time
	// RxBytes and TxBytes are what the flow's connection received from
	// the client and sent it (on its subflows, framing included), and
	// Paths how the client's addresses share them, read when OpenFlows
	// is called (zero before the verdict went).
	RxBytes, TxBytes uint64
	Paths            []mptcpinfo.AddrShare // by remote address: an uplink's, or its NAT's

	tcp *net.TCPConn // once accepted
}

// readPaths fills fi's bytes and paths from its connection's subflows.
func (fi *FlowInfo) readPaths() {
	if fi.tcp == nil {
		return
	}
	info, err := mptcpinfo.GetConn(fi.tcp)
	if err != nil {
		return // closed meanwhile
	}
	fi.Paths = info.ByAddr(true)
	for _, a := range fi.Paths {
		fi.RxBytes += a.BytesReceived
		fi.TxBytes += a.BytesAcked
	}
}

// OpenFlows lists up to max of the flows being relayed now (to a
// destination; the resolver's streams are not among them), oldest first.
func (s *Server) OpenFlows(max int) []FlowInfo {
	s.openMu.Lock()
	out := make([]FlowInfo, 0, min(len(s.open), max))
	for fi := range s.open {
		out = append(out, *fi)
	}
	s.openMu.Unlock()
	slices.SortFunc(out, func(a, b FlowInfo) int { return a.Since.Compare(b.Since) })
	out = out[:min(len(out), max)]
	for i := range out {
		out[i].readPaths()
		out[i].tcp = nil
	}
	return out
}
