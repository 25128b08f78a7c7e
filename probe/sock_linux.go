package probe

import (
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// controlMark sets SO_MARK on a probe socket before it is bound, so its
// datagrams bypass the TUN as the tunnel's own connections do.
func controlMark(rc syscall.RawConn, mark uint32) error {
	if mark == 0 {
		return nil
	}
	var serr error
	err := rc.Control(func(fd uintptr) {
		if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark)); err != nil {
			serr = fmt.Errorf("set SO_MARK %#x (needs CAP_NET_ADMIN): %w", mark, err)
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// pktinfo makes a wildcard-bound responder answer from the address each
// request was sent to. Without it the kernel picks the reply's source by
// route, which on a multi-homed concentrator (its public address on lo,
// transit addresses on the links) is the wrong one: the client's NAT
// (CGNAT on LTE) then has no mapping for the reply and drops it.
type pktinfo struct {
	v6  bool
	oob [64]byte
}

// enablePktinfo asks the kernel for each datagram's destination address.
func enablePktinfo(uc *net.UDPConn) (*pktinfo, error) {
	rc, err := uc.SyscallConn()
	if err != nil {
		return nil, err
	}
	la, _ := uc.LocalAddr().(*net.UDPAddr)
	p := &pktinfo{v6: la != nil && la.IP.To4() == nil}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		if p.v6 {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1)
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
		}
	}); err != nil {
		return nil, err
	}
	if serr != nil {
		return nil, fmt.Errorf("enable packet info: %w", serr)
	}
	return p, nil
}

// dst finds the destination address in a datagram's control messages
// (invalid if absent). No allocation: the walk is by hand.
func (p *pktinfo) dst(oob []byte) netip.Addr {
	for len(oob) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		if h.Len < unix.SizeofCmsghdr || int(h.Len) > len(oob) {
			return netip.Addr{}
		}
		data := oob[unix.SizeofCmsghdr:h.Len]
		switch {
		case h.Level == unix.IPPROTO_IP && h.Type == unix.IP_PKTINFO && len(data) >= unix.SizeofInet4Pktinfo:
			// struct in_pktinfo: ifindex, spec_dst, addr; addr is
			// the header's destination.
			return netip.AddrFrom4([4]byte(data[8:12]))
		case h.Level == unix.IPPROTO_IPV6 && h.Type == unix.IPV6_PKTINFO && len(data) >= unix.SizeofInet6Pktinfo:
			return netip.AddrFrom16([16]byte(data[0:16]))
		}
		next := cmsgAlign(int(h.Len))
		if next > len(oob) {
			break
		}
		oob = oob[next:]
	}
	return netip.Addr{}
}

// src builds the control message that sets a reply's source address.
func (p *pktinfo) src(a netip.Addr) []byte {
	if !a.IsValid() {
		return nil
	}
	b := p.oob[:]
	clear(b)
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	if p.v6 && !a.Is4() {
		h.Level, h.Type = unix.IPPROTO_IPV6, unix.IPV6_PKTINFO
		h.SetLen(unix.CmsgLen(unix.SizeofInet6Pktinfo))
		a16 := a.As16()
		copy(b[unix.SizeofCmsghdr:], a16[:])
		return b[:unix.CmsgSpace(unix.SizeofInet6Pktinfo)]
	}
	if p.v6 {
		return nil // IPv4 on a dual-stack socket: leave it to the kernel
	}
	h.Level, h.Type = unix.IPPROTO_IP, unix.IP_PKTINFO
	h.SetLen(unix.CmsgLen(unix.SizeofInet4Pktinfo))
	a4 := a.As4()
	copy(b[unix.SizeofCmsghdr+4:], a4[:]) // spec_dst: the source to use
	return b[:unix.CmsgSpace(unix.SizeofInet4Pktinfo)]
}

func cmsgAlign(n int) int {
	const align = int(unsafe.Sizeof(uintptr(0)))
	return (n + align - 1) &^ (align - 1)
}
