//go:build linux

package stack

import (
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// ipPacket is what the link's own looks at a packet (pings, new SYNs)
// need of it before gVisor sees it.
type ipPacket struct {
	proto    uint8 // the transport protocol (IPv4 protocol, IPv6 next header)
	src, dst tcpip.Address
	payload  []byte // the transport header and what follows it
}

// parseIP reads the IP packet b: a valid unfragmented IPv4 packet, or an
// IPv6 packet whose next header is the transport (one behind extension
// headers is left to gVisor as it is).
func parseIP(b []byte) (ipPacket, bool) {
	switch header.IPVersion(b) {
	case header.IPv4Version:
		ip := header.IPv4(b)
		if !ip.IsValid(len(b)) || ip.More() || ip.FragmentOffset() != 0 {
			return ipPacket{}, false
		}
		return ipPacket{ip.Protocol(), ip.SourceAddress(), ip.DestinationAddress(), b[ip.HeaderLength():ip.TotalLength()]}, true
	case header.IPv6Version:
		ip := header.IPv6(b)
		if !ip.IsValid(len(b)) {
			return ipPacket{}, false
		}
		return ipPacket{ip.NextHeader(), ip.SourceAddress(), ip.DestinationAddress(), b[header.IPv6MinimumSize : header.IPv6MinimumSize+int(ip.PayloadLength())]}, true
	}
	return ipPacket{}, false
}
