//go:build linux

package udprelay

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Pings ride the datagram stream too, as messages of kindEcho: client →
// server an echo request to addr (its port field carries the request's
// sequence number, its flow the client's id of the pinging socket);
// server → client the echo reply from addr, with the same flow and
// sequence number. The concentrator pings the destination itself, so the
// round trip the application sees is the real one, and a host that does
// not answer gets no answer.
const kindEcho = 3

// echoTimeout is how long the concentrator waits for an echo reply.
const echoTimeout = 10 * time.Second

// maxEchoes bounds the echo requests of one stream waiting for replies.
const maxEchoes = 1024

// echoer is one stream's pinger for one address family: an unprivileged
// ICMP socket (SOCK_DGRAM, IPPROTO_ICMP: the kernel sets the identifier
// and matches the replies, but only for the groups in
// net.ipv4.ping_group_range), or a raw one (CAP_NET_RAW: mpvpn sets its
// own identifier and reads every echo reply the host receives, keeping
// those with it).
type echoer struct {
	s    *server
	v4   bool
	fd   *os.File
	raw  bool
	id   uint16 // the raw socket's identifier
	mu   sync.Mutex
	seq  uint16
	wait map[uint16]pendingEcho // by the sequence number on the wire
}

type pendingEcho struct {
	flow uint32
	seq  uint16 // the application's
	dst  netip.Addr
	at   time.Time
}

func newEchoer(s *server, v4 bool) (*echoer, error) {
	family, proto := unix.AF_INET6, unix.IPPROTO_ICMPV6
	if v4 {
		family, proto = unix.AF_INET, unix.IPPROTO_ICMP
	}
	e := &echoer{s: s, v4: v4, wait: map[uint16]pendingEcho{}, seq: uint16(rand.Uint32())}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		// Not in ping_group_range: a raw socket, if allowed.
		var rerr error
		fd, rerr = unix.Socket(family, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, proto)
		if rerr != nil {
			return nil, fmt.Errorf("udprelay: no ICMP socket to ping with (ping socket: %w; raw: %w)", err, rerr)
		}
		e.raw, e.id = true, uint16(rand.Uint32())
		if !v4 {
			// Only echo replies, as ping(8) filters.
			var f unix.ICMPv6Filter
			for i := range f.Data {
				f.Data[i] = 0xffffffff
			}
			f.Data[129>>5] &^= 1 << (129 & 31)
			unix.SetsockoptICMPv6Filter(fd, unix.SOL_ICMPV6, unix.ICMPV6_FILTER, &f)
		}
	}
	e.fd = os.NewFile(uintptr(fd), "icmp")
	s.wg.Add(1)
	go func() { defer s.wg.Done(); e.receive() }()
	return e, nil
}

func (e *echoer) close() { e.fd.Close() }

// send pings dst for the application's request.
func (e *echoer) send(flow uint32, seq uint16, dst netip.Addr, data []byte) error {
	e.mu.Lock()
	now := time.Now()
	for k, p := range e.wait {
		if now.Sub(p.at) > echoTimeout {
			delete(e.wait, k)
		}
	}
	if len(e.wait) >= maxEchoes {
		e.mu.Unlock()
		return errors.New("udprelay: too many pings waiting")
	}
	e.seq++
	wire := e.seq
	e.wait[wire] = pendingEcho{flow: flow, seq: seq, dst: dst, at: now}
	e.mu.Unlock()

	b := make([]byte, 8+len(data))
	b[0] = 8 // echo request
	if !e.v4 {
		b[0] = 128
	}
	binary.BigEndian.PutUint16(b[4:], e.id) // a ping socket sets its own
	binary.BigEndian.PutUint16(b[6:], wire)
	copy(b[8:], data)
	if e.v4 && e.raw {
		binary.BigEndian.PutUint16(b[2:], icmpChecksum(b))
	}
	// (A ping socket computes the checksum, and ICMPv6's is always the
	// kernel's.)
	var sa unix.Sockaddr
	if e.v4 {
		sa = &unix.SockaddrInet4{Addr: dst.As4()}
	} else {
		sa = &unix.SockaddrInet6{Addr: dst.As16()}
	}
	rc, err := e.fd.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Write(func(fd uintptr) bool {
		serr = unix.Sendto(int(fd), b, 0, sa)
		return serr != unix.EAGAIN
	}); err != nil {
		return err
	}
	return serr
}

// receive passes the echo replies back until the socket is closed.
func (e *echoer) receive() {
	rc, err := e.fd.SyscallConn()
	if err != nil {
		return
	}
	buf := make([]byte, 65536)
	for {
		var (
			n    int
			from unix.Sockaddr
			rerr error
		)
		if err := rc.Read(func(fd uintptr) bool {
			n, from, rerr = unix.Recvfrom(int(fd), buf, unix.MSG_DONTWAIT)
			return rerr != unix.EAGAIN
		}); err != nil {
			return
		}
		if rerr != nil {
			continue
		}
		b := buf[:n]
		if e.raw && e.v4 {
			// A raw IPv4 socket reads the IP header too.
			if len(b) < 20 || int(b[0]&0x0f)*4 > len(b) {
				continue
			}
			b = b[int(b[0]&0x0f)*4:]
		}
		reply := byte(0)
		if !e.v4 {
			reply = 129
		}
		if len(b) < 8 || b[0] != reply || b[1] != 0 || (e.raw && binary.BigEndian.Uint16(b[4:]) != e.id) {
			continue
		}
		src := sockaddrAddrPort(from).Addr()
		wire := binary.BigEndian.Uint16(b[6:])
		e.mu.Lock()
		p, ok := e.wait[wire]
		if ok && p.dst == src {
			delete(e.wait, wire)
		}
		e.mu.Unlock()
		if !ok || p.dst != src {
			continue
		}
		out, err := appendMsg(nil, kindEcho, p.flow, netip.AddrPortFrom(src, p.seq), b[8:])
		if err != nil || !e.s.deliver(out) {
			e.s.n.dropped.Add(1)
			continue
		}
		e.s.n.echoes.Add(1)
	}
}

// icmpChecksum is the Internet checksum of b (RFC 1071).
func icmpChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}
