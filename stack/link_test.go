//go:build linux

package stack

import (
	"bytes"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/mpvpn/mpvpn/tun/tuntest"
)

// gateDev is a channel TUN whose first Write waits for a release, so
// that packets pile up behind it; it records the batch of every Write.
type gateDev struct {
	*tuntest.Channel
	release chan struct{}
	once    sync.Once
	mu      sync.Mutex
	batches []int
	offsets []int
}

func (d *gateDev) Write(bufs [][]byte, offset int) (int, error) {
	d.once.Do(func() { <-d.release })
	d.mu.Lock()
	d.batches = append(d.batches, len(bufs))
	d.offsets = append(d.offsets, offset)
	d.mu.Unlock()
	return d.Channel.Write(bufs, offset)
}

// packet returns an IPv4 packet of n bytes whose payload is filled with
// b (the link does not look past the version nibble).
func packet(n int, b byte) []byte {
	p := bytes.Repeat([]byte{b}, n)
	p[0] = 0x45
	return p
}

// TestLinkWriteBatches: packets that queue while the device is busy go
// out in one Write, behind the headroom wireguard's GRO needs, intact.
func TestLinkWriteBatches(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	dev := &gateDev{Channel: tuntest.NewChannel(1500, 16), release: make(chan struct{})}
	l := newLink(dev, 1500, slog.New(slog.DiscardHandler))
	l.start()
	defer l.close()

	const n = 6
	for i := range n {
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(packet(100+i, byte(i)))})
		var list stack.PacketBufferList
		list.PushBack(pkt)
		if _, err := l.WritePackets(list); err != nil {
			t.Fatal(err)
		}
		pkt.DecRef()
	}
	close(dev.release)
	for i := range n {
		select {
		case got := <-dev.FromStack:
			if want := packet(100+i, byte(i)); !bytes.Equal(got, want) {
				t.Fatalf("packet %d: got %d bytes % x…, want %d", i, len(got), got[:4], len(want))
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("packet %d not written", i)
		}
	}
	dev.mu.Lock()
	defer dev.mu.Unlock()
	// The writer takes what is queued when it starts a Write; the first
	// Write waits at the gate, so whatever came after it goes out in the
	// second: [k, n-k] or [n] (k depends on scheduling, [5 1] and [3 3]
	// seen under -race), never one Write per packet.
	sum := 0
	for _, b := range dev.batches {
		sum += b
	}
	if len(dev.batches) > 2 || sum != n {
		t.Errorf("Write batches %v, want at most two Writes of %d packets in all", dev.batches, n)
	}
	for _, off := range dev.offsets {
		if off != writeHeadroom {
			t.Errorf("Write offset %d, want %d", off, writeHeadroom)
		}
	}
}

// dispatcher records what the link delivers.
type dispatcher struct {
	mu   sync.Mutex
	pkts [][]byte
}

func (d *dispatcher) DeliverNetworkPacket(_ tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	v := pkt.ToView()
	d.mu.Lock()
	d.pkts = append(d.pkts, bytes.Clone(v.AsSlice()))
	d.mu.Unlock()
	v.Release()
}

func (d *dispatcher) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}

// TestLinkReadBatch: one Read returning several packets delivers them all
// intact, large ones in their read buffer (headers split off), small ones
// copied, and packets that are not IP are dropped.
func TestLinkReadBatch(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	dev := tuntest.NewChannel(9000, 8)
	l := newLink(dev, 9000, slog.New(slog.DiscardHandler))
	var d dispatcher
	l.Attach(&d)
	want := [][]byte{packet(9000, 1), packet(40, 2), packet(4600, 3), packet(headerSplit, 4)}
	for _, p := range want {
		dev.ToStack <- p
	}
	dev.ToStack <- []byte{0x00, 1, 2, 3} // not IP
	l.start()
	deadline := time.Now().Add(5 * time.Second)
	for {
		d.mu.Lock()
		n := len(d.pkts)
		d.mu.Unlock()
		if n >= len(want) || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if err := l.close(); err != nil && err != os.ErrClosed {
		t.Fatal(err)
	}
	if len(d.pkts) != len(want) {
		t.Fatalf("delivered %d packets, want %d", len(d.pkts), len(want))
	}
	for i := range want {
		if !bytes.Equal(d.pkts[i], want[i]) {
			t.Errorf("packet %d: %d bytes delivered, want %d, equal %v", i, len(d.pkts[i]), len(want[i]), bytes.Equal(d.pkts[i], want[i]))
		}
	}
	if got := l.rxPackets.Load(); got != uint64(len(want)) {
		t.Errorf("rxPackets %d, want %d", got, len(want))
	}
}

func TestICMPQuoteIPv6ExtensionHeader(t *testing.T) {
	// A SYN behind an IPv6 extension header cannot be quoted simply:
	// no quote, so the stack answers with a RST instead.
	b := make([]byte, header.IPv6MinimumSize+8+header.TCPMinimumSize)
	header.IPv6(b).Encode(&header.IPv6Fields{TransportProtocol: tcpip.TransportProtocolNumber(header.IPv6HopByHopOptionsExtHdrIdentifier), HopLimit: 1})
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
	defer pkt.DecRef()
	pkt.NetworkProtocolNumber = header.IPv6ProtocolNumber
	pkt.NetworkHeader().Consume(header.IPv6MinimumSize)
	pkt.TransportHeader().Consume(8 + header.TCPMinimumSize)
	if q := synQuote(pkt); q != nil {
		t.Fatalf("quoted %d bytes", len(q))
	}
}
