//go:build linux

package udprelay

import (
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// kindUnreachable: server → client: an ICMP error came back for a
// datagram of the flow's to addr; the payload's one byte says which
// (the unreach* values below), and the client answers the application
// with the same error.
const kindUnreachable = 6

// What an ICMP error meant, as kindUnreachable carries it.
const (
	unreachPort       = 0
	unreachHost       = 1
	unreachNet        = 2
	unreachProhibited = 3
)

// recvErr turns on IP_RECVERR (IPV6_RECVERR): without it the kernel
// reports no ICMP error to an unconnected UDP socket, and with it each
// one is queued on the socket with the address the failed datagram was
// sent to.
func recvErr(fd int, v4 bool) error {
	if v4 {
		return unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_RECVERR, 1)
	}
	return unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_RECVERR, 1)
}

// icmpErr is one error read from a socket's error queue.
type icmpErr struct {
	dst  netip.AddrPort // where the failed datagram was going
	what byte           // unreach*
}

// readErrQueue reads the socket's queued ICMP errors (it never blocks),
// keeping those that say a destination cannot be reached.
func readErrQueue(fd int) []icmpErr {
	var out []icmpErr
	var buf [512]byte
	var oob [512]byte
	for range 64 {
		_, oobn, _, from, err := unix.Recvmsg(fd, buf[:], oob[:], unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
		if err != nil {
			return out
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			continue
		}
		for _, m := range msgs {
			if !(m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_RECVERR) &&
				!(m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_RECVERR) {
				continue
			}
			if len(m.Data) < int(unsafe.Sizeof(unix.SockExtendedErr{})) {
				continue
			}
			ee := (*unix.SockExtendedErr)(unsafe.Pointer(&m.Data[0]))
			what, ok := classify(ee)
			if !ok {
				continue
			}
			if dst := sockaddrAddrPort(from); dst.IsValid() {
				out = append(out, icmpErr{dst: dst, what: what})
			}
		}
	}
	return out
}

// classify maps an ICMP(v6) destination-unreachable to what the client
// tells the application; anything else (time exceeded, fragmentation
// needed, a local error) is not passed on.
func classify(ee *unix.SockExtendedErr) (byte, bool) {
	switch ee.Origin {
	case unix.SO_EE_ORIGIN_ICMP:
		if ee.Type != 3 {
			return 0, false
		}
		switch ee.Code {
		case 3:
			return unreachPort, true
		case 0, 6, 9:
			return unreachNet, true
		case 1, 2, 7, 10:
			return unreachHost, true
		case 13:
			return unreachProhibited, true
		}
	case unix.SO_EE_ORIGIN_ICMP6:
		if ee.Type != 1 {
			return 0, false
		}
		switch ee.Code {
		case 4:
			return unreachPort, true
		case 0:
			return unreachNet, true
		case 3:
			return unreachHost, true
		case 1:
			return unreachProhibited, true
		}
	}
	return 0, false
}
