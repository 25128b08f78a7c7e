//go:build linux

package tunnel

import (
	"bytes"
	"context"
	"io"
	"net"
	"sync"
	"time"
)

// Reuse: a connection whose flow ended cleanly both ways carries the
// client's next flow, as an HTTP/1.1 connection carries the next request
// (one flow at a time: never two flows on one connection, so a flow
// still has the MPTCP connection, its subflows and its scheduler to
// itself). A new flow on the pool's connections already skipped the
// round trip of the handshake; one on a reused connection skips its CPU
// too: the MPTCP socket, its connect and subflow joins at both ends, and
// the four X25519 of a Noise IK handshake. Measured 2026-12-03 with
// `ab -c 50` on the two-uplink links (perf): the handshake and the MPTCP
// dial were half of the client's CPU per new flow, and the handshake a
// third of the concentrator's.
//
// On the wire: a flow ends cleanly when each end has sent and received
// the end-of-stream frame (CloseWrite); with reuse, CloseWrite sends the
// frame but no FIN. After that the connection is where a pooled one is
// after msg2: keyed, the client to speak next. The client puts it back
// into its pool, checked as any pooled connection is before a flow takes
// it; the concentrator waits for the next request frame, counted against
// the same caps as a pooled connection, and closes it after PoolIdle
// unused. The nonces go on counting, so a frame of an earlier flow
// replayed into a later one fails its tag. Either end may close instead
// (a full pool, a cap); the other then finds it closed, as a pooled
// connection the concentrator closed.
//
// One frame is new: the ready frame, an empty frame the concentrator
// sends as soon as it waits for the next request, if the client's msg1
// offered it (a client that reuses does; an older one, or one with
// reuse off, gets none). Its job is the ACK it carries. The client's
// end-of-stream frame is usually a flow's last segment, and the
// concentrator, with nothing to send, would acknowledge it only after a
// delayed ACK (40 ms on Linux; MPTCP sockets refuse TCP_QUICKACK,
// ENOPROTOOPT, checked 2026-12-05 on 6.18). Until then the subflow that
// carried it has bytes in flight, and Linux's MPTCP scheduler, which
// puts each write on the subflow with the emptiest queue, sends the
// next flow's request over another uplink, which may be the slow one
// (measured 2026-12-05 under `ab -c 50` on 20 and 50 ms links: 4 of 5
// request frames went over the 50 ms uplink). The client reads the
// ready frame before the next verdict, and prefers a pooled connection
// whose ready frame has come (takePooled). Putting it at a fixed place
// in the stream, under the same keys and nonces, keeps the stream as
// strict as before: anything else after an end-of-stream frame is
// still an error.
//
// What reuse bounds: a connection carries flows only within PoolMaxAge
// of its handshake (the client's 5 minutes), so keys live no longer in
// memory than a pooled connection's unless one flow lasts longer; after
// a withdrawn uplink or a changed address (Flush) no earlier connection
// is reused; an aborted flow, an error, or bytes after the end-of-stream
// frame beyond a request frame close the connection.

// reusable is what a Conn hands back for the next flow.
type reusable struct {
	raw  net.Conn
	keys transportKeys
	// after: bytes read past the peer's end-of-stream frame: on the
	// server, the start of the next request frame; on the client, the
	// ready frame, if it came with the end of stream.
	after []byte
}

// reusable says whether c may carry another flow, and if so detaches
// its connection. Called by Close, once. A Read or Write still in
// progress (a lock held) means the flow did not end cleanly.
func (c *Conn) reusable() (reusable, bool) {
	if c.onReuse == nil || c.aborted.Load() {
		return reusable{}, false
	}
	if !c.rmu.TryLock() {
		return reusable{}, false
	}
	defer c.rmu.Unlock()
	if !c.wmu.TryLock() {
		return reusable{}, false
	}
	defer c.wmu.Unlock()
	if c.rerr != io.EOF || len(c.pending) > 0 || c.hdrN > 0 || c.rbuf != nil || c.werr != nil || !c.wclosed {
		return reusable{}, false
	}
	c.dmu.Lock()
	c.handed = true
	c.dmu.Unlock()
	if err := c.raw.SetDeadline(time.Time{}); err != nil {
		return reusable{}, false
	}
	return reusable{raw: c.raw, keys: transportKeys{send: c.send, recv: c.recv, cipher: c.cipher}, after: c.after}, true
}

// ---- the client ----

// reuseHook is the onReuse of a client's flow on a connection born at
// born in pool generation gen, or nil when the client does not reuse.
func (c *Client) reuseHook(born time.Time, gen uint64) func(reusable) {
	if !c.reuses() {
		return nil
	}
	return func(r reusable) { c.putBack(r, born, gen) }
}

// reuses says whether the client's flows leave their connections for the
// next ones (and so whether its msg1 offers ready frames).
func (c *Client) reuses() bool { return !c.cfg.NoReuse && c.cfg.PoolSize > 0 }

// putBack returns a finished flow's connection to the pool, at the end
// (the pool's connections are taken longest waiting first: see
// pool.ready), or closes it: the pool stopped or is full, it was flushed
// since, or it is too old.
//
// Full is twice PoolSize, the most RunPool aims for (see pool.grow):
// what flows leave behind is what they were using a moment ago, so this
// keeps no more than the load itself made, and for no longer than
// PoolMaxAge.
func (c *Client) putBack(r reusable, born time.Time, gen uint64) {
	tc, ok := r.raw.(*net.TCPConn)
	if ok {
		tc.SetKeepAlive(false) // as pooled: PoolMaxAge bounds its life
	}
	// The ready frame, if it came with the end of stream, is checked
	// now; otherwise it is still owed. Part of one (never seen: the
	// concentrator writes it in one piece) is not worth keeping.
	owes := c.offerReady && len(r.after) == 0
	if ok && len(r.after) > 0 {
		ok = openReadyFrame(r.after, r.keys.recv) == nil // its size too
	}
	p := &c.pool
	p.mu.Lock()
	keep := ok && p.running && gen == p.gen &&
		time.Since(born) < c.cfg.PoolMaxAge && len(p.ready) < 2*c.cfg.PoolSize
	if keep {
		p.ready = append(p.ready, &pooledConn{tc: tc, keys: r.keys, born: born, idle: time.Now(), gen: gen, owesReady: owes})
	}
	p.mu.Unlock()
	if !keep {
		r.raw.Close()
		return
	}
	p.reused.Add(1)
}

// poolGen is the pool's generation now: a connection dialled now is
// reused only if the pool is not flushed meanwhile.
func (c *Client) poolGen() uint64 {
	c.pool.mu.Lock()
	defer c.pool.mu.Unlock()
	return c.pool.gen
}

// ---- the concentrator ----

// serveState is what a connection needs beyond its first flow: Serve's
// context and handler, and the group Serve waits for before it returns.
type serveState struct {
	ctx    context.Context
	handle func(context.Context, *Flow)

	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup
}

// goWait runs f in a goroutine Serve waits for, unless Serve is ending.
func (sv *serveState) goWait(f func()) bool {
	sv.mu.Lock()
	defer sv.mu.Unlock()
	if sv.closed {
		return false
	}
	sv.wg.Go(f)
	return true
}

func (sv *serveState) closeAndWait() {
	sv.mu.Lock()
	sv.closed = true
	sv.mu.Unlock()
	sv.wg.Wait()
}

// reuseHook is the onReuse of the server's flow f.
func (s *Server) reuseHook(f *Flow) func(reusable) {
	if f.sv == nil || f.peer == nil {
		return nil
	}
	return func(r reusable) {
		p := &pendingFlow{key: f.Peer, peer: f.peer, cipher: f.Cipher, ready: f.ready}
		if !f.sv.goWait(func() { s.awaitReuse(f.sv, r, p) }) {
			r.raw.Close()
		}
	}
}

// awaitReuse holds a connection whose flow ended until the client's next
// request frame, under the caps of pooled connections, then serves it.
func (s *Server) awaitReuse(sv *serveState, r reusable, p *pendingFlow) {
	if peerN, total, ok := s.enterPool(p.peer); !ok {
		s.log.Debug("finished flow's connection over the pool's caps: closed", "peer", p.key.String(), "peer_pooled", peerN, "pooled", total)
		r.raw.Close()
		return
	}
	s.reused.Add(1)
	stop := context.AfterFunc(sv.ctx, func() { r.raw.Close() })
	defer stop()
	if p.ready {
		if err := s.writeReadyFrame(r.raw, r.keys.send); err != nil {
			s.leavePool(p.peer)
			s.poolUnused.Add(1)
			r.raw.Close()
			return
		}
	}
	var src io.Reader = r.raw
	if len(r.after) > 0 {
		src = io.MultiReader(bytes.NewReader(r.after), r.raw)
	}
	s.awaitRequest(sv.ctx, r.raw, src, p, r.keys, false, true, sv)
}
