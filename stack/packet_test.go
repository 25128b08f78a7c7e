//go:build linux

package stack_test

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// tcpSeg describes a TCP segment to craft or one that was parsed.
type tcpSeg struct {
	src, dst netip.AddrPort
	seq, ack uint32
	flags    header.TCPFlags
	window   uint16
	payload  []byte
}

// encode builds the IPv4 or IPv6 packet carrying seg (by src's family),
// checksums included. SYNs carry an MSS option, as every real SYN does.
func (seg tcpSeg) encode() []byte {
	var opts []byte
	if seg.flags&header.TCPFlagSyn != 0 {
		opts = make([]byte, header.TCPOptionMSSLength)
		header.EncodeMSSOption(1400, opts)
	}
	tcpLen := header.TCPMinimumSize + len(opts) + len(seg.payload)
	ipLen := header.IPv4MinimumSize
	if seg.src.Addr().Is6() {
		ipLen = header.IPv6MinimumSize
	}
	b := make([]byte, ipLen+tcpLen)
	src := tcpip.AddrFromSlice(seg.src.Addr().AsSlice())
	dst := tcpip.AddrFromSlice(seg.dst.Addr().AsSlice())
	if seg.src.Addr().Is4() {
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(len(b)),
			TTL:         64,
			Protocol:    uint8(header.TCPProtocolNumber),
			SrcAddr:     src,
			DstAddr:     dst,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
	} else {
		header.IPv6(b).Encode(&header.IPv6Fields{
			PayloadLength:     uint16(tcpLen),
			TransportProtocol: header.TCPProtocolNumber,
			HopLimit:          64,
			SrcAddr:           src,
			DstAddr:           dst,
		})
	}
	t := header.TCP(b[ipLen:])
	window := seg.window
	if window == 0 {
		window = 65535
	}
	t.Encode(&header.TCPFields{
		SrcPort:    seg.src.Port(),
		DstPort:    seg.dst.Port(),
		SeqNum:     seg.seq,
		AckNum:     seg.ack,
		DataOffset: uint8(header.TCPMinimumSize + len(opts)),
		Flags:      seg.flags,
		WindowSize: window,
	})
	copy(t[header.TCPMinimumSize:], opts)
	copy(t[header.TCPMinimumSize+len(opts):], seg.payload)
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(tcpLen))
	xsum = checksum.Checksum(seg.payload, xsum)
	t.SetChecksum(^t.CalculateChecksum(xsum))
	return b
}

// icmpErr is a parsed ICMP(v6) destination-unreachable.
type icmpErr struct {
	v6        bool
	code      uint8
	src, dst  netip.Addr // of the ICMP packet
	quotedSrc netip.AddrPort
	quotedDst netip.AddrPort
	quotedSeq uint32
}

// parsed is one packet the stack wrote: a TCP segment or an ICMP error.
type parsed struct {
	tcp  *tcpSeg
	icmp *icmpErr
}

func (p parsed) String() string {
	switch {
	case p.tcp != nil:
		return fmt.Sprintf("TCP %v→%v [%v] seq=%d ack=%d len=%d", p.tcp.src, p.tcp.dst, p.tcp.flags, p.tcp.seq, p.tcp.ack, len(p.tcp.payload))
	case p.icmp != nil:
		return fmt.Sprintf("ICMP unreachable code %d %v→%v about %v→%v", p.icmp.code, p.icmp.src, p.icmp.dst, p.icmp.quotedSrc, p.icmp.quotedDst)
	}
	return "other packet"
}

func addr(a tcpip.Address) netip.Addr {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return ip
}

// parsePacket parses what the stack wrote, checking the checksums it is
// responsible for.
func parsePacket(t *testing.T, b []byte) parsed {
	t.Helper()
	var (
		src, dst netip.Addr
		proto    tcpip.TransportProtocolNumber
		l4       []byte
	)
	switch header.IPVersion(b) {
	case header.IPv4Version:
		ip := header.IPv4(b)
		if !ip.IsValid(len(b)) || !ip.IsChecksumValid() {
			t.Fatalf("invalid IPv4 packet from the stack: % x", b)
		}
		src, dst, proto, l4 = addr(ip.SourceAddress()), addr(ip.DestinationAddress()), ip.TransportProtocol(), ip.Payload()
	case header.IPv6Version:
		ip := header.IPv6(b)
		if !ip.IsValid(len(b)) {
			t.Fatalf("invalid IPv6 packet from the stack: % x", b)
		}
		src, dst, proto, l4 = addr(ip.SourceAddress()), addr(ip.DestinationAddress()), ip.TransportProtocol(), ip.Payload()
	default:
		t.Fatalf("not an IP packet: % x", b)
	}
	switch proto {
	case header.TCPProtocolNumber:
		th := header.TCP(l4)
		xsum := header.PseudoHeaderChecksum(proto, tcpip.AddrFromSlice(src.AsSlice()), tcpip.AddrFromSlice(dst.AsSlice()), uint16(len(l4)))
		if th.CalculateChecksum(checksum.Checksum(th.Payload(), xsum)) != 0xffff {
			t.Fatalf("bad TCP checksum from the stack")
		}
		return parsed{tcp: &tcpSeg{
			src:     netip.AddrPortFrom(src, th.SourcePort()),
			dst:     netip.AddrPortFrom(dst, th.DestinationPort()),
			seq:     th.SequenceNumber(),
			ack:     th.AckNumber(),
			flags:   th.Flags(),
			window:  th.WindowSize(),
			payload: append([]byte(nil), th.Payload()...),
		}}
	case header.ICMPv4ProtocolNumber, header.ICMPv6ProtocolNumber:
		v6 := proto == header.ICMPv6ProtocolNumber
		if !v6 && checksum.Checksum(l4, 0) != 0xffff {
			t.Fatalf("bad ICMP checksum")
		}
		if v6 {
			xsum := header.PseudoHeaderChecksum(proto, tcpip.AddrFromSlice(src.AsSlice()), tcpip.AddrFromSlice(dst.AsSlice()), uint16(len(l4)))
			if checksum.Checksum(l4, xsum) != 0xffff {
				t.Fatalf("bad ICMPv6 checksum")
			}
		}
		if (!v6 && l4[0] != byte(header.ICMPv4DstUnreachable)) || (v6 && l4[0] != byte(header.ICMPv6DstUnreachable)) {
			t.Fatalf("unexpected ICMP type %d", l4[0])
		}
		e := &icmpErr{v6: v6, code: l4[1], src: src, dst: dst}
		q := l4[8:]
		var qsrc, qdst netip.Addr
		var qt header.TCP
		if v6 {
			ip := header.IPv6(q)
			qsrc, qdst, qt = addr(ip.SourceAddress()), addr(ip.DestinationAddress()), header.TCP(q[header.IPv6MinimumSize:])
		} else {
			ip := header.IPv4(q)
			qsrc, qdst, qt = addr(ip.SourceAddress()), addr(ip.DestinationAddress()), header.TCP(q[ip.HeaderLength():])
		}
		e.quotedSrc = netip.AddrPortFrom(qsrc, qt.SourcePort())
		e.quotedDst = netip.AddrPortFrom(qdst, qt.DestinationPort())
		e.quotedSeq = qt.SequenceNumber()
		return parsed{icmp: e}
	}
	t.Fatalf("unexpected protocol %d from the stack", proto)
	return parsed{}
}

// next returns the next packet the stack writes, failing after d.
func next(t *testing.T, from <-chan []byte, d time.Duration) parsed {
	t.Helper()
	select {
	case b := <-from:
		return parsePacket(t, b)
	case <-time.After(d):
		t.Fatalf("no packet from the stack within %v", d)
		return parsed{}
	}
}

// none checks that the stack writes nothing for d.
func none(t *testing.T, from <-chan []byte, d time.Duration) {
	t.Helper()
	select {
	case b := <-from:
		t.Fatalf("unexpected packet from the stack: %v", parsePacket(t, b))
	case <-time.After(d):
	}
}
