//go:build linux

package stack

import (
	"fmt"
	"math"
	"net"
	"net/netip"
	"syscall"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// UDPHandler receives the UDP datagrams applications send into the TUN.
type UDPHandler interface {
	// HandleUDP is called on the TUN's read goroutine, once per datagram:
	// it must not block, and must copy payload to keep it. It returns
	// false to refuse the datagram; the application then gets an ICMP
	// port unreachable (ECONNREFUSED on a connected UDP socket), as from a
	// host with nothing listening.
	//
	// Datagrams to multicast addresses never get here (gVisor delivers
	// them only for groups the NIC joined, and it joins none); those to
	// 255.255.255.255 do, and are never answered with ICMP.
	HandleUDP(src, dst netip.AddrPort, payload []byte) bool
}

// udpTTL is the TTL / hop limit of the datagrams WriteUDP builds; like
// the ICMP errors, they only cross the TUN.
const udpTTL = 64

// handleUDP is the UDP protocol's default handler: gVisor calls it for
// every datagram, as the stack has no UDP endpoints. It hands a
// well-formed datagram to the UDPHandler. A datagram it returns false for
// is answered by gVisor: with nothing malformed about it, the UDP
// protocol reports it unhandled and the IP layer sends an ICMP port
// unreachable from the datagram's destination, quoting as much of it as
// fits 576 bytes (IPv4) or 1280 (IPv6), rate-limited by the stack's ICMP
// limiter (1000/s, burst 50), and never to a broadcast or multicast
// destination (gVisor 2025-05: udp HandleUnknownDestinationPacket, ipv4
// and ipv6 returnError).
func (s *Stack) handleUDP(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	hdr := header.UDP(pkt.TransportHeader().Slice())
	if len(hdr) < header.UDPMinimumSize {
		return false // gVisor drops it as malformed
	}
	// The default handler runs before gVisor's own checks (those are in
	// HandleUnknownDestinationPacket), so the length is checked here. The
	// checksum is not: the link offloads RX checksums (link.Capabilities).
	nh := pkt.Network()
	lengthOK, csumOK := header.UDPValid(hdr, func() uint16 { return pkt.Data().Checksum() },
		uint16(pkt.Data().Size()), pkt.NetworkProtocolNumber,
		nh.SourceAddress(), nh.DestinationAddress(), pkt.RXChecksumValidated)
	if !lengthOK || !csumOK {
		return false // gVisor counts it malformed and drops it, no ICMP
	}
	if s.ctx.Err() != nil {
		return true // closing: dropped, as handleTCP does
	}
	if h := s.udp; h != nil {
		// One copy, into a pooled buffer: a large datagram spans two
		// views (link.deliver splits off the headers), which the handler
		// would otherwise have to gather itself.
		v := pkt.Data().AsRange().Capped(int(hdr.Length()) - header.UDPMinimumSize).ToView()
		var payload []byte
		if v != nil { // nil for an empty datagram
			payload = v.AsSlice()
		}
		ok := h.HandleUDP(addrPort(id.RemoteAddress, id.RemotePort), addrPort(id.LocalAddress, id.LocalPort), payload)
		if v != nil {
			v.Release()
		}
		if ok {
			s.udpIn.Add(1)
			return true
		}
	}
	s.udpRefused.Add(1) // counted before gVisor answers, as every answer is
	if dst := id.LocalAddress; header.IsV4MulticastAddress(dst) || header.IsV6MulticastAddress(dst) || dst == header.IPv4Broadcast {
		// Never an ICMP error for these. gVisor would send none either,
		// and drops multicast before this handler anyway (the NIC joins
		// no group); this does not rely on it. A subnet broadcast cannot
		// be told: the NIC has no subnet.
		return true
	}
	return false
}

// WriteUDP writes a UDP datagram into the TUN, from src to dst: the
// application at dst receives it as sent by src, whatever address that
// is. src and dst must be of one family (4-in-6 addresses count as
// IPv4). The packet, headers included, must fit the stack's MTU (it is
// not fragmented); if not, the error wraps syscall.EMSGSIZE. After Close
// the error wraps net.ErrClosed. It is safe for concurrent use, and may
// be called from HandleUDP; it waits while the device's write queue is
// full.
func (s *Stack) WriteUDP(src, dst netip.AddrPort, payload []byte) error {
	if s.ctx.Err() != nil {
		return fmt.Errorf("stack: write UDP: %w", net.ErrClosed)
	}
	sa, da := src.Addr().Unmap(), dst.Addr().Unmap()
	if !sa.IsValid() || !da.IsValid() || sa.Is4() != da.Is4() {
		return fmt.Errorf("stack: write UDP %v → %v: not two addresses of one family", src, dst)
	}
	ipLen := header.IPv4MinimumSize
	if sa.Is6() {
		ipLen = header.IPv6MinimumSize
	}
	udpLen := header.UDPMinimumSize + len(payload)
	if total := ipLen + udpLen; total > int(s.link.mtu) {
		return fmt.Errorf("stack: write UDP %v → %v: %d-byte packet exceeds the MTU %d: %w", src, dst, total, s.link.mtu, syscall.EMSGSIZE)
	}

	v := buffer.NewViewSize(ipLen + udpLen) // zeroed
	b := v.AsSlice()
	srcAddr, dstAddr := tcpip.AddrFromSlice(sa.AsSlice()), tcpip.AddrFromSlice(da.AsSlice())
	if sa.Is4() {
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(len(b)),
			// DF clear, so the kernel may fragment it should it forward
			// the datagram onto a smaller link; hence a fresh ID each.
			ID:       uint16(s.ipID.Add(1)),
			TTL:      udpTTL,
			Protocol: uint8(header.UDPProtocolNumber),
			SrcAddr:  srcAddr,
			DstAddr:  dstAddr,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
	} else {
		header.IPv6(b).Encode(&header.IPv6Fields{
			PayloadLength:     uint16(udpLen),
			TransportProtocol: header.UDPProtocolNumber,
			HopLimit:          udpTTL,
			SrcAddr:           srcAddr,
			DstAddr:           dstAddr,
		})
	}
	u := header.UDP(b[ipLen:])
	u.Encode(&header.UDPFields{SrcPort: src.Port(), DstPort: dst.Port(), Length: uint16(udpLen)})
	copy(u.Payload(), payload)
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, srcAddr, dstAddr, uint16(udpLen))
	xsum = u.CalculateChecksum(checksum.Checksum(payload, xsum))
	// RFC 768: a checksum that computes to zero is sent as all ones;
	// zero means "none", which IPv6 does not allow.
	if xsum != math.MaxUint16 {
		xsum = ^xsum
	}
	u.SetChecksum(xsum)

	if err := s.link.writeBuffer(buffer.MakeWithView(v)); err != nil {
		if s.link.closed() {
			return fmt.Errorf("stack: write UDP: %w", net.ErrClosed)
		}
		return fmt.Errorf("stack: write UDP: %w", err)
	}
	s.udpOut.Add(1)
	return nil
}

// Why a UDP destination could not be reached, for UnreachableUDP.
type Unreachable int

const (
	// UnreachableProhibited: administratively prohibited (the
	// concentrator's policy): EHOSTUNREACH over IPv4, EACCES over IPv6.
	UnreachableProhibited Unreachable = iota
	// UnreachablePort: nothing listens there: ECONNREFUSED.
	UnreachablePort
	// UnreachableHost: no such host: EHOSTUNREACH.
	UnreachableHost
	// UnreachableNet: no route: ENETUNREACH.
	UnreachableNet
)

// UnreachableUDP tells the application at app that its datagram to dst
// did not get there, and why: an ICMP destination unreachable from dst,
// quoting the IP and UDP headers of such a datagram, which is all the
// kernel needs to find the application's socket (a connected one's next
// call then fails with the matching errno).
func (s *Stack) UnreachableUDP(app, dst netip.AddrPort, why Unreachable) error {
	kind := unreachProhibited
	switch why {
	case UnreachablePort:
		kind = unreachPort
	case UnreachableHost:
		kind = unreachHost
	case UnreachableNet:
		kind = unreachNet
	}
	app, dst = unmapAddrPort(app), unmapAddrPort(dst)
	if !app.Addr().IsValid() || app.Addr().Is4() != dst.Addr().Is4() {
		return fmt.Errorf("stack: refuse UDP %v → %v: not two addresses of one family", app, dst)
	}
	var quote []byte
	if app.Addr().Is4() {
		quote = make([]byte, header.IPv4MinimumSize+header.UDPMinimumSize)
		ip := header.IPv4(quote)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(len(quote)),
			TTL:         udpTTL,
			Protocol:    uint8(header.UDPProtocolNumber),
			SrcAddr:     tcpip.AddrFrom4(app.Addr().As4()),
			DstAddr:     tcpip.AddrFrom4(dst.Addr().As4()),
		})
		ip.SetChecksum(^ip.CalculateChecksum())
	} else {
		quote = make([]byte, header.IPv6MinimumSize+header.UDPMinimumSize)
		header.IPv6(quote).Encode(&header.IPv6Fields{
			PayloadLength:     header.UDPMinimumSize,
			TransportProtocol: header.UDPProtocolNumber,
			HopLimit:          udpTTL,
			SrcAddr:           tcpip.AddrFrom16(app.Addr().As16()),
			DstAddr:           tcpip.AddrFrom16(dst.Addr().As16()),
		})
	}
	u := header.UDP(quote[len(quote)-header.UDPMinimumSize:])
	u.Encode(&header.UDPFields{SrcPort: app.Port(), DstPort: dst.Port(), Length: header.UDPMinimumSize})
	if s.ctx.Err() != nil {
		return fmt.Errorf("stack: refuse UDP: %w", net.ErrClosed)
	}
	return s.link.writeRaw(unreachable(quote, kind))
}

func unmapAddrPort(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}
