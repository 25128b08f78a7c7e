//go:build linux

package stack_test

import (
	"bytes"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/mpvpn/mpvpn/stack"
)

// echoPacket builds an ICMP(v6) echo request or reply from src to dst.
func echoPacket(src, dst netip.Addr, reply bool, id, seq uint16, data []byte) []byte {
	if src.Is4() {
		total := header.IPv4MinimumSize + header.ICMPv4MinimumSize + len(data)
		b := make([]byte, total)
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(total), TTL: 64, Protocol: uint8(header.ICMPv4ProtocolNumber),
			SrcAddr: tcpip.AddrFrom4(src.As4()), DstAddr: tcpip.AddrFrom4(dst.As4())})
		ip.SetChecksum(^ip.CalculateChecksum())
		icmp := header.ICMPv4(b[header.IPv4MinimumSize:])
		icmp.SetType(header.ICMPv4Echo)
		if reply {
			icmp.SetType(header.ICMPv4EchoReply)
		}
		icmp.SetIdent(id)
		icmp.SetSequence(seq)
		copy(icmp[header.ICMPv4MinimumSize:], data)
		icmp.SetChecksum(header.ICMPv4Checksum(icmp[:header.ICMPv4MinimumSize], checksum.Checksum(data, 0)))
		return b
	}
	b := make([]byte, header.IPv6MinimumSize+header.ICMPv6EchoMinimumSize+len(data))
	ip := header.IPv6(b)
	ip.Encode(&header.IPv6Fields{PayloadLength: uint16(header.ICMPv6EchoMinimumSize + len(data)), TransportProtocol: header.ICMPv6ProtocolNumber,
		HopLimit: 64, SrcAddr: tcpip.AddrFrom16(src.As16()), DstAddr: tcpip.AddrFrom16(dst.As16())})
	icmp := header.ICMPv6(b[header.IPv6MinimumSize:])
	icmp.SetType(header.ICMPv6EchoRequest)
	if reply {
		icmp.SetType(header.ICMPv6EchoReply)
	}
	icmp.SetIdent(id)
	icmp.SetSequence(seq)
	copy(icmp[header.ICMPv6EchoMinimumSize:], data)
	icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: icmp[:header.ICMPv6EchoMinimumSize],
		Src: ip.SourceAddress(), Dst: ip.DestinationAddress(), PayloadCsum: checksum.Checksum(data, 0), PayloadLen: len(data)}))
	return b
}

type echoReq struct {
	src, dst netip.Addr
	id, seq  uint16
	data     []byte
}

type echoFunc func(src, dst netip.Addr, id, seq uint16, data []byte)

func (f echoFunc) HandleEcho(src, dst netip.Addr, id, seq uint16, data []byte) {
	f(src, dst, id, seq, data)
}

// TestEcho: an echo request reaches the handler and is never answered by
// the netstack itself (with or without a handler); WriteEchoReply writes
// the reply the kernel expects, checksums included.
func TestEcho(t *testing.T) {
	for _, fam := range []struct {
		name     string
		app, dst netip.Addr
	}{
		{"IPv4", app4.Addr(), dest4.Addr()},
		{"IPv6", app6.Addr(), dest6.Addr()},
	} {
		t.Run(fam.name, func(t *testing.T) {
			got := make(chan echoReq, 1)
			h := echoFunc(func(src, dst netip.Addr, id, seq uint16, data []byte) {
				got <- echoReq{src, dst, id, seq, bytes.Clone(data)}
			})
			s, dev := newStack(t, stack.Config{Dialer: &recorder{fn: hang}, Echo: h})
			data := pattern(56)
			dev.ToStack <- echoPacket(fam.app, fam.dst, false, 0x1234, 7, data)
			select {
			case r := <-got:
				if r.src != fam.app || r.dst != fam.dst || r.id != 0x1234 || r.seq != 7 || !bytes.Equal(r.data, data) {
					t.Fatalf("handler got %+v", r)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("the echo request did not reach the handler")
			}
			none(t, dev.FromStack, 200*time.Millisecond) // the netstack did not answer
			if err := s.WriteEchoReply(fam.dst, fam.app, 0x1234, 7, data); err != nil {
				t.Fatal(err)
			}
			select {
			case b := <-dev.FromStack:
				if want := echoPacket(fam.dst, fam.app, true, 0x1234, 7, data); !bytes.Equal(b, want) {
					t.Errorf("reply\n%x\nwant\n%x", b, want)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("no reply written")
			}
			if err := s.WriteEchoReply(dest4.Addr(), app6.Addr(), 1, 1, nil); err == nil {
				t.Error("a reply across families written")
			}
		})
	}
	t.Run("no handler", func(t *testing.T) {
		_, dev := newStack(t, stack.Config{Dialer: &recorder{fn: hang}})
		dev.ToStack <- echoPacket(app4.Addr(), dest4.Addr(), false, 1, 1, pattern(8))
		none(t, dev.FromStack, 300*time.Millisecond)
	})
}
