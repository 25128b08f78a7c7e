//go:build linux

package stack

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/mpvpn/mpvpn/internal/relay"
)

// pendingSYN is one SYN being forwarded: from handleTCP letting it through
// to the forwarder until its request is completed. While it is here,
// retransmissions of the SYN are absorbed.
type pendingSYN struct {
	limited bool          // over MaxInFlight: answered with a RST, never dialled
	quote   []byte        // the SYN's headers, for an ICMP error
	wq      *waiter.Queue // set once the app's handshake is started
}

// flow is a relayed flow, kept so that Close can end it.
type flow struct {
	app *appConn
	up  net.Conn
}

// appConn is the app's side of a flow: gonet's conn, plus WaitRead, which
// the tunnel's Conn.ReadFrom uses to wait for the app's bytes without
// holding a buffer (issue 8: an idle flow pins no relay buffer).
type appConn struct {
	*gonet.TCPConn
	ep tcpip.Endpoint
	wq *waiter.Queue

	// Park's state: the waiter entry is registered by the first Park and
	// stays for the flow's life (gVisor 2025-05 calls an entry's
	// callback with the queue's lock held, so the callback must not
	// unregister it); parked says a resume is owed.
	parkOnce sync.Once
	entry    waiter.Entry
	resume   func()
	parked   atomic.Bool
}

// readyEvents are what end a wait for the app: data, its FIN, an error.
const readyEvents = waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr

// Park implements relay.Parker: while the app sends nothing, the relay
// holds no goroutine for its direction (issue 11: an idle flow's memory
// is mostly goroutine stacks). gVisor's notification, or Close and Abort,
// start resume in a new goroutine.
func (c *appConn) Park(resume func()) bool {
	if c.ep.Readiness(readyEvents) != 0 {
		return false
	}
	c.parkOnce.Do(func() {
		c.resume = resume
		c.entry = waiter.NewFunctionEntry(readyEvents, func(waiter.EventMask) { c.wake() })
		c.wq.EventRegister(&c.entry)
	})
	c.parked.Store(true)
	// Whatever came between the first look and the registration: the
	// notification may have missed it; take it back here unless the
	// callback already did.
	if c.ep.Readiness(readyEvents) != 0 && c.parked.CompareAndSwap(true, false) {
		return false
	}
	return true
}

// wake starts the resume that Park owes, once.
func (c *appConn) wake() {
	if c.parked.CompareAndSwap(true, false) {
		go c.resume()
	}
}

// Close closes the app's conn and wakes a parked relay, which then reads
// the close (gVisor does not notify waiters of a local Close in every
// state).
func (c *appConn) Close() error {
	err := c.TCPConn.Close()
	c.wake()
	return err
}

// Abort closes the flow with a reset, so the app's next read or write
// fails with ECONNRESET rather than seeing an end of stream: what the app
// gets when the tunnel side of its flow failed (gVisor 2025-05:
// Endpoint.Abort resets a connected endpoint; Close then frees it).
func (c *appConn) Abort() error {
	c.ep.Abort()
	return c.Close()
}

// Readable reports whether the app's bytes (or its FIN, or an error) are
// there to read now, so that a Read would not block. The tunnel's
// ReadFrom asks after a Read that filled a frame, to send more frames in
// one write only when they are already here.
func (c *appConn) Readable() bool {
	return c.ep.Readiness(waiter.ReadableEvents) != 0
}

// WaitRead blocks until a Read would not block: data, the app's FIN or an
// error is there, or the endpoint was closed (gVisor 2025-05: Close
// notifies every event, and a closed endpoint is readable). It ignores
// read deadlines; the relay sets none.
func (c *appConn) WaitRead() error {
	if c.ep.Readiness(waiter.ReadableEvents) != 0 {
		return nil
	}
	entry, ch := waiter.NewChannelEntry(readyEvents)
	c.wq.EventRegister(&entry)
	defer c.wq.EventUnregister(&entry)
	for c.ep.Readiness(readyEvents) == 0 {
		<-ch
	}
	return nil
}

func (f *flow) close() {
	f.app.Close()
	f.up.Close()
}

var errClosed = errors.New("stack closed")

// handleTCP is the TCP protocol's default handler: gVisor calls it for
// every TCP segment that matches no endpoint. A new SYN is registered as
// pending and passed to the forwarder, which runs serve for it in a new
// goroutine; any other segment is left to gVisor, which answers a stray
// segment with a RST.
func (s *Stack) handleTCP(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	th := header.TCP(pkt.TransportHeader().Slice())
	if len(th) < header.TCPMinimumSize || th.Flags()&(header.TCPFlagSyn|header.TCPFlagAck|header.TCPFlagRst) != header.TCPFlagSyn {
		return false
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return true // dropped; the app's retry finds the TUN gone
	}
	if _, ok := s.pending[id]; ok {
		// A retransmitted SYN while its dial is under way. gVisor's
		// forwarder would absorb it too (gVisor 2025-05: HandlePacket
		// returns true for an ID in flight); doing it here keeps the
		// accounting in one place.
		s.mu.Unlock()
		return true
	}
	p := &pendingSYN{}
	switch {
	case s.dialing < s.maxInFlight:
		s.dialing++
		p.quote = synQuote(pkt)
	case s.limiting < s.maxInFlight:
		// Over the cap: answer with a RST through the forwarder (it
		// builds the RST), without dialling.
		p.limited = true
		s.limiting++
	default:
		// Even the RSTs are backed up: drop, like a full SYN queue.
		s.mu.Unlock()
		s.limited.Add(1)
		return true
	}
	s.pending[id] = p
	s.wg.Add(1)
	s.mu.Unlock()

	// With handleTCP's bookkeeping, the forwarder starts serve for every
	// SYN it accepts (gVisor 2025-05: it refuses only segments that do not
	// parse, and its own limit is above ours), and Complete, which removes
	// the ID from its in-flight set, always comes before release removes
	// it from ours.
	if !s.fwd.HandlePacket(id, pkt) {
		s.release(id, p)
		s.wg.Done()
		return false
	}
	return true
}

// release ends p's pending state. It must come after the request's
// Complete, so that a retransmitted SYN never reaches the forwarder while
// it still holds the ID.
func (s *Stack) release(id stack.TransportEndpointID, p *pendingSYN) {
	s.mu.Lock()
	delete(s.pending, id)
	if p.limited {
		s.limiting--
	} else {
		s.dialing--
	}
	s.mu.Unlock()
}

// serve forwards one SYN: dial, and only if that succeeds complete the
// app's handshake and relay. Every path calls r.Complete exactly once,
// then release.
func (s *Stack) serve(r *tcp.ForwarderRequest) {
	defer s.wg.Done()
	id := r.ID()
	s.mu.Lock()
	p := s.pending[id]
	s.mu.Unlock()
	if p == nil {
		// Not registered by handleTCP; cannot happen.
		r.Complete(true)
		return
	}
	src := addrPort(id.RemoteAddress, id.RemotePort)
	dst := addrPort(id.LocalAddress, id.LocalPort)
	if p.limited {
		s.limited.Add(1) // counted before the RST goes out, as every answer is
		r.Complete(true)
		s.release(id, p)
		s.log.Debug("SYN over the in-flight limit: RST", "src", src, "dst", dst, "max_in_flight", s.maxInFlight)
		return
	}

	ctx, cancel := context.WithTimeout(s.ctx, s.dialTimeout)
	up, err := s.dialer.DialTCP(ctx, src, dst)
	cancel()
	if err == nil && up == nil {
		err = errors.New("dialer returned neither a conn nor an error")
	}
	if err != nil {
		if up != nil {
			up.Close() // a conn with an error is no conn
		}
		s.reject(r, p, src, dst, err)
		s.release(id, p)
		return
	}

	app, err := s.accept(r, p)
	s.release(id, p)
	if err != nil {
		up.Close()
		s.log.Debug("app handshake failed", "src", src, "dst", dst, "err", err)
		return
	}
	// The flow's life in a goroutine of its own: this one's stack grew
	// through the dial (the tunnel's handshake) and the app's handshake,
	// and a blocked goroutine keeps its stack; a fresh one starts small,
	// and an idle flow is mostly its goroutines (issue 11). serve still
	// holds its own count, so the Add cannot race Close's Wait.
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.relay(app, up, src, dst)
	}()
}

// accept completes the app's handshake; the dial has succeeded. Like
// reject, it counts the outcome before answering.
func (s *Stack) accept(r *tcp.ForwarderRequest, p *pendingSYN) (*appConn, error) {
	var wq waiter.Queue
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.failed.Add(1)
		r.Complete(true)
		return nil, errClosed
	}
	p.wq = &wq // from here Close can interrupt the handshake
	s.mu.Unlock()
	// Blocks until the app has answered our SYN-ACK (or given up, or
	// Close interrupted it): gVisor 2025-05 performHandshake.
	ep, tcpErr := r.CreateEndpoint(&wq)
	if tcpErr != nil {
		s.failed.Add(1)
		r.Complete(true)
		return nil, fmt.Errorf("create endpoint: %s", tcpErr)
	}
	s.forwarded.Add(1)
	r.Complete(false)
	if err := setFlowOptions(ep); err != nil {
		s.log.Debug("flow options", "err", err)
	}
	return &appConn{TCPConn: gonet.NewTCPConn(&wq, ep), ep: ep, wq: &wq}, nil
}

// reject answers a SYN whose dial failed, without ever completing its
// handshake: a RST where the destination refused (the app's connect()
// fails with ECONNREFUSED at once), an ICMP destination-unreachable where
// it could not be reached (EHOSTUNREACH or ENETUNREACH), a RST otherwise.
func (s *Stack) reject(r *tcp.ForwarderRequest, p *pendingSYN, src, dst netip.AddrPort, err error) {
	answer := "RST"
	kind, icmp := unreachableKind(err)
	switch {
	case s.ctx.Err() != nil:
		// Closing: the dial was cancelled, whatever it says.
		s.failed.Add(1)
		r.Complete(true)
	case isRefusal(err):
		s.refused.Add(1)
		r.Complete(true)
	case icmp && p.quote != nil:
		s.failed.Add(1)
		if werr := s.link.writeRaw(unreachable(p.quote, kind)); werr != nil {
			r.Complete(true)
			break
		}
		// Completing without a RST only frees the request: the ICMP
		// error is the answer.
		r.Complete(false)
		answer = "ICMP unreachable"
	default:
		s.failed.Add(1)
		r.Complete(true)
	}
	s.log.Debug("dial failed", "src", src, "dst", dst, "err", err, "answer", answer)
}

func isRefusal(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EAGAIN)
}

// unreachableKind says whether err is answered with an ICMP error, and
// which. A timeout (ETIMEDOUT, or the dial's own deadline) becomes "host
// unreachable": no ICMP error means "timed out", and making the app wait
// through its own SYN retries (over two minutes on Linux) for the same
// verdict would only be slower.
func unreachableKind(err error) (unreach, bool) {
	switch {
	case errors.Is(err, syscall.ENETUNREACH):
		return unreachNet, true
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ETIMEDOUT),
		errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded):
		return unreachHost, true
	}
	var t interface{ Timeout() bool }
	if errors.As(err, &t) && t.Timeout() {
		return unreachHost, true
	}
	return 0, false
}

// relay moves the flow's bytes both ways until both directions are done.
// The app's FIN becomes the upstream's CloseWrite and the upstream's EOF
// the app's FIN (internal/relay, shared with the concentrator).
func (s *Stack) relay(app *appConn, up net.Conn, src, dst netip.AddrPort) {
	f := &flow{app: app, up: up}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		f.close()
		return
	}
	s.flows[f] = struct{}{}
	s.mu.Unlock()

	st, err := relay.Relay(app, up)

	s.mu.Lock()
	delete(s.flows, f)
	s.mu.Unlock()
	s.log.Debug("flow closed", "src", src, "dst", dst, "sent", st.AtoB, "received", st.BtoA, "err", err)
}

func addrPort(a tcpip.Address, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(addrOf(a), port)
}

// addrOf is a gVisor address as a netip.Addr (the zero Addr if it is
// neither IPv4 nor IPv6).
func addrOf(a tcpip.Address) netip.Addr {
	switch a.Len() {
	case 4:
		return netip.AddrFrom4(a.As4())
	case 16:
		return netip.AddrFrom16(a.As16())
	}
	return netip.Addr{}
}
