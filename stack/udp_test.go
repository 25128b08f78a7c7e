//go:build linux

package stack_test

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/mpvpn/mpvpn/stack"
)

// udpDgram describes a UDP datagram to craft or one that was parsed.
type udpDgram struct {
	src, dst netip.AddrPort
	payload  []byte
	ttl      uint8  // parsed: TTL or hop limit
	xsum     uint16 // parsed: the UDP checksum field
}

func (d udpDgram) String() string {
	return fmt.Sprintf("UDP %v→%v len=%d", d.src, d.dst, len(d.payload))
}

// ipLen is the IP header length for addr's family.
func ipLen(a netip.Addr) int {
	if a.Is4() {
		return header.IPv4MinimumSize
	}
	return header.IPv6MinimumSize
}

// encode builds the IPv4 or IPv6 packet carrying d, checksums included.
func (d udpDgram) encode() []byte {
	n := ipLen(d.src.Addr())
	udpLen := header.UDPMinimumSize + len(d.payload)
	b := make([]byte, n+udpLen)
	src := tcpip.AddrFromSlice(d.src.Addr().AsSlice())
	dst := tcpip.AddrFromSlice(d.dst.Addr().AsSlice())
	if d.src.Addr().Is4() {
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(len(b)),
			TTL:         64,
			Protocol:    uint8(header.UDPProtocolNumber),
			SrcAddr:     src,
			DstAddr:     dst,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
	} else {
		header.IPv6(b).Encode(&header.IPv6Fields{
			PayloadLength:     uint16(udpLen),
			TransportProtocol: header.UDPProtocolNumber,
			HopLimit:          64,
			SrcAddr:           src,
			DstAddr:           dst,
		})
	}
	u := header.UDP(b[n:])
	u.Encode(&header.UDPFields{SrcPort: d.src.Port(), DstPort: d.dst.Port(), Length: uint16(udpLen)})
	copy(u.Payload(), d.payload)
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, src, dst, uint16(udpLen))
	u.SetChecksum(^u.CalculateChecksum(checksum.Checksum(d.payload, xsum)))
	return b
}

// parseUDP parses a UDP datagram the stack wrote, failing t unless its IP
// header and both checksums are valid (checked with gVisor's header
// package) and the lengths agree.
func parseUDP(t *testing.T, b []byte) udpDgram {
	t.Helper()
	var (
		src, dst tcpip.Address
		l4       []byte
		ttl      uint8
	)
	switch header.IPVersion(b) {
	case header.IPv4Version:
		ip := header.IPv4(b)
		if !ip.IsValid(len(b)) || !ip.IsChecksumValid() || int(ip.TotalLength()) != len(b) {
			t.Fatalf("invalid IPv4 packet from the stack: % x", b)
		}
		if ip.TransportProtocol() != header.UDPProtocolNumber || ip.More() || ip.FragmentOffset() != 0 {
			t.Fatalf("not a whole UDP datagram: % x", b[:header.IPv4MinimumSize])
		}
		src, dst, l4, ttl = ip.SourceAddress(), ip.DestinationAddress(), ip.Payload(), ip.TTL()
	case header.IPv6Version:
		ip := header.IPv6(b)
		if !ip.IsValid(len(b)) || int(ip.PayloadLength())+header.IPv6MinimumSize != len(b) {
			t.Fatalf("invalid IPv6 packet from the stack: % x", b)
		}
		if ip.TransportProtocol() != header.UDPProtocolNumber {
			t.Fatalf("not a UDP datagram: next header %d", ip.TransportProtocol())
		}
		src, dst, l4, ttl = ip.SourceAddress(), ip.DestinationAddress(), ip.Payload(), ip.HopLimit()
	default:
		t.Fatalf("not an IP packet: % x", b)
	}
	u := header.UDP(l4)
	if len(u) < header.UDPMinimumSize || int(u.Length()) != len(u) {
		t.Fatalf("UDP length %d in %d bytes", u.Length(), len(u))
	}
	if u.Checksum() == 0 {
		t.Fatalf("UDP checksum left out")
	}
	if !u.IsChecksumValid(src, dst, checksum.Checksum(u.Payload(), 0)) {
		t.Fatalf("bad UDP checksum %#04x", u.Checksum())
	}
	return udpDgram{
		src:     netip.AddrPortFrom(addr(src), u.SourcePort()),
		dst:     netip.AddrPortFrom(addr(dst), u.DestinationPort()),
		payload: bytes.Clone(u.Payload()),
		ttl:     ttl,
		xsum:    u.Checksum(),
	}
}

// udpFunc adapts a function to stack.UDPHandler.
type udpFunc func(src, dst netip.AddrPort, payload []byte) bool

func (f udpFunc) HandleUDP(src, dst netip.AddrPort, payload []byte) bool { return f(src, dst, payload) }

// udpSink is a UDPHandler that records each datagram (a copy) on got and
// answers accept.
func udpSink(accept bool) (stack.UDPHandler, <-chan udpDgram) {
	got := make(chan udpDgram, 64)
	return udpFunc(func(src, dst netip.AddrPort, payload []byte) bool {
		got <- udpDgram{src: src, dst: dst, payload: bytes.Clone(payload)}
		return accept
	}), got
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + 3)
	}
	return b
}

// The channel TUN of newStack has MTU 1500.
const (
	maxPayload4 = 1500 - header.IPv4MinimumSize - header.UDPMinimumSize
	maxPayload6 = 1500 - header.IPv6MinimumSize - header.UDPMinimumSize
)

// TestUDPToHandler: every datagram into the TUN reaches HandleUDP with
// its exact addresses and payload, from empty to the MTU, and nothing is
// sent back for an accepted one.
func TestUDPToHandler(t *testing.T) {
	tests := []struct {
		name     string
		src, dst netip.AddrPort
		size     int
	}{
		{"IPv4 empty", app4, dest4, 0},
		{"IPv4 small", app4, dest4, 5},
		{"IPv4 at the MTU", app4, dest4, maxPayload4},
		{"IPv6 empty", app6, dest6, 0},
		{"IPv6 small", app6, dest6, 5},
		{"IPv6 at the MTU", app6, dest6, maxPayload6},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, got := udpSink(true)
			s, dev := newStack(t, stack.Config{Dialer: &recorder{fn: hang}, UDP: h})
			sent := udpDgram{src: tt.src, dst: tt.dst, payload: pattern(tt.size)}
			dev.ToStack <- sent.encode()
			select {
			case d := <-got:
				if d.src != tt.src || d.dst != tt.dst || !bytes.Equal(d.payload, sent.payload) {
					t.Fatalf("handler got %v, want %v (payload equal: %v)", d, sent, bytes.Equal(d.payload, sent.payload))
				}
			case <-time.After(5 * time.Second):
				t.Fatal("datagram not handed to the handler")
			}
			none(t, dev.FromStack, 100*time.Millisecond)
			if st := s.Stats(); st.UDPIn != 1 || st.UDPRefused != 0 || st.UDPOut != 0 {
				t.Errorf("stats %+v, want UDPIn 1", st)
			}
		})
	}
}

// TestUDPRefused: a datagram the handler refuses, or any datagram when
// there is no handler, gets gVisor's ICMP port unreachable from its
// destination, quoting its IP header and UDP ports. One to the broadcast
// address is handed over but refused silently; one to a multicast address
// is dropped by gVisor before the handler (the NIC joins no group), and a
// malformed one is dropped too: neither is handed over, counted or
// answered.
func TestUDPRefused(t *testing.T) {
	mcast4 := netip.MustParseAddrPort("239.1.2.3:5353")
	bcast4 := netip.MustParseAddrPort("255.255.255.255:67")
	mcast6 := netip.MustParseAddrPort("[ff02::fb]:5353")
	tests := []struct {
		name      string
		noHandler bool
		src, dst  netip.AddrPort
		size      int
		malformed bool // UDP length field beyond the packet
		dropped   bool // before the handler
		wantICMP  bool
	}{
		{name: "IPv4 refused", src: app4, dst: dest4, size: 20, wantICMP: true},
		{name: "IPv6 refused", src: app6, dst: dest6, size: 20, wantICMP: true},
		{name: "IPv4 refused at the MTU", src: app4, dst: dest4, size: maxPayload4, wantICMP: true},
		{name: "IPv6 refused at the MTU", src: app6, dst: dest6, size: maxPayload6, wantICMP: true},
		{name: "IPv4 no handler", noHandler: true, src: app4, dst: dest4, wantICMP: true},
		{name: "IPv6 no handler", noHandler: true, src: app6, dst: dest6, wantICMP: true},
		{name: "IPv4 multicast", src: app4, dst: mcast4, dropped: true},
		{name: "IPv4 broadcast", src: app4, dst: bcast4},
		{name: "IPv4 broadcast no handler", noHandler: true, src: app4, dst: bcast4},
		{name: "IPv6 multicast", src: app6, dst: mcast6, dropped: true},
		{name: "IPv4 malformed", src: app4, dst: dest4, size: 4, malformed: true, dropped: true},
		{name: "IPv6 malformed", src: app6, dst: dest6, size: 4, malformed: true, dropped: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, got := udpSink(false)
			cfg := stack.Config{Dialer: &recorder{fn: hang}, UDP: h}
			if tt.noHandler {
				cfg.UDP = nil
			}
			s, dev := newStack(t, cfg)
			b := udpDgram{src: tt.src, dst: tt.dst, payload: pattern(tt.size)}.encode()
			if tt.malformed {
				u := header.UDP(b[ipLen(tt.src.Addr()):])
				u.SetLength(u.Length() + 1)
			}
			dev.ToStack <- b

			if !tt.noHandler && !tt.dropped {
				select {
				case d := <-got:
					if d.src != tt.src || d.dst != tt.dst {
						t.Fatalf("handler got %v, want %v→%v", d, tt.src, tt.dst)
					}
				case <-time.After(5 * time.Second):
					t.Fatal("datagram not handed to the handler")
				}
			}
			if !tt.wantICMP {
				none(t, dev.FromStack, 200*time.Millisecond)
			} else {
				var raw []byte
				select {
				case raw = <-dev.FromStack:
				case <-time.After(5 * time.Second):
					t.Fatal("no ICMP error")
				}
				p := parsePacket(t, raw) // checks type and checksum
				e := p.icmp
				code := uint8(header.ICMPv4PortUnreachable)
				if tt.src.Addr().Is6() {
					code = uint8(header.ICMPv6PortUnreachable)
				}
				if e == nil || e.code != code || e.src != tt.dst.Addr() || e.dst != tt.src.Addr() ||
					e.quotedSrc != tt.src || e.quotedDst != tt.dst {
					t.Fatalf("got %v, want port unreachable (code %d) from %v to %v quoting %v→%v", p, code, tt.dst.Addr(), tt.src.Addr(), tt.src, tt.dst)
				}
				// The quote holds at least the IP header and 8 bytes
				// (the whole UDP header), up to gVisor's limit.
				quote := raw[ipLen(tt.src.Addr())+8:]
				if min := ipLen(tt.src.Addr()) + header.UDPMinimumSize; len(quote) < min || !bytes.Equal(quote[:min], b[:min]) {
					t.Fatalf("quoted %d bytes, want the datagram's first %d", len(quote), min)
				}
			}
			wantRefused := uint64(1)
			if tt.dropped {
				wantRefused = 0
			}
			if st := s.Stats(); st.UDPIn != 0 || st.UDPRefused != wantRefused {
				t.Errorf("stats %+v, want UDPIn 0, UDPRefused %d", st, wantRefused)
			}
			if len(got) != 0 {
				t.Errorf("%d more datagrams handed over", len(got))
			}
		})
	}
}

// zeroSumPayload returns a 2-byte payload for which the UDP checksum of a
// datagram src→dst computes to zero, so it must be sent as 0xffff.
func zeroSumPayload(src, dst netip.AddrPort) []byte {
	const udpLen = header.UDPMinimumSize + 2
	u := make(header.UDP, udpLen)
	u.Encode(&header.UDPFields{SrcPort: src.Port(), DstPort: dst.Port(), Length: udpLen})
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber,
		tcpip.AddrFromSlice(src.Addr().Unmap().AsSlice()), tcpip.AddrFromSlice(dst.Addr().Unmap().AsSlice()), udpLen)
	w := ^u.CalculateChecksum(xsum) // the sum plus w is all ones
	return []byte{byte(w >> 8), byte(w)}
}

// TestWriteUDP: WriteUDP puts one datagram on the device, from src to dst
// as given, with valid IP and UDP checksums and TTL 64.
func TestWriteUDP(t *testing.T) {
	mapped := netip.AddrPortFrom(netip.AddrFrom16(dest4.Addr().As16()), dest4.Port())
	tests := []struct {
		name     string
		src, dst netip.AddrPort
		payload  []byte
		wantSrc  netip.AddrPort // if not src
		wantXsum uint16         // if not 0
	}{
		{name: "IPv4 empty", src: dest4, dst: app4},
		{name: "IPv4 odd length", src: dest4, dst: app4, payload: pattern(1)},
		{name: "IPv4", src: dest4, dst: app4, payload: pattern(1000)},
		{name: "IPv4 at the MTU", src: dest4, dst: app4, payload: pattern(maxPayload4)},
		{name: "IPv4 checksum zero", src: dest4, dst: app4, payload: zeroSumPayload(dest4, app4), wantXsum: math.MaxUint16},
		{name: "IPv4 from any address", src: netip.MustParseAddrPort("203.0.113.99:3478"), dst: app4, payload: pattern(10)},
		{name: "IPv4 4-in-6 source", src: mapped, dst: app4, payload: pattern(10), wantSrc: dest4},
		{name: "IPv6 empty", src: dest6, dst: app6},
		{name: "IPv6 odd length", src: dest6, dst: app6, payload: pattern(1)},
		{name: "IPv6", src: dest6, dst: app6, payload: pattern(1000)},
		{name: "IPv6 at the MTU", src: dest6, dst: app6, payload: pattern(maxPayload6)},
		{name: "IPv6 checksum zero", src: dest6, dst: app6, payload: zeroSumPayload(dest6, app6), wantXsum: math.MaxUint16},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, dev := newStack(t, stack.Config{Dialer: &recorder{fn: hang}})
			if err := s.WriteUDP(tt.src, tt.dst, tt.payload); err != nil {
				t.Fatal(err)
			}
			var d udpDgram
			select {
			case b := <-dev.FromStack:
				d = parseUDP(t, b)
			case <-time.After(5 * time.Second):
				t.Fatal("nothing written")
			}
			wantSrc := tt.src
			if tt.wantSrc.IsValid() {
				wantSrc = tt.wantSrc
			}
			if d.src != wantSrc || d.dst != tt.dst || !bytes.Equal(d.payload, tt.payload) || d.ttl != 64 {
				t.Fatalf("wrote %v ttl %d, want %v→%v len=%d ttl 64 (payload equal: %v)", d, d.ttl, wantSrc, tt.dst, len(tt.payload), bytes.Equal(d.payload, tt.payload))
			}
			if tt.wantXsum != 0 && d.xsum != tt.wantXsum {
				t.Errorf("checksum field %#04x, want %#04x", d.xsum, tt.wantXsum)
			}
			if st := s.Stats(); st.UDPOut != 1 {
				t.Errorf("stats %+v, want UDPOut 1", st)
			}
		})
	}
}

// TestWriteUDPErrors: addresses of two families, or of none, and packets
// over the MTU are errors, and nothing is written.
func TestWriteUDPErrors(t *testing.T) {
	tests := []struct {
		name     string
		src, dst netip.AddrPort
		size     int
		want     error // errors.Is, if not nil
	}{
		{name: "IPv4 to IPv6", src: dest4, dst: app6},
		{name: "IPv6 to IPv4", src: dest6, dst: app4},
		{name: "no source", dst: app4},
		{name: "no destination", src: dest4},
		{name: "IPv4 over the MTU", src: dest4, dst: app4, size: maxPayload4 + 1, want: syscall.EMSGSIZE},
		{name: "IPv6 over the MTU", src: dest6, dst: app6, size: maxPayload6 + 1, want: syscall.EMSGSIZE},
		{name: "IPv4 over 64 KiB", src: dest4, dst: app4, size: 1 << 16, want: syscall.EMSGSIZE},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, dev := newStack(t, stack.Config{Dialer: &recorder{fn: hang}})
			err := s.WriteUDP(tt.src, tt.dst, pattern(tt.size))
			if err == nil || (tt.want != nil && !errors.Is(err, tt.want)) {
				t.Fatalf("WriteUDP: %v, want an error (%v)", err, tt.want)
			}
			t.Log(err)
			none(t, dev.FromStack, 50*time.Millisecond)
			if st := s.Stats(); st.UDPOut != 0 {
				t.Errorf("stats %+v, want UDPOut 0", st)
			}
		})
	}
}

// TestWriteUDPConcurrent: writers on many goroutines, the last ones
// racing Close, each get nil or net.ErrClosed, and every datagram
// written before Close reaches the device whole.
func TestWriteUDPConcurrent(t *testing.T) {
	s, dev := newStack(t, stack.Config{Dialer: &recorder{fn: hang}})
	const writers, each = 8, 50
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			src := netip.AddrPortFrom(dest4.Addr(), uint16(1000+w))
			for i := range each {
				if err := s.WriteUDP(src, app4, []byte{byte(w), byte(i)}); err != nil {
					t.Errorf("writer %d: %v", w, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	seen := make(map[[2]byte]bool)
	for range writers * each {
		select {
		case b := <-dev.FromStack:
			d := parseUDP(t, b)
			if len(d.payload) != 2 || d.src.Port() != 1000+uint16(d.payload[0]) {
				t.Fatalf("wrote %v payload % x", d, d.payload)
			}
			seen[[2]byte(d.payload)] = true
		case <-time.After(5 * time.Second):
			t.Fatalf("%d datagrams written, want %d", len(seen), writers*each)
		}
	}
	if len(seen) != writers*each {
		t.Errorf("%d distinct datagrams, want %d", len(seen), writers*each)
	}
	if st := s.Stats(); st.UDPOut != writers*each {
		t.Errorf("UDPOut %d, want %d", st.UDPOut, writers*each)
	}

	// Racing Close: no panic, no hang, and only net.ErrClosed as errors.
	stop := make(chan struct{})
	for range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				err := s.WriteUDP(dest4, app4, []byte("late"))
				if err != nil {
					if !errors.Is(err, net.ErrClosed) {
						t.Errorf("WriteUDP during Close: %v, want net.ErrClosed", err)
					}
					return
				}
				select {
				case <-stop:
					return
				default:
				}
			}
		}()
	}
	time.Sleep(10 * time.Millisecond)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	close(stop)
	wg.Wait()
}

// TestWriteUDPAfterClose: WriteUDP on a closed stack fails with
// net.ErrClosed and writes nothing; a datagram into a closing stack is
// not handed over.
func TestWriteUDPAfterClose(t *testing.T) {
	h, got := udpSink(true)
	s, dev := newStack(t, stack.Config{Dialer: &recorder{fn: hang}, UDP: h})
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	for _, fam := range [][2]netip.AddrPort{{dest4, app4}, {dest6, app6}} {
		if err := s.WriteUDP(fam[0], fam[1], []byte("x")); !errors.Is(err, net.ErrClosed) {
			t.Errorf("WriteUDP %v→%v after Close: %v, want net.ErrClosed", fam[0], fam[1], err)
		}
	}
	select {
	case b := <-dev.FromStack:
		t.Fatalf("wrote % x after Close", b)
	default:
	}
	if len(got) != 0 {
		t.Errorf("%d datagrams handed over", len(got))
	}
}
