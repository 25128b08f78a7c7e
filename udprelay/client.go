//go:build linux

package udprelay

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
)

// ClientConfig configures a Client.
type ClientConfig struct {
	// Dial opens the datagram stream to the concentrator (the tunnel's
	// DialService(ServiceDatagrams)).
	Dial func(ctx context.Context) (net.Conn, error)
	// Write sends a datagram back to an application: the netstack's
	// WriteUDP, from src (the remote sender) to dst (the application).
	Write func(src, dst netip.AddrPort, payload []byte) error
	// Refused tells the application at app that its datagram to dst was
	// refused by the concentrator's policy (an ICMP error); nil: nothing.
	Refused func(app, dst netip.AddrPort)
	// Unreachable tells it that an ICMP error came back for its
	// datagram to dst: why is UnreachablePort, Host, Net or Prohibited.
	Unreachable func(app, dst netip.AddrPort, why int)
	// EchoReply writes an echo reply back to the application that
	// pinged: the netstack's WriteEchoReply, from src (the host that
	// answered) to dst; nil: pings are not carried.
	EchoReply   func(src, dst netip.Addr, id, seq uint16, data []byte) error
	IdleTimeout time.Duration // 0: DefaultIdleTimeout
	MaxFlows    int           // 0: DefaultMaxFlows
	QueueBytes  int           // 0: DefaultQueueBytes
	// DialTimeout bounds a dial of the stream; 0: 10 s.
	DialTimeout time.Duration
	// Transport is TransportStream ("" too) or TransportUplinks; with
	// the latter, Paths lists the live uplinks (the prober's), Server is
	// the concentrator's address and Mark the SO_MARK of the path
	// sockets. DuplicateBelow: a datagram of at most this many bytes of
	// payload goes over the two best paths (0: none), and so do its
	// answers.
	Transport      string
	Paths          func() []Path
	Server         netip.AddrPort
	ServerAlt      netip.AddrPort // the concentrator's address of the other family, if any
	Mark           uint32
	DuplicateBelow int
	Logger         *slog.Logger
}

// What Unreachable's why says.
const (
	UnreachablePort       = unreachPort
	UnreachableHost       = unreachHost
	UnreachableNet        = unreachNet
	UnreachableProhibited = unreachProhibited
)

// ClientStats are a Client's counters. Up is app → concentrator.
type ClientStats struct {
	Flows       int    // application sockets with a flow now
	Up, Down    uint64 // datagrams sent into the stream, and written back to apps
	UpBytes     uint64 // their payload bytes
	DownBytes   uint64
	Refused     uint64 // datagrams the concentrator's policy refused
	Dropped     uint64 // datagrams dropped: a full queue, or no stream
	Dials       uint64 // streams opened
	DialsFailed uint64
	Pings       uint64 // echo requests sent on
	Echoes      uint64 // echo replies written back
	// PathOut and PathIn count the packets sent and accepted over the
	// uplinks (TransportUplinks); the rest went in the stream.
	PathOut, PathIn uint64
	Unreachable     uint64 // ICMP errors passed on to applications
}

// Client carries the applications' datagrams over one stream at a time,
// dialled when the first datagram comes and again after the last one
// failed.
type Client struct {
	cfg ClientConfig
	log *slog.Logger
	out *queue

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	start  time.Time

	mu     sync.Mutex
	byApp  map[netip.AddrPort]*cflow
	byEcho map[netip.AddrPort]*cflow // by the pinging address and its identifier
	byID   map[uint32]*cflow
	nextID uint32

	up, down, upBytes, downBytes, refused, dropped, dials, dialsFailed atomic.Uint64
	pings, echoes, pathOut, pathIn, unreachable                        atomic.Uint64

	sess  atomic.Pointer[session] // the stream's path session
	paths *clientPaths
}

// cflow is one application socket's flow, or one pinging socket's (app
// then holds its address and identifier).
type cflow struct {
	id   uint32
	app  netip.AddrPort
	dns  bool // the short timeout: DNS, and pings
	echo bool
	last atomic.Int64 // nanoseconds since Client.start
}

// NewClient starts a Client; it dials nothing until the first datagram.
func NewClient(cfg ClientConfig) (*Client, error) {
	if cfg.Dial == nil || cfg.Write == nil {
		return nil, errors.New("udprelay: ClientConfig needs Dial and Write")
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.MaxFlows <= 0 {
		cfg.MaxFlows = DefaultMaxFlows
	}
	if cfg.QueueBytes <= 0 {
		cfg.QueueBytes = DefaultQueueBytes
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = 10 * time.Second
	}
	switch cfg.Transport {
	case "":
		cfg.Transport = TransportStream
	case TransportStream:
	case TransportUplinks:
		if cfg.Paths == nil || !cfg.Server.IsValid() {
			return nil, errors.New("udprelay: the uplinks transport needs Paths and Server")
		}
	default:
		return nil, fmt.Errorf("udprelay: transport %q: want %s or %s", cfg.Transport, TransportStream, TransportUplinks)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Client{
		cfg: cfg, log: log, out: newQueue(cfg.QueueBytes), done: make(chan struct{}), start: time.Now(),
		byApp: map[netip.AddrPort]*cflow{}, byEcho: map[netip.AddrPort]*cflow{}, byID: map[uint32]*cflow{},
	}
	c.paths = &clientPaths{c: c, socks: map[netip.Addr]*pathSock{}}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	go c.run()
	return c, nil
}

// Close stops the Client and returns once its goroutines have ended.
func (c *Client) Close() error {
	c.cancel()
	<-c.done
	return nil
}

// Stats returns the counters.
func (c *Client) Stats() ClientStats {
	c.mu.Lock()
	n := len(c.byApp)
	c.mu.Unlock()
	return ClientStats{Flows: n, Up: c.up.Load(), Down: c.down.Load(), UpBytes: c.upBytes.Load(), DownBytes: c.downBytes.Load(), Refused: c.refused.Load(),
		Dropped: c.dropped.Load(), Dials: c.dials.Load(), DialsFailed: c.dialsFailed.Load(),
		Pings: c.pings.Load(), Echoes: c.echoes.Load(), PathOut: c.pathOut.Load(), PathIn: c.pathIn.Load(), Unreachable: c.unreachable.Load()}
}

func (c *Client) now() int64 { return int64(time.Since(c.start)) }

// HandleUDP queues one datagram of the application at app for dst. It
// never blocks: a datagram that finds the queue full is dropped (and
// still counts as taken: UDP may lose it).
func (c *Client) HandleUDP(app, dst netip.AddrPort, payload []byte) bool {
	if c.ctx.Err() != nil {
		return false
	}
	f := c.flow(app, dst.Port() == 53)
	b, err := appendMsg(make([]byte, 0, headerSize+len(payload)), kindData, f.id, dst, payload)
	if err == nil && c.sendPaths(b, len(payload) <= c.cfg.DuplicateBelow) {
		c.pathOut.Add(1)
		c.up.Add(1)
		c.upBytes.Add(uint64(len(payload)))
		return true
	}
	if err != nil || !c.out.put(b) {
		c.dropped.Add(1)
		return true
	}
	c.up.Add(1)
	c.upBytes.Add(uint64(len(payload)))
	return true
}

// HandleEcho queues an application's ping (an echo request from src to
// dst); the reply, if the destination answers the concentrator, comes
// back through EchoReply. It never blocks.
func (c *Client) HandleEcho(src, dst netip.Addr, id, seq uint16, data []byte) {
	if c.ctx.Err() != nil || c.cfg.EchoReply == nil {
		return
	}
	f := c.flowIn(c.byEcho, netip.AddrPortFrom(src, id), true, true)
	b, err := appendMsg(make([]byte, 0, headerSize+len(data)), kindEcho, f.id, netip.AddrPortFrom(dst, seq), data)
	if err == nil && c.sendPaths(b, len(data) <= c.cfg.DuplicateBelow) {
		c.pathOut.Add(1)
		c.pings.Add(1)
		return
	}
	if err != nil || !c.out.put(b) {
		c.dropped.Add(1)
		return
	}
	c.pings.Add(1)
}

// flow is app's flow, made when needed; over MaxFlows the least recently
// used one is forgotten.
func (c *Client) flow(app netip.AddrPort, dns bool) *cflow {
	return c.flowIn(c.byApp, app, dns, false)
}

func (c *Client) flowIn(table map[netip.AddrPort]*cflow, app netip.AddrPort, dns, echo bool) *cflow {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f := table[app]; f != nil {
		f.last.Store(c.now())
		return f
	}
	if len(table) >= c.cfg.MaxFlows {
		var lru *cflow
		for _, f := range table {
			if lru == nil || f.last.Load() < lru.last.Load() {
				lru = f
			}
		}
		delete(table, lru.app)
		delete(c.byID, lru.id)
	}
	for {
		c.nextID++
		if _, taken := c.byID[c.nextID]; !taken && c.nextID != 0 {
			break
		}
	}
	f := &cflow{id: c.nextID, app: app, dns: dns, echo: echo}
	f.last.Store(c.now())
	table[app] = f
	c.byID[f.id] = f
	return f
}

// run keeps a stream while there are datagrams to carry.
func (c *Client) run() {
	defer close(c.done)
	defer c.paths.close()
	sweep := time.NewTicker(min(c.cfg.IdleTimeout, DefaultDNSIdleTimeout) / 4)
	defer sweep.Stop()
	// The paths follow the prober's verdicts within this long.
	paths := time.NewTicker(100 * time.Millisecond)
	defer paths.Stop()
	backoff := time.Duration(0)
	for {
		// Wait for something to send.
		select {
		case <-c.ctx.Done():
			return
		case <-sweep.C:
			c.expire()
			continue
		case <-paths.C:
			c.paths.refresh()
			continue
		case <-c.out.ready:
		}
		if backoff > 0 {
			select {
			case <-c.ctx.Done():
				return
			case <-time.After(backoff):
			}
		}
		ctx, cancel := context.WithTimeout(c.ctx, c.cfg.DialTimeout)
		conn, err := c.cfg.Dial(ctx)
		cancel()
		if err != nil {
			c.dialsFailed.Add(1)
			// What waited is lost, as on a link that is down.
			c.dropped.Add(uint64(c.out.reset()))
			c.log.Debug("datagram stream: dial failed", "err", err)
			backoff = min(max(2*backoff, 100*time.Millisecond), 5*time.Second)
			continue
		}
		c.dials.Add(1)
		backoff = 0
		c.serve(conn, sweep.C, paths.C)
		// Its session went with it.
		c.sess.Store(nil)
	}
}

// serve carries datagrams over conn until it fails or the Client closes.
func (c *Client) serve(conn net.Conn, sweep, paths <-chan time.Time) {
	ctx, cancel := context.WithCancel(c.ctx)
	defer cancel()
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		c.read(conn)
		cancel()
	}()
	// The queue's token was taken by run: drain at once.
	select {
	case c.out.ready <- struct{}{}:
	default:
	}
	writeDone := make(chan error, 1)
	go func() { writeDone <- c.out.drain(ctx, conn) }()
	for {
		select {
		case <-sweep:
			c.expire()
			continue
		case <-paths:
			c.paths.refresh()
			continue
		case err := <-writeDone:
			if ctx.Err() == nil {
				c.log.Debug("datagram stream: write failed", "err", err)
			}
		case <-ctx.Done():
			<-writeDone
		}
		break
	}
	cancel()
	conn.Close()
	<-readDone
}

// read writes the concentrator's datagrams back to the applications.
func (c *Client) read(conn net.Conn) {
	buf := make([]byte, 2+maxMessage)
	for {
		m, err := readMsg(conn, buf)
		if err != nil {
			if c.ctx.Err() == nil {
				c.log.Debug("datagram stream ended", "err", err)
			}
			return
		}
		if m.kind == kindSession {
			if len(m.payload) != sessionKeys {
				c.log.Debug("datagram stream: a malformed session")
				continue
			}
			// The client sends with the first key, receives with the
			// second (copied: the payload is the read buffer).
			keys := append([]byte(nil), m.payload...)
			s, err := newSession(m.flow, keys[:32], keys[32:])
			if err != nil {
				continue
			}
			c.sess.Store(s)
			continue
		}
		c.dispatch(m)
	}
}

// dispatch hands one message of the concentrator's, from the stream or
// a path, to the application it is for.
func (c *Client) dispatch(m msg) {
	c.mu.Lock()
	f := c.byID[m.flow]
	c.mu.Unlock()
	if f == nil {
		if m.kind != kindKeepalive {
			c.dropped.Add(1) // a flow forgotten meanwhile
		}
		return
	}
	switch m.kind {
	case kindEcho:
		if !f.echo || c.cfg.EchoReply == nil {
			return
		}
		f.last.Store(c.now())
		if err := c.cfg.EchoReply(m.addr.Addr(), f.app.Addr(), f.app.Port(), m.addr.Port(), m.payload); err != nil {
			c.dropped.Add(1)
			return
		}
		c.echoes.Add(1)
	case kindData:
		if f.echo {
			return
		}
		f.last.Store(c.now())
		if err := c.cfg.Write(m.addr, f.app, m.payload); err != nil {
			c.dropped.Add(1)
			return
		}
		c.down.Add(1)
		c.downBytes.Add(uint64(len(m.payload)))
	case kindRefused:
		c.refused.Add(1)
		if c.cfg.Refused != nil {
			c.cfg.Refused(f.app, m.addr)
		}
	case kindUnreachable:
		if f.echo || len(m.payload) != 1 {
			return
		}
		c.unreachable.Add(1)
		if c.cfg.Unreachable != nil {
			c.cfg.Unreachable(f.app, m.addr, int(m.payload[0]))
		}
	}
}

// expire forgets the flows idle past their timeout (the concentrator
// closes their sockets on its own clock).
func (c *Client) expire() {
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, table := range []map[netip.AddrPort]*cflow{c.byApp, c.byEcho} {
		for app, f := range table {
			limit := c.cfg.IdleTimeout
			if f.dns {
				limit = min(limit, DefaultDNSIdleTimeout)
			}
			if time.Duration(now-f.last.Load()) > limit {
				delete(table, app)
				delete(c.byID, f.id)
			}
		}
	}
}
