//go:build linux

package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/flynn/noise"
	"golang.org/x/sys/unix"
)

// The pool: connections to the concentrator already through the
// handshake (MPTCP connect, subflows joining, Noise IK with a protoPool
// msg1 and its msg2), so that a new flow costs one round trip, its
// request frame and the verdict frame, instead of two (connect, then
// msg1 and msg2). The concentrator holds a pooled connection in a
// goroutine waiting for a 38-byte frame and closes it after its PoolIdle;
// the client retires its own earlier (PoolMaxAge), and checks each one
// before handing it out, so a connection the concentrator closed
// (restart, idle timeout) never carries a flow.
const (
	// DefaultPoolSize covers a page load: a browser opens a burst of
	// some 6 to 20 flows at once (a burst of 20 is the benchmark's page load), and a burst larger than the pool
	// costs its excess one round trip more each, while the pool refills
	// behind it.
	DefaultPoolSize   = 24
	defaultPoolMaxAge = 5 * time.Minute
	// defaultPoolLinger: after this long without a new flow the pool
	// shrinks to poolIdleSize, so a client left idle on a metered
	// uplink renews two connections every PoolMaxAge, not all of them.
	defaultPoolLinger = 10 * time.Minute
	poolIdleSize      = 2
	// poolBackoffMin/Max bound the wait after a pooled dial failed
	// (concentrator down, Limited, no uplink), doubled per failure.
	poolBackoffMin = 100 * time.Millisecond
	poolBackoffMax = 30 * time.Second
	poolTick       = time.Second
	// poolScan bounds the live connections a flow looks at for one
	// with nothing in flight (peekConn) before it takes the first.
	poolScan = 4
	// poolSlack: a flow that takes a connection idle longer than this
	// found the pool larger than its load needs (see pool.grow).
	poolSlack = time.Second
)

// errPoolGone marks a pooled connection that turned out closed by the
// concentrator when a flow tried it: the flow dials afresh.
var errPoolGone = errors.New("pooled connection closed by the concentrator")

type pooledConn struct {
	tc   *net.TCPConn
	keys transportKeys
	born time.Time
	idle time.Time // when it began waiting in the pool (born, or put back)
	gen  uint64
	// owesReady: a finished flow left it, and the concentrator's ready
	// frame (reuse.go) is still to be read.
	owesReady bool
}

type pool struct {
	mu sync.Mutex
	// ready: longest waiting first, so that a flow takes the one whose
	// last flow ended longest ago (its end-of-stream frame answered, see
	// peekConn); a fresh one joins at the end too.
	ready   []*pooledConn
	running bool
	dialing int
	gen     uint64 // Flush increments it; older dials are discarded
	lastUse time.Time
	// grow: connections RunPool keeps beyond PoolSize, at most
	// PoolSize more. A flow that finds no connection, or only busy
	// ones (peekConn: a connection a flow just left stays busy for
	// about a round trip), adds one; one that takes a connection idle
	// for more than poolSlack takes one away, and the pool's shrinking
	// after PoolLinger clears it. So flows at a steady rate get some
	// rate × RTT connections settling beside the idle ones, and a
	// quiet client keeps PoolSize (measured 2026-12-05, `ab -c 50` on
	// 20 and 50 ms links: with 24 pooled a third of the flows got a
	// busy connection and sent their request over the 50 ms uplink,
	// 829 flows/s at a median of 58 ms; with 48, almost none, 1004
	// flows/s at 46 ms).
	grow    int
	backoff time.Duration
	notTill time.Time
	kick    chan struct{}

	hits, stale, expired, dials, failures, reused atomic.Uint64
	// returning: flows open now on connections they will put back when
	// they end cleanly (reuse.go).
	returning atomic.Int64
}

func (p *pool) signal() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// takePooled returns a live pooled connection, or nil when there is none.
func (c *Client) takePooled() *pooledConn {
	p := &c.pool
	now := time.Now()
	p.mu.Lock()
	if !p.running {
		p.mu.Unlock()
		return nil
	}
	p.lastUse = now
	var drop []*pooledConn
	var pc *pooledConn
	busy := -1 // the first live one still sending, if no other is idle
	for i, looked := 0, 0; i < len(p.ready) && looked < poolScan; {
		cand := p.ready[i]
		if now.Sub(cand.born) >= c.cfg.PoolMaxAge {
			p.expired.Add(1)
			drop = append(drop, cand)
			p.ready = slices.Delete(p.ready, i, i+1)
			continue
		}
		alive, sending := peekConn(cand.tc, cand.owesReady)
		if !alive {
			p.stale.Add(1)
			drop = append(drop, cand)
			p.ready = slices.Delete(p.ready, i, i+1)
			continue
		}
		looked++
		if sending {
			if busy < 0 {
				busy = i
			}
			i++
			continue
		}
		pc = cand
		p.ready = slices.Delete(p.ready, i, i+1)
		break
	}
	switch {
	case pc == nil && busy >= 0:
		pc = p.ready[busy]
		p.ready = slices.Delete(p.ready, busy, busy+1)
		fallthrough
	case pc == nil:
		p.grow = min(p.grow+1, c.cfg.PoolSize)
	case now.Sub(pc.idle) > poolSlack:
		p.grow = max(p.grow-1, 0)
	}
	p.mu.Unlock()
	for _, d := range drop {
		d.tc.Close()
	}
	p.signal()
	if pc != nil {
		p.hits.Add(1)
	}
	return pc
}

// Flush closes every pooled connection and discards those being dialled
// now. The client calls it when an uplink is withdrawn or an address
// changes: a pooled connection's subflows may be on the path that went,
// and a fresh one starts on a path that works.
func (c *Client) Flush() {
	p := &c.pool
	p.mu.Lock()
	old := p.ready
	p.ready = nil
	p.gen++
	p.notTill = time.Time{}
	p.mu.Unlock()
	for _, pc := range old {
		pc.tc.Close()
	}
	p.signal()
}

// poolTarget is how many connections the pool should hold now. Called
// with pool.mu held.
func (c *Client) poolTarget(now time.Time) int {
	if now.Sub(c.pool.lastUse) > c.cfg.PoolLinger {
		c.pool.grow = 0
		return min(c.cfg.PoolSize, poolIdleSize)
	}
	return c.cfg.PoolSize + c.pool.grow
}

// RunPool keeps the pool filled until ctx is done, then closes what it
// holds and returns nil once its dials have ended. Without RunPool (or
// with PoolSize < 0) every flow dials afresh.
func (c *Client) RunPool(ctx context.Context) error {
	if c.cfg.PoolSize < 0 {
		return nil
	}
	p := &c.pool
	p.mu.Lock()
	if p.running {
		p.mu.Unlock()
		return errors.New("tunnel: RunPool is already running")
	}
	p.running = true
	p.lastUse = time.Now()
	p.mu.Unlock()

	var wg sync.WaitGroup
	defer func() {
		wg.Wait()
		p.mu.Lock()
		p.running = false
		old := p.ready
		p.ready = nil
		p.mu.Unlock()
		for _, pc := range old {
			pc.tc.Close()
		}
	}()
	tick := time.NewTicker(poolTick)
	defer tick.Stop()
	for {
		now := time.Now()
		var expired []*pooledConn
		p.mu.Lock()
		p.ready = slices.DeleteFunc(p.ready, func(pc *pooledConn) bool {
			if now.Sub(pc.born) < c.cfg.PoolMaxAge {
				return false
			}
			expired = append(expired, pc)
			return true
		})
		target := c.poolTarget(now)
		want := target - len(p.ready) - p.dialing
		// Flows that will put their connection back count towards
		// the target, up to half of it: a pool kept full by dials
		// while flows cycle would close what they put back (a
		// handshake per flow again, at both ends), and one that
		// waited for every open flow would be empty while long ones
		// last.
		want -= min(int(p.returning.Load()), target/2)
		if now.Before(p.notTill) {
			want = 0
		}
		if want > 0 && c.cfg.Source != nil && !c.cfg.Source().IsValid() {
			want = 0 // no working uplink: nothing to dial over
		}
		gen := p.gen
		if want > 0 {
			p.dialing += want
		}
		p.mu.Unlock()
		for _, pc := range expired {
			p.expired.Add(1)
			pc.tc.Close()
		}
		for range want {
			wg.Go(func() { c.fillOne(ctx, gen) })
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		case <-p.kick:
		}
	}
}

// fillOne dials one pooled connection and adds it, unless the pool was
// flushed or stopped meanwhile.
func (c *Client) fillOne(ctx context.Context, gen uint64) {
	p := &c.pool
	p.dials.Add(1)
	var stamp time.Time
	tc, keys, err := c.handshake(ctx, target{pool: true}, &stamp)
	p.mu.Lock()
	p.dialing--
	if err != nil {
		// Dials fail together (the concentrator is down, or every
		// uplink): the first failure of a round doubles the wait, the
		// others of the same round find it set.
		if now := time.Now(); !now.Before(p.notTill) {
			p.backoff = min(max(2*p.backoff, poolBackoffMin), poolBackoffMax)
			p.notTill = now.Add(p.backoff)
		}
		wait := time.Until(p.notTill)
		p.mu.Unlock()
		p.failures.Add(1)
		if ctx.Err() == nil {
			c.log.Debug("pooled connection failed", "err", err, "retry_in", wait)
		}
		return
	}
	p.backoff = 0
	if !p.running || gen != p.gen || ctx.Err() != nil {
		p.mu.Unlock()
		tc.Close()
		return
	}
	// No keepalives while pooled (PoolMaxAge bounds its life): on a
	// metered uplink they would be most of what an idle client sends.
	// established turns them back on.
	tc.SetKeepAlive(false)
	now := time.Now()
	p.ready = append(p.ready, &pooledConn{tc: tc, keys: keys, born: now, idle: now, gen: gen})
	p.mu.Unlock()
}

// usePooled sends t in the request frame of pc and waits for the verdict
// frame. errPoolGone means the concentrator had closed pc (nothing of
// the request was acted upon that the client can know of); the caller
// then dials afresh, as a SYN is retransmitted.
func (c *Client) usePooled(ctx context.Context, pc *pooledConn, t target) (*Conn, error) {
	ctx, cancel := context.WithTimeoutCause(ctx, c.cfg.HandshakeTimeout, errHandshakeTimeout)
	defer cancel()
	tc := pc.tc
	stop := context.AfterFunc(ctx, func() { tc.SetDeadline(aLongTimeAgo) })
	// The download side of what awaitRequest does for uploads: a
	// connection that waited would keep its receive buffer small
	// (measured 2026-12-03, Linux 6.18, 40 + 20 Mbit/s: downloads
	// through pooled connections at 96 % of the two links' sum against
	// 97 % through fresh ones, the same through both once the buffer is
	// set).
	pinAfterWait(tc, pc.idle, c.rmemMax, c.log)
	var req [requestSize]byte
	putTarget(req[:], t)
	var wbuf [requestFrameSize]byte
	out, err := sealFrame(wbuf[:], pc.keys.send, req[:])
	// The ready frame, if owed, comes before the verdict (it may be
	// here already, or on its way).
	pre := 0
	if pc.owesReady {
		pre = readyFrameSize
	}
	var rbuf [readyFrameSize + verdictFrameSize]byte
	in := rbuf[:pre+verdictFrameSize]
	n := 0
	if err == nil {
		if _, err = tc.Write(out); err == nil {
			n, err = io.ReadFull(tc, in)
		}
	}
	if !stop() && err == nil {
		err = context.Cause(ctx)
	}
	if err != nil {
		tc.Close()
		// Nothing of a verdict: the concentrator closed the
		// connection (after the ready frame, when it timed out
		// waiting) before it acted on the request.
		if n <= pre && ctx.Err() == nil && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)) {
			return nil, errPoolGone
		}
		return nil, c.failed(ctx, "request to", err)
	}
	if pre > 0 {
		if err := openReadyFrame(in[:pre], pc.keys.recv); err != nil {
			tc.Close()
			return nil, fmt.Errorf("%w with %s: its ready frame failed authentication: %w", ErrHandshake, c.server, err)
		}
	}
	v, err := openVerdictFrame(in[pre:], pc.keys.recv)
	if err != nil {
		tc.Close()
		return nil, fmt.Errorf("%w with %s: its verdict frame failed authentication: %w", ErrHandshake, c.server, err)
	}
	if v != Connected {
		tc.Close()
		return nil, &VerdictError{Verdict: v, Dst: t.dst, Service: t.svc}
	}
	tc.SetKeepAliveConfig(keepAlive())
	return c.established(tc, pc.keys, t, pc.born, pc.gen), nil
}

// openReadyFrame checks a ready frame (reuse.go): its length, and the
// tag of its empty plaintext under recv.
func openReadyFrame(b []byte, recv *noise.CipherState) error {
	_, err := openFrame(b, 0, recv)
	return err
}

func openVerdictFrame(b []byte, recv *noise.CipherState) (Verdict, error) {
	pt, err := openFrame(b, msg2PayloadSize, recv)
	if err != nil {
		return 0, err
	}
	v, ciph, err := parseMsg2Payload(pt)
	if err == nil && ciph != 0 {
		// The cipher was agreed in msg2; a verdict frame's byte is zero.
		err = errBadPayload
	}
	return v, err
}

// peekConn tells whether tc still looks open: nothing to read but the
// ready frame it owes (the concentrator sends nothing else on a pooled
// connection before the request) and no FIN or error pending, by a
// non-blocking MSG_PEEK, so nothing is consumed. And whether bytes it
// sent are not yet acknowledged: an owed ready frame that has not come
// (it carries the ACK of the last flow's end-of-stream frame), or bytes
// in SIOCOUTQ, which MPTCP answers at the connection's level. Such a
// connection would send the next flow's request on the other subflow,
// the scheduler's emptiest queue, which may be the slow uplink's
// (measured 2026-12-05, 20 and 50 ms links: such a flow's connect()
// took 36 ms instead of 21); another one is taken where there is one.
func peekConn(tc *net.TCPConn, owesReady bool) (alive, sending bool) {
	rc, err := tc.SyscallConn()
	if err != nil {
		return false, false
	}
	rc.Read(func(fd uintptr) bool {
		var b [readyFrameSize + 1]byte
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		switch {
		case err == syscall.EAGAIN:
			alive, sending = true, owesReady
		case err == nil && owesReady && n < readyFrameSize:
			// Part of the ready frame (n 0 is the FIN).
			alive, sending = n > 0, true
		case err == nil && owesReady && n == readyFrameSize:
			alive = true
		}
		if alive && !sending {
			n, err := unix.IoctlGetInt(int(fd), unix.SIOCOUTQ)
			sending = err == nil && n > 0
		}
		return true
	})
	return alive, sending
}

// WaitPool waits until the pool holds n connections (or all it aims for,
// if fewer), ctx is done, or timeout passes, and says whether it got
// them. The client waits so before it routes anything into the TUN, so
// that the first flows after a start find the pool filled.
func (c *Client) WaitPool(ctx context.Context, n int, timeout time.Duration) bool {
	n = min(n, c.cfg.PoolSize)
	if n <= 0 {
		return true
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		c.pool.mu.Lock()
		have := len(c.pool.ready)
		c.pool.mu.Unlock()
		if have >= n {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
			return false
		case <-tick.C:
		}
	}
}
