//go:build linux

package stack

import (
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// unreach is the kind of ICMP destination-unreachable sent back to an
// application whose destination could not be reached.
type unreach int

const (
	// unreachHost: IPv4 code 1 (host unreachable), IPv6 code 3 (address
	// unreachable); Linux turns both into EHOSTUNREACH at connect().
	unreachHost unreach = iota
	// unreachNet: IPv4 code 0, IPv6 code 0 (no route); ENETUNREACH.
	unreachNet
	// unreachProhibited: IPv4 code 13 (communication administratively
	// prohibited), IPv6 code 1 (administratively prohibited); Linux
	// reports EHOSTUNREACH and EACCES.
	unreachProhibited
	// unreachPort: IPv4 code 3, IPv6 code 4 (port unreachable);
	// ECONNREFUSED.
	unreachPort
)

// icmpTTL is the TTL / hop limit of the ICMP errors the stack sends; they
// only cross the TUN.
const icmpTTL = 64

// synQuote returns what an ICMP error about this SYN must quote: its IP
// header and its TCP header (RFC 792 asks for the IP header and 8 bytes;
// Linux matches the error to the connecting socket by the quoted ports
// and checks that the quoted sequence number is the one it sent). nil if
// the SYN cannot be quoted simply (IPv6 extension headers).
func synQuote(pkt *stack.PacketBuffer) []byte {
	nh := pkt.NetworkHeader().Slice()
	th := pkt.TransportHeader().Slice()
	switch pkt.NetworkProtocolNumber {
	case header.IPv4ProtocolNumber:
		if len(nh) < header.IPv4MinimumSize {
			return nil
		}
	case header.IPv6ProtocolNumber:
		if len(nh) < header.IPv6MinimumSize || header.IPv6(nh).TransportProtocol() != header.TCPProtocolNumber {
			return nil
		}
	default:
		return nil
	}
	if len(th) < header.TCPMinimumSize {
		return nil
	}
	q := make([]byte, 0, len(nh)+len(th))
	q = append(q, nh...)
	return append(q, th...)
}

// unreachable builds the ICMP or ICMPv6 destination-unreachable packet
// answering the packet quote came from: from the address it was sent to,
// back to its source.
func unreachable(quote []byte, kind unreach) []byte {
	switch header.IPVersion(quote) {
	case header.IPv4Version:
		return unreachable4(quote, kind)
	case header.IPv6Version:
		return unreachable6(quote, kind)
	}
	return nil
}

func unreachable4(quote []byte, kind unreach) []byte {
	orig := header.IPv4(quote)
	code := header.ICMPv4HostUnreachable
	switch kind {
	case unreachNet:
		code = header.ICMPv4NetUnreachable
	case unreachProhibited:
		code = header.ICMPv4AdminProhibited
	case unreachPort:
		code = header.ICMPv4PortUnreachable
	}
	total := header.IPv4MinimumSize + header.ICMPv4MinimumSize + len(quote)
	b := make([]byte, total)
	ip := header.IPv4(b)
	ip.Encode(&header.IPv4Fields{
		TotalLength: uint16(total),
		TTL:         icmpTTL,
		Protocol:    uint8(header.ICMPv4ProtocolNumber),
		SrcAddr:     orig.DestinationAddress(),
		DstAddr:     orig.SourceAddress(),
	})
	ip.SetChecksum(^ip.CalculateChecksum())
	icmp := header.ICMPv4(b[header.IPv4MinimumSize:])
	icmp.SetType(header.ICMPv4DstUnreachable)
	icmp.SetCode(code)
	copy(icmp[header.ICMPv4MinimumSize:], quote)
	icmp.SetChecksum(header.ICMPv4Checksum(icmp[:header.ICMPv4MinimumSize], checksum.Checksum(quote, 0)))
	return b
}

func unreachable6(quote []byte, kind unreach) []byte {
	orig := header.IPv6(quote)
	code := header.ICMPv6AddressUnreachable
	switch kind {
	case unreachNet:
		code = header.ICMPv6NetworkUnreachable
	case unreachProhibited:
		code = header.ICMPv6Prohibited
	case unreachPort:
		code = header.ICMPv6PortUnreachable
	}
	b := make([]byte, header.IPv6MinimumSize+header.ICMPv6MinimumSize+len(quote))
	ip := header.IPv6(b)
	ip.Encode(&header.IPv6Fields{
		PayloadLength:     uint16(header.ICMPv6MinimumSize + len(quote)),
		TransportProtocol: header.ICMPv6ProtocolNumber,
		HopLimit:          icmpTTL,
		SrcAddr:           orig.DestinationAddress(),
		DstAddr:           orig.SourceAddress(),
	})
	icmp := header.ICMPv6(b[header.IPv6MinimumSize:])
	icmp.SetType(header.ICMPv6DstUnreachable)
	icmp.SetCode(code)
	copy(icmp[header.ICMPv6MinimumSize:], quote)
	icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
		Header:      icmp[:header.ICMPv6MinimumSize],
		Src:         ip.SourceAddress(),
		Dst:         ip.DestinationAddress(),
		PayloadCsum: checksum.Checksum(quote, 0),
		PayloadLen:  len(quote),
	}))
	return b
}
