//go:build linux

package tunnel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/flynn/noise"
)

// ErrHandshake marks a dial that got no verdict: the handshake did not
// complete. The concentrator answers nothing to a client it cannot
// authenticate, so a wrong server key, a client key it does not list, a
// clock too far off and a concentrator that is simply gone all end the
// same way: silence, then a close or a timeout.
var ErrHandshake = errors.New("tunnel handshake failed")

// ClientConfig configures a Client.
type ClientConfig struct {
	Server    netip.AddrPort
	ServerKey PublicKey
	Key       PrivateKey
	// Mark is set as SO_MARK on every socket; on an MPTCP socket it
	// reaches all subflows, present and future. 0 = none.
	Mark uint32
	// FastOpen sets TCP_FASTOPEN_CONNECT: once the kernel holds a cookie
	// for the server, msg1 rides in the SYN.
	FastOpen bool
	// HandshakeTimeout bounds DialTCP: MPTCP connect, handshake and the
	// concentrator's own dial to the destination. Default 10 s.
	HandshakeTimeout time.Duration
	// Source, if set, names the local address each new connection is
	// bound to (invalid: let the kernel choose). The client's path
	// manager points it at an uplink that works, so a flow's first
	// subflow never starts on an uplink that is withdrawn while the main
	// table's default route still points at it.
	Source func() netip.Addr
	// Now is the clock msg1 is stamped with (nil: this host's wall
	// clock). The client's prober passes the concentrator's own clock as
	// it learns it from authenticated probe replies, which the
	// concentrator requires to within ServerConfig.FutureSkew ahead (and
	// ReplayWindow behind): that way a client whose clock is wrong still
	// connects, and the concentrator can refuse every message recorded
	// before it restarted.
	Now func() time.Time
	// Horizon, when set, is the latest replay horizon the client knows of
	// (the prober's ServerHorizon). A handshake the concentrator closed
	// without answering, stamped at or before a horizon learned since
	// (the concentrator restarted after the stamp was made), is tried
	// once more with a fresh stamp.
	Horizon func() time.Time
	// PoolSize: connections kept through the handshake ahead of any
	// flow while RunPool runs (0: DefaultPoolSize; negative: no pool,
	// every flow dials afresh). PoolMaxAge: a pooled connection unused
	// this long is replaced (default 5 min; keep it under the
	// concentrator's PoolIdle). PoolLinger: after this long without a
	// new flow the pool shrinks to two (default 10 min).
	PoolSize               int
	PoolMaxAge, PoolLinger time.Duration
	// NoReuse: close a flow's connection when the flow ends, instead of
	// putting it back into the pool for the next flow (reuse.go). Reuse
	// needs the pool. Flows that open at a steady rate make the pool
	// grow, to twice PoolSize at most (see pool.grow).
	NoReuse bool
	// EarlyDestination: a flow that finds no pooled connection names its
	// destination in msg1, a round trip sooner than after the handshake.
	// msg1 is replayable and its payload not forward secret: a
	// concentrator's replay cache catches a replay to itself, but the
	// members of a fleet (several concentrators behind one address) each
	// have their own, so a recorded msg1 replayed to each would be dialled
	// once by each. Without it (the default) every destination travels
	// in a request frame, under forward-secret keys, as through the pool.
	EarlyDestination bool
	// Cipher: which transport ciphers msg1 offers besides
	// ChaCha20-Poly1305 (CipherAuto: AES-256-GCM if this host has AES
	// instructions); the concentrator picks one of them.
	Cipher CipherPolicy
	Logger *slog.Logger
}

// ClientStats are a Client's counters.
type ClientStats struct {
	Dials     uint64 // DialTCP calls
	Connected uint64 // flows the concentrator connected
	Rejected  uint64 // flows answered with a verdict other than Connected (VerdictError)
	Failures  uint64 // dials that got no verdict (connect or handshake failed)
	Fallbacks uint64 // connected flows whose connection is plain TCP, not MPTCP
	Active    int64  // connected flows not yet closed
	// The pool (see RunPool): connections ready now; flows that took
	// one; pooled connections found closed by the concentrator when a
	// flow tried them, and retired unused at PoolMaxAge; pool dials made
	// and failed.
	Pooled                           int
	PoolHits, PoolStale, PoolExpired uint64
	PoolDials, PoolFailures          uint64
	// PoolReused: connections a finished flow put back into the pool.
	PoolReused uint64
	// PoolGrow: connections the pool keeps now beyond PoolSize, for
	// the rate flows open at (see pool.grow).
	PoolGrow int
	// FallbacksBySource splits Fallbacks by the local address the
	// connection started from: with the path manager's Source, that
	// names the uplink a middlebox stripped MPTCP on.
	FallbacksBySource map[netip.Addr]uint64
	// OffersAES: msg1 offers AES-256-GCM (ClientConfig.Cipher, and this
	// host's AES instructions with CipherAuto). AESGCM: connected flows
	// whose concentrator chose it; the others are ChaCha20-Poly1305.
	OffersAES bool
	AESGCM    uint64
}

// Client opens flows to one concentrator.
type Client struct {
	cfg    ClientConfig
	log    *slog.Logger
	server string
	static noise.DHKey
	sk     staticKey // static, made once (dh.go)
	ss     []byte    // the static-static DH with ssPeer (ServerKey)
	ssPeer PublicKey
	mac1   [32]byte
	dialer net.Dialer

	now  func() time.Time // ClientConfig.Now; nil means time.Now
	rand io.Reader        // for tests; nil means crypto/rand

	dials, connected, rejected, failures, fallbacks atomic.Uint64
	active                                          atomic.Int64
	lastWarn                                        atomic.Int64
	// appFlows: open flows to a destination (not to a service) and
	// those being opened; see Busy.
	appFlows atomic.Int64
	offerAES bool
	// offerReady: msg1 offers ready frames (reuse.go), which the client
	// then reads on the connections its flows leave. A client reusing
	// without it is one from before ready frames (tests).
	offerReady bool
	aesFlows   atomic.Uint64

	nextID     atomic.Uint64
	mu         sync.Mutex
	conns      map[*Conn]struct{} // open flows, for Conns and AbortAll
	fallbackBy map[netip.Addr]uint64

	pool    pool
	rmemMax int // net.ipv4.tcp_rmem's maximum, for pooled connections
}

const defaultHandshakeTimeout = 10 * time.Second

// keepAlive is set on both ends. The kernel's default (2 h idle) would let
// a flow whose peer vanished pin its relay goroutines for hours
// (tailscale#4522); 60 s + 6×10 s notices within two minutes while still
// riding out a short outage of every uplink. SO_KEEPALIVE and the
// TCP_KEEP* options propagate to MPTCP subflows.
func keepAlive() net.KeepAliveConfig {
	return net.KeepAliveConfig{Enable: true, Idle: 60 * time.Second, Interval: 10 * time.Second, Count: 6}
}

// NewClient checks cfg and returns a Client. Nothing is sent until DialTCP.
func NewClient(cfg ClientConfig) (*Client, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if !cfg.Server.IsValid() || cfg.Server.Port() == 0 {
		return nil, fmt.Errorf("tunnel: server %q is not an address:port", cfg.Server)
	}
	if cfg.Key.IsZero() {
		return nil, errors.New("tunnel: no private key")
	}
	if cfg.ServerKey.IsZero() {
		return nil, errors.New("tunnel: no server public key")
	}
	sk, err := newStaticKey(cfg.Key)
	if err != nil {
		return nil, err
	}
	ss, err := staticStatic(sk, cfg.ServerKey)
	if err != nil {
		return nil, fmt.Errorf("tunnel: server key: %w", err)
	}
	if cfg.Cipher > CipherAES {
		return nil, fmt.Errorf("tunnel: cipher policy %s", cfg.Cipher)
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = defaultHandshakeTimeout
	}
	if cfg.PoolSize == 0 {
		cfg.PoolSize = DefaultPoolSize
	}
	if cfg.PoolMaxAge <= 0 {
		cfg.PoolMaxAge = defaultPoolMaxAge
	}
	if cfg.PoolLinger <= 0 {
		cfg.PoolLinger = defaultPoolLinger
	}
	c := &Client{
		cfg:    cfg,
		log:    cfg.Logger,
		server: cfg.Server.String(),
		static: dhKey(cfg.Key),
		sk:     sk,
		ss:     ss,
		ssPeer: cfg.ServerKey,
		mac1:   mac1Key(cfg.ServerKey),
		now:    cfg.Now,

		offerAES: cfg.Cipher.wantsAES(HardwareAES()),
		rmemMax:  tcpRmemMax(),
	}
	c.offerReady = c.reuses()
	c.pool.kick = make(chan struct{}, 1)
	c.dialer.KeepAliveConfig = keepAlive()
	c.dialer.SetMultipathTCP(true)
	if cfg.FastOpen {
		if v, err := fastOpenSysctl(); err != nil {
			c.log.Warn("cannot read net.ipv4.tcp_fastopen; Fast Open may be off", "err", err)
		} else if v&1 == 0 {
			c.log.Warn("net.ipv4.tcp_fastopen lacks bit 0x1: the kernel will not send data in SYNs", "value", v)
		}
	}
	return c, nil
}

// Stats returns a snapshot of the counters.
func (c *Client) Stats() ClientStats {
	st := ClientStats{
		Dials:     c.dials.Load(),
		Connected: c.connected.Load(),
		Rejected:  c.rejected.Load(),
		Failures:  c.failures.Load(),
		Fallbacks: c.fallbacks.Load(),
		Active:    c.active.Load(),

		PoolHits:     c.pool.hits.Load(),
		PoolStale:    c.pool.stale.Load(),
		PoolExpired:  c.pool.expired.Load(),
		PoolDials:    c.pool.dials.Load(),
		PoolFailures: c.pool.failures.Load(),
		PoolReused:   c.pool.reused.Load(),

		OffersAES: c.offerAES,
		AESGCM:    c.aesFlows.Load(),
	}
	c.pool.mu.Lock()
	st.Pooled = len(c.pool.ready)
	st.PoolGrow = c.pool.grow
	c.pool.mu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.fallbackBy) > 0 {
		st.FallbacksBySource = maps.Clone(c.fallbackBy)
	}
	return st
}

// Conns returns the flows open now.
func (c *Client) Conns() []*Conn {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Collect(maps.Keys(c.conns))
}

// AbortAll resets every open flow (the app sees its connection reset) and
// returns how many there were: what the client does when every uplink has
// been down for longer than it lets flows wait.
func (c *Client) AbortAll() int {
	conns := c.Conns()
	for _, fc := range conns {
		fc.Abort()
	}
	return len(conns)
}

// DialTCP asks the concentrator for a flow to dst and returns the
// encrypted stream once the verdict came. With the pool running it takes
// a connection from the pool and sends dst in its request frame (one
// round trip); otherwise it opens one MPTCP connection and sends msg1
// (authentication and destination, no application bytes). Either way the
// concentrator answers only after its own connect to dst, so a nil error
// means dst accepted.
//
// A verdict other than Connected comes back as a *VerdictError, which
// unwraps to the matching errno. A handshake without a verdict returns an
// error wrapping ErrHandshake (and syscall.ETIMEDOUT when
// HandshakeTimeout expired). Errors connecting to the concentrator wrap
// the socket's error (e.g. ECONNREFUSED).
func (c *Client) DialTCP(ctx context.Context, dst netip.AddrPort) (*Conn, error) {
	if !dst.IsValid() || dst.Port() == 0 || dst.Addr().Zone() != "" {
		return nil, fmt.Errorf("tunnel: destination %s: %w", dst, syscall.EINVAL)
	}
	return c.open(ctx, target{dst: dst})
}

// DialService opens a flow to one of the concentrator's own services
// (ServiceResolver), with the same handshake, errors and counters as
// DialTCP. A concentrator without the service answers NotAllowed.
func (c *Client) DialService(ctx context.Context, svc Service) (*Conn, error) {
	if !svc.valid() {
		return nil, fmt.Errorf("tunnel: %s: %w", svc, syscall.EINVAL)
	}
	return c.open(ctx, target{svc: svc})
}

// Busy tells whether any flow to a destination is open or being opened
// (flows to the concentrator's own services, such as the DNS stream,
// which stays open, do not count): the prober's cue to probe at its busy
// cadence.
func (c *Client) Busy() bool { return c.appFlows.Load() > 0 }

func (c *Client) open(ctx context.Context, t target) (*Conn, error) {
	c.dials.Add(1)
	if t.svc == 0 {
		// Counted while it opens; established keeps the count for
		// the flow's life, and a failed open gives it back.
		c.appFlows.Add(1)
		conn, err := c.openOnce(ctx, t)
		if err != nil {
			c.appFlows.Add(-1)
		}
		return conn, err
	}
	return c.openOnce(ctx, t)
}

func (c *Client) openOnce(ctx context.Context, t target) (*Conn, error) {
	if pc := c.takePooled(); pc != nil {
		conn, err := c.usePooled(ctx, pc, t)
		if !errors.Is(err, errPoolGone) {
			return c.count(conn, err)
		}
		c.pool.stale.Add(1)
		c.log.Debug("pooled connection was closed by the concentrator; dialling afresh", "dst", t.String())
	}
	conn, stamp, err := c.dial(ctx, t)
	if err != nil && c.cfg.Horizon != nil && errors.Is(err, errNoAnswer) && ctx.Err() == nil {
		if h := c.cfg.Horizon(); !h.IsZero() && !stamp.After(h) {
			c.log.Debug("handshake refused after a concentrator restart; again, stamped past its new horizon", "stamp", stamp, "horizon", h)
			conn, _, err = c.dial(ctx, t)
		}
	}
	return c.count(conn, err)
}

// count adds a dial's outcome to the counters.
func (c *Client) count(conn *Conn, err error) (*Conn, error) {
	if err != nil {
		if _, ok := errors.AsType[*VerdictError](err); ok {
			c.rejected.Add(1)
		} else {
			c.failures.Add(1)
		}
		return nil, err
	}
	c.connected.Add(1)
	return conn, nil
}

var errHandshakeTimeout = errors.New("handshake timeout")

// aLongTimeAgo is a deadline that has passed: setting it wakes a blocked
// Read or Write at once.
var aLongTimeAgo = time.Unix(1, 0)

// errNoAnswer marks a handshake the concentrator closed without an answer.
var errNoAnswer = errors.New("closed the connection without answering")

// dial makes one attempt, and says what it stamped msg1 with.
func (c *Client) dial(ctx context.Context, dst target) (*Conn, time.Time, error) {
	var stamp time.Time
	conn, err := c.dialOnce(ctx, dst, &stamp)
	return conn, stamp, err
}

func (c *Client) dialOnce(ctx context.Context, dst target, stamp *time.Time) (*Conn, error) {
	gen := c.poolGen()
	if c.cfg.EarlyDestination || dst.pool {
		tc, keys, err := c.handshake(ctx, dst, stamp)
		if err != nil {
			return nil, err
		}
		return c.established(tc, keys, dst, time.Now(), gen), nil
	}
	// The destination only under forward-secret keys: authenticate as a
	// pooled connection would, then ask in the request frame. One
	// deadline for both, as for a handshake that names it.
	ctx, cancel := context.WithTimeoutCause(ctx, c.cfg.HandshakeTimeout, errHandshakeTimeout)
	defer cancel()
	tc, keys, err := c.handshake(ctx, target{pool: true, soon: true}, stamp)
	if err != nil {
		if ve, ok := errors.AsType[*VerdictError](err); ok {
			// Limited for the connection is the flow's verdict.
			ve.Dst, ve.Service = dst.dst, dst.svc
		}
		return nil, err
	}
	now := time.Now()
	conn, err := c.usePooled(ctx, &pooledConn{tc: tc, keys: keys, born: now, idle: now, gen: gen}, dst)
	if errors.Is(err, errPoolGone) {
		err = fmt.Errorf("%w: %s closed the connection after authenticating it, before the verdict", ErrHandshake, c.server)
	}
	return conn, err
}

// handshake opens one MPTCP connection and runs msg1 and msg2 for dst; a
// verdict other than Connected is a *VerdictError. For a pool target,
// Connected means authenticated and ready for a request frame.
func (c *Client) handshake(ctx context.Context, dst target, stamp *time.Time) (*net.TCPConn, transportKeys, error) {
	ctx, cancel := context.WithTimeoutCause(ctx, c.cfg.HandshakeTimeout, errHandshakeTimeout)
	defer cancel()

	var at dialAttempt
	d := c.dialer
	if c.cfg.Source != nil {
		if src := c.cfg.Source(); src.IsValid() {
			d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
		}
	}
	d.Control = func(_, _ string, rc syscall.RawConn) error {
		return controlDial(rc, c.cfg.Mark, c.cfg.FastOpen, &at)
	}
	// msg1 first (its DH work), so that it follows the TCP handshake at
	// once: until it arrives the concentrator holds the connection as
	// unauthenticated, and under load it evicts such connections, oldest
	// first. Its timestamp is then older by the connect's duration, well
	// within the concentrator's ReplayWindow.
	c.waitPastHorizon(ctx)
	hs, msg1, ts, err := c.msg1For(dst)
	if err != nil {
		return nil, transportKeys{}, err
	}
	*stamp = ts
	// With TCP_FASTOPEN_CONNECT and a cached cookie, this returns before
	// any packet is sent; connect errors then show on Write or Read.
	raw, err := d.DialContext(ctx, "tcp", c.server)
	if err != nil {
		// Go dialled twice if the MPTCP attempt failed (it retries
		// plain TCP after any error); the error is the second
		// attempt's, which for a refused, unreachable or silent
		// server is the same as the first one's.
		return nil, transportKeys{}, c.failed(ctx, "connect to", err)
	}
	tc := raw.(*net.TCPConn)
	if at.attempts > 1 && !at.lastMPTCP {
		c.warnFallback("the MPTCP connect failed and Go retried with plain TCP, which worked", "server", c.server)
	}
	if at.fastOpenErr != nil {
		c.log.Debug("TCP_FASTOPEN_CONNECT not set", "err", at.fastOpenErr)
	}

	stop := context.AfterFunc(ctx, func() { tc.SetDeadline(aLongTimeAgo) })
	var m2 [msg2Size]byte
	if _, err = tc.Write(msg1); err == nil {
		_, err = io.ReadFull(tc, m2[:])
	}
	if !stop() && err == nil {
		// The timer fired as the answer arrived; the socket now has a
		// past deadline, so give up on it as on any timeout.
		err = context.Cause(ctx)
	}
	if err != nil {
		tc.Close()
		return nil, transportKeys{}, c.failed(ctx, "handshake with", err)
	}
	v, keys, err := readMsg2(hs, m2[:], c.offerAES)
	if err != nil {
		tc.Close()
		return nil, transportKeys{}, fmt.Errorf("%w with %s: its answer failed authentication (is ServerKey this concentrator's key?): %w", ErrHandshake, c.server, err)
	}
	if v != Connected {
		tc.Close()
		return nil, transportKeys{}, &VerdictError{Verdict: v, Dst: dst.dst, Service: dst.svc}
	}
	return tc, keys, nil
}

// established makes the flow's Conn of a connection through its verdict.
func (c *Client) established(tc *net.TCPConn, keys transportKeys, dst target, born time.Time, gen uint64) *Conn {
	// Only meaningful now: with Fast Open the connection did not exist
	// when DialContext returned.
	mp, _ := tc.MultipathTCP()
	if !mp {
		c.fallbacks.Add(1)
		if la, ok := tc.LocalAddr().(*net.TCPAddr); ok {
			src, _ := netip.AddrFromSlice(la.IP)
			c.mu.Lock()
			if c.fallbackBy == nil {
				c.fallbackBy = map[netip.Addr]uint64{}
			}
			c.fallbackBy[src.Unmap()]++
			c.mu.Unlock()
		}
		c.warnFallback("flow is on plain TCP, not MPTCP: it uses one path only (the concentrator, a middlebox, or the kernel's MPTCP blackhole detection after lost SYNs; see net.mptcp.blackhole_timeout)", "server", c.server, "dst", dst.String())
	}
	c.active.Add(1)
	app := dst.svc == 0
	var fc *Conn
	if keys.cipher == AES256GCM {
		c.aesFlows.Add(1)
	}
	reuse := c.reuseHook(born, gen)
	if reuse != nil {
		c.pool.returning.Add(1)
	}
	fc = newKeyedConn(tc, keys, mp, func() {
		c.active.Add(-1)
		if app {
			c.appFlows.Add(-1)
		}
		if reuse != nil {
			c.pool.returning.Add(-1)
		}
		c.mu.Lock()
		delete(c.conns, fc)
		c.mu.Unlock()
	})
	fc.id = c.nextID.Add(1)
	fc.dest, fc.opened = dst, time.Now()
	fc.onReuse = reuse
	if reuse != nil && c.offerReady {
		// The concentrator's ready frame may come with its end of
		// stream (reuse.go).
		fc.afterEOF = readyFrameSize
	}
	c.mu.Lock()
	if c.conns == nil {
		c.conns = map[*Conn]struct{}{}
	}
	c.conns[fc] = struct{}{}
	c.mu.Unlock()
	return fc
}

// maxHorizonWait bounds waitPastHorizon: the concentrator's horizon is its
// start plus FutureSkew (1 s by default).
const maxHorizonWait = 2 * time.Second

// waitPastHorizon waits, when the concentrator's clock as the client
// knows it is not yet past the horizon it announced (it restarted less
// than FutureSkew ago), until it is: a handshake stamped before would be
// refused in silence, and the client would learn that only when the
// concentrator closes the connection.
func (c *Client) waitPastHorizon(ctx context.Context) {
	if c.cfg.Horizon == nil || c.now == nil {
		return
	}
	h := c.cfg.Horizon()
	if h.IsZero() {
		return
	}
	d := h.Sub(c.now()) + time.Millisecond
	if d <= 0 || d > maxHorizonWait {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// failed explains an error that left the dial without a verdict.
func (c *Client) failed(ctx context.Context, stage string, err error) error {
	switch {
	case context.Cause(ctx) == errHandshakeTimeout:
		return fmt.Errorf("%w with %s: no answer within %s; a wrong server key, a client key the concentrator does not list, or clocks further apart than its replay window look like this, as does an unreachable concentrator: %w",
			ErrHandshake, c.server, c.cfg.HandshakeTimeout, syscall.ETIMEDOUT)
	case ctx.Err() != nil:
		return fmt.Errorf("tunnel: %s %s: %w", stage, c.server, context.Cause(ctx))
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET):
		if stage == "handshake with" {
			return fmt.Errorf("%w with %s: the concentrator %w; check that ServerKey is its key, that it lists this client's public key, and that the clocks agree: %w",
				ErrHandshake, c.server, errNoAnswer, err)
		}
	}
	return fmt.Errorf("tunnel: %s concentrator %s: %w", stage, c.server, err)
}

// warnFallback logs at Warn at most once a minute, then at Debug: with a
// broken path every flow falls back, and one line says it all.
func (c *Client) warnFallback(msg string, args ...any) {
	now := time.Now().UnixNano()
	last := c.lastWarn.Load()
	if now-last >= int64(time.Minute) && c.lastWarn.CompareAndSwap(last, now) {
		c.log.Warn(msg, append(args, "fallbacks", c.fallbacks.Load())...)
		return
	}
	c.log.Debug(msg, args...)
}

// msg1 builds the first handshake message for dst.
func (c *Client) msg1(dst netip.AddrPort) (*noise.HandshakeState, []byte, error) {
	hs, m, _, err := c.msg1For(target{dst: dst})
	return hs, m, err
}

// msg1For builds the first handshake message for t, and returns its stamp.
func (c *Client) msg1For(dst target) (*noise.HandshakeState, []byte, time.Time, error) {
	dh := &handshakeDH{static: c.sk.priv, staticRaw: c.sk.raw, ss: func(pub []byte) ([]byte, bool) {
		if len(pub) != KeySize || PublicKey(pub) != c.ssPeer {
			return nil, false
		}
		return bytes.Clone(c.ss), true
	}}
	hs, err := newHandshake(dh, true, c.static, append([]byte(nil), c.cfg.ServerKey[:]...), c.rand)
	if err != nil {
		return nil, nil, time.Time{}, fmt.Errorf("tunnel: handshake state: %w", err)
	}
	now := time.Now
	if c.now != nil {
		now = c.now
	}
	ts := now()
	var payload [msg1PayloadSize]byte
	putMsg1Payload(payload[:], ts, dst, offer{aes: c.offerAES, ready: c.offerReady})
	msg, _, _, err := hs.WriteMessage(make([]byte, 0, msg1Size), payload[:])
	if err != nil {
		return nil, nil, time.Time{}, fmt.Errorf("tunnel: handshake: %w", err)
	}
	if len(msg) != msg1NoiseSize {
		return nil, nil, time.Time{}, fmt.Errorf("tunnel: msg1 is %d bytes, want %d", len(msg), msg1NoiseSize)
	}
	m := mac1(&c.mac1, msg)
	return hs, append(msg, m[:]...), ts, nil
}

// readMsg2 authenticates the concentrator's answer and returns the
// verdict with the transport keys (initiator: send with the first) for
// the cipher it chose, which must be one the client offered.
func readMsg2(hs *noise.HandshakeState, m []byte, offeredAES bool) (Verdict, transportKeys, error) {
	if len(m) != msg2Size {
		return 0, transportKeys{}, errBadPayload
	}
	var buf [msg2PayloadSize]byte
	payload, cs1, cs2, err := hs.ReadMessage(buf[:0], m)
	if err != nil {
		return 0, transportKeys{}, err
	}
	if cs1 == nil || cs2 == nil {
		return 0, transportKeys{}, errors.New("handshake did not complete")
	}
	v, ciph, err := parseMsg2Payload(payload)
	if err != nil {
		return 0, transportKeys{}, err
	}
	if ciph == AES256GCM && !offeredAES {
		return 0, transportKeys{}, fmt.Errorf("%w: the concentrator chose %s, which this client did not offer", errBadPayload, ciph)
	}
	return v, newTransportKeys(ciph, cs1, cs2), nil
}
