//go:build linux

package udprelay

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Defaults of both ends.
const (
	// DefaultIdleTimeout forgets a flow that carried nothing either way
	// for this long: RFC 4787's two minutes at least (REQ-5).
	DefaultIdleTimeout = 2 * time.Minute
	// DefaultDNSIdleTimeout is the idle timeout of a flow whose
	// destination is port 53 (REQ-5a allows shorter timers for
	// well-known ports): a lookup is one exchange.
	DefaultDNSIdleTimeout = 30 * time.Second
	// DefaultMaxFlows caps one client's flows; a new one over the cap
	// takes the place of the least recently used.
	DefaultMaxFlows = 4096
	// DefaultQueueBytes bounds the datagrams waiting for the stream, per
	// direction and per client: beyond it they are dropped.
	DefaultQueueBytes = 1 << 20
)

// ServerConfig configures ServeStream.
type ServerConfig struct {
	// Check is the destination policy, asked for every datagram's
	// destination (refused: the client is told, nothing is sent) and for
	// every sender of a datagram passed back (refused: dropped). nil
	// allows everything.
	Check       func(netip.AddrPort) error
	IdleTimeout time.Duration // 0: DefaultIdleTimeout
	MaxFlows    int           // 0: DefaultMaxFlows
	QueueBytes  int           // 0: DefaultQueueBytes
	// Counters, shared by every stream of a concentrator, count what
	// they carry as they carry it; nil: a stream's own.
	Counters *Counters
	// Sessions, when set, opens a path session for each stream, so that
	// its client may send and receive its datagrams as UDP packets over
	// each uplink instead of in the stream.
	Sessions *Sessions
	Logger   *slog.Logger
}

func (c *ServerConfig) defaults() {
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = DefaultIdleTimeout
	}
	if c.MaxFlows <= 0 {
		c.MaxFlows = DefaultMaxFlows
	}
	if c.QueueBytes <= 0 {
		c.QueueBytes = DefaultQueueBytes
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Counters == nil {
		c.Counters = &Counters{}
	}
}

// Stats count what a stream carried. Up is client → destination.
type Stats struct {
	Streams                   uint64 // streams served
	Flows                     uint64 // sockets opened (a flow has one per family it used)
	Up, Down                  uint64 // datagrams relayed
	UpBytes, DownBytes        uint64 // their payload bytes
	Refused                   uint64 // datagrams refused by the destination policy
	Dropped                   uint64 // datagrams dropped: a full queue, or a sender the policy refuses
	SendErrors                uint64 // datagrams the kernel did not send (no route, ...)
	ActiveFlows, EvictedFlows int64  // open now; closed over MaxFlows
	Pings, Echoes             uint64 // echo requests sent for the clients, replies passed back
	Unreachable               uint64 // ICMP errors for the clients' datagrams, passed back
}

// Counters is Stats in atomics, shared by streams and their goroutines.
type Counters struct {
	streams, flows, up, down, upBytes, downBytes, refused, dropped, sendErrors atomic.Uint64
	pings, echoes, unreachable                                                 atomic.Uint64
	active, evicted                                                            atomic.Int64
}

// Stats returns the counters now.
func (c *Counters) Stats() Stats {
	return Stats{
		Streams: c.streams.Load(), Flows: c.flows.Load(), Up: c.up.Load(), Down: c.down.Load(),
		UpBytes: c.upBytes.Load(), DownBytes: c.downBytes.Load(),
		Refused: c.refused.Load(), Dropped: c.dropped.Load(), SendErrors: c.sendErrors.Load(),
		Pings: c.pings.Load(), Echoes: c.echoes.Load(), Unreachable: c.unreachable.Load(),
		ActiveFlows: c.active.Load(), EvictedFlows: c.evicted.Load(),
	}
}

// server is one client's stream.
type server struct {
	cfg   ServerConfig
	ctx   context.Context
	out   *queue
	n     *Counters
	start time.Time
	wg    sync.WaitGroup

	mu      sync.Mutex
	flows   map[uint32]*sflow
	echoers [2]*echoer // IPv4, IPv6; opened on the first ping
	noEcho  [2]bool    // could not open one: said once
	sess    *serverSession
}

// deliver sends a message to the client: over its paths when it uses
// them, else in the stream. False: dropped (a full queue).
func (s *server) deliver(m []byte) bool {
	if s.sess != nil && s.sess.deliver(s.cfg.Sessions, m) {
		return true
	}
	return s.out.put(m)
}

// sflow is one application socket of the client's: a UDP socket per
// address family, opened when the flow first sends to that family.
type sflow struct {
	id      uint32
	last    atomic.Int64 // nanoseconds since server.start of the last datagram either way
	dns     bool         // its destination was port 53: the short timeout
	mu      sync.Mutex
	socks   [2]*net.UDPConn // IPv4, IPv6
	closed  bool
	onClose sync.Once
}

// ServeStream relays the datagrams of one client's datagram stream rw
// until it ends (nil for a clean end), fails, or ctx is done; it closes
// every socket it opened and returns once every goroutine it started has
// ended. What it carries is counted in cfg.Counters as it goes. The
// caller closes rw when ctx is done.
func ServeStream(ctx context.Context, rw io.ReadWriter, cfg ServerConfig) error {
	cfg.defaults()
	cfg.Counters.streams.Add(1)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s := &server{cfg: cfg, ctx: ctx, out: newQueue(cfg.QueueBytes), n: cfg.Counters, start: time.Now(), flows: map[uint32]*sflow{}}

	if cfg.Sessions != nil {
		if err := s.openSession(); err != nil {
			cfg.Logger.Warn("no path session for this client: its datagrams stay in the stream", "err", err)
		} else {
			defer cfg.Sessions.remove(s.sess)
		}
	}
	var werr error
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		werr = s.out.drain(ctx, rw)
		cancel()
	}()
	s.wg.Add(1)
	go func() { defer s.wg.Done(); s.sweep() }()

	buf := make([]byte, 2+maxMessage)
	var rerr error
	for {
		m, err := readMsg(rw, buf)
		if err != nil {
			if err != io.EOF {
				rerr = err
			}
			break
		}
		if s.sess != nil {
			s.sess.viaStream()
		}
		switch m.kind {
		case kindData:
			s.send(m)
		case kindEcho:
			s.ping(m)
		default:
			rerr = errMalformed
		}
		if rerr != nil {
			break
		}
	}
	cancel()
	s.mu.Lock()
	for _, f := range s.flows {
		s.closeFlow(f)
	}
	s.flows = nil
	for _, e := range s.echoers {
		if e != nil {
			e.close()
		}
	}
	s.mu.Unlock()
	s.wg.Wait()
	<-writerDone
	if rerr == nil && ctx.Err() != nil && werr != nil && !errors.Is(werr, context.Canceled) {
		rerr = werr
	}
	return rerr
}

func (s *server) now() int64 { return int64(time.Since(s.start)) }

// openSession makes the stream's path session and sends its index and
// keys to the client, first thing on the stream.
func (s *server) openSession() error {
	for range 8 { // a free index: 2^32 of them, so at once
		idx, keys, err := newSessionKeys()
		if err != nil {
			return err
		}
		c2s, s2c := keys[:32], keys[32:]
		ses, err := newSession(idx, s2c, c2s)
		if err != nil {
			return err
		}
		ss := &serverSession{session: ses, srv: s}
		if !s.cfg.Sessions.add(ss) {
			continue
		}
		m, err := appendMsg(nil, kindSession, idx, netip.AddrPortFrom(netip.IPv4Unspecified(), 0), keys[:])
		if err != nil {
			s.cfg.Sessions.remove(ss)
			return err
		}
		s.out.put(m)
		s.sess = ss
		return nil
	}
	return errors.New("udprelay: no free session index")
}

// send sends one datagram of the client's to its destination.
func (s *server) send(m msg) {
	if s.cfg.Check != nil {
		if err := s.cfg.Check(m.addr); err != nil {
			s.n.refused.Add(1)
			if b, err := appendMsg(nil, kindRefused, m.flow, m.addr, nil); err == nil && !s.deliver(b) {
				s.n.dropped.Add(1)
			}
			return
		}
	}
	f := s.flow(m.flow, m.addr.Port() == 53)
	if f == nil {
		return
	}
	c, err := f.sock(s, m.addr.Addr().Is4())
	if err != nil {
		s.n.sendErrors.Add(1)
		s.cfg.Logger.Debug("udp socket", "err", err)
		return
	}
	f.last.Store(s.now())
	if _, err := c.WriteToUDPAddrPort(m.payload, m.addr); err != nil {
		s.n.sendErrors.Add(1)
		return
	}
	s.n.up.Add(1)
	s.n.upBytes.Add(uint64(len(m.payload)))
}

// ping sends the client's echo request to its destination.
func (s *server) ping(m msg) {
	// The policy judges a destination by its address (its port matters
	// only for the concentrator's own listener): a ping is checked as a
	// datagram to the echo port, 7.
	if s.cfg.Check != nil && s.cfg.Check(netip.AddrPortFrom(m.addr.Addr(), 7)) != nil {
		s.n.refused.Add(1)
		return // a host that may not be reached does not answer
	}
	i := 1
	if m.addr.Addr().Is4() {
		i = 0
	}
	s.mu.Lock()
	e := s.echoers[i]
	if e == nil && !s.noEcho[i] && s.flows != nil {
		var err error
		if e, err = newEchoer(s, i == 0); err != nil {
			s.noEcho[i] = true
			s.cfg.Logger.Warn("cannot ping for the clients: their pings go unanswered (allow this group in net.ipv4.ping_group_range, or give CAP_NET_RAW)", "err", err)
		}
		s.echoers[i] = e
	}
	s.mu.Unlock()
	if e == nil {
		s.n.dropped.Add(1)
		return
	}
	if err := e.send(m.flow, m.addr.Port(), m.addr.Addr(), m.payload); err != nil {
		s.n.sendErrors.Add(1)
		return
	}
	s.n.pings.Add(1)
}

// flow returns flow id, opening it (and closing the least recently used
// one when MaxFlows are open).
func (s *server) flow(id uint32, dns bool) *sflow {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.flows == nil {
		return nil
	}
	if f := s.flows[id]; f != nil {
		return f
	}
	if len(s.flows) >= s.cfg.MaxFlows {
		var lru *sflow
		for _, f := range s.flows {
			if lru == nil || f.last.Load() < lru.last.Load() {
				lru = f
			}
		}
		s.closeFlow(lru)
		delete(s.flows, lru.id)
		s.n.evicted.Add(1)
	}
	f := &sflow{id: id, dns: dns}
	f.last.Store(s.now())
	s.flows[id] = f
	s.n.active.Add(1)
	return f
}

// closeFlow closes f's sockets; its readers then end. Called with s.mu.
func (s *server) closeFlow(f *sflow) {
	f.onClose.Do(func() {
		s.n.active.Add(-1)
		f.mu.Lock()
		f.closed = true
		socks := f.socks
		f.mu.Unlock()
		for _, c := range socks {
			if c != nil {
				c.Close()
			}
		}
	})
}

// sock is f's socket of one family, opened (with its reader) on first use.
func (f *sflow) sock(s *server, v4 bool) (*net.UDPConn, error) {
	i, network, laddr := 1, "udp6", &net.UDPAddr{IP: net.IPv6unspecified}
	if v4 {
		i, network, laddr = 0, "udp4", &net.UDPAddr{IP: net.IPv4zero}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, net.ErrClosed
	}
	if c := f.socks[i]; c != nil {
		return c, nil
	}
	c, err := net.ListenUDP(network, laddr)
	if err != nil {
		return nil, err
	}
	if rc, err := c.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) { recvErr(int(fd), v4) })
	}
	f.socks[i] = c
	s.n.flows.Add(1)
	s.wg.Add(1)
	go func() { defer s.wg.Done(); s.receive(f, c) }()
	return c, nil
}

// receive passes back what arrives at c, from anyone the policy allows,
// until c is closed. It holds a read buffer only while a datagram is
// being read, so that thousands of quiet flows pin no memory.
func (s *server) receive(f *sflow, c *net.UDPConn) {
	rc, err := c.SyscallConn()
	if err != nil {
		return
	}
	for {
		var (
			out  []byte
			from netip.AddrPort
			rerr error
			errs []icmpErr
		)
		err := rc.Read(func(fd uintptr) bool {
			bp := bufPool.Get().(*[]byte)
			defer bufPool.Put(bp)
			b := *bp
			n, sa, err := unix.Recvfrom(int(fd), b[headerSize:], unix.MSG_DONTWAIT|unix.MSG_TRUNC)
			if err == unix.EAGAIN || err == unix.EINTR {
				return false
			}
			if err != nil {
				// An ICMP error (IP_RECVERR): its details wait in the
				// error queue.
				errs = readErrQueue(int(fd))
				rerr = err
				return true
			}
			from = sockaddrAddrPort(sa)
			if n > len(b)-headerSize {
				return true // truncated: cannot be passed on whole
			}
			// The exact size, so that the queue holds no more than it
			// says: the pooled buffer goes back at once.
			out, rerr = appendMsg(make([]byte, 0, headerSize+n), kindData, f.id, from, b[headerSize:headerSize+n])
			return true
		})
		if err != nil {
			return // closed
		}
		for _, e := range errs {
			if b, err := appendMsg(nil, kindUnreachable, f.id, e.dst, []byte{e.what}); err == nil && s.deliver(b) {
				s.n.unreachable.Add(1)
			}
		}
		if rerr != nil || out == nil {
			continue
		}
		if s.cfg.Check != nil && s.cfg.Check(from) != nil {
			s.n.dropped.Add(1)
			continue
		}
		f.last.Store(s.now())
		if !s.deliver(out) {
			s.n.dropped.Add(1)
			continue
		}
		s.n.down.Add(1)
		s.n.downBytes.Add(uint64(len(out) - headerSize))
	}
}

// sweep closes the flows idle for longer than their timeout.
func (s *server) sweep() {
	t := time.NewTicker(min(s.cfg.IdleTimeout, DefaultDNSIdleTimeout) / 4)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		now := s.now()
		s.mu.Lock()
		for id, f := range s.flows {
			limit := s.cfg.IdleTimeout
			if f.dns {
				limit = min(limit, DefaultDNSIdleTimeout)
			}
			if time.Duration(now-f.last.Load()) > limit {
				s.closeFlow(f)
				delete(s.flows, id)
			}
		}
		s.mu.Unlock()
	}
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, headerSize+maxMessage); return &b }}

func sockaddrAddrPort(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port))
	}
	return netip.AddrPort{}
}
