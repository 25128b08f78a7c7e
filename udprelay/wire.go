//go:build linux

// Package udprelay carries the applications' UDP datagrams between the
// client and the concentrator, both ends, over one long-lived tunnel flow
// per client (the tunnel's datagram service): framed datagrams over one
// kernel MPTCP connection, so that they get multipath and failover like
// every flow, at the price of head-of-line blocking (a lost segment holds
// every datagram behind it until it is repaired).
//
// On the client, a Client takes the datagrams the netstack hands it, gives
// each application socket (source address and port) a flow id and sends
// the datagram with its destination. On the concentrator, ServeStream
// gives each flow id one UDP socket (per address family), so that a flow
// keeps its source port whatever it sends to (endpoint-independent
// mapping), and passes back whatever arrives at that socket, from any
// address and port (endpoint-independent filtering: STUN and NAT traversal
// work), with the sender's address, which the client writes back into the
// TUN from that address. A flow idle for IdleTimeout is forgotten on both
// ends (RFC 4787 REQ-5: never less than two minutes, but DNS).
//
// Neither end ever queues without bound: a datagram that finds the
// stream's queue full is dropped and counted, as a router would drop it.
package udprelay

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
)

// Message kinds.
const (
	// kindData: a datagram. Client → server: to addr. Server → client:
	// from addr.
	kindData = 1
	// kindRefused: server → client: the datagram to addr was not sent,
	// refused by the concentrator's destination policy; the client
	// answers the application with an ICMP error.
	kindRefused = 2
)

// Wire layout of one message on the stream:
//
//	0  2  length of what follows, BE (headerSize-2 .. headerSize-2+MaxPayload)
//	2  1  kind
//	3  4  flow id, BE
//	7  1  family: 4 or 6
//	8  16 address (IPv4 in the first 4 bytes, the rest zero)
//	24 2  port, BE
//	26 .. payload
//
// A payload of up to 65511 bytes fits: every IPv4 datagram (65507 at
// most), and every IPv6 one that a TUN of at most 65535 bytes' MTU passes.
const headerSize = 26

var errMalformed = errors.New("udprelay: malformed message")

// msg is one decoded message; payload aliases the read buffer.
type msg struct {
	kind    byte
	flow    uint32
	addr    netip.AddrPort
	payload []byte
}

// maxMessage is the largest message after the length field.
const maxMessage = 0xffff

// appendMsg appends m's encoding to b; it fails when the payload does not
// fit the length field.
func appendMsg(b []byte, kind byte, flow uint32, addr netip.AddrPort, payload []byte) ([]byte, error) {
	n := headerSize - 2 + len(payload)
	if n > maxMessage {
		return b, fmt.Errorf("udprelay: a %d-byte datagram does not fit a message", len(payload))
	}
	a := addr.Addr().Unmap()
	var h [headerSize]byte
	binary.BigEndian.PutUint16(h[0:2], uint16(n))
	h[2] = kind
	binary.BigEndian.PutUint32(h[3:7], flow)
	if a.Is4() {
		h[7] = 4
		a4 := a.As4()
		copy(h[8:12], a4[:])
	} else {
		h[7] = 6
		a16 := a.As16()
		copy(h[8:24], a16[:])
	}
	binary.BigEndian.PutUint16(h[24:26], addr.Port())
	b = append(b, h[:]...)
	return append(b, payload...), nil
}

// readMsg reads one message into buf (at least 2 + maxMessage long).
func readMsg(r io.Reader, buf []byte) (msg, error) {
	if _, err := io.ReadFull(r, buf[:2]); err != nil {
		return msg{}, err
	}
	n := int(binary.BigEndian.Uint16(buf[:2]))
	if n < headerSize-2 {
		return msg{}, errMalformed
	}
	b := buf[2 : 2+n]
	if _, err := io.ReadFull(r, b); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return msg{}, err
	}
	return parseBody(b)
}

// parseBody decodes a message without its length field.
func parseBody(b []byte) (msg, error) {
	if len(b) < headerSize-2 {
		return msg{}, errMalformed
	}
	m := msg{kind: b[0], flow: binary.BigEndian.Uint32(b[1:5])}
	switch m.kind {
	case kindData, kindRefused, kindEcho, kindSession, kindKeepalive, kindUnreachable:
	default:
		return msg{}, errMalformed
	}
	var a netip.Addr
	switch b[5] {
	case 4:
		for _, z := range b[10:22] {
			if z != 0 {
				return msg{}, errMalformed
			}
		}
		a = netip.AddrFrom4([4]byte(b[6:10]))
	case 6:
		a = netip.AddrFrom16([16]byte(b[6:22]))
		if a.Is4In6() {
			return msg{}, errMalformed
		}
	default:
		return msg{}, errMalformed
	}
	m.addr = netip.AddrPortFrom(a, binary.BigEndian.Uint16(b[22:24]))
	m.payload = b[headerSize-2:]
	return m, nil
}
