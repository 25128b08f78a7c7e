//go:build linux

package stack

import (
	"errors"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	wgtun "golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

const (
	// writeHeadroom is the room left in front of every packet written to
	// the device. wireguard's Linux device needs 10 bytes there (the
	// virtio-net header it fills in for GRO); a fake device ignores it.
	writeHeadroom = 10

	// maxWriteBatchBytes bounds one Write call by bytes as well as by the
	// device's batch size: at MTU 65000 GRO has nothing to coalesce (two
	// segments exceed 64 KiB), so a batch of 128 would only hold 8 MiB of
	// copies back; 1 MiB keeps the syscall savings at small MTUs (where the
	// count limit binds first) and a short queue at large ones.
	maxWriteBatchBytes = 1 << 20

	// outQueueLen is how many outbound packets may wait for the writer.
	// When it is full WritePackets blocks (back-pressure on gVisor's TCP
	// senders) rather than dropping: a drop here would cost a
	// retransmission timeout on a link that never loses anything.
	outQueueLen = 1024
)

// link is the gVisor LinkEndpoint on the wireguard TUN device. Inbound,
// one goroutine reads whole batches and hands each packet to gVisor
// without copying it again (the buffer it was read into becomes the
// packet). Outbound, gVisor's packets queue on a channel and one goroutine
// flushes whatever has accumulated as one batched device Write, so
// wireguard's GRO can coalesce consecutive TCP segments.
type link struct {
	dev     wgtun.Device
	mtu     uint32
	batch   int // device batch size
	readBuf int // bytes per read buffer
	log     *slog.Logger

	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher

	out       chan *stack.PacketBuffer
	done      chan struct{} // closed by close: stops both loops
	closeOnce sync.Once
	wg        sync.WaitGroup

	rxPackets, txPackets atomic.Uint64
	rxErrors, txErrors   atomic.Uint64

	// echo takes the ICMP echo requests before gVisor sees them (set
	// before start; nil: they are dropped).
	echo EchoHandler
	// syn sees every packet before gVisor does, to act on new TCP SYNs
	// (set before start; nil: none).
	syn func(b []byte)
}

var _ stack.LinkEndpoint = (*link)(nil)

func newLink(dev wgtun.Device, mtu int, log *slog.Logger) *link {
	batch := dev.BatchSize()
	if batch < 1 {
		batch = 1
	}
	// A read buffer holds one packet of at most MTU bytes (wireguard
	// splits GSO super-packets into MTU-sized segments); gVisor's buffer
	// pools round it up, to 64 KiB at most.
	readBuf := min(mtu, buffer.MaxChunkSize)
	return &link{
		dev:     dev,
		mtu:     uint32(mtu),
		batch:   batch,
		readBuf: readBuf,
		log:     log,
		out:     make(chan *stack.PacketBuffer, outQueueLen),
		done:    make(chan struct{}),
	}
}

// start launches the read and write loops. It is called once gVisor is
// fully configured, so no packet reaches a half-built stack.
func (l *link) start() {
	l.wg.Add(2)
	go l.readLoop()
	go l.writeLoop()
}

// close stops both loops and closes the device (the only way to interrupt
// a blocked Read), then waits for the loops and releases what was queued.
func (l *link) close() error {
	var err error
	l.closeOnce.Do(func() {
		close(l.done)
		err = l.dev.Close()
		l.wg.Wait()
		for {
			select {
			case pkt := <-l.out:
				pkt.DecRef()
			default:
				return
			}
		}
	})
	return err
}

func (l *link) closed() bool {
	select {
	case <-l.done:
		return true
	default:
		return false
	}
}

func (l *link) readLoop() {
	defer l.wg.Done()
	n := l.batch
	views := make([]*buffer.View, n)
	bufs := make([][]byte, n)
	sizes := make([]int, n)
	fresh := func(i int) {
		views[i] = buffer.NewViewSize(l.readBuf)
		bufs[i] = views[i].AsSlice()
	}
	for i := range views {
		fresh(i)
	}
	defer func() {
		for _, v := range views {
			v.Release()
		}
	}()
	consecutiveErrs := 0
	for {
		count, err := l.dev.Read(bufs, sizes, 0)
		for i := range count {
			if l.deliver(views[i], bufs[i][:sizes[i]]) {
				fresh(i) // gVisor owns that buffer now
			}
		}
		if err == nil {
			consecutiveErrs = 0
			continue
		}
		if l.closed() {
			return
		}
		if errors.Is(err, os.ErrClosed) {
			l.log.Warn("TUN closed under the netstack: no more packets in")
			return
		}
		l.rxErrors.Add(1)
		if errors.Is(err, wgtun.ErrTooManySegments) {
			// A super-packet had more segments than the batch holds;
			// the first count were delivered, TCP resends the rest.
			l.log.Debug("TUN read: super-packet larger than the batch", "err", err)
			continue
		}
		// Errors are per packet (a malformed virtio header, say); keep
		// reading, but do not spin if the device keeps failing.
		consecutiveErrs++
		l.log.Warn("TUN read", "err", err)
		if consecutiveErrs > 8 {
			select {
			case <-l.done:
				return
			case <-time.After(time.Duration(min(consecutiveErrs, 100)) * time.Millisecond):
			}
		}
	}
}

// deliver hands one packet read into v (b is its bytes) to gVisor. It
// reports whether gVisor took v itself; otherwise the bytes were copied
// and v can be reused.
func (l *link) deliver(v *buffer.View, b []byte) (tookView bool) {
	if len(b) == 0 {
		return false
	}
	var proto tcpip.NetworkProtocolNumber
	switch header.IPVersion(b) {
	case header.IPv4Version:
		proto = header.IPv4ProtocolNumber
	case header.IPv6Version:
		proto = header.IPv6ProtocolNumber
	default:
		return false
	}
	l.mu.RLock()
	d := l.dispatcher
	l.mu.RUnlock()
	if d == nil {
		return false
	}
	l.rxPackets.Add(1)
	// Pings never reach gVisor, which would answer every one itself.
	if src, dst, id, seq, data, ok := echoRequest(b); ok {
		if l.echo != nil {
			l.echo.HandleEcho(src, dst, id, seq, data)
		}
		return false
	}
	if l.syn != nil {
		l.syn(b)
	}
	// A large packet keeps its read buffer (no copy of the payload); a
	// small one (an ACK, say) is copied into a right-sized buffer so that
	// a 64 KiB buffer is never held, possibly for long in a receive queue,
	// for a few bytes. "Large" is at least half the buffer: never more
	// than half wasted.
	var payload buffer.Buffer
	if 2*len(b) >= len(v.AsSlice()) && len(b) > headerSplit {
		// The headers go to a small buffer of their own, as gVisor's
		// fdbased endpoint does with its 128-byte first iovec: gVisor
		// 2025-05's IPv4 HandlePacket keeps a view of the network header
		// while it reads the header again, and a read of a header whose
		// buffer is shared copies that whole buffer (Buffer.PullUp) — 64
		// KiB per packet if the payload lived there too (measured: ~8% of
		// the CPU of a bulk upload).
		payload = buffer.MakeWithView(buffer.NewViewWithData(b[:headerSplit]))
		v.CapLength(len(b))
		v.TrimFront(headerSplit)
		if err := payload.Append(v); err != nil {
			payload.Release()
			return false // v is still ours
		}
		tookView = true
	} else {
		payload = buffer.MakeWithData(b)
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: payload})
	d.DeliverNetworkPacket(proto, pkt)
	pkt.DecRef()
	return tookView
}

func (l *link) writeLoop() {
	defer l.wg.Done()
	var (
		slots [][]byte // backing buffers, allocated as batches grow
		bufs  [][]byte
		pkts  []*stack.PacketBuffer
		// gone: the device was closed under the stack. The loop keeps
		// taking (and dropping) packets until close, so that gVisor never
		// blocks in WritePackets on a queue nobody drains.
		gone bool
	)
	for {
		var first *stack.PacketBuffer
		select {
		case <-l.done:
			return
		case first = <-l.out:
		}
		pkts = append(pkts[:0], first)
		size := first.Size()
	collect:
		for len(pkts) < l.batch && size < maxWriteBatchBytes {
			select {
			case pkt := <-l.out:
				pkts = append(pkts, pkt)
				size += pkt.Size()
			default:
				break collect
			}
		}
		if gone {
			for _, pkt := range pkts {
				pkt.DecRef()
			}
			clear(pkts)
			continue
		}
		bufs = bufs[:0]
		for i, pkt := range pkts {
			if i == len(slots) {
				// Room for a whole 64 KiB super-packet: GRO appends the
				// following segments of a flow into the first one's
				// buffer, and only as far as its capacity allows.
				slots = append(slots, make([]byte, writeHeadroom+maxPacketSize))
			}
			n := copyPacket(slots[i][writeHeadroom:], pkt)
			pkt.DecRef()
			// Rebuilt every time: GRO may have resized or swapped the
			// slices of the previous batch.
			bufs = append(bufs, slots[i][:writeHeadroom+n])
		}
		clear(pkts)
		if _, err := l.dev.Write(bufs, writeHeadroom); err != nil {
			if errors.Is(err, os.ErrClosed) {
				gone = true
				if !l.closed() {
					l.log.Warn("TUN closed under the netstack: no more packets out")
				}
				continue
			}
			l.txErrors.Add(1)
			l.log.Debug("TUN write", "err", err, "packets", len(bufs))
			continue
		}
		l.txPackets.Add(uint64(len(bufs)))
	}
}

// copyPacket copies the whole packet (headers and payload) into dst and
// returns its length; dst must be large enough.
func copyPacket(dst []byte, pkt *stack.PacketBuffer) int {
	views, skip := pkt.AsViewList()
	n := 0
	for v := views.Front(); v != nil; v = v.Next() {
		s := v.AsSlice()
		if skip >= len(s) {
			skip -= len(s)
			continue
		}
		n += copy(dst[n:], s[skip:])
		skip = 0
	}
	return n
}

// writeRaw queues a packet built outside gVisor (an ICMP error) behind
// gVisor's own, so everything reaches the device through one writer.
func (l *link) writeRaw(b []byte) error {
	return l.writeBuffer(buffer.MakeWithData(b))
}

// writeBuffer is writeRaw for a packet built in a buffer (WriteUDP's,
// saving a copy); it takes the buffer over.
func (l *link) writeBuffer(b buffer.Buffer) error {
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: b})
	defer pkt.DecRef()
	var list stack.PacketBufferList
	list.PushBack(pkt)
	if _, err := l.WritePackets(list); err != nil {
		return errors.New(err.String())
	}
	return nil
}

// WritePackets implements stack.LinkWriter. It queues the packets for the
// write loop, waiting while the queue is full.
func (l *link) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n := 0
	for _, pkt := range pkts.AsSlice() {
		if pkt.Size() > maxPacketSize {
			// gVisor does not emit these without GSO, which this link
			// does not offer; if it ever did, no buffer could take it.
			l.txErrors.Add(1)
			continue
		}
		pkt.IncRef()
		select {
		case l.out <- pkt:
			n++
		case <-l.done:
			pkt.DecRef()
			if n == 0 {
				return 0, &tcpip.ErrClosedForSend{}
			}
			return n, nil
		}
	}
	return n, nil
}

// Attach implements stack.NetworkLinkEndpoint.
func (l *link) Attach(d stack.NetworkDispatcher) {
	l.mu.Lock()
	l.dispatcher = d
	l.mu.Unlock()
}

// IsAttached implements stack.NetworkLinkEndpoint.
func (l *link) IsAttached() bool {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.dispatcher != nil
}

// MTU implements stack.NetworkLinkEndpoint.
func (l *link) MTU() uint32 { return l.mtu }

// SetMTU implements stack.NetworkLinkEndpoint. The MTU is the device's,
// fixed at creation.
func (l *link) SetMTU(uint32) {}

// Capabilities implements stack.NetworkLinkEndpoint.
//
// RX checksum offload: every packet read comes from this host's own kernel
// through a TUN, and wireguard's reader already completes the checksums
// the kernel left partial and computes those of the segments it splits;
// verifying them again in gVisor would be pure cost (a full pass over
// every 64 KiB segment). TX offload is not claimed: wireguard's GRO checks
// checksums before coalescing and the kernel verifies uncoalesced packets,
// so gVisor must fill them in.
func (l *link) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityRXChecksumOffload
}

// MaxHeaderLength implements stack.NetworkLinkEndpoint: no link header.
func (l *link) MaxHeaderLength() uint16 { return 0 }

// LinkAddress implements stack.NetworkLinkEndpoint: a TUN has none.
func (l *link) LinkAddress() tcpip.LinkAddress { return "" }

// SetLinkAddress implements stack.NetworkLinkEndpoint.
func (l *link) SetLinkAddress(tcpip.LinkAddress) {}

// Wait implements stack.NetworkLinkEndpoint; the loops are stopped and
// waited for by close.
func (l *link) Wait() {}

// ARPHardwareType implements stack.NetworkLinkEndpoint.
func (l *link) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }

// AddHeader implements stack.NetworkLinkEndpoint: no link header.
func (l *link) AddHeader(*stack.PacketBuffer) {}

// ParseHeader implements stack.NetworkLinkEndpoint: no link header.
func (l *link) ParseHeader(*stack.PacketBuffer) bool { return true }

// Close implements stack.NetworkLinkEndpoint. gVisor calls it when the NIC
// is removed; the Stack closes the link itself, in its own order.
func (l *link) Close() {}

// SetOnCloseAction implements stack.NetworkLinkEndpoint.
func (l *link) SetOnCloseAction(func()) {}

// maxPacketSize is the largest IP packet: IPv4's total length is 16 bits.
const maxPacketSize = 1<<16 - 1

// headerSplit is how many leading bytes of a large inbound packet are
// copied into a buffer of their own: enough for an IPv4 header with
// options and a TCP header with options (60 + 60), one of gVisor's pooled
// chunk sizes.
const headerSplit = 128
