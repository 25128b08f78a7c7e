//go:build linux

package stack

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// EchoHandler receives the ICMP echo requests (ping) applications send
// into the TUN. The netstack never answers them itself: every address is
// local to it (it is promiscuous), so it would answer for hosts that do
// not exist, at the TUN's round-trip time; a ping must get the real
// destination's answer, or none.
type EchoHandler interface {
	// HandleEcho is called on the TUN's read goroutine, once per echo
	// request from src to dst with its identifier and sequence number:
	// it must not block, and must copy data to keep it.
	HandleEcho(src, dst netip.Addr, id, seq uint16, data []byte)
}

// echoRequest parses an ICMP or ICMPv6 echo request: no IPv4 options
// that hide it, no fragment, no IPv6 extension header.
func echoRequest(b []byte) (src, dst netip.Addr, id, seq uint16, data []byte, ok bool) {
	p, ok := parseIP(b)
	if !ok {
		return
	}
	var echo byte
	switch {
	case p.src.Len() == 4 && p.proto == uint8(header.ICMPv4ProtocolNumber):
		echo = byte(header.ICMPv4Echo)
	case p.src.Len() == 16 && p.proto == uint8(header.ICMPv6ProtocolNumber):
		echo = byte(header.ICMPv6EchoRequest)
	default:
		return src, dst, 0, 0, nil, false
	}
	// ICMPv4's and ICMPv6's echo headers are laid out alike: type, code,
	// checksum, identifier, sequence number, then the data.
	icmp := p.payload
	if len(icmp) < header.ICMPv4MinimumSize || icmp[0] != echo || icmp[1] != 0 {
		return src, dst, 0, 0, nil, false
	}
	return addrOf(p.src), addrOf(p.dst), binary.BigEndian.Uint16(icmp[4:]), binary.BigEndian.Uint16(icmp[6:]), icmp[8:], true
}

// isEchoRequest: what link.deliver keeps from gVisor.
func isEchoRequest(b []byte) bool {
	_, _, _, _, _, ok := echoRequest(b)
	return ok
}

// WriteEchoReply writes an echo reply from src (the host that answered)
// to dst (the application), with the request's identifier, sequence
// number and data.
func (s *Stack) WriteEchoReply(src, dst netip.Addr, id, seq uint16, data []byte) error {
	src, dst = src.Unmap(), dst.Unmap()
	if !src.IsValid() || src.Is4() != dst.Is4() {
		return fmt.Errorf("stack: echo reply %v → %v: not two addresses of one family", src, dst)
	}
	if s.ctx.Err() != nil {
		return fmt.Errorf("stack: echo reply: %w", net.ErrClosed)
	}
	var b []byte
	if src.Is4() {
		total := header.IPv4MinimumSize + header.ICMPv4MinimumSize + len(data)
		if total > int(s.link.mtu) {
			return fmt.Errorf("stack: echo reply of %d bytes exceeds the MTU %d", total, s.link.mtu)
		}
		b = make([]byte, total)
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(total),
			TTL:         icmpTTL,
			Protocol:    uint8(header.ICMPv4ProtocolNumber),
			SrcAddr:     tcpip.AddrFrom4(src.As4()),
			DstAddr:     tcpip.AddrFrom4(dst.As4()),
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		icmp := header.ICMPv4(b[header.IPv4MinimumSize:])
		icmp.SetType(header.ICMPv4EchoReply)
		icmp.SetIdent(id)
		icmp.SetSequence(seq)
		copy(icmp[header.ICMPv4MinimumSize:], data)
		icmp.SetChecksum(header.ICMPv4Checksum(icmp[:header.ICMPv4MinimumSize], checksum.Checksum(data, 0)))
	} else {
		total := header.IPv6MinimumSize + header.ICMPv6EchoMinimumSize + len(data)
		if total > int(s.link.mtu) {
			return fmt.Errorf("stack: echo reply of %d bytes exceeds the MTU %d", total, s.link.mtu)
		}
		b = make([]byte, total)
		ip := header.IPv6(b)
		ip.Encode(&header.IPv6Fields{
			PayloadLength:     uint16(header.ICMPv6EchoMinimumSize + len(data)),
			TransportProtocol: header.ICMPv6ProtocolNumber,
			HopLimit:          icmpTTL,
			SrcAddr:           tcpip.AddrFrom16(src.As16()),
			DstAddr:           tcpip.AddrFrom16(dst.As16()),
		})
		icmp := header.ICMPv6(b[header.IPv6MinimumSize:])
		icmp.SetType(header.ICMPv6EchoReply)
		icmp.SetIdent(id)
		icmp.SetSequence(seq)
		copy(icmp[header.ICMPv6EchoMinimumSize:], data)
		icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
			Header:      icmp[:header.ICMPv6EchoMinimumSize],
			Src:         ip.SourceAddress(),
			Dst:         ip.DestinationAddress(),
			PayloadCsum: checksum.Checksum(data, 0),
			PayloadLen:  len(data),
		}))
	}
	return s.link.writeRaw(b)
}
