//go:build linux

package probe

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

	"github.com/mpvpn/mpvpn/internal/tokenbucket"
	"github.com/mpvpn/mpvpn/tunnel"
)

// Default rate bounds of a Responder.
const (
	// DefaultClientRate answers ten uplinks probing every 50 ms (half
	// the default interval); DefaultClientBurst absorbs half a second of
	// jitter.
	DefaultClientRate  = 200
	DefaultClientBurst = 100
	// DefaultGlobalRate is 5000 such clients with one uplink, or 1700
	// with three. Beyond it probes are dropped and clients see paths
	// die, so size it to the deployment.
	DefaultGlobalRate = 50000
)

// ResponderConfig configures the concentrator side.
type ResponderConfig struct {
	// Key is the concentrator's private key, the tunnel's.
	Key tunnel.PrivateKey
	// Peers are the public keys of the clients to answer.
	Peers []tunnel.PublicKey
	// Logger gets the few things worth logging (nil: discard).
	Logger *slog.Logger
	// Now is the clock (nil: time.Now). Replies carry it, and clients
	// stamp their tunnel handshakes with what they learn of it, so the
	// concentrator passes the tunnel server's own clock; tests pass a
	// fake one.
	Now func() time.Time
	// Horizon returns the replay horizon, the time before which the
	// tunnel refuses every handshake stamp (nil, or a zero time: none,
	// sent as 0). Replies carry it so that a client learns of a
	// concentrator restart from its first probe. It is called once per
	// reply, so it must be cheap and must not call the Responder.
	Horizon func() time.Time

	// ClientRate and ClientBurst bound replies per client and second
	// (0: DefaultClientRate, DefaultClientBurst). GlobalRate bounds all
	// replies per second, with a burst of a tenth of it (0:
	// DefaultGlobalRate).
	ClientRate, ClientBurst int
	GlobalRate              int

	// Other takes the datagrams on the socket that are not probe
	// requests (any other size): the UDP relay's packets share the port.
	// It runs on Serve's goroutine, so it must not block, and must copy
	// pkt to keep it; to is the local address it was sent to (invalid
	// when unknown). nil: they are dropped as malformed.
	Other func(pkt []byte, from netip.AddrPort, to netip.Addr)
}

// ResponderStats counts what a Responder did with the datagrams it read.
// Every request is counted exactly once: as a reply or under one drop
// reason, the first check it failed; the checks run in the order
// Malformed, UnknownID, BadMAC, Stale, Replayed, ClientLimit, GlobalLimit.
type ResponderStats struct {
	Requests    uint64 // datagrams read
	Replies     uint64 // replies sent (or attempted: see WriteErrors)
	Malformed   uint64 // wrong size
	Stale       uint64 // timestamp more than MaxSkew from the clock, or not of its id's epoch
	UnknownID   uint64 // no peer has this id in the epochs around the clock's
	BadMAC      uint64 // authentication failed
	Replayed    uint64 // counter seen before or behind the window
	ClientLimit uint64 // the client's reply rate was exhausted
	GlobalLimit uint64 // the global reply rate was exhausted
	WriteErrors uint64 // the reply could not be sent
}

// Responder answers authenticated probe requests. Its methods are safe for
// concurrent use; Serve may run on several sockets at once (IPv4 and IPv6,
// say), sharing replay windows and rate bounds.
type Responder struct {
	log     *slog.Logger
	now     func() time.Time
	horizon func() time.Time // nil: none
	peers   []*peer

	ids      atomic.Pointer[idTable]
	idsMu    sync.Mutex // serialises rebuilds of ids
	globalMu sync.Mutex
	global   tokenbucket.Bucket

	requests, replies, malformed, unknownID, badMAC, stale,
	replayed, clientLimit, globalLimit, writeErrors atomic.Uint64

	other func(pkt []byte, from netip.AddrPort, to netip.Addr)
	conn  atomic.Pointer[sendConn] // while Serve runs on a *net.UDPConn
}

// peer is one client. Everything mutable is behind mu; opening a request
// and sealing a reply take it too, because the keyed hashes and their
// buffers are reused so that a request costs no allocation.
type peer struct {
	pub  tunnel.PublicKey
	keys keys

	mu     sync.Mutex
	req    *siv // opens this client's requests
	rep    *siv // seals the replies to it
	win    window
	bucket tokenbucket.Bucket
}

// idTable maps the ids of every peer for the epochs around epoch to the
// peer. It is immutable once published.
type idTable struct {
	epoch uint64
	m     map[uint64]idEntry
}

type idEntry struct {
	p     *peer
	epoch uint64
}

// NewResponder derives a key per peer. It fails on a missing key, a
// duplicate or unusable peer key.
func NewResponder(cfg ResponderConfig) (*Responder, error) {
	if cfg.Key.IsZero() {
		return nil, errors.New("probe: responder has no private key")
	}
	if cfg.ClientRate < 0 || cfg.ClientBurst < 0 || cfg.GlobalRate < 0 {
		return nil, errors.New("probe: negative rate bound")
	}
	if cfg.ClientRate == 0 {
		cfg.ClientRate = DefaultClientRate
	}
	if cfg.ClientBurst == 0 {
		cfg.ClientBurst = DefaultClientBurst
	}
	if cfg.GlobalRate == 0 {
		cfg.GlobalRate = DefaultGlobalRate
	}
	r := &Responder{
		log:     cfg.Logger,
		now:     cfg.Now,
		horizon: cfg.Horizon,
		global:  tokenbucket.New(cfg.GlobalRate, max(cfg.GlobalRate/10, 1)),
		other:   cfg.Other,
	}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	if r.now == nil {
		r.now = time.Now
	}
	serverPub := cfg.Key.Public()
	seen := make(map[tunnel.PublicKey]bool, len(cfg.Peers))
	for _, pub := range cfg.Peers {
		if seen[pub] {
			return nil, fmt.Errorf("probe: peer %s listed twice", pub)
		}
		seen[pub] = true
		ks, err := deriveKeys(cfg.Key, pub, pub, serverPub)
		if err != nil {
			return nil, fmt.Errorf("probe: peer: %w", err)
		}
		p := &peer{pub: pub, keys: ks, bucket: tokenbucket.New(cfg.ClientRate, cfg.ClientBurst)}
		p.req, p.rep = newRequestSIV(&p.keys), newReplySIV(&p.keys)
		r.peers = append(r.peers, p)
	}
	r.idsFor(epochOf(r.now().UnixNano()))
	return r, nil
}

// idsFor returns the id table for the server's epoch e, building it when
// the epoch has moved on (about every 275 s: the only allocation on the
// request path).
func (r *Responder) idsFor(e uint64) *idTable {
	if t := r.ids.Load(); t != nil && t.epoch == e {
		return t
	}
	r.idsMu.Lock()
	defer r.idsMu.Unlock()
	if t := r.ids.Load(); t != nil && t.epoch == e {
		return t
	}
	t := &idTable{epoch: e, m: make(map[uint64]idEntry, 3*len(r.peers))}
	for _, p := range r.peers {
		for _, pe := range [...]uint64{e - 1, e, e + 1} {
			id := clientID(&p.keys.k, pe)
			if _, dup := t.m[id]; dup {
				// 2^-64 per pair: log it, and let the first
				// peer keep the id for this epoch.
				r.log.Warn("probe: id collision between peers; one peer is unanswered for an epoch", "peer", p.pub.String())
				continue
			}
			t.m[id] = idEntry{p: p, epoch: pe}
		}
	}
	r.ids.Store(t)
	return t
}

// handle answers one datagram: it returns the reply written into out (nil
// for no reply). out must hold ReplySize bytes. It allocates nothing
// except for the id table rebuild once an epoch.
//
// The checks run cheapest first. The id is the only field in clear, so
// the timestamp can only be checked once the request is decrypted, which
// is also when it is authenticated; the replay window and the rate
// bounds are touched only after that, so forged datagrams cannot move
// them.
func (r *Responder) handle(pkt, out []byte) []byte {
	r.requests.Add(1)
	id, ok := requestID(pkt)
	if !ok {
		r.malformed.Add(1)
		return nil
	}
	now := r.now().UnixNano()
	e, ok := r.idsFor(epochOf(now)).m[id]
	if !ok {
		r.unknownID.Add(1)
		return nil
	}
	p := e.p
	p.mu.Lock()
	req, ok := openRequest(pkt, p.req)
	if !ok {
		p.mu.Unlock()
		r.badMAC.Add(1)
		return nil
	}
	// Only a holder of the client key can make the id and the
	// timestamp's epoch disagree; refuse it all the same, so that an
	// id never stands for another epoch than its own.
	if d := req.ts - now; d > int64(MaxSkew) || d < -int64(MaxSkew) || epochOf(req.ts) != e.epoch {
		p.mu.Unlock()
		r.stale.Add(1)
		return nil
	}
	if !p.win.accept(req.counter) {
		p.mu.Unlock()
		r.replayed.Add(1)
		return nil
	}
	if !p.bucket.Take(now) {
		p.mu.Unlock()
		r.clientLimit.Add(1)
		return nil
	}
	r.globalMu.Lock()
	ok = r.global.Take(now)
	r.globalMu.Unlock()
	if !ok {
		p.mu.Unlock()
		r.globalLimit.Add(1)
		return nil
	}
	b := putReply(out, p.rep, reply{counter: req.counter, server: now, horizon: r.horizonNow()})
	p.mu.Unlock()
	r.replies.Add(1)
	return b
}

// horizonNow is the replay horizon a reply carries: 0 for none.
func (r *Responder) horizonNow() int64 {
	if r.horizon == nil {
		return 0
	}
	h := r.horizon()
	if h.IsZero() {
		return 0
	}
	return h.UnixNano()
}

// Serve answers requests read from pc until ctx is done, and then returns
// nil; it returns an error only if pc fails for good (closed by someone
// else, say). It does not close pc, but sets a past read deadline on it
// when ctx is done, to wake the read. A *net.UDPConn is read and written
// without allocating.
func (r *Responder) Serve(ctx context.Context, pc net.PacketConn) error {
	stop := context.AfterFunc(ctx, func() { pc.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	uc, _ := pc.(*net.UDPConn)
	var pi *pktinfo
	if uc != nil {
		var err error
		if pi, err = enablePktinfo(uc); err != nil {
			r.log.Warn("probe: replies leave from the routed source address, not the one asked", "err", err)
		}
	}
	if uc != nil {
		r.conn.Store(&sendConn{uc: uc, pi: pi})
		defer r.conn.Store(nil)
	}
	var oob [128]byte
	var to netip.Addr // the address the request was sent to
	// One byte more than a request, so a longer datagram shows as such;
	// the largest datagram when others share the port.
	inBuf := make([]byte, RequestSize+1)
	if r.other != nil {
		inBuf = make([]byte, 65536)
	}
	in := inBuf
	var out [ReplySize]byte
	var fails int
	for {
		var (
			n    int
			from netip.AddrPort
			addr net.Addr
			err  error
		)
		if uc != nil {
			var oobn int
			n, oobn, _, from, err = uc.ReadMsgUDPAddrPort(in[:], oob[:])
			to = netip.Addr{}
			if pi != nil && err == nil {
				to = pi.dst(oob[:oobn])
			}
		} else {
			n, addr, err = pc.ReadFrom(in[:])
		}
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("probe: serve: %w", err)
			}
			// Transient (ENOBUFS, ICMP errors with IP_RECVERR…):
			// keep serving, but never spin on a broken socket.
			fails++
			if fails == 1 || fails%1000 == 0 {
				r.log.Warn("probe: read failed", "err", err, "count", fails)
			}
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		fails = 0
		if n != RequestSize && r.other != nil {
			if from.IsValid() {
				r.other(in[:n], from, to)
			}
			continue
		}
		b := r.handle(in[:n], out[:])
		if b == nil {
			continue
		}
		if uc != nil {
			var o []byte
			if pi != nil {
				o = pi.src(to)
			}
			_, _, err = uc.WriteMsgUDPAddrPort(b, o, from)
		} else {
			_, err = pc.WriteTo(b, addr)
		}
		if err != nil {
			r.writeErrors.Add(1)
		}
	}
}

// sendConn is the socket Serve reads, for Send.
type sendConn struct {
	uc *net.UDPConn
	pi *pktinfo
}

// Send writes b to dst from the socket Serve reads (from the local
// address src, when valid and the socket allows it): how the UDP relay
// answers over the port it shares with the probes.
func (r *Responder) Send(b []byte, dst netip.AddrPort, src netip.Addr) error {
	c := r.conn.Load()
	if c == nil {
		return fmt.Errorf("probe: send: %w", net.ErrClosed)
	}
	var o []byte
	if c.pi != nil && src.IsValid() {
		// A copy: Serve builds its replies' control messages in the
		// shared one's buffer.
		pi := *c.pi
		o = pi.src(src)
	}
	_, _, err := c.uc.WriteMsgUDPAddrPort(b, o, dst)
	return err
}

// Stats returns the counters since NewResponder.
func (r *Responder) Stats() ResponderStats {
	return ResponderStats{
		Requests:    r.requests.Load(),
		Replies:     r.replies.Load(),
		Malformed:   r.malformed.Load(),
		Stale:       r.stale.Load(),
		UnknownID:   r.unknownID.Load(),
		BadMAC:      r.badMAC.Load(),
		Replayed:    r.replayed.Load(),
		ClientLimit: r.clientLimit.Load(),
		GlobalLimit: r.globalLimit.Load(),
		WriteErrors: r.writeErrors.Load(),
	}
}
