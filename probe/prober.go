//go:build linux

package probe

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mpvpn/mpvpn/tunnel"
)

// Defaults of a ProberConfig.
const (
	// DefaultInterval is the probe cadence per path: ten 40-byte
	// datagrams a second (and as many 40-byte replies), about 5.5 kbit/s
	// each way with headers, for a verdict within a third of a second.
	DefaultInterval = 100 * time.Millisecond
	// DefaultDeadAfter is three intervals: a path is not declared dead
	// for one or two lost probes. In the outage tests (2026-11-30) the
	// app-level stall of a silent outage was 0.55-0.7 s with 400 ms and
	// about 0.5 s with 300 ms; 200 ms at a 50 ms interval did not do
	// better (what remains is the concentrator re-sending what was in
	// flight on the dead path, behind the other uplink's queue), for
	// twice the probe traffic. A link whose RTT swings more gets more:
	// see the adaptive bound in the prober.
	DefaultDeadAfter = 300 * time.Millisecond
	// DefaultAliveAfter is how many replies bring a dead path back: two,
	// so that one stray datagram does not restore a path that is still
	// mostly black.
	DefaultAliveAfter = 2
	// DefaultIdleInterval is the cadence while Busy says no flow is
	// open: a twentieth of the traffic (some 3 MB a day each way per
	// uplink instead of 60), because then nothing waits on a verdict.
	// A silent uplink is still found within three idle intervals, so
	// that the first flow after an idle hour does not start on it; the
	// first flow switches every path back to DefaultInterval at once.
	DefaultIdleInterval = 2 * time.Second
	// idlePoll is how often an idle path looks at Busy between probes.
	idlePoll = 50 * time.Millisecond
)

// ProberConfig configures the client side.
type ProberConfig struct {
	// Server is the concentrator's address and port: the port number of
	// its TCP listener, here over UDP.
	Server netip.AddrPort
	// ServerAlt, when valid, is the concentrator's address of the other
	// family: a path whose source is of that family probes it instead
	// (an IPv6 uplink beside IPv4 ones, say).
	ServerAlt netip.AddrPort
	// Key is the client's private key and ServerKey the concentrator's
	// public key, as for the tunnel.
	Key       tunnel.PrivateKey
	ServerKey tunnel.PublicKey
	// Mark is set as SO_MARK on every probe socket (0: none), the
	// tunnel's mark, so probes bypass the TUN. Setting it needs
	// CAP_NET_ADMIN.
	Mark uint32
	// Interval is the time between requests on each path
	// (0: DefaultInterval).
	Interval time.Duration
	// DeadAfter is how long a path may go without a reply before it is
	// dead (0: DefaultDeadAfter). It must be at least two intervals. On
	// a path whose RTT is high or swings (a bufferbloated LTE uplink
	// under load), the Prober waits longer: srtt + 4·rttvar, as TCP's
	// RTO, whenever that is more, so that a queue filling up is not
	// taken for an outage.
	DeadAfter time.Duration
	// AliveAfter is how many replies, with no DeadAfter silence among
	// them, bring a dead path back (0: DefaultAliveAfter). The first
	// verdict on a new path only needs one.
	AliveAfter int
	// Busy, if set, tells whether any flow is open. While it is false
	// the paths are probed every IdleInterval (0: DefaultIdleInterval)
	// and judged dead after three of them without a reply; the moment it
	// turns true every path sends a probe and goes back to Interval and
	// DeadAfter, counted from then. Nil: always busy.
	Busy         func() bool
	IdleInterval time.Duration
	// Logger gets transitions and errors (nil: discard).
	Logger *slog.Logger
	// OnChange is told when a path's verdict changes. A new path is
	// presumed alive (it is in use when it is added), so OnChange is
	// called with false when it is first found dead or dies, and with
	// true when it comes back from dead; never for the first verdict
	// "alive". The presumption carries across SetPath with a new source
	// address: if the path was reported dead, the first reply from the
	// new address reports it alive. So the caller can withdraw the
	// uplink on false and restore it on true, and nothing else.
	//
	// It is called from the path's probing goroutine, never twice at
	// once for one path, and not after RemovePath or Close return. It
	// may call Status, but not SetPath, RemovePath or Close (they wait
	// for that goroutine); it delays that path's probes while it runs.
	OnChange func(path string, alive bool)
}

// PathStatus is one path as Status reports it.
type PathStatus struct {
	Name string
	Src  netip.Addr
	// Known is false until the first verdict; Alive is then the
	// verdict.
	Known, Alive bool
	// RTT is the smoothed round-trip time (RFC 6298), 0 before the
	// first reply.
	RTT time.Duration
	// LastReply is when the last valid reply arrived (zero: never).
	LastReply time.Time
	// Sent counts requests written, Received valid replies, Errors
	// failed socket opens and sends (each counts as a probe without a
	// reply).
	Sent, Received, Errors uint64
	// LastError is the last such error, "" if none since the last reply.
	LastError string
}

// Prober probes each path (uplink) to the concentrator. Its methods are
// safe for concurrent use.
type Prober struct {
	cfg    ProberConfig
	log    *slog.Logger
	keys   keys
	server netip.AddrPort

	// counter is shared by all paths, so each request has its own.
	counter    atomic.Uint64
	skewWarned atomic.Bool
	// clock is what the replies of all paths tell of the server's
	// clock, for ServerNow.
	clock serverClock

	ctl    sync.Mutex // serialises SetPath, RemovePath and Close
	mu     sync.Mutex // guards the fields below and every path's status
	closed bool
	paths  map[string]*path
}

// path is one probed uplink. Its status fields are guarded by Prober.mu;
// the probing goroutine owns everything else it uses.
type path struct {
	name   string
	src    netip.Addr
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	st PathStatus
	// reported is the verdict last given to OnChange (initially alive:
	// see OnChange). It survives a change of source address.
	reported bool
}

// NewProber checks cfg and derives the key. No goroutine runs until
// SetPath.
func NewProber(cfg ProberConfig) (*Prober, error) {
	switch {
	case !cfg.Server.IsValid() || cfg.Server.Port() == 0:
		return nil, fmt.Errorf("probe: server address %s is not an address and port", cfg.Server)
	case cfg.Key.IsZero():
		return nil, errors.New("probe: no private key")
	case cfg.ServerKey.IsZero():
		return nil, errors.New("probe: no server key")
	case cfg.Interval < 0 || cfg.DeadAfter < 0 || cfg.AliveAfter < 0 || cfg.IdleInterval < 0:
		return nil, errors.New("probe: negative interval, dead-after or alive-after")
	}
	if cfg.IdleInterval == 0 {
		cfg.IdleInterval = DefaultIdleInterval
	}
	if cfg.Interval == 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.DeadAfter == 0 {
		cfg.DeadAfter = DefaultDeadAfter
	}
	if cfg.AliveAfter == 0 {
		cfg.AliveAfter = DefaultAliveAfter
	}
	if cfg.Interval < time.Millisecond {
		return nil, fmt.Errorf("probe: interval %v is below 1ms", cfg.Interval)
	}
	if cfg.IdleInterval < cfg.Interval {
		cfg.IdleInterval = cfg.Interval
	}
	if cfg.DeadAfter < 2*cfg.Interval {
		return nil, fmt.Errorf("probe: dead-after %v is less than two intervals (%v): one late reply would kill the path", cfg.DeadAfter, cfg.Interval)
	}
	ks, err := deriveKeys(cfg.Key, cfg.ServerKey, cfg.Key.Public(), cfg.ServerKey)
	if err != nil {
		return nil, fmt.Errorf("probe: server key: %w", err)
	}
	p := &Prober{
		cfg:    cfg,
		log:    cfg.Logger,
		keys:   ks,
		server: netip.AddrPortFrom(cfg.Server.Addr().Unmap(), cfg.Server.Port()),
		paths:  make(map[string]*path),
		clock:  serverClock{base: time.Now()},
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	// See the package comment, "Counter".
	p.counter.Store(uint64(time.Now().UnixNano()))
	return p, nil
}

// serverFor is the concentrator's address that a path from src probes:
// of src's family when there is one.
func (p *Prober) serverFor(src netip.Addr) netip.AddrPort {
	alt := p.cfg.ServerAlt
	if alt.IsValid() && src.IsValid() && src.Unmap().Is4() != p.server.Addr().Is4() && alt.Addr().Unmap().Is4() == src.Unmap().Is4() {
		return netip.AddrPortFrom(alt.Addr().Unmap(), alt.Port())
	}
	return p.server
}

// SetPath starts probing the path name from source address src, or, if
// it is already probed from another address, restarts it from src (status
// back to unknown). The same address again changes nothing. A source
// address that cannot be bound yet is retried every interval, and the path
// counts as silent meanwhile.
func (p *Prober) SetPath(name string, src netip.Addr) {
	src = src.Unmap()
	p.ctl.Lock()
	defer p.ctl.Unlock()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	pa := p.paths[name]
	if pa != nil && pa.src == src {
		p.mu.Unlock()
		return
	}
	p.mu.Unlock()
	reported := true
	if pa != nil {
		pa.cancel()
		<-pa.done
		reported = pa.reported
	}
	pa = &path{name: name, src: src, done: make(chan struct{}), reported: reported}
	pa.st = PathStatus{Name: name, Src: src}
	pa.ctx, pa.cancel = context.WithCancel(context.Background())
	p.mu.Lock()
	p.paths[name] = pa
	p.mu.Unlock()
	p.log.Debug("probe: path started", "path", name, "src", src)
	go p.run(pa)
}

// RemovePath stops probing name. OnChange is not called for it.
func (p *Prober) RemovePath(name string) {
	p.ctl.Lock()
	defer p.ctl.Unlock()
	p.mu.Lock()
	pa := p.paths[name]
	delete(p.paths, name)
	p.mu.Unlock()
	if pa != nil {
		pa.cancel()
		<-pa.done
	}
}

// Close stops all probing and waits for it to end. SetPath after Close
// does nothing.
func (p *Prober) Close() error {
	p.ctl.Lock()
	defer p.ctl.Unlock()
	p.mu.Lock()
	p.closed = true
	paths := p.paths
	p.paths = map[string]*path{}
	p.mu.Unlock()
	for _, pa := range paths {
		pa.cancel()
	}
	for _, pa := range paths {
		<-pa.done
	}
	return nil
}

// Status returns every path, sorted by name.
func (p *Prober) Status() []PathStatus {
	p.mu.Lock()
	out := make([]PathStatus, 0, len(p.paths))
	for _, pa := range p.paths {
		out = append(out, pa.st)
	}
	p.mu.Unlock()
	slices.SortFunc(out, func(a, b PathStatus) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// ringSize is how many requests per path are remembered for matching
// replies: 12.8 s at the default interval, far beyond any RTT a live
// path has.
const ringSize = 128

type sentReq struct {
	counter  uint64
	wall     int64     // the timestamp sent, for the skew warning
	at       time.Time // with its monotonic reading, for the RTT
	answered bool
}

// pathRun is the state of one path's goroutine.
type pathRun struct {
	p     *Prober
	pa    *path
	req   *siv // seals this path's requests
	rep   *siv // opens the replies
	conn  *net.UDPConn
	stop  func() bool // the AfterFunc that closes conn on cancel
	ring  [ringSize]sentReq
	next  int
	epoch uint64
	id    uint64
	err   string // last error logged, to log each new one once

	lastReply    time.Time // monotonic; zero until the first reply
	srtt, rttvar time.Duration
	streak       int
	// idle: probing at IdleInterval (Busy said false). since: when the
	// path last turned busy, from which a silence counts once busy.
	idle  bool
	since time.Time
}

// busy asks ProberConfig.Busy.
func (p *Prober) busy() bool { return p.cfg.Busy == nil || p.cfg.Busy() }

// interval is the time between probes now.
func (r *pathRun) interval() time.Duration {
	if r.idle {
		return r.p.cfg.IdleInterval
	}
	return r.p.cfg.Interval
}

func (p *Prober) run(pa *path) {
	defer close(pa.done)
	// Each path has its own hashes: they hold state while in use.
	r := &pathRun{p: p, pa: pa, req: newRequestSIV(&p.keys), rep: newReplySIV(&p.keys)}
	defer r.closeConn()
	var (
		out [RequestSize]byte
		in  [ReplySize + 1]byte
	)
	start := time.Now()
	nextSend := start
	r.since = start
	r.idle = !p.busy()
	for pa.ctx.Err() == nil {
		now := time.Now()
		if idle := !p.busy(); idle != r.idle {
			r.idle = idle
			if !idle {
				// A flow opened: probe now, and judge from now at the
				// busy cadence, not from a reply an idle interval ago.
				r.since = now
				nextSend = now
			} else {
				nextSend = now.Add(p.cfg.IdleInterval)
			}
		}
		if !now.Before(nextSend) {
			r.send(out[:], now)
			nextSend = nextSend.Add(r.interval())
			if nextSend.Before(now) {
				nextSend = now.Add(r.interval()) // we were late (suspend, slow OnChange): do not catch up
			}
		}
		ref := r.lastReply
		if ref.Before(r.since) {
			ref = r.since
		}
		deadAt := ref.Add(r.deadAfter())
		if !now.Before(deadAt) {
			r.streak = 0
			r.verdict(false)
		}
		wake := nextSend
		if deadAt.After(now) && deadAt.Before(wake) {
			wake = deadAt
		}
		if r.idle && p.cfg.Busy != nil {
			wake = minTime(wake, now.Add(idlePoll))
		}
		if r.conn == nil {
			t := time.NewTimer(time.Until(wake))
			select {
			case <-pa.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			continue
		}
		r.conn.SetReadDeadline(wake)
		n, from, err := r.conn.ReadFromUDPAddrPort(in[:])
		if err != nil {
			if pa.ctx.Err() != nil {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			// Not expected on an unconnected UDP socket; reopen
			// at the next interval rather than spin on it.
			r.fail(fmt.Errorf("read: %w", err))
			r.closeConn()
			continue
		}
		if srv := p.serverFor(pa.src); from.Addr().Unmap() != srv.Addr() || from.Port() != srv.Port() {
			continue
		}
		if rep, ok := parseReply(in[:n], r.rep); ok {
			r.received(rep)
		}
	}
}

// deadAfter is DeadAfter (three idle intervals while idle), or srtt +
// 4·rttvar when that is longer.
func (r *pathRun) deadAfter() time.Duration {
	d := r.p.cfg.DeadAfter
	if r.idle {
		d = 3 * r.p.cfg.IdleInterval
	}
	return max(d, r.srtt+4*r.rttvar)
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func (r *pathRun) send(buf []byte, now time.Time) {
	if r.conn == nil {
		if err := r.open(); err != nil {
			r.fail(err)
			return
		}
	}
	wall := now.UnixNano()
	if e := epochOf(wall); e != r.epoch || r.id == 0 {
		r.epoch, r.id = e, clientID(&r.p.keys.k, e)
	}
	counter := r.p.counter.Add(1)
	pkt := putRequest(buf, r.req, request{id: r.id, ts: wall, counter: counter})
	if _, err := r.conn.WriteToUDPAddrPort(pkt, r.p.serverFor(r.pa.src)); err != nil {
		// ENETUNREACH, EADDRNOTAVAIL once the address is gone…: a
		// probe without a reply. A fresh socket next time, in case
		// this one is bound to an address that is no more.
		r.fail(fmt.Errorf("send: %w", err))
		r.closeConn()
		return
	}
	r.ring[r.next] = sentReq{counter: counter, wall: wall, at: now}
	r.next = (r.next + 1) % ringSize
	r.p.mu.Lock()
	r.pa.st.Sent++
	r.p.mu.Unlock()
}

func (r *pathRun) open() error {
	network := "udp4"
	if r.pa.src.Is6() {
		network = "udp6"
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		return controlMark(rc, r.p.cfg.Mark)
	}}
	pc, err := lc.ListenPacket(r.pa.ctx, network, netip.AddrPortFrom(r.pa.src, 0).String())
	if err != nil {
		return fmt.Errorf("open socket: %w", err)
	}
	r.conn = pc.(*net.UDPConn)
	c := r.conn
	r.stop = context.AfterFunc(r.pa.ctx, func() { c.Close() })
	return nil
}

func (r *pathRun) closeConn() {
	if r.conn != nil {
		r.stop()
		r.conn.Close()
		r.conn = nil
	}
}

func (r *pathRun) fail(err error) {
	msg := err.Error()
	r.p.mu.Lock()
	r.pa.st.Errors++
	r.pa.st.LastError = msg
	r.p.mu.Unlock()
	if msg != r.err {
		r.err = msg
		r.p.log.Info("probe: path error", "path", r.pa.name, "src", r.pa.src, "err", err)
	}
}

func (r *pathRun) received(rep reply) {
	// The counter alone identifies the request: it is unique, and the
	// reply is authenticated, so it was the server that echoed it.
	var s *sentReq
	for i := range r.ring {
		if e := &r.ring[i]; e.counter == rep.counter && !e.at.IsZero() {
			s = e
			break
		}
	}
	if s == nil || s.answered {
		return // not ours, too old, or a duplicate
	}
	s.answered = true
	now := time.Now()
	// Only a reply to a request of the last few seconds, once: a
	// replayed old reply could not then bring back a concentrator's
	// past, its clock or its horizon.
	r.p.clock.add(rep.server, rep.horizon, now)
	rtt := now.Sub(s.at)
	if r.srtt == 0 {
		r.srtt, r.rttvar = rtt, rtt/2
	} else {
		d := r.srtt - rtt
		if d < 0 {
			d = -d
		}
		r.rttvar = (3*r.rttvar + d) / 4
		r.srtt = (7*r.srtt + rtt) / 8
	}
	r.lastReply = now
	r.streak++
	r.err = ""
	if off := time.Duration(rep.server - (s.wall + int64(rtt/2))); (off > 10*time.Second || off < -10*time.Second) && !r.p.skewWarned.Swap(true) {
		r.p.log.Warn("probe: this clock and the concentrator's differ; beyond ±60s it stops answering and every path looks dead", "offset", off.Round(time.Millisecond))
	}
	r.p.mu.Lock()
	st := &r.pa.st
	st.Received++
	st.RTT = r.srtt
	st.LastReply = now
	st.LastError = ""
	alive := !st.Known || st.Alive || r.streak >= r.p.cfg.AliveAfter
	r.p.mu.Unlock()
	if alive {
		r.verdict(true)
	}
}

// verdict records alive or dead, and tells OnChange when it differs from
// what it was last told.
func (r *pathRun) verdict(alive bool) {
	p, pa := r.p, r.pa
	p.mu.Lock()
	if pa.ctx.Err() != nil || (pa.st.Known && pa.st.Alive == alive) {
		p.mu.Unlock()
		return
	}
	pa.st.Known, pa.st.Alive = true, alive
	tell := pa.reported != alive
	pa.reported = alive
	p.mu.Unlock()
	if alive {
		p.log.Info("probe: path alive", "path", pa.name, "src", pa.src, "rtt", r.srtt.Round(time.Microsecond))
	} else {
		p.log.Info("probe: path dead", "path", pa.name, "src", pa.src, "silent_for", r.deadAfter())
	}
	if tell && p.cfg.OnChange != nil {
		p.cfg.OnChange(pa.name, alive)
	}
}
