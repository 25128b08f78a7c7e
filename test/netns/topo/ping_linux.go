package topo

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mpvpn/mpvpn/test/netns/internal/netns"
)

// The harness pings in Go: Debian's minimal images have no ping binary, and
// a raw socket in-process gives exact control over source address and
// interface (including spoofed ones, for BCP 38).

// PingOptions shape a Ping.
type PingOptions struct {
	// Iface pins the socket to an interface (SO_BINDTODEVICE); "" lets the
	// routing table decide.
	Iface string
	// Src is the source address; the zero value lets the kernel choose. Any
	// local address works, on any interface: that is how a test spoofs.
	Src netip.Addr
	// Count of echo requests; default 1.
	Count int
	// Interval between requests; default 100 ms.
	Interval time.Duration
	// Timeout is how long to wait for replies after the last request;
	// default 2 s.
	Timeout time.Duration
	// Size of the payload in bytes (at least 16); default 56.
	Size int
}

// PingResult is what came back.
type PingResult struct {
	Sent, Received int
	RTTs           []time.Duration // one per reply, in arrival order
	// Errors are ICMP errors received (e.g. "destination unreachable code
	// 1") and send errors (e.g. ENETUNREACH).
	Errors []string
}

// Min, Avg and Max of the RTTs (0 with no reply).
func (r PingResult) Min() time.Duration {
	if len(r.RTTs) == 0 {
		return 0
	}
	return slices.Min(r.RTTs)
}

func (r PingResult) Max() time.Duration {
	if len(r.RTTs) == 0 {
		return 0
	}
	return slices.Max(r.RTTs)
}

func (r PingResult) Avg() time.Duration {
	if len(r.RTTs) == 0 {
		return 0
	}
	var s time.Duration
	for _, d := range r.RTTs {
		s += d
	}
	return s / time.Duration(len(r.RTTs))
}

func (r PingResult) String() string {
	return fmt.Sprintf("%d sent, %d received, rtt min/avg/max %v/%v/%v, errors %q",
		r.Sent, r.Received, r.Min(), r.Avg(), r.Max(), r.Errors)
}

// Ping sends ICMP echo requests to dst from inside ns, failing the test if
// it cannot even open the socket. Lost replies are not an error: look at
// the result.
func (tp *Topology) Ping(ns string, dst netip.Addr, o PingOptions) PingResult {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	r, err := Ping(ns, dst, o)
	if err != nil {
		tp.fatalf("%v", err)
	}
	return r
}

// PingUplink pings dst from the client over uplink u (its address and
// interface).
func (tp *Topology) PingUplink(u Uplink, dst netip.Addr, o PingOptions) PingResult {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	o.Iface, o.Src = tp.Uplinks[u].Iface, tp.Uplinks[u].Addr
	return tp.Ping(tp.Client, dst, o)
}

// Ping sends ICMP echo requests to dst from inside ns.
func Ping(ns string, dst netip.Addr, o PingOptions) (PingResult, error) {
	if o.Count <= 0 {
		o.Count = 1
	}
	if o.Interval <= 0 {
		o.Interval = 100 * time.Millisecond
	}
	if o.Timeout <= 0 {
		o.Timeout = 2 * time.Second
	}
	if o.Size < 16 {
		o.Size = 56
	}
	if !dst.Is4() {
		return PingResult{}, fmt.Errorf("ping %s: IPv4 only", dst)
	}
	var fd int
	err := netns.Do(ns, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
		if err != nil {
			return err
		}
		if o.Iface != "" {
			if err := unix.SetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, o.Iface); err != nil {
				unix.Close(fd)
				return fmt.Errorf("bind to %s: %w", o.Iface, err)
			}
		}
		if o.Src.IsValid() {
			if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: o.Src.As4()}); err != nil {
				unix.Close(fd)
				return fmt.Errorf("bind to %s: %w", o.Src, err)
			}
		}
		return nil
	})
	if err != nil {
		return PingResult{}, fmt.Errorf("ping from %s: %w", ns, err)
	}
	f := os.NewFile(uintptr(fd), "icmp")
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return PingResult{}, err
	}

	var idb [2]byte
	var cookie [8]byte
	rand.Read(idb[:])
	rand.Read(cookie[:])
	id := binary.BigEndian.Uint16(idb[:])
	start := time.Now()
	to := &unix.SockaddrInet4{Addr: dst.As4()}

	type sendResult struct {
		sent int
		errs []string
	}
	sentc := make(chan sendResult, 1)
	stop := make(chan struct{})
	go func() {
		var res sendResult
		defer func() { sentc <- res }()
		for seq := range o.Count {
			if seq > 0 {
				select {
				case <-time.After(o.Interval):
				case <-stop:
					return
				}
			}
			pkt := make([]byte, 8+o.Size)
			pkt[0] = 8 // echo request
			binary.BigEndian.PutUint16(pkt[4:], id)
			binary.BigEndian.PutUint16(pkt[6:], uint16(seq))
			copy(pkt[8:], cookie[:])
			binary.BigEndian.PutUint64(pkt[16:], uint64(time.Since(start)))
			binary.BigEndian.PutUint16(pkt[2:], checksum(pkt))
			var serr error
			werr := rc.Write(func(fd uintptr) bool {
				serr = unix.Sendto(int(fd), pkt, 0, to)
				return serr != unix.EAGAIN
			})
			if err := errors.Join(werr, serr); err != nil {
				res.errs = append(res.errs, "send: "+err.Error())
				continue
			}
			res.sent++
		}
	}()

	var r PingResult
	seen := make([]bool, o.Count)
	deadline := start.Add(time.Duration(o.Count-1)*o.Interval + o.Timeout)
	f.SetReadDeadline(deadline)
	buf := make([]byte, 65536)
	for r.Received < o.Count {
		n, err := f.Read(buf)
		if err != nil {
			break // deadline
		}
		now := time.Since(start)
		pkt := buf[:n]
		if len(pkt) < 20 {
			continue
		}
		ihl := int(pkt[0]&0x0f) * 4
		if len(pkt) < ihl+8 {
			continue
		}
		icmp := pkt[ihl:]
		switch icmp[0] {
		case 0: // echo reply
			if len(icmp) < 24 || binary.BigEndian.Uint16(icmp[4:]) != id || string(icmp[8:16]) != string(cookie[:]) {
				continue
			}
			seq := int(binary.BigEndian.Uint16(icmp[6:]))
			if seq >= o.Count || seen[seq] {
				continue
			}
			seen[seq] = true
			r.Received++
			r.RTTs = append(r.RTTs, now-time.Duration(binary.BigEndian.Uint64(icmp[16:])))
		case 3, 11: // destination unreachable, time exceeded: quote our request
			inner := icmp[8:]
			if len(inner) < 20 {
				continue
			}
			iihl := int(inner[0]&0x0f) * 4
			if len(inner) < iihl+8 || inner[iihl] != 8 || binary.BigEndian.Uint16(inner[iihl+4:]) != id {
				continue
			}
			kind := "destination unreachable"
			if icmp[0] == 11 {
				kind = "time exceeded"
			}
			r.Errors = append(r.Errors, fmt.Sprintf("%s code %d from %d.%d.%d.%d", kind, icmp[1], pkt[12], pkt[13], pkt[14], pkt[15]))
		}
	}
	close(stop)
	res := <-sentc
	r.Sent = res.sent
	r.Errors = append(r.Errors, res.errs...)
	return r, nil
}

// checksum is the Internet checksum (RFC 1071).
func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}
