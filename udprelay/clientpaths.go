//go:build linux

package udprelay

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Transports a client can carry its datagrams with.
const (
	// TransportStream: every datagram in the datagram stream (one MPTCP
	// connection: multipath and failover, head-of-line blocking).
	TransportStream = "stream"
	// TransportUplinks: as UDP packets straight over the live uplink with
	// the lowest round-trip time (the stream still opens the session, and
	// carries datagrams while no uplink is live).
	TransportUplinks = "uplinks"
)

// keepaliveEvery is how often the client tells the concentrator which
// path is its preferred one while it has a session (well within
// endpointFresh), besides at once whenever the preference changes.
const keepaliveEvery = 5 * time.Second

// clientPaths is the client's side of the path transport: a socket per
// live uplink, bound to its address and marked, connected to the
// concentrator.
type clientPaths struct {
	c  *Client
	mu sync.Mutex
	// socks by uplink address; order is the live paths, best first.
	socks     map[netip.Addr]*pathSock
	order     []netip.Addr
	preferred netip.Addr
	lastKeep  time.Time
	wg        sync.WaitGroup
}

type pathSock struct {
	conn *net.UDPConn
}

// pathSession is the session to send over the paths with, nil when the
// stream is the transport or has not opened one yet.
func (c *Client) pathSession() *session {
	if c.cfg.Transport != TransportUplinks {
		return nil
	}
	return c.sess.Load()
}

// sendPaths sends a stream message as a packet on the best path, and on
// the second best too when asked to duplicate it; false when there is no
// session or no live path (the caller then uses the stream).
func (c *Client) sendPaths(m []byte, dup bool) bool {
	s := c.pathSession()
	if s == nil {
		return false
	}
	p := c.paths
	p.mu.Lock()
	var socks []*pathSock
	for _, a := range p.order {
		if ps := p.socks[a]; ps != nil {
			socks = append(socks, ps)
		}
		if len(socks) == 2 || (!dup && len(socks) == 1) {
			break
		}
	}
	p.mu.Unlock()
	if len(socks) == 0 {
		return false
	}
	var flags byte
	if dup && len(socks) > 1 {
		flags = flagDuplicate
	}
	pkt, err := s.seal(m, flags)
	if err != nil {
		return false
	}
	sent := false
	for _, ps := range socks {
		if _, err := ps.conn.Write(pkt); err == nil {
			sent = true
		}
	}
	return sent
}

// refresh follows the live paths: a socket for each new one, none for
// those gone, and a keepalive on the preferred one when it changed or is
// due. It runs on the Client's goroutine.
func (p *clientPaths) refresh() {
	c := p.c
	if c.cfg.Transport != TransportUplinks || c.cfg.Paths == nil {
		return
	}
	live := c.cfg.Paths()
	slices.SortStableFunc(live, func(a, b Path) int { return int(a.RTT - b.RTT) })
	var order []netip.Addr
	for _, l := range live {
		if l.Addr.IsValid() {
			order = append(order, l.Addr.Unmap())
		}
	}
	p.mu.Lock()
	for a, ps := range p.socks {
		if !slices.Contains(order, a) {
			ps.conn.Close()
			delete(p.socks, a)
		}
	}
	for _, a := range order {
		if p.socks[a] != nil {
			continue
		}
		conn, err := c.dialPath(a)
		if err != nil {
			c.log.Debug("datagram path", "addr", a.String(), "err", err)
			continue
		}
		ps := &pathSock{conn: conn}
		p.socks[a] = ps
		p.wg.Add(1)
		go func() { defer p.wg.Done(); c.readPath(conn) }()
	}
	p.order = order
	var pref netip.Addr
	if len(order) > 0 && p.socks[order[0]] != nil {
		pref = order[0]
	}
	keep := pref.IsValid() && (pref != p.preferred || time.Since(p.lastKeep) >= keepaliveEvery)
	p.preferred = pref
	if keep {
		p.lastKeep = time.Now()
	}
	p.mu.Unlock()
	if keep {
		if m, err := appendMsg(nil, kindKeepalive, 0, netip.AddrPortFrom(netip.IPv4Unspecified(), 0), nil); err == nil {
			c.sendPaths(m, false)
		}
	}
}

// close closes every path socket and waits for their readers.
func (p *clientPaths) close() {
	p.mu.Lock()
	for a, ps := range p.socks {
		ps.conn.Close()
		delete(p.socks, a)
	}
	p.order = nil
	p.mu.Unlock()
	p.wg.Wait()
}

// dialPath opens the socket of the path from src: bound to it, marked so
// that it leaves through that uplink and never enters the TUN.
func (c *Client) dialPath(src netip.Addr) (*net.UDPConn, error) {
	d := net.Dialer{
		LocalAddr: &net.UDPAddr{IP: src.AsSlice()},
		Control: func(_, _ string, rc syscall.RawConn) error {
			if c.cfg.Mark == 0 {
				return nil
			}
			var serr error
			err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(c.cfg.Mark))
			})
			if err != nil {
				return err
			}
			return serr
		},
	}
	server := c.cfg.Server
	if alt := c.cfg.ServerAlt; alt.IsValid() && alt.Addr().Unmap().Is4() == src.Is4() && server.Addr().Unmap().Is4() != src.Is4() {
		server = alt // of the path's family
	}
	conn, err := d.DialContext(context.Background(), "udp", server.String())
	if err != nil {
		return nil, err
	}
	return conn.(*net.UDPConn), nil
}

// readPath hands the concentrator's packets on one path to the
// applications until the socket is closed.
func (c *Client) readPath(conn *net.UDPConn) {
	buf := make([]byte, 65536)
	for {
		n, err := conn.Read(buf)
		if err != nil {
			if errorsIsClosed(err) {
				return
			}
			continue // an ICMP error for an earlier packet: keep reading
		}
		s := c.sess.Load()
		if s == nil {
			continue
		}
		if idx, ok := packetIndex(buf[:n]); !ok || idx != s.index {
			continue
		}
		_, m, err := s.open(buf[:n])
		if err != nil {
			continue
		}
		c.pathIn.Add(1)
		c.dispatch(m)
	}
}

func errorsIsClosed(err error) bool { return errors.Is(err, net.ErrClosed) }
