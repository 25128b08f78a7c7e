package linkemu

import (
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mpvpn/mpvpn/test/netns/internal/netns"
)

// How the wire moves frames (Linux 6.x, measured on 2 vCPUs in 2025):
//
//   - One AF_PACKET SOCK_RAW socket per interface, bound to it with
//     ETH_P_ALL, in promiscuous mode (the frames are addressed to the MACs
//     at either end, not to the wire's interfaces), with
//     PACKET_IGNORE_OUTGOING so a socket does not read back what the other
//     direction just wrote to its interface.
//   - The interfaces must carry MTU-sized frames with complete checksums:
//     with TSO/GSO on, veth hands the packet socket 64 KiB super-frames, and
//     with tx checksum offload the TCP/UDP checksum is left for "hardware"
//     and arrives unfinished. The topology turns those off with
//     `ethtool -K <if> tx off sg off tso off gso off gro off` on every
//     interface on either side of the wire; oversize frames are counted and
//     dropped, never truncated.
//   - One goroutine, locked to its thread, runs the whole wire around a
//     private epoll set (the two sockets, a timerfd for the next frame due,
//     an eventfd for Set and Close). The obvious design, a reader and a
//     writer goroutine per direction in Go's netpoller, woke for every frame
//     and spent ~40% of a core in context switches at 60 Mbit/s. Here, while
//     frames keep moving the loop stops watching the sockets and wakes on a
//     Tick grid instead, draining both sockets and sending what is due each
//     time: ~1000 wake-ups a second at any rate, ~12% of a core at 60 Mbit/s
//     (most of it the far side's network stack, which runs in our send
//     calls). A frame at an idle wire is handled at once and delivered on
//     time; on a busy one arrival and delivery are each rounded up to the
//     tick (never early).

// Config describes a wire.
type Config struct {
	// A and B are the interfaces joined; Up is A → B, Down is B → A.
	A, B string
	// NetNS is the network namespace (a name under /run/netns or a path)
	// holding A and B; "" = the caller's. The wire can then run in any
	// process: its sockets stay bound to that namespace.
	NetNS string
	// Up and Down are the initial parameters per direction.
	Up, Down Params
	// Seed makes loss and jitter reproducible; 0 picks a random seed.
	Seed uint64
	// Tick is the wake-up grid while traffic flows; 0 = 1 ms, negative =
	// wake for every frame (precise, costly).
	Tick   time.Duration
	Logger *slog.Logger
}

const defaultTick = time.Millisecond

// busyRounds rounds that move frames within two ticks make the wire busy.
const busyRounds = 4

// Wire joins two interfaces. Its methods are safe for concurrent use.
type Wire struct {
	log  *slog.Logger
	tick time.Duration

	socks   [2]int // A, B
	timerfd int
	eventfd int
	epAll   int // sockets, timer, event
	epTimer int // timer, event
	// The epoll sets are waited on through Go's netpoller (an epoll fd is
	// readable while it has events ready), not with a blocking epoll_wait:
	// a thread parked in a syscall keeps the runtime's sysmon polling every
	// 20 µs to retake its P, which alone cost a third of a core.
	waitAll, waitTimer syscall.RawConn
	files              []*os.File

	mu     sync.Mutex
	pipes  [2]*pipe // Up, Down
	closed bool

	done chan struct{}
	errc chan error
	once sync.Once
}

// bufSize leaves room above maxFrame so an oversize frame shows up as a
// full buffer rather than passing silently truncated.
const bufSize = 2048

// New opens the sockets and starts moving frames.
func New(cfg Config) (*Wire, error) {
	if cfg.A == "" || cfg.B == "" || cfg.A == cfg.B {
		return nil, fmt.Errorf("linkemu: need two distinct interfaces, got %q and %q", cfg.A, cfg.B)
	}
	for _, p := range []Params{cfg.Up, cfg.Down} {
		if err := p.Validate(); err != nil {
			return nil, err
		}
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	seed := cfg.Seed
	if seed == 0 {
		seed = rand.Uint64()
	}
	tick := cfg.Tick
	if tick == 0 {
		tick = defaultTick
	}
	w := &Wire{
		log: log, tick: tick,
		socks:   [2]int{-1, -1},
		timerfd: -1, eventfd: -1, epAll: -1, epTimer: -1,
		pipes: [2]*pipe{newPipe(cfg.Up, seed), newPipe(cfg.Down, seed+1)},
		done:  make(chan struct{}),
		errc:  make(chan error, 1),
	}
	err := netns.Do(cfg.NetNS, func() error {
		for i, name := range []string{cfg.A, cfg.B} {
			fd, err := openPacketSocket(name)
			if err != nil {
				return err
			}
			w.socks[i] = fd
		}
		return nil
	})
	if err == nil {
		err = w.openPoll()
	}
	if err != nil {
		w.closeFDs()
		return nil, err
	}
	go w.loop()
	log.Info("wire up", "a", cfg.A, "b", cfg.B, "netns", cfg.NetNS, "up", cfg.Up.String(), "down", cfg.Down.String())
	return w, nil
}

func (w *Wire) openPoll() error {
	var err error
	if w.timerfd, err = unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_NONBLOCK|unix.TFD_CLOEXEC); err != nil {
		return fmt.Errorf("linkemu: timerfd: %w", err)
	}
	if w.eventfd, err = unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC); err != nil {
		return fmt.Errorf("linkemu: eventfd: %w", err)
	}
	if w.epAll, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return fmt.Errorf("linkemu: epoll: %w", err)
	}
	if w.epTimer, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return fmt.Errorf("linkemu: epoll: %w", err)
	}
	add := func(ep, fd int) error {
		ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)}
		if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
			return fmt.Errorf("linkemu: epoll: %w", err)
		}
		return nil
	}
	if err := errors.Join(
		add(w.epAll, w.socks[0]), add(w.epAll, w.socks[1]),
		add(w.epAll, w.timerfd), add(w.epAll, w.eventfd),
		add(w.epTimer, w.timerfd), add(w.epTimer, w.eventfd),
	); err != nil {
		return err
	}
	for _, rc := range []*syscall.RawConn{&w.waitAll, &w.waitTimer} {
		ep := w.epAll
		if rc == &w.waitTimer {
			ep = w.epTimer
		}
		// A duplicate for the netpoller, so closing the os.File never
		// races with the loop's use of the original number.
		dup, err := unix.FcntlInt(uintptr(ep), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("linkemu: epoll: %w", err)
		}
		if err := unix.SetNonblock(dup, true); err != nil {
			unix.Close(dup)
			return fmt.Errorf("linkemu: epoll: %w", err)
		}
		f := os.NewFile(uintptr(dup), "epoll")
		w.files = append(w.files, f)
		if *rc, err = f.SyscallConn(); err != nil {
			return fmt.Errorf("linkemu: epoll: %w", err)
		}
	}
	return nil
}

// openPacketSocket opens a promiscuous, non-blocking packet socket on the
// interface name of the current namespace.
func openPacketSocket(name string) (int, error) {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return -1, fmt.Errorf("linkemu: interface %s: %w", name, err)
	}
	// Protocol 0 at creation, ETH_P_ALL at bind: a socket created with
	// ETH_P_ALL would see every interface's frames until bound.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("linkemu: packet socket: %w", err)
	}
	fail := func(what string, err error) (int, error) {
		unix.Close(fd)
		return -1, fmt.Errorf("linkemu: %s on %s: %w", what, name, err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1); err != nil {
		return fail("PACKET_IGNORE_OUTGOING", err)
	}
	// Room for a tick's worth of frames at a few Gbit/s, and for a GC pause.
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20)
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 4<<20)
	// veth has no qdisc anyway; skip the queueing layer explicitly.
	_ = unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_QDISC_BYPASS, 1)
	mreq := unix.PacketMreq{Ifindex: int32(ifi.Index), Type: unix.PACKET_MR_PROMISC}
	if err := unix.SetsockoptPacketMreq(fd, unix.SOL_PACKET, unix.PACKET_ADD_MEMBERSHIP, &mreq); err != nil {
		return fail("promiscuous mode", err)
	}
	sa := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}
	if err := unix.Bind(fd, sa); err != nil {
		return fail("bind", err)
	}
	return fd, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// loop is the wire: drain the sockets, schedule, send what is due, sleep.
func (w *Wire) loop() {
	defer close(w.done)
	defer func() {
		w.mu.Lock()
		w.closed = true
		w.closeFDs()
		w.mu.Unlock()
	}()

	var (
		free    [][]byte // buffer free list; the loop is the only user
		in      [2][][]byte
		out     [2][][]byte
		events  [4]unix.EpollEvent
		armed   time.Time             // when the timer is set to fire; zero = disarmed
		recent  [busyRounds]time.Time // the last rounds that moved frames
		nRecent int
	)
	getBuf := func() []byte {
		if n := len(free); n > 0 {
			b := free[n-1]
			free = free[:n-1]
			return b[:bufSize]
		}
		return make([]byte, bufSize)
	}
	putBuf := func(b []byte) { free = append(free, b[:cap(b)]) }

	for {
		// Read everything waiting on both sockets (frames read on A go Up).
		got := 0
		var oversize [2]int
		for d := range 2 {
			for len(in[d]) < 4096 {
				b := getBuf()
				n, err := unix.Read(w.socks[d], b)
				if err == unix.EINTR {
					putBuf(b)
					continue
				}
				if err != nil {
					putBuf(b)
					// EAGAIN: drained. ENETDOWN: the interface went down; the
					// kernel re-attaches the socket when it comes back up.
					if err != unix.EAGAIN && err != unix.ENETDOWN && err != unix.ENOBUFS {
						w.fail(fmt.Errorf("linkemu: read %s: %w", Dir(d), err))
						return
					}
					break
				}
				if n >= bufSize || n > maxFrame+4 { // +4: room for a VLAN tag
					putBuf(b)
					oversize[d]++
					continue
				}
				in[d] = append(in[d], b[:n])
			}
			got += len(in[d]) + oversize[d]
		}

		now := time.Now()
		w.mu.Lock()
		if w.closed {
			w.mu.Unlock()
			return
		}
		var next time.Time
		for d, q := range w.pipes {
			for _, b := range in[d] {
				if v, _ := q.arrive(now, b); v != accepted {
					putBuf(b)
				}
			}
			clear(in[d])
			in[d] = in[d][:0]
			q.st.RxFrames += uint64(oversize[d])
			q.st.DropOversize += uint64(oversize[d])
			for _, b := range q.flushed {
				putBuf(b)
			}
			clear(q.flushed)
			q.flushed = q.flushed[:0]
			out[d] = q.popDue(now, out[d][:0])
			if at, ok := q.next(); ok && (next.IsZero() || at.Before(next)) {
				next = at
			}
		}
		w.mu.Unlock()

		// Send outside the lock so Stats and Set never wait on I/O.
		var sent [2][3]int
		for d := range 2 {
			if len(out[d]) == 0 {
				continue
			}
			sent[d] = w.send(w.socks[1-d], out[d])
			for i, b := range out[d] {
				putBuf(b)
				out[d][i] = nil
			}
		}
		if sent[0][0]+sent[0][2]+sent[1][0]+sent[1][2] > 0 {
			w.mu.Lock()
			for d, q := range w.pipes {
				q.delivered(sent[d][0], sent[d][1], sent[d][2])
			}
			w.mu.Unlock()
		}

		// Sleep. A busy wire (busyRounds rounds that moved frames within two
		// ticks) leaves the sockets alone and polls them on the tick grid;
		// what falls due meanwhile goes out at the next tick. Otherwise wake
		// on the first arrival or exactly when the next frame is due, so a
		// short exchange (a ping, a TCP handshake) is not rounded.
		ep, wake := w.epAll, next
		if got+sent[0][0]+sent[0][2]+sent[1][0]+sent[1][2] > 0 {
			oldest := recent[nRecent%busyRounds]
			recent[nRecent%busyRounds] = now
			nRecent++
			if w.tick > 0 && nRecent >= busyRounds && now.Sub(oldest) < 2*w.tick {
				ep, wake = w.epTimer, now.Add(w.tick)
			}
		}
		if !wake.Equal(armed) {
			var its unix.ItimerSpec // zero disarms
			if !wake.IsZero() {
				its.Value = unix.NsecToTimespec(max(int64(wake.Sub(time.Now())), 1))
			}
			if err := unix.TimerfdSettime(w.timerfd, 0, &its, nil); err != nil {
				w.fail(fmt.Errorf("linkemu: timerfd: %w", err))
				return
			}
			armed = wake
		}
		rc := w.waitAll
		if ep == w.epTimer {
			rc = w.waitTimer
		}
		var n int
		var err error
		if rerr := rc.Read(func(fd uintptr) bool {
			n, err = unix.EpollWait(int(fd), events[:], 0)
			return n > 0 || (err != nil && err != unix.EINTR)
		}); rerr != nil {
			err = rerr
		}
		if err != nil {
			w.fail(fmt.Errorf("linkemu: epoll: %w", err))
			return
		}
		var scratch [8]byte
		for _, ev := range events[:max(n, 0)] {
			switch int(ev.Fd) {
			case w.timerfd:
				unix.Read(w.timerfd, scratch[:])
				armed = time.Time{}
			case w.eventfd:
				unix.Read(w.eventfd, scratch[:])
			}
		}
	}
}

// send writes frames to a socket and returns how many went (frames,
// bytes) and how many the far side refused (its interface or its peer down,
// a backlog full): those are dropped, as a real link would.
func (w *Wire) send(fd int, frames [][]byte) (r [3]int) {
	for _, b := range frames {
		for {
			_, err := unix.Write(fd, b)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				r[2]++
			} else {
				r[0]++
				r[1] += len(b)
			}
			break
		}
	}
	return r
}

// poke wakes the loop (after Set or Close).
func (w *Wire) poke() {
	one := [8]byte{1}
	unix.Write(w.eventfd, one[:])
}

func (w *Wire) fail(err error) {
	w.log.Error("wire failed", "err", err)
	select {
	case w.errc <- err:
	default:
	}
}

// Err delivers the error that stopped the wire (an interface deleted under
// it, say); a daemon should exit on it.
func (w *Wire) Err() <-chan error { return w.errc }

// Params returns the parameters of d (Up for Both).
func (w *Wire) Params(d Dir) Params {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.pipes[d.one()].p
}

// Set replaces the parameters of d (or both directions).
func (w *Wire) Set(d Dir, p Params) error {
	if err := p.Validate(); err != nil {
		return err
	}
	if d < Up || d > Both {
		return fmt.Errorf("linkemu: bad direction %d", d)
	}
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return errors.New("linkemu: wire closed")
	}
	for _, dd := range d.dirs() {
		q := w.pipes[dd]
		q.flushed = q.setParams(p, q.flushed)
	}
	w.poke() // the next frame due may have changed
	w.mu.Unlock()
	w.log.Info("set", "dir", d.String(), "params", p.String())
	return nil
}

// Stats returns the counters of d (Up for Both).
func (w *Wire) Stats(d Dir) Stats {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.pipes[d.one()].stats()
}

// Close stops the wire and closes its sockets; frames inside are dropped.
func (w *Wire) Close() error {
	w.once.Do(func() {
		w.mu.Lock()
		if !w.closed {
			w.closed = true
			w.poke()
		}
		w.mu.Unlock()
		<-w.done
		w.log.Info("wire closed")
	})
	return nil
}

// closeFDs runs once, on the loop's way out (or when New fails), so no
// descriptor is closed while the loop may still use its number; Set and Close
// only poke the eventfd under w.mu while the wire is not closed.
func (w *Wire) closeFDs() {
	for _, f := range w.files {
		f.Close()
	}
	w.files = nil
	for _, fd := range []*int{&w.socks[0], &w.socks[1], &w.epAll, &w.epTimer, &w.timerfd, &w.eventfd} {
		if *fd >= 0 {
			unix.Close(*fd)
			*fd = -1
		}
	}
}
