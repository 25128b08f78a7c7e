//go:build linux

package dnsrelay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// ErrClosed is returned by a Forwarder's methods once Close was called.
var ErrClosed = errors.New("dnsrelay: forwarder closed")

// ErrBusy is returned when MaxInFlight queries are waiting already: the
// query is dropped rather than queued (a resolver that falls behind must
// not grow without bound).
var ErrBusy = errors.New("dnsrelay: too many queries in flight")

// ForwarderConfig configures a Forwarder.
type ForwarderConfig struct {
	// Dial opens a stream to the resolver service (the tunnel's
	// DialService(ServiceResolver)).
	Dial func(ctx context.Context) (net.Conn, error)
	// Timeout bounds one query, dial included; 0: DefaultTimeout.
	Timeout time.Duration
	// MaxInFlight bounds the queries waiting for an answer; 0:
	// DefaultMaxInFlight * 4 (the upstream stream's IDs are 16 bits).
	MaxInFlight int
	// UDP sends an answer back to an application over UDP: the
	// netstack's WriteUDP (from the resolver address to the app).
	UDP    func(src, dst netip.AddrPort, payload []byte) error
	Logger *slog.Logger
}

// ForwarderStats are a Forwarder's counters.
type ForwarderStats struct {
	Queries  uint64 // from applications, over UDP and TCP
	Answered uint64 // answers from the concentrator passed back
	Failed   uint64 // no answer in time (SERVFAIL sent, or nothing when unparsable)
	Dropped  uint64 // refused because MaxInFlight were waiting
	Dials    uint64 // streams opened to the concentrator
}

// Forwarder answers applications' DNS queries through the tunnel, over
// one stream at a time to the concentrator's resolver, dialled when the
// first query comes and again whenever the last one failed.
type Forwarder struct {
	cfg ForwarderConfig
	log *slog.Logger
	sem chan struct{}

	ctx    context.Context // done at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // UDP queries and stream readers

	mu     sync.Mutex
	up     *upstream // the current stream; nil until needed
	closed bool

	queries, answered, failed, dropped, dials atomic.Uint64
}

// upstream is one stream to the concentrator's resolver: queries carry
// IDs of its own, so that the applications' IDs (which may collide) are
// restored on the way back.
type upstream struct {
	conn    net.Conn
	ready   chan struct{} // closed once dialled (or failed to)
	err     error         // why the stream is gone; set once
	wmu     sync.Mutex
	mu      sync.Mutex
	nextID  uint16
	waiting map[uint16]chan []byte
}

// NewForwarder returns a Forwarder; it dials nothing until the first query.
func NewForwarder(cfg ForwarderConfig) (*Forwarder, error) {
	if cfg.Dial == nil {
		return nil, errors.New("dnsrelay: no Dial")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 4 * DefaultMaxInFlight
	}
	if cfg.MaxInFlight > 1<<15 {
		return nil, fmt.Errorf("dnsrelay: MaxInFlight %d: at most %d (16-bit IDs)", cfg.MaxInFlight, 1<<15)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	f := &Forwarder{cfg: cfg, log: log, sem: make(chan struct{}, cfg.MaxInFlight)}
	f.ctx, f.cancel = context.WithCancel(context.Background())
	return f, nil
}

// Stats returns the counters.
func (f *Forwarder) Stats() ForwarderStats {
	return ForwarderStats{
		Queries: f.queries.Load(), Answered: f.answered.Load(), Failed: f.failed.Load(),
		Dropped: f.dropped.Load(), Dials: f.dials.Load(),
	}
}

// Close closes the stream and fails the queries in flight; it returns
// once every goroutine the Forwarder started has ended.
func (f *Forwarder) Close() error {
	f.mu.Lock()
	f.closed = true
	up := f.up
	f.up = nil
	f.mu.Unlock()
	f.cancel()
	if up != nil {
		<-up.ready
		up.fail(ErrClosed)
	}
	f.wg.Wait()
	return nil
}

// HandleUDP takes one query that the application at app sent over UDP
// to resolver, one of mpvpn's resolver addresses. It never blocks: the
// query is answered from another goroutine, from resolver to app, with
// the answer made to fit the application's UDP size. It reports whether
// it took the query (false: not a query, or the Forwarder is closed).
func (f *Forwarder) HandleUDP(app, resolver netip.AddrPort, query []byte) bool {
	if f.cfg.UDP == nil || !isQuery(query) {
		return false
	}
	f.queries.Add(1)
	select {
	case f.sem <- struct{}{}:
	default:
		f.dropped.Add(1)
		return true // taken, and dropped: the app retries
	}
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		<-f.sem
		return false
	}
	f.wg.Add(1)
	f.mu.Unlock()
	q := append([]byte(nil), query...)
	go func() {
		defer f.wg.Done()
		defer func() { <-f.sem }()
		resp := f.answer(q)
		if resp == nil {
			return
		}
		if resp = fitUDP(q, resp); resp == nil {
			return
		}
		if err := f.cfg.UDP(resolver, app, resp); err != nil {
			f.log.Debug("DNS answer not delivered", "app", app.String(), "err", err)
		}
	}()
	return true
}

// ServeStream answers the DNS-over-TCP stream of one application (its
// connection to a resolver address), query by query, until it ends; the
// answers go back in the order they come, as RFC 7766 allows. It closes
// conn when it returns.
func (f *Forwarder) ServeStream(conn net.Conn) {
	defer conn.Close()
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return
	}
	f.wg.Add(1)
	f.mu.Unlock()
	defer f.wg.Done()
	stop := context.AfterFunc(f.ctx, func() { conn.Close() })
	defer stop()
	var (
		wg  sync.WaitGroup
		wmu sync.Mutex
	)
	buf := make([]byte, MaxMessage)
	for {
		m, err := readMsg(conn, buf)
		if err != nil || !isQuery(m) {
			break
		}
		f.queries.Add(1)
		// A stream waits for room (its own TCP flow control pushes back
		// on the application) rather than dropping.
		select {
		case f.sem <- struct{}{}:
		case <-f.ctx.Done():
		}
		if f.ctx.Err() != nil {
			break
		}
		q := append([]byte(nil), m...)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-f.sem }()
			if resp := f.answer(q); resp != nil {
				wmu.Lock()
				writeMsg(conn, resp)
				wmu.Unlock()
			}
		}()
	}
	wg.Wait()
}

// answer is the concentrator's answer to q, SERVFAIL when none came in
// time, or nil when q cannot even be answered SERVFAIL.
func (f *Forwarder) answer(q []byte) []byte {
	ctx, cancel := context.WithTimeout(f.ctx, f.cfg.Timeout)
	defer cancel()
	resp, err := f.Exchange(ctx, q)
	if err == nil {
		f.answered.Add(1)
		return resp
	}
	f.failed.Add(1)
	f.log.Debug("DNS query failed", "err", err)
	if errors.Is(err, ErrClosed) || f.ctx.Err() != nil {
		// Closing: whether the query saw the stream fail or the
		// context end first, nobody is left to answer.
		return nil
	}
	return servfail(q)
}

// Exchange sends query through the tunnel and returns the answer, with
// the query's own ID. A stream that fails before the answer came is
// replaced and the query sent once more (DNS queries are idempotent).
func (f *Forwarder) Exchange(ctx context.Context, query []byte) ([]byte, error) {
	if !isQuery(query) {
		return nil, errMalformed
	}
	var err error
	for range 2 {
		// A stream that died before this query was sent (its reader saw
		// the EOF first: stream reports its error, and drops it) is
		// replaced as one that dies under the query is; returning its
		// error made TestFailures flaky (2026-12-03).
		var up *upstream
		if up, err = f.stream(ctx); err == nil {
			var resp []byte
			if resp, err = up.exchange(ctx, query); err == nil {
				return resp, nil
			}
		}
		if ctx.Err() != nil || errors.Is(err, ErrClosed) {
			return nil, err
		}
		if up != nil { // stream dropped its own failed one
			f.drop(up, err)
		}
	}
	return nil, err
}

// stream returns the current stream, dialling one if there is none.
func (f *Forwarder) stream(ctx context.Context) (*upstream, error) {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil, ErrClosed
	}
	up := f.up
	dial := up == nil
	if dial {
		up = &upstream{ready: make(chan struct{}), waiting: map[uint16]chan []byte{}}
		f.up = up
		f.wg.Add(1)
	}
	f.mu.Unlock()
	if dial {
		go f.dial(up)
	}
	select {
	case <-up.ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	up.mu.Lock()
	err := up.err
	up.mu.Unlock()
	if err != nil {
		f.drop(up, err)
		return nil, err
	}
	return up, nil
}

// dial opens up's stream (not bound to one query's context: the stream
// outlives it) and then reads its answers until it fails.
func (f *Forwarder) dial(up *upstream) {
	defer f.wg.Done()
	f.dials.Add(1)
	ctx, cancel := context.WithTimeout(f.ctx, f.cfg.Timeout)
	conn, err := f.cfg.Dial(ctx)
	cancel()
	if err != nil {
		up.fail(fmt.Errorf("dnsrelay: open the tunnel's resolver stream: %w", err))
		close(up.ready)
		return
	}
	up.conn = conn
	close(up.ready)
	stop := context.AfterFunc(f.ctx, func() { up.fail(ErrClosed) })
	defer stop()
	buf := make([]byte, MaxMessage)
	for {
		m, err := readMsg(conn, buf)
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF // the concentrator never ends it first
			}
			up.fail(fmt.Errorf("dnsrelay: the tunnel's resolver stream: %w", err))
			f.drop(up, err)
			return
		}
		if !isResponse(m) {
			continue
		}
		up.mu.Lock()
		ch := up.waiting[id(m)]
		delete(up.waiting, id(m))
		up.mu.Unlock()
		if ch != nil {
			ch <- append([]byte(nil), m...) // buffered: never blocks
		}
	}
}

// drop makes f dial a new stream next time, if up is still its current one.
func (f *Forwarder) drop(up *upstream, err error) {
	f.mu.Lock()
	if f.up == up {
		f.up = nil
	}
	f.mu.Unlock()
	up.fail(err)
}

// fail ends the stream: its waiters get nothing (their channels are
// closed) and its connection is closed. Only the first reason is kept.
func (u *upstream) fail(err error) {
	u.mu.Lock()
	if u.err == nil {
		u.err = err
	}
	waiting := u.waiting
	u.waiting = map[uint16]chan []byte{}
	u.mu.Unlock()
	for _, ch := range waiting {
		close(ch)
	}
	if u.conn != nil {
		u.conn.Close()
	}
}

// exchange sends q over u under an ID of u's and waits for its answer.
func (u *upstream) exchange(ctx context.Context, q []byte) ([]byte, error) {
	ch := make(chan []byte, 1)
	u.mu.Lock()
	if u.err != nil {
		err := u.err
		u.mu.Unlock()
		return nil, err
	}
	// The next free ID: at most MaxInFlight (≤ 2^15) are taken, so the
	// search ends quickly.
	for {
		u.nextID++
		if _, taken := u.waiting[u.nextID]; !taken {
			break
		}
	}
	qid := u.nextID
	u.waiting[qid] = ch
	u.mu.Unlock()
	forget := func() {
		u.mu.Lock()
		if u.waiting[qid] == ch {
			delete(u.waiting, qid)
		}
		u.mu.Unlock()
	}

	m := append([]byte(nil), q...)
	setID(m, qid)
	u.wmu.Lock()
	u.conn.SetWriteDeadline(deadlineOf(ctx))
	err := writeMsg(u.conn, m)
	u.wmu.Unlock()
	if err != nil {
		forget()
		return nil, fmt.Errorf("dnsrelay: send to the tunnel's resolver stream: %w", err)
	}
	select {
	case resp, ok := <-ch:
		if !ok {
			u.mu.Lock()
			err := u.err
			u.mu.Unlock()
			return nil, err
		}
		setID(resp, id(q))
		return resp, nil
	case <-ctx.Done():
		forget()
		return nil, ctx.Err()
	}
}

func deadlineOf(ctx context.Context) time.Time {
	d, _ := ctx.Deadline()
	return d
}
