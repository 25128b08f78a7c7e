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
	// ReplayWindow: msg1's timestamp must be within ± this of the
	// server's clock. Default 30 s.
	ReplayWindow time.Duration
	// MaxFlowsPerPeer: authenticated flows per client key; over it the
	// verdict is Limited. Default 4096.
	MaxFlowsPerPeer int
	// MaxHalfOpen: connections not yet authenticated, in all. Default 4096.
	MaxHalfOpen int
	// MaxHalfOpenPerIP: the same per source address (per /64 for IPv6).
	// Default 1024. Over either limit a connection is closed at once,
	// unread.
	MaxHalfOpenPerIP int
	Logger           *slog.Logger
}

// ServerStats are a Server's counters. Every accepted connection ends up
// in exactly one of: Evicted, one of the silent reasons, or Flows.
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
}

// Server is the concentrator side of the protocol.
type Server struct {
	cfg    ServerConfig
	log    *slog.Logger
	static noise.DHKey
	mac1   [32]byte
	peers  map[PublicKey]*peerState
	start  time.Time
	replay *replayCache

	// Hooks for tests; nil means time.Now and crypto/rand.
	now  func() time.Time
	rand io.Reader

	halfOpen atomic.Int64
	ipMu     sync.Mutex
	perIP    map[netip.Prefix]int

	accepted, evicted, flows, limited, fallbacks atomic.Uint64
	rateLimited, full                            atomic.Uint64
	rejects                                      [numRejects]atomic.Uint64
	active                                       atomic.Int64
}

type peerState struct {
	flows    atomic.Int64 // open now
	total    atomic.Uint64
	lastSeen atomic.Int64 // unix nanoseconds of the last authenticated flow
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
		ps := PeerStats{Key: k, Active: p.flows.Load(), Total: p.total.Load()}
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
	defaultHandshakeDeadline = 5 * time.Second
	defaultReplayWindow      = 30 * time.Second
	defaultMaxFlowsPerPeer   = 4096
	defaultMaxHalfOpen       = 4096
	// A legitimate client opens flows in bursts (a browser page, a
	// build's downloads) and sits behind one address, often a CGNAT one
	// shared with others; a connection is half-open for one round trip
	// only. 1024 keeps one address to a quarter of the global cap.
	defaultMaxHalfOpenPerIP = 1024
)

// NewServer checks cfg and returns a Server. Its start time is taken now:
// msg1s timestamped earlier are refused, so a restart does not reopen the
// window for messages recorded before it. (A client whose clock is behind
// the server's by d is therefore refused for d after a restart.)
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
	if cfg.HandshakeDeadline <= 0 {
		cfg.HandshakeDeadline = defaultHandshakeDeadline
	}
	if cfg.ReplayWindow <= 0 {
		cfg.ReplayWindow = defaultReplayWindow
	}
	if cfg.MaxFlowsPerPeer <= 0 {
		cfg.MaxFlowsPerPeer = defaultMaxFlowsPerPeer
	}
	if cfg.MaxHalfOpen <= 0 {
		cfg.MaxHalfOpen = defaultMaxHalfOpen
	}
	if cfg.MaxHalfOpenPerIP <= 0 {
		cfg.MaxHalfOpenPerIP = defaultMaxHalfOpenPerIP
	}
	s := &Server{
		cfg:    cfg,
		log:    cfg.Logger,
		static: dhKey(cfg.Key),
		mac1:   mac1Key(cfg.Key.Public()),
		peers:  make(map[PublicKey]*peerState, len(cfg.Peers)),
		start:  time.Now(),
		replay: newReplayCache(defaultReplayMax),
		perIP:  make(map[netip.Prefix]int),
	}
	for _, p := range cfg.Peers {
		if p.IsZero() {
			return nil, errors.New("tunnel: a peer key is all zeros")
		}
		if err := checkPeerKey(cfg.Key, p); err != nil {
			return nil, fmt.Errorf("tunnel: peer: %w", err)
		}
		s.peers[p] = &peerState{}
	}
	return s, nil
}

// Stats returns a snapshot of the counters.
func (s *Server) Stats() ServerStats {
	r := func(x reject) uint64 { return s.rejects[x].Load() }
	return ServerStats{
		Accepted:     s.accepted.Load(),
		Evicted:      s.evicted.Load(),
		HalfOpen:     s.halfOpen.Load(),
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
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	stopClose := context.AfterFunc(ctx, func() { ln.Close() })
	defer stopClose()

	var backoff time.Duration
	for {
		raw, err := ln.Accept()
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
		release, ok := s.admit(raw)
		if !ok {
			// Load shedding: closing unread is fine here, every
			// connection over the limit gets the same treatment.
			s.evicted.Add(1)
			abort(raw)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.serveConn(ctx, raw, acceptedAt, release, handle)
		}()
	}
}

func transientAcceptErr(err error) bool {
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// admit takes a half-open slot, globally and for the source address.
func (s *Server) admit(raw net.Conn) (release func(), ok bool) {
	if s.halfOpen.Add(1) > int64(s.cfg.MaxHalfOpen) {
		s.halfOpen.Add(-1)
		return nil, false
	}
	key := sourceKey(raw.RemoteAddr())
	s.ipMu.Lock()
	if s.perIP[key] >= s.cfg.MaxHalfOpenPerIP {
		s.ipMu.Unlock()
		s.halfOpen.Add(-1)
		return nil, false
	}
	s.perIP[key]++
	s.ipMu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.ipMu.Lock()
			if s.perIP[key]--; s.perIP[key] <= 0 {
				delete(s.perIP, key)
			}
			s.ipMu.Unlock()
			s.halfOpen.Add(-1)
		})
	}, true
}

// sourceKey is what MaxHalfOpenPerIP counts by: the IPv4 address, or the
// IPv6 /64 (one host usually owns a whole /64). Non-IP addresses (tests)
// share one key.
func sourceKey(a net.Addr) netip.Prefix {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.Prefix{}
	}
	ip := ta.AddrPort().Addr().Unmap()
	if ip.Is4() {
		return netip.PrefixFrom(ip, 32)
	}
	p, _ := ip.WithZone("").Prefix(64)
	return p
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
	if tc, ok := raw.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	raw.Close()
}

func (s *Server) serveConn(ctx context.Context, raw net.Conn, acceptedAt time.Time, release func(), handle func(context.Context, *Flow)) {
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	defer stop()

	deadline := acceptedAt.Add(s.cfg.HandshakeDeadline)
	raw.SetReadDeadline(deadline)
	// msg1 has a fixed size: read exactly that, nothing of what follows.
	var m1 [msg1Size]byte
	var p *pendingFlow
	why := rejectIncomplete
	if _, err := io.ReadFull(raw, m1[:]); err == nil {
		p, why = s.checkMsg1(m1[:])
	}
	if p == nil {
		s.rejects[why].Add(1)
		s.log.Debug("handshake rejected", "remote", raw.RemoteAddr().String(), "reason", why.String())
		s.silence(ctx, raw, deadline)
		release()
		return
	}
	release()
	raw.SetReadDeadline(time.Time{})

	s.flows.Add(1)
	f := &Flow{
		Peer:   p.key,
		Dst:    p.dst,
		Remote: addrPort(raw.RemoteAddr()),
		s:      s,
		raw:    raw,
		hs:     p.hs,
	}
	if tc, ok := raw.(*net.TCPConn); ok {
		f.MultipathTCP, _ = tc.MultipathTCP()
		if !f.MultipathTCP {
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
	if p.peer.flows.Add(1) > int64(s.cfg.MaxFlowsPerPeer) {
		s.limited.Add(1)
		s.log.Debug("flow over MaxFlowsPerPeer", "peer", p.key.String())
		f.Refuse(Limited)
		return
	}
	handle(ctx, f)
	if f.undecided() {
		s.log.Warn("flow handler returned without a verdict; refusing", "peer", p.key.String(), "dst", p.dst.String())
		f.Refuse(Unreachable)
	}
}

// silence is what every failed handshake gets: no byte back, the
// connection read and discarded until the fixed deadline, then a RST. A
// prober learns neither how much was read nor which check failed.
func (s *Server) silence(ctx context.Context, raw net.Conn, deadline time.Time) {
	bp := discardPool.Get().(*[]byte)
	for {
		// Bounded memory: one small buffer, whatever arrives. The
		// read deadline (already set) ends the loop.
		if _, err := raw.Read(*bp); err != nil {
			break
		}
	}
	discardPool.Put(bp)
	// EOF or an error before the deadline: still wait for it.
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

var discardPool = sync.Pool{New: func() any { b := make([]byte, 4096); return &b }}

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
	hs   *noise.HandshakeState
	key  PublicKey
	peer *peerState
	dst  netip.AddrPort
}

// checkMsg1 runs the checks in order of cost: size and mac1 (a BLAKE2s),
// then Noise (two X25519) and the peer list, then the request itself, its
// timestamp, and last the replay cache, which only authenticated messages
// can reach and so only peers can fill.
func (s *Server) checkMsg1(m []byte) (*pendingFlow, reject) {
	if !mac1Valid(&s.mac1, m) {
		return nil, rejectMAC
	}
	hs, err := newHandshake(false, s.static, nil, s.rand)
	if err != nil {
		return nil, rejectNoise
	}
	var buf [msg1PayloadSize]byte
	payload, _, _, err := hs.ReadMessage(buf[:0], m[:msg1NoiseSize])
	if err != nil {
		return nil, rejectNoise
	}
	key := PublicKey(hs.PeerStatic())
	peer := s.peers[key]
	if peer == nil {
		return nil, rejectPeer
	}
	ts, dst, err := parseMsg1Payload(payload)
	if err != nil {
		return nil, rejectPayload
	}
	now := time.Now()
	if s.now != nil {
		now = s.now()
	}
	w := s.cfg.ReplayWindow
	if ts.Before(s.start) || ts.Before(now.Add(-w)) || ts.After(now.Add(w)) {
		return nil, rejectTime
	}
	// Past ts+w the timestamp check refuses the message by itself, so
	// the cache need not remember it longer.
	switch s.replay.add([KeySize]byte(m[:KeySize]), ts.Add(w).UnixNano(), now.UnixNano()) {
	case replaySeen:
		return nil, rejectReplay
	case replayFull:
		return nil, rejectReplayFull
	}
	return &pendingFlow{hs: hs, key: key, peer: peer, dst: dst}, 0
}

// Flow is an authenticated request for a connection to Dst. The client is
// waiting for the verdict: call Accept or Refuse exactly once.
type Flow struct {
	Peer   PublicKey      // the client's static key
	Dst    netip.AddrPort // where the client wants to go
	Remote netip.AddrPort // the client connection's source address
	// MultipathTCP: the client's connection is MPTCP (false: plain TCP).
	MultipathTCP bool

	s       *Server
	raw     net.Conn
	mu      sync.Mutex
	hs      *noise.HandshakeState // nil once decided
	release func()
}

var errDecided = errors.New("tunnel: flow already accepted or refused")

func (f *Flow) undecided() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.hs != nil
}

// msg2 writes the verdict; called with f.mu held.
func (f *Flow) msg2(v Verdict) (send, recv *noise.CipherState, err error) {
	if f.hs == nil {
		return nil, nil, errDecided
	}
	hs := f.hs
	f.hs = nil
	var payload [msg2PayloadSize]byte
	putMsg2Payload(payload[:], v)
	m, cs1, cs2, err := hs.WriteMessage(make([]byte, 0, msg2Size), payload[:])
	if err == nil && (cs1 == nil || cs2 == nil) {
		err = errors.New("handshake did not complete")
	}
	if err != nil {
		return nil, nil, fmt.Errorf("tunnel: msg2: %w", err)
	}
	// 64 bytes into an empty send buffer; the deadline only guards
	// against a peer that stopped reading with a full window.
	f.raw.SetWriteDeadline(time.Now().Add(f.s.cfg.HandshakeDeadline))
	_, err = f.raw.Write(m)
	f.raw.SetWriteDeadline(time.Time{})
	if err != nil {
		return nil, nil, fmt.Errorf("tunnel: send verdict to %s: %w", f.Remote, err)
	}
	// Responder: receive with the first CipherState, send with the second.
	return cs2, cs1, nil
}

// Accept sends the Connected verdict and returns the flow's stream. The
// Conn is the caller's to close; closing it frees the peer's
// MaxFlowsPerPeer slot (a fatal stream error closes it too).
func (f *Flow) Accept() (*Conn, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	send, recv, err := f.msg2(Connected)
	if err != nil {
		if !errors.Is(err, errDecided) {
			f.raw.Close()
			f.release()
		}
		return nil, err
	}
	return newConn(f.raw, send, recv, f.MultipathTCP, f.release), nil
}

// Refuse sends verdict v (anything but Connected) inside the encrypted
// handshake and closes the connection.
func (f *Flow) Refuse(v Verdict) error {
	if v == Connected || !v.valid() {
		return fmt.Errorf("tunnel: Refuse(%s): not a refusal", v)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	_, _, err := f.msg2(v)
	if errors.Is(err, errDecided) {
		return err
	}
	f.raw.Close()
	f.release()
	return err
}
