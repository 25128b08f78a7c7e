//go:build linux

package stack

import (
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// A flow whose far end closed first leaves its netstack endpoint in
// TIME_WAIT. An app that opens a new connection from the same port to the
// same destination meanwhile (its own socket is long gone: it closed
// second) sends a SYN that gVisor delivers to that endpoint, and gVisor
// (2025-05) hands a SYN on from TIME_WAIT only to a listening endpoint,
// which the forwarder is not:
//
//   - while the endpoint lives, the SYN is dropped (handleTimeWaitSegments),
//     and the app waits for its SYN retransmissions until TIME_WAIT ends;
//   - if TIME_WAIT ends while the SYN is still queued on the endpoint,
//     it is redelivered to registered endpoints only
//     (tryDeliverSegmentFromClosedEndpoint), finds none, and is answered
//     with a RST: the app's connect() is refused. One or two flows in
//     30 000 of a churn met that (issue 11).
//
// So a new SYN retires the TIME_WAIT endpoint of its 4-tuple before gVisor
// sees it, and then takes the forwarder's path like any other, as Linux
// lets a SYN reopen a TIME_WAIT connection (RFC 1122 4.2.2.13). On a local
// TUN the app never has two connections on one 4-tuple, so its SYN is
// always a new connection, never an old duplicate.

// pureSYN returns the 4-tuple (as gVisor's endpoint sees it: local is the
// destination) of a TCP SYN without ACK in the IP packet b.
func pureSYN(b []byte) (stack.TransportEndpointID, tcpip.NetworkProtocolNumber, bool) {
	p, ok := parseIP(b)
	if !ok || p.proto != uint8(header.TCPProtocolNumber) || len(p.payload) < header.TCPMinimumSize {
		return stack.TransportEndpointID{}, 0, false
	}
	th := header.TCP(p.payload)
	if th.Flags()&(header.TCPFlagSyn|header.TCPFlagAck|header.TCPFlagRst) != header.TCPFlagSyn {
		return stack.TransportEndpointID{}, 0, false
	}
	proto := header.IPv4ProtocolNumber
	if p.src.Len() == 16 {
		proto = header.IPv6ProtocolNumber
	}
	return stack.TransportEndpointID{
		LocalPort: th.DestinationPort(), LocalAddress: p.dst,
		RemotePort: th.SourcePort(), RemoteAddress: p.src,
	}, proto, true
}

// retireTimeWait is the link's SYN hook: it aborts the endpoint in
// TIME_WAIT that holds the 4-tuple of the SYN in b, if any.
func (s *Stack) retireTimeWait(b []byte) {
	id, proto, ok := pureSYN(b)
	if !ok {
		return
	}
	ep, ok := s.ip.FindTransportEndpoint(proto, header.TCPProtocolNumber, id, nicID).(*tcp.Endpoint)
	if !ok || tcp.EndpointState(ep.State()) != tcp.StateTimeWait {
		return
	}
	// Abort unregisters the endpoint before it returns, so the SYN
	// delivered next meets no endpoint and reaches handleTCP. It also
	// sends the old connection's RST, carrying the old sequence numbers:
	// the app's socket in SYN-SENT drops it as unacceptable (RFC 793;
	// Linux then resends its SYN at once, which handleTCP absorbs while
	// the first is pending).
	ep.Abort()
	s.timeWaitRetired.Add(1)
}
