//go:build linux

package udprelay

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Stats returns the packets accepted on the shared port and those
// rejected (no session, failed authentication, replayed).
func (ss *Sessions) Stats() (received, rejected uint64) {
	return ss.received.Load(), ss.rejected.Load()
}

// Sessions are the concentrator's path sessions, one per datagram stream,
// found by index when their packets arrive on the shared UDP port.
type Sessions struct {
	// Send writes a packet to a client's endpoint from the local address
	// it arrived at (probe.Responder.Send).
	Send func(b []byte, dst netip.AddrPort, src netip.Addr) error

	mu sync.RWMutex
	m  map[uint32]*serverSession

	received, rejected atomic.Uint64
}

// endpointFresh is how long a client's endpoint counts as its own after
// its last packet; the client sends a keepalive on its preferred path
// more often than that.
const endpointFresh = 15 * time.Second

// serverSession is one stream's path session on the concentrator.
type serverSession struct {
	*session
	srv *server

	mu        sync.Mutex
	endpoints [2]endpoint // the latest two distinct ones, latest first
	dup       bool        // the latest packet asked for answers on two paths
	// inStream: the client's latest message came in the stream (it has
	// no live path, or does not use them): answer there too.
	inStream bool
}

// viaStream records that the client sent in the stream.
func (s *serverSession) viaStream() {
	s.mu.Lock()
	s.inStream = true
	s.mu.Unlock()
}

type endpoint struct {
	peer  netip.AddrPort // the client's address and port, as seen here
	local netip.Addr     // the address the packet arrived at
	at    time.Time
}

func (ss *Sessions) add(s *serverSession) bool {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.m == nil {
		ss.m = map[uint32]*serverSession{}
	}
	if _, taken := ss.m[s.index]; taken {
		return false
	}
	ss.m[s.index] = s
	return true
}

func (ss *Sessions) remove(s *serverSession) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.m[s.index] == s {
		delete(ss.m, s.index)
	}
}

// HandlePacket takes one packet that arrived on the shared port from
// from, at local address to. It runs on the socket's read goroutine, so
// everything it does is quick: decrypt, check, hand the datagram to its
// stream's socket.
func (ss *Sessions) HandlePacket(pkt []byte, from netip.AddrPort, to netip.Addr) {
	idx, ok := packetIndex(pkt)
	if !ok {
		ss.rejected.Add(1)
		return
	}
	ss.mu.RLock()
	s := ss.m[idx]
	ss.mu.RUnlock()
	if s == nil {
		ss.rejected.Add(1)
		return
	}
	flags, m, err := s.open(pkt)
	if err != nil {
		ss.rejected.Add(1)
		return
	}
	ss.received.Add(1)
	// to as the socket gave it: a dual-stack socket sends from a mapped
	// IPv4 address with IPV6_PKTINFO, not from an unmapped one.
	s.saw(netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), to, flags&flagDuplicate != 0)
	switch m.kind {
	case kindData:
		s.srv.send(m)
	case kindEcho:
		s.srv.ping(m)
	case kindKeepalive:
	}
}

// saw records the endpoint a packet came from.
func (s *serverSession) saw(peer netip.AddrPort, local netip.Addr, dup bool) {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dup = dup
	s.inStream = false
	if s.endpoints[0].peer == peer {
		s.endpoints[0].at, s.endpoints[0].local = now, local
		return
	}
	s.endpoints[1] = s.endpoints[0]
	s.endpoints[0] = endpoint{peer: peer, local: local, at: now}
}

// deliver sends a message to the client over its latest path (and the
// one before, when it asked for two), if it has one that is fresh, and
// reports whether it did; otherwise the caller queues it on the stream.
func (s *serverSession) deliver(ss *Sessions, m []byte) bool {
	now := time.Now()
	s.mu.Lock()
	eps := s.endpoints
	dup := s.dup
	inStream := s.inStream
	s.mu.Unlock()
	if inStream || ss.Send == nil || !eps[0].peer.IsValid() || now.Sub(eps[0].at) > endpointFresh {
		return false
	}
	pkt, err := s.seal(m, 0)
	if err != nil {
		return false
	}
	if ss.Send(pkt, eps[0].peer, eps[0].local) != nil {
		return false
	}
	if dup && eps[1].peer.IsValid() && now.Sub(eps[1].at) <= endpointFresh {
		ss.Send(pkt, eps[1].peer, eps[1].local)
	}
	return true
}
