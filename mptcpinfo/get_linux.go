package mptcpinfo

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	solMPTCP      = unix.SOL_MPTCP // 284
	mptcpFullInfo = 4              // MPTCP_FULL_INFO; x/sys/unix has no name for it

	// tcpInfoUser is the tcp_info stride we offer: x/sys/unix's struct,
	// the newest we know of; the kernel lowers it to its own size.
	tcpInfoUser = uint32(unsafe.Sizeof(unix.TCPInfo{}))

	// defaultSlots subflows fit the pooled buffer; more cost one retry
	// with a bigger, unpooled one.
	defaultSlots = 8
	maxTries     = 4
)

// getter is the scratch state of one Get: a buffer holding the
// mptcp_full_info reply and both arrays, and the function Control runs,
// made once so that a pooled getter costs no allocation.
type getter struct {
	buf    []byte // 8-byte aligned: head | mptcp_info | sfinfo[slots] | tcp_info[slots]
	slots  uint32
	op     int // which query fn runs
	optlen uint32
	errno  syscall.Errno
	fn     func(fd uintptr)
}

const (
	opFullInfo = iota
	opTCPInfo
	opSockname
	opPeername
)

var pool = sync.Pool{New: func() any { return newGetter(defaultSlots) }}

func newGetter(slots uint32) *getter {
	g := &getter{slots: slots}
	n := fullInfoHead + mptcpInfoSize + int(slots)*(sfInfoSize+int(tcpInfoUser))
	words := make([]uint64, (n+7)/8)
	g.buf = unsafe.Slice((*byte)(unsafe.Pointer(&words[0])), len(words)*8)
	g.fn = g.run
	return g
}

func (g *getter) sfOff() int { return fullInfoHead + mptcpInfoSize }
func (g *getter) tiOff() int { return g.sfOff() + int(g.slots)*sfInfoSize }

func (g *getter) run(fd uintptr) {
	g.errno = 0
	switch g.op {
	case opFullInfo:
		b := g.buf
		clear(b)
		ne.PutUint32(b[offSizeTCPInfoUser:], tcpInfoUser)
		ne.PutUint32(b[offSizeSFInfoUser:], sfInfoSize)
		ne.PutUint32(b[offSizeArraysUser:], g.slots)
		// The kernel writes through these; b is heap memory (Go's heap
		// does not move) kept alive below until the call has returned.
		ne.PutUint64(b[offSubflowInfoPtr:], uint64(uintptr(unsafe.Pointer(&b[g.sfOff()]))))
		ne.PutUint64(b[offTCPInfoPtr:], uint64(uintptr(unsafe.Pointer(&b[g.tiOff()]))))
		g.optlen = fullInfoHead + mptcpInfoSize
		g.errno = getsockopt(fd, solMPTCP, mptcpFullInfo, &b[0], &g.optlen)
	case opTCPInfo:
		g.optlen = tcpInfoUser
		g.errno = getsockopt(fd, unix.SOL_TCP, unix.TCP_INFO, &g.buf[g.tiOff()], &g.optlen)
	case opSockname, opPeername:
		trap := uintptr(unix.SYS_GETSOCKNAME)
		if g.op == opPeername {
			trap = unix.SYS_GETPEERNAME
		}
		g.optlen = sockaddrSize
		off := sfLocal
		if g.op == opPeername {
			off = sfRemote
		}
		_, _, g.errno = unix.Syscall(trap, fd, uintptr(unsafe.Pointer(&g.buf[g.sfOff()+off])), uintptr(unsafe.Pointer(&g.optlen)))
	}
	runtime.KeepAlive(g)
}

func getsockopt(fd uintptr, level, opt int, val *byte, vallen *uint32) syscall.Errno {
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(val)), uintptr(unsafe.Pointer(vallen)), 0)
	return e
}

// control runs g.op on rc's socket.
func (g *getter) control(rc syscall.RawConn, op int) error {
	g.op = op
	if err := rc.Control(g.fn); err != nil {
		return err
	}
	if g.errno != 0 {
		return g.errno
	}
	return nil
}

// Get reads the statistics of rc's socket: MPTCP_FULL_INFO for an MPTCP
// socket (one getsockopt; a second, with room for all, if the connection
// has more subflows than fit the pooled buffer), or, when the socket is
// plain TCP (the kernel answers SOL_MPTCP with EOPNOTSUPP, or ENOPROTOOPT
// for IPv6, also for an MPTCP socket that fell back to TCP), TCP_INFO and
// the socket's two addresses as Fallback. Beyond the returned Subflows
// slice it allocates nothing in the common case.
func Get(rc syscall.RawConn) (Info, error) {
	pooled := pool.Get().(*getter)
	defer pool.Put(pooled)
	g := pooled
	for try := 0; ; try++ {
		err := g.control(rc, opFullInfo)
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOPROTOOPT) {
			return g.fallback(rc)
		}
		if err != nil {
			return Info{}, fmt.Errorf("mptcpinfo: getsockopt MPTCP_FULL_INFO: %w", err)
		}
		reply := g.buf[:min(int(g.optlen), fullInfoHead+mptcpInfoSize)]
		h, err := parseHead(reply)
		if err != nil {
			return Info{}, err
		}
		if h.numSubflows > g.slots && try+1 < maxTries {
			// Subflows were added: retry with room for a few more.
			g = newGetter(h.numSubflows + 2)
			continue
		}
		return parseFull(reply, g.buf[g.sfOff():g.tiOff()], g.buf[g.tiOff():])
	}
}

// fallback reads a plain TCP socket: TCP_INFO and its two addresses.
func (g *getter) fallback(rc syscall.RawConn) (Info, error) {
	if err := g.control(rc, opTCPInfo); err != nil {
		return Info{}, fmt.Errorf("mptcpinfo: getsockopt TCP_INFO: %w", err)
	}
	ti := g.buf[g.tiOff():][:min(g.optlen, tcpInfoUser)]
	e := g.buf[g.sfOff():][:sfInfoSize]
	clear(e)
	if err := g.control(rc, opSockname); err != nil {
		return Info{}, fmt.Errorf("mptcpinfo: getsockname: %w", err)
	}
	if err := g.control(rc, opPeername); err != nil && !errors.Is(err, unix.ENOTCONN) {
		return Info{}, fmt.Errorf("mptcpinfo: getpeername: %w", err)
	}
	info := Info{Fallback: true, Subflows: make([]Subflow, 1)}
	s := &info.Subflows[0]
	s.Local = parseSockaddr(e[sfLocal:][:sockaddrSize])
	s.Remote = parseSockaddr(e[sfRemote:][:sockaddrSize])
	parseTCPInfo(s, ti)
	return info, nil
}

// GetConn is Get on c's socket (a *net.TCPConn, for one).
func GetConn(c syscall.Conn) (Info, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return Info{}, fmt.Errorf("mptcpinfo: %w", err)
	}
	return Get(rc)
}
