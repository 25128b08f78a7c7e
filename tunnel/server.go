//go:build linux

package tunnel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/flynn/noise"

	"github.com/mpvpn/mpvpn/internal/tokenbucket"
)

// ServerConfig configures a Server. Zero values take the defaults.
type ServerConfig struct {
	Key   PrivateKey
	Peers []PublicKey
	// HandshakeDeadline is fixed, measured from accept: a connection
	// that has not authenticated by then is closed then, and a
	// connection that failed any check is closed exactly then too,
	// whatever and however much it sent. Default 5 s.
	HandshakeDeadline time.Duration
	// ReplayWindow: msg1's timestamp may be up to this much behind the
	// server's clock. Default 30 s, so a client whose clock is behind
	// by up to that much connects even before it has learned the
	// server's clock from its probes.
	ReplayWindow time.Duration
	// FutureSkew: msg1's timestamp may be up to this much ahead of the
	// server's clock. Default 1 s. It is small on purpose: the server
	// refuses every timestamp up to Horizon (its start plus FutureSkew),
	// and a message recorded before a restart carries a timestamp no
	// later than that, so no first message is accepted twice, across a
	// restart too. Clients stamp in the server's clock, learned from
	// authenticated probe replies, so a client clock that is off does
	// not matter.
	FutureSkew time.Duration
	// MaxFlows: authenticated flows open at once, over all peers; over
	// it the verdict is Limited. Default 16384.
	MaxFlows int
	// MaxFlowsPerPeer: authenticated flows per client key; over it the
	// verdict is Limited. Default 4096.
	MaxFlowsPerPeer int
	// PeerHandshakeRate and PeerHandshakeBurst bound each peer's new
	// flows per second (a token bucket); over it the verdict is Limited,
	// and other peers are not affected. Defaults 1000 and 2000.
	PeerHandshakeRate, PeerHandshakeBurst int
	// MaxHalfOpen: connections not yet authenticated, in all. Default
	// 4096. When the table is full the oldest of them is closed to make
	// room; a newcomer is never refused.
	MaxHalfOpen int
	// MaxHalfOpenPerAddr: the same per IPv4 address or IPv6 /64, and
	// MaxHalfOpenPerSite per IPv6 /48. Defaults 32 and 256. Over either,
	// the oldest of that source is closed to make room.
	MaxHalfOpenPerAddr, MaxHalfOpenPerSite int
	// PoolIdle: how long a pooled connection (authenticated, no target
	// yet) may wait for its request frame before the server closes it.
	// Default 6 min, longer than the client's default PoolMaxAge (5 min),
	// so a client retires its pooled connections before the server does.
	PoolIdle time.Duration
	// MaxPooledPerPeer and MaxPooled bound the pooled connections
	// waiting, per client key and in all; over either msg2 answers
	// Limited and the client's pool backs off. Defaults 64 and 16384.
	MaxPooledPerPeer, MaxPooled int
	// Cipher: whether a client's offer of AES-256-GCM is taken
	// (CipherAuto: if this host has AES instructions); otherwise, and
	// for a client that offers nothing, ChaCha20-Poly1305.
	Cipher CipherPolicy
	Logger *slog.Logger
}

// ServerStats are a Server's counters. Every accepted connection ends up
// in exactly one of: Evicted, one of the silent reasons, Flows,
// PoolLimited, PoolUnused, Pooled (waiting now) or, when a pool
// handshake came over the peer's handshake rate, RateLimited (which
// otherwise counts among Flows those refused for the rate).
type ServerStats struct {
	Accepted uint64 // connections accepted
	// Evicted counts half-open connections closed before their deadline
	// to make room for a newer one: the oldest of the same address (or
	// IPv6 /64 or /48) when that is over its share, else the oldest of
	// all when the table is full. Nonzero means a flood, or limits set
	// too low for the clients behind one address.
	Evicted  uint64
	HalfOpen int64 // connections now in the handshake

	// Connections dropped silently (closed at the deadline), by reason.
	Incomplete   uint64 // no complete msg1 before the deadline
	BadMAC       uint64 // mac1 wrong: garbage, a scan, or a wrong server key on the client
	BadHandshake uint64 // Noise decryption failed
	UnknownPeer  uint64 // a valid handshake from a key not in Peers
	BadPayload   uint64 // authenticated, but the request is malformed
	BadTime      uint64 // timestamp outside the window, or before the server's horizon
	Replayed     uint64 // msg1 seen before
	ReplayFull   uint64 // the peer's replay cache is full (that peer's own handshake flood)

	Flows       uint64 // authenticated flows
	Limited     uint64 // answered Limited: the peer had MaxFlowsPerPeer open
	RateLimited uint64 // answered Limited: the peer is over its handshake rate
	Full        uint64 // answered Limited: the server had MaxFlows open
	Active      int64  // authenticated flows not yet closed
	Fallbacks   uint64 // authenticated connections that were plain TCP, not MPTCP
	// NoFiles: connections accepted on the spare descriptor while the
	// process was out of them, and answered Limited (see Serve).
	NoFiles uint64

	// Pooled connections: authenticated ahead of any flow (see
	// ClientConfig.PoolSize). A used one counts in Flows from its
	// request frame on.
	Pooled      int64  // waiting for their request frame now
	PoolLimited uint64 // pool handshakes answered Limited (MaxPooledPerPeer, MaxPooled; over the rate: RateLimited)
	PoolUnused  uint64 // closed without a request: PoolIdle passed, the client closed it, or a bad request frame
	// Reused: connections kept, after their flow ended cleanly, for the
	// client's next flow (they count in Pooled while they wait).
	Reused uint64

	// AcceptsAES: a client's offer of AES-256-GCM is taken
	// (ServerConfig.Cipher, and this host's AES instructions with
	// CipherAuto). AESGCM: flows whose transport is AES-256-GCM; the
	// other Flows are ChaCha20-Poly1305.
	AcceptsAES bool
	AESGCM     uint64
}

// Server is the concentrator side of the protocol.
type Server struct {
	cfg     ServerConfig
	log     *slog.Logger
	static  noise.DHKey
	sk      staticKey // static, made once (dh.go)
	mac1    [32]byte
	peers   map[PublicKey]*peerState
	start   time.Time // with its monotonic reading: see Now
	horizon time.Time // see Horizon
	table   *halfOpen
	rmemMax int // net.ipv4.tcp_rmem's maximum, for pooled connections

	// Hooks for tests; nil means the server's own clock and crypto/rand.
	now  func() time.Time
	rand io.Reader

	accepted, evicted, flows, limited, fallbacks atomic.Uint64
	rateLimited, full                            atomic.Uint64
	rejects                                      [numRejects]atomic.Uint64
	active                                       atomic.Int64
	pooled                                       atomic.Int64
	poolLimited, poolUnused, noFiles, reused     atomic.Uint64
	aesFlows                                     atomic.Uint64
	acceptAES                                    bool

	files fdReserve // descriptors held for accepts when none are left
}

type peerState struct {
	ss       []byte       // the static-static DH with this peer (dh.go)
	flows    atomic.Int64 // open now
	pooled   atomic.Int64 // pooled connections waiting now
	total    atomic.Uint64
	lastSeen atomic.Int64 // unix nanoseconds of the last authenticated flow
	limited  atomic.Uint64
	replay   *replayCache
	full     atomic.Uint64 // handshakes dropped: replay cache full

	mu     sync.Mutex
	bucket tokenbucket.Bucket // new flows per second
}

// PeerStats is one client key's share of the flows.
type PeerStats struct {
	Key      PublicKey
	Active   int64
	Total    uint64
	LastSeen time.Time // zero if never seen
	// Limited counts this peer's flows answered Limited (over its flow
	// cap, its handshake rate, or the server's MaxFlows); ReplayFull its
	// handshakes dropped because its own replay cache was full.
	Limited, ReplayFull uint64
}

// PeerStats returns every configured peer's counters.
func (s *Server) PeerStats() []PeerStats {
	out := make([]PeerStats, 0, len(s.peers))
	for k, p := range s.peers {
		ps := PeerStats{Key: k, Active: p.flows.Load(), Total: p.total.Load(), Limited: p.limited.Load(), ReplayFull: p.full.Load()}
		if ns := p.lastSeen.Load(); ns != 0 {
			ps.LastSeen = time.Unix(0, ns)
		}
		out = append(out, ps)
	}
	slices.SortFunc(out, func(a, b PeerStats) int { return bytes.Compare(a.Key[:], b.Key[:]) })
	return out
}

// Defaults.
const (
	defaultHandshakeDeadline  = 5 * time.Second
	defaultReplayWindow       = 30 * time.Second
	defaultFutureSkew         = time.Second
	defaultMaxFlows           = 16384
	defaultMaxFlowsPerPeer    = 4096
	defaultPeerHandshakeRate  = 1000
	defaultPeerHandshakeBurst = 2000
	defaultMaxHalfOpen        = 4096
	// A legitimate client is half-open for less than a round trip (msg1
	// follows the ACK that completes the TCP handshake), so even a burst
	// of a browser's page load rarely has more than a few connections
	// half-open at once; 32 per address leaves room for a CGNAT address
	// shared by several clients, and eviction of the oldest (see
	// halfOpen) keeps a flood from that same address from starving them.
	defaultMaxHalfOpenPerAddr = 32
	defaultMaxHalfOpenPerSite = 256
	defaultPoolIdle           = 6 * time.Minute
	defaultMaxPooledPerPeer   = 64
	defaultMaxPooled          = 16384
)

// NewServer checks cfg and returns a Server. Its clock starts now (see
// Now), and so does its horizon: msg1s timestamped up to start+FutureSkew
// are refused, so a restart does not reopen the window for messages
// recorded before it.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Key.IsZero() {
		return nil, errors.New("tunnel: no server private key")
	}
	if len(cfg.Peers) == 0 {
		return nil, errors.New("tunnel: no peers: the server would accept nobody")
	}
	if cfg.Cipher > CipherAES {
		return nil, fmt.Errorf("tunnel: cipher policy %s", cfg.Cipher)
	}
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	defDur := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	defDur(&cfg.HandshakeDeadline, defaultHandshakeDeadline)
	defDur(&cfg.ReplayWindow, defaultReplayWindow)
	defDur(&cfg.FutureSkew, defaultFutureSkew)
	def(&cfg.MaxFlows, defaultMaxFlows)
	def(&cfg.MaxFlowsPerPeer, defaultMaxFlowsPerPeer)
	def(&cfg.PeerHandshakeRate, defaultPeerHandshakeRate)
	def(&cfg.PeerHandshakeBurst, defaultPeerHandshakeBurst)
	def(&cfg.MaxHalfOpen, defaultMaxHalfOpen)
	def(&cfg.MaxHalfOpenPerAddr, defaultMaxHalfOpenPerAddr)
	def(&cfg.MaxHalfOpenPerSite, defaultMaxHalfOpenPerSite)
	defDur(&cfg.PoolIdle, defaultPoolIdle)
	def(&cfg.MaxPooledPerPeer, defaultMaxPooledPerPeer)
	def(&cfg.MaxPooled, defaultMaxPooled)
	if cfg.MaxHalfOpenPerAddr > cfg.MaxHalfOpen || cfg.MaxHalfOpenPerSite > cfg.MaxHalfOpen {
		return nil, fmt.Errorf("tunnel: half-open limits per address (%d) and per /48 (%d) must not exceed the total (%d)",
			cfg.MaxHalfOpenPerAddr, cfg.MaxHalfOpenPerSite, cfg.MaxHalfOpen)
	}
	sk, err := newStaticKey(cfg.Key)
	if err != nil {
		return nil, err
	}
	s := &Server{
		cfg:     cfg,
		log:     cfg.Logger,
		static:  dhKey(cfg.Key),
		sk:      sk,
		mac1:    mac1Key(cfg.Key.Public()),
		peers:   make(map[PublicKey]*peerState, len(cfg.Peers)),
		start:   time.Now(),
		table:   newHalfOpen(cfg.MaxHalfOpen, cfg.MaxHalfOpenPerAddr, cfg.MaxHalfOpenPerSite),
		rmemMax: tcpRmemMax(),

		acceptAES: cfg.Cipher.wantsAES(HardwareAES()),
	}
	s.horizon = s.start.Add(cfg.FutureSkew)
	for _, p := range cfg.Peers {
		if p.IsZero() {
			return nil, errors.New("tunnel: a peer key is all zeros")
		}
		ss, err := staticStatic(sk, p)
		if err != nil {
			return nil, fmt.Errorf("tunnel: peer: %w", err)
		}
		s.peers[p] = &peerState{
			ss:     ss,
			replay: newReplayCache(defaultPeerReplayMax),
			bucket: tokenbucket.New(cfg.PeerHandshakeRate, cfg.PeerHandshakeBurst),
		}
	}
	return s, nil
}

// Now is the server's clock: the wall clock as it was at start, advanced
// by the monotonic clock since. It never steps, whatever NTP or an
// operator does to the wall clock meanwhile, so the timestamp check and
// the replay cache's expiry always agree (a wall-clock step back and
// forth could otherwise empty the cache while its messages were still
// acceptable). Clients learn this clock from the probe responder, which
// uses it too, and stamp their handshakes in it.
func (s *Server) Now() time.Time {
	if s.now != nil {
		return s.now()
	}
	return s.start.Add(time.Since(s.start))
}

// Horizon is the latest msg1 timestamp the server refuses however fresh
// it looks: its start plus FutureSkew. Any message accepted by an earlier
// run of the server was stamped no later than that run's clock plus
// FutureSkew, which is before this one's start (unless the wall clock
// was stepped back across the restart by more than the restart took).
// Clients learn it from the probe replies and stamp after it.
func (s *Server) Horizon() time.Time { return s.horizon }

// Stats returns a snapshot of the counters.
func (s *Server) Stats() ServerStats {
	r := func(x reject) uint64 { return s.rejects[x].Load() }
	return ServerStats{
		Accepted:     s.accepted.Load(),
		Evicted:      s.evicted.Load(),
		HalfOpen:     int64(s.table.len()),
		Incomplete:   r(rejectIncomplete),
		BadMAC:       r(rejectMAC),
		BadHandshake: r(rejectNoise),
		UnknownPeer:  r(rejectPeer),
		BadPayload:   r(rejectPayload),
		BadTime:      r(rejectTime),
		Replayed:     r(rejectReplay),
		ReplayFull:   r(rejectReplayFull),
		Flows:        s.flows.Load(),
		Limited:      s.limited.Load(),
		RateLimited:  s.rateLimited.Load(),
		Full:         s.full.Load(),
		Active:       s.active.Load(),
		Fallbacks:    s.fallbacks.Load(),
		Pooled:       s.pooled.Load(),
		PoolLimited:  s.poolLimited.Load(),
		PoolUnused:   s.poolUnused.Load(),
		Reused:       s.reused.Load(),
		NoFiles:      s.noFiles.Load(),
		AcceptsAES:   s.acceptAES,
		AESGCM:       s.aesFlows.Load(),
	}
}

// Serve accepts connections from ln until ln fails or is closed, or ctx is
// done. Each one is authenticated in its own goroutine; an authenticated
// flow is handed to handle in that goroutine, which must decide with
// Flow.Accept or Flow.Refuse (a handler that returns without deciding
// refuses the flow as Unreachable).
//
// Before returning, Serve cancels the context given to handlers, closes
// every connection it accepted that is still in the handshake or inside a
// handler, and waits for all its goroutines, handlers included: a handler
// must return once its context is done. Serve returns nil when ctx was
// done, otherwise the accept error.
func (s *Server) Serve(ctx context.Context, ln net.Listener, handle func(context.Context, *Flow)) error {
	if l, ok := ln.(*listener); ok {
		l.report(s.log)
	}
	// Descriptors held in reserve (fdreserve.go): when accept finds none
	// left (EMFILE, ENFILE), a spare is given up for one connection,
	// which is authenticated and answered Limited, so the client's app
	// is told "a limit" at once, not left to time out as if the
	// concentrator were unreachable. Refilled as descriptors free up;
	// released last, once every goroutine ended.
	s.files.refill()
	defer s.files.close()
	ctx, cancel := context.WithCancel(ctx)
	// Connections kept for another flow outlive the goroutine that
	// accepted them (reuse.go); Serve waits for them too.
	sv := &serveState{ctx: ctx, handle: handle}
	defer sv.closeAndWait()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	stopClose := context.AfterFunc(ctx, func() { ln.Close() })
	defer stopClose()

	var backoff time.Duration
	for {
		s.files.refill()
		raw, err := ln.Accept()
		noFiles := false
		if err != nil && isNoFile(err) && s.files.release() {
			if raw, err = ln.Accept(); err == nil {
				noFiles = true
			}
		}
		if err == nil {
			if err := limitUnsent(raw); err != nil {
				s.log.Debug("TCP_NOTSENT_LOWAT not set", "err", err)
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if transientAcceptErr(err) {
				// Out of file descriptors or memory: wait, as
				// net/http does, rather than spin or give up.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed; retrying", "err", err, "in", backoff)
				t := time.NewTimer(backoff)
				select {
				case <-t.C:
				case <-ctx.Done():
					t.Stop()
					return nil
				}
				continue
			}
			return fmt.Errorf("tunnel: accept: %w", err)
		}
		backoff = 0
		acceptedAt := time.Now()
		s.accepted.Add(1)
		connCtx, cancelConn := context.WithCancel(ctx)
		e, n := s.table.admit(addrPort(raw.RemoteAddr()).Addr(), func() {
			// Evicted to make room: closed now, not at the
			// deadline. Every evicted connection gets the same.
			// SO_LINGER 0 before cancelling: the cancel runs
			// serveConn's AfterFunc, whose Close would otherwise
			// race SetLinger and could end it with a FIN. The
			// cancel before the close, so serveConn counts it as
			// evicted, not incomplete.
			lingerZero(raw)
			cancelConn()
			raw.Close()
		}, msg1Queued(raw))
		s.evicted.Add(uint64(n))
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer cancelConn()
			s.serveConn(connCtx, raw, acceptedAt, e, noFiles, sv)
		}()
	}
}

// FilesScarce reports whether the process is short of file descriptors:
// the reserve Serve keeps for answering connections is not full and
// cannot be refilled. A handler should then open nothing (no dial) and
// answer Limited, so descriptors that free up go to the reserve.
func (s *Server) FilesScarce() bool { return !s.files.full() }

func isNoFile(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE)
}

func transientAcceptErr(err error) bool {
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// abort closes with a RST (SO_LINGER 0). Every rejected connection ends
// this way, so a prober sees the same close whatever it sent.
func abort(raw net.Conn) {
	lingerZero(raw)
	raw.Close()
}

// lingerZero makes raw's close, whoever calls it, a RST.
func lingerZero(raw net.Conn) {
	if tc, ok := raw.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
}

func (s *Server) serveConn(ctx context.Context, raw net.Conn, acceptedAt time.Time, e *hoEntry, noFiles bool, sv *serveState) {
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	defer stop()

	deadline := acceptedAt.Add(s.cfg.HandshakeDeadline)
	raw.SetReadDeadline(deadline)
	// msg1 has a fixed size: read exactly that, nothing of what follows.
	// An older client's is 4 bytes shorter (msg1V0Size) and it then waits
	// for msg2: its 144 bytes are taken as such if their mac1 says so
	// (one BLAKE2s; a 148-byte msg1 passes it by chance with probability
	// 2^-128), else 4 more are read.
	var buf [msg1Size]byte
	m1 := buf[:msg1V0Size]
	var p *pendingFlow
	why := rejectIncomplete
	_, err := io.ReadFull(raw, m1)
	if err == nil && !mac1Valid(&s.mac1, m1) {
		m1 = buf[:]
		_, err = io.ReadFull(raw, m1[msg1V0Size:])
	}
	if err == nil && s.table.check(e) {
		p, why = s.checkMsg1(m1)
		if p == nil {
			s.table.uncheck(e)
		}
	}
	if p == nil {
		if ctx.Err() != nil {
			// Evicted, or the server is stopping: counted as such,
			// not as a reason.
			s.table.release(e)
			return
		}
		s.rejects[why].Add(1)
		s.log.Debug("handshake rejected", "remote", raw.RemoteAddr().String(), "reason", why.String())
		s.silence(ctx, raw, deadline)
		s.table.release(e)
		return
	}
	s.table.release(e)
	raw.SetReadDeadline(time.Time{})

	if noFiles {
		// On the spare descriptor: no flow can be served (it would
		// need another for the destination), but the client hears
		// why, in its own handshake.
		if s.noFiles.Add(1)%1000 == 1 {
			s.log.Warn("out of file descriptors: new connections are answered limited (raise LimitNOFILE / RLIMIT_NOFILE)", "count", s.noFiles.Load())
		}
		p.peer.limited.Add(1)
		s.writeMsg2(raw, p.hs, Limited, p.cipher)
		raw.Close()
		return
	}

	// The peer's rate of new connections, pooled or not: a token per
	// handshake, so a pool refilling in a loop is held to it too.
	p.peer.mu.Lock()
	rateOK := p.peer.bucket.Take(s.Now().UnixNano())
	p.peer.mu.Unlock()
	if p.dst.pool {
		s.servePooled(ctx, raw, p, rateOK, sv)
		return
	}
	s.serveFlow(ctx, p, s.newFlow(raw, p, sv), rateOK, sv.handle)
}

// newFlow makes the Flow of an authenticated connection; its verdict
// goes into msg2 (p.hs) or, on a pooled connection, into a verdict frame.
func (s *Server) newFlow(raw net.Conn, p *pendingFlow, sv *serveState) *Flow {
	f := &Flow{
		peer:    p.peer,
		sv:      sv,
		Peer:    p.key,
		Dst:     p.dst.dst,
		Service: p.dst.svc,
		Remote:  addrPort(raw.RemoteAddr()),
		Local:   addrPort(raw.LocalAddr()),
		s:       s,
		raw:     raw,
		hs:      p.hs,
		keys:    p.keys,
		pooled:  p.keys.send != nil,
		Cipher:  p.cipher,
		ready:   p.ready,
	}
	if tc, ok := raw.(*net.TCPConn); ok {
		f.MultipathTCP, _ = tc.MultipathTCP()
	}
	return f
}

// serveFlow applies the limits to an authenticated request and hands it
// to handle.
func (s *Server) serveFlow(ctx context.Context, p *pendingFlow, f *Flow, rateOK bool, handle func(context.Context, *Flow)) {
	s.flows.Add(1)
	if f.Cipher == AES256GCM {
		s.aesFlows.Add(1)
	}
	if !f.MultipathTCP {
		if _, ok := f.raw.(*net.TCPConn); ok {
			s.fallbacks.Add(1)
		}
	}
	s.active.Add(1)
	f.release = func() {
		p.peer.flows.Add(-1)
		s.active.Add(-1)
	}
	p.peer.total.Add(1)
	p.peer.lastSeen.Store(time.Now().UnixNano())
	p.peer.flows.Add(1)
	// The limits, in order: the peer's rate of new flows, the server's
	// flows in all, the peer's flows. Each refusal is a Limited verdict
	// inside the encrypted channel, so the client's app gets a reset at
	// once; msg1 is already in its peer's replay cache, so replaying it
	// later dials nothing either.
	var limit *atomic.Uint64
	switch {
	case !rateOK:
		limit = &s.rateLimited
	case s.active.Load() > int64(s.cfg.MaxFlows):
		limit = &s.full
	case p.peer.flows.Load() > int64(s.cfg.MaxFlowsPerPeer):
		limit = &s.limited
	}
	if limit != nil {
		limit.Add(1)
		p.peer.limited.Add(1)
		s.log.Debug("flow over a limit", "peer", p.key.String(), "rate_ok", rateOK, "active", s.active.Load(), "peer_flows", p.peer.flows.Load())
		f.Refuse(Limited)
		return
	}
	handle(ctx, f)
	if f.undecided() {
		s.log.Warn("flow handler returned without a verdict; refusing", "peer", p.key.String(), "dst", p.dst.String())
		f.Refuse(Unreachable)
	}
}

// silence is what every failed handshake gets: no byte back, nothing more
// read (the server read exactly msg1's size, or less if less came, from
// every connection alike), and a RST at the fixed deadline. A prober
// learns neither how much was read nor which check failed. Nothing is
// read meanwhile, so a connection here costs no buffer and no wakeup per
// byte it trickles.
func (s *Server) silence(ctx context.Context, raw net.Conn, deadline time.Time) {
	if d := time.Until(deadline); d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
	}
	abort(raw)
}

type reject int

const (
	rejectIncomplete reject = iota
	rejectMAC
	rejectNoise
	rejectPeer
	rejectPayload
	rejectTime
	rejectReplay
	rejectReplayFull
	numRejects
)

func (r reject) String() string {
	return [...]string{"incomplete msg1", "bad mac1", "handshake failed", "unknown peer", "bad payload", "timestamp out of window", "replayed msg1", "replay cache full"}[r]
}

type pendingFlow struct {
	hs     *noise.HandshakeState // nil once msg2 went out (pooled)
	key    PublicKey
	peer   *peerState
	dst    target
	cipher Cipher // the transport, as msg2 will say
	// On a pooled connection, the transport keys from msg2 on.
	keys transportKeys
	// ready: the client speaks ready frames (msg1's offer, reuse.go).
	ready bool
}

// checkMsg1 runs the checks in order of cost: size and mac1 (a BLAKE2s),
// then Noise (two X25519) and the peer list, then the request itself, its
// timestamp, and last the replay cache, which only authenticated messages
// can reach and so only peers can fill.
func (s *Server) checkMsg1(m []byte) (*pendingFlow, reject) {
	if !mac1Valid(&s.mac1, m) {
		return nil, rejectMAC
	}
	dh := &handshakeDH{static: s.sk.priv, staticRaw: s.sk.raw, ss: func(pub []byte) ([]byte, bool) {
		if len(pub) != KeySize {
			return nil, false
		}
		p := s.peers[PublicKey(pub)]
		if p == nil {
			return nil, false
		}
		return bytes.Clone(p.ss), true
	}}
	hs, err := newHandshake(dh, false, s.static, nil, s.rand)
	if err != nil {
		return nil, rejectNoise
	}
	var buf [msg1PayloadSize]byte
	payload, _, _, err := hs.ReadMessage(buf[:0], m[:len(m)-mac1Size])
	if err != nil {
		return nil, rejectNoise
	}
	key := PublicKey(hs.PeerStatic())
	peer := s.peers[key]
	if peer == nil {
		return nil, rejectPeer
	}
	ts, dst, off, err := parseMsg1Payload(payload)
	if err != nil {
		return nil, rejectPayload
	}
	now := s.Now()
	if !ts.After(s.horizon) || ts.Before(now.Add(-s.cfg.ReplayWindow)) || ts.After(now.Add(s.cfg.FutureSkew)) {
		return nil, rejectTime
	}
	// Past ts+ReplayWindow the timestamp check refuses the message by
	// itself, so its peer's cache need not remember it longer.
	switch peer.replay.add([KeySize]byte(m[:KeySize]), ts.Add(s.cfg.ReplayWindow).UnixNano(), now.UnixNano()) {
	case replaySeen:
		return nil, rejectReplay
	case replayFull:
		peer.full.Add(1)
		return nil, rejectReplayFull
	}
	return &pendingFlow{hs: hs, key: key, peer: peer, dst: dst, cipher: negotiate(off.aes, s.acceptAES), ready: off.ready}, 0
}

// Flow is an authenticated request for a connection to Dst. The client is
// waiting for the verdict: call Accept or Refuse exactly once.
type Flow struct {
	Peer PublicKey      // the client's static key
	Dst  netip.AddrPort // where the client wants to go (zero for a service)
	// Service: the client asks for this service of the concentrator's
	// instead of a destination (0: Dst).
	Service Service
	Remote  netip.AddrPort // the client connection's source address
	// Local: the address the connection reached on this host (after
	// whatever NAT stands in front of it).
	Local netip.AddrPort
	// MultipathTCP: the client's connection is MPTCP (false: plain TCP).
	MultipathTCP bool
	// Cipher: the transport the flow's frames are sealed with.
	Cipher Cipher

	s       *Server
	raw     net.Conn
	mu      sync.Mutex
	hs      *noise.HandshakeState // nil once decided
	release func()
	// pooled: the verdict goes into a verdict frame under send (the
	// handshake is long done); decided once it went.
	pooled  bool
	decided bool
	keys    transportKeys // pooled: from msg2 on
	// For the connection's next flow (reuse.go).
	peer  *peerState
	sv    *serveState
	ready bool // the client speaks ready frames
}

var errDecided = errors.New("tunnel: flow already accepted or refused")

func (f *Flow) undecided() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.pooled {
		return !f.decided
	}
	return f.hs != nil
}

// msg2 writes the verdict; called with f.mu held.
func (f *Flow) msg2(v Verdict) (transportKeys, error) {
	if f.pooled {
		if f.decided {
			return transportKeys{}, errDecided
		}
		f.decided = true
		if err := f.s.writeVerdictFrame(f.raw, f.keys.send, v); err != nil {
			return transportKeys{}, fmt.Errorf("tunnel: send verdict to %s: %w", f.Remote, err)
		}
		return f.keys, nil
	}
	if f.hs == nil {
		return transportKeys{}, errDecided
	}
	hs := f.hs
	f.hs = nil
	keys, err := f.s.writeMsg2(f.raw, hs, v, f.Cipher)
	if err != nil {
		return transportKeys{}, fmt.Errorf("tunnel: send verdict to %s: %w", f.Remote, err)
	}
	return keys, nil
}

// writeMsg2 completes the handshake with verdict v and transport cipher c
// and returns the responder's transport keys.
func (s *Server) writeMsg2(raw net.Conn, hs *noise.HandshakeState, v Verdict, c Cipher) (transportKeys, error) {
	var payload [msg2PayloadSize]byte
	putMsg2Payload(payload[:], v, c)
	m, cs1, cs2, err := hs.WriteMessage(make([]byte, 0, msg2Size), payload[:])
	if err == nil && (cs1 == nil || cs2 == nil) {
		err = errors.New("handshake did not complete")
	}
	if err != nil {
		return transportKeys{}, fmt.Errorf("msg2: %w", err)
	}
	// 64 bytes into an empty send buffer; the deadline only guards
	// against a peer that stopped reading with a full window.
	raw.SetWriteDeadline(time.Now().Add(s.cfg.HandshakeDeadline))
	_, err = raw.Write(m)
	raw.SetWriteDeadline(time.Time{})
	if err != nil {
		return transportKeys{}, err
	}
	// Responder: receive with the first CipherState, send with the second.
	return newTransportKeys(c, cs2, cs1), nil
}

// Accept sends the Connected verdict and returns the flow's stream. The
// Conn is the caller's to close; closing it frees the peer's
// MaxFlowsPerPeer slot (a fatal stream error closes it too).
func (f *Flow) Accept() (*Conn, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	keys, err := f.msg2(Connected)
	if err != nil {
		if !errors.Is(err, errDecided) {
			f.raw.Close()
			f.release()
		}
		return nil, err
	}
	c := newKeyedConn(f.raw, keys, f.MultipathTCP, f.release)
	c.onReuse = f.s.reuseHook(f)
	c.afterEOF = requestFrameSize
	return c, nil
}

// Refuse sends verdict v (anything but Connected) inside the encrypted
// handshake and closes the connection.
func (f *Flow) Refuse(v Verdict) error {
	if v == Connected || !v.valid() {
		return fmt.Errorf("tunnel: Refuse(%s): not a refusal", v)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	_, err := f.msg2(v)
	if errors.Is(err, errDecided) {
		return err
	}
	f.raw.Close()
	f.release()
	return err
}
