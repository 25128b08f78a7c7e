//go:build linux

package mptcpinfo

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"strconv"
	"time"
)

// Layout of the MPTCP_FULL_INFO structures, from include/uapi/linux/mptcp.h
// (torvalds/linux since v6.5; checked against multipath-tcp/mptcp_net-next
// as mirrored in matttbe/mptcp_net-next at ddbfceb66692bcab446be181db11b5c3f3ff441d)
// and net/mptcp/sockopt.c mptcp_getsockopt_full_info. All integers are in
// host byte order except the ports and addresses inside the sockaddrs.
//
//	struct mptcp_full_info {              // offset
//		__u32 size_tcpinfo_kernel;    //  0  set by the kernel: its sizeof(struct tcp_info)
//		__u32 size_tcpinfo_user;      //  4  in: our stride; out: min(ours, kernel's)
//		__u32 size_sfinfo_kernel;     //  8  set by the kernel
//		__u32 size_sfinfo_user;       // 12  in/out like size_tcpinfo_user
//		__u32 num_subflows;           // 16  set by the kernel: the real count
//		__u32 size_arrays_user;       // 20  slots in our two arrays
//		__aligned_u64 subflow_info;   // 24  user pointer to mptcp_subflow_info[]
//		__aligned_u64 tcp_info;       // 32  user pointer to tcp_info[]
//		struct mptcp_info mptcp_info; // 40  (MIN_FULL_INFO_OPTLEN_SIZE = 40)
//	};
//
// The kernel writes the 40-byte head plus min(optlen-40, sizeof(struct
// mptcp_info)) bytes back to optval and sets optlen to that, and fills
// min(num_subflows, size_arrays_user) entries of each array, advancing by
// the (returned) size_*_user strides.
const (
	offSizeTCPInfoKernel = 0
	offSizeTCPInfoUser   = 4
	offSizeSFInfoKernel  = 8
	offSizeSFInfoUser    = 12
	offNumSubflows       = 16
	offSizeArraysUser    = 20
	offSubflowInfoPtr    = 24
	offTCPInfoPtr        = 32
	fullInfoHead         = 40 // MIN_FULL_INFO_OPTLEN_SIZE
)

// struct mptcp_info (Linux 6.18: 96 bytes). Older kernels have a prefix.
//
//	 0 u8 mptcpi_subflows           1 u8 mptcpi_add_addr_signal
//	 2 u8 mptcpi_add_addr_accepted  3 u8 mptcpi_subflows_max
//	 4 u8 mptcpi_add_addr_signal_max 5 u8 mptcpi_add_addr_accepted_max
//	 8 u32 mptcpi_flags            12 u32 mptcpi_token
//	16 u64 mptcpi_write_seq        24 u64 mptcpi_snd_una   32 u64 mptcpi_rcv_nxt
//	40 u8 mptcpi_local_addr_used   41 u8 mptcpi_local_addr_max  42 u8 mptcpi_csum_enabled
//	44 u32 mptcpi_retransmits      48 u64 mptcpi_bytes_retrans
//	56 u64 mptcpi_bytes_sent       64 u64 mptcpi_bytes_received  72 u64 mptcpi_bytes_acked
//	80 u8 mptcpi_subflows_total    81 u8 mptcpi_endp_add_addr_max / reserved
//	84 u32 mptcpi_last_data_sent   88 u32 mptcpi_last_data_recv  92 u32 mptcpi_last_ack_recv
const (
	miSubflows           = 0
	miAddAddrSignal      = 1
	miAddAddrAccepted    = 2
	miSubflowsMax        = 3
	miAddAddrSignalMax   = 4
	miAddAddrAcceptedMax = 5
	miFlags              = 8
	miToken              = 12
	miRetransmits        = 44
	miBytesRetrans       = 48
	miBytesSent          = 56
	miBytesReceived      = 64
	miBytesAcked         = 72
	miSubflowsTotal      = 80
	mptcpInfoSize        = 96
)

// struct mptcp_subflow_info { __u32 id; struct mptcp_subflow_addrs addrs; }:
// the addrs are two unions each as wide as struct __kernel_sockaddr_storage
// (128 bytes, pointer aligned), so addrs starts at 8 and the whole is 264.
const (
	sfID         = 0
	sfLocal      = 8
	sfRemote     = 8 + 128
	sfInfoSize   = 8 + 2*128
	sockaddrSize = 128
)

// struct tcp_info offsets (include/uapi/linux/tcp.h; the same as
// golang.org/x/sys/unix.TCPInfo, which a test checks).
const (
	tiState         = 0
	tiRTT           = 68
	tiRTTVar        = 72
	tiTotalRetrans  = 100
	tiBytesAcked    = 120
	tiBytesReceived = 128
	tcpInfoMin      = 136 // through tcpi_bytes_received
)

const (
	afInet  = 2  // AF_INET
	afInet6 = 10 // AF_INET6
)

var ne = binary.NativeEndian

var errShort = errors.New("mptcpinfo: MPTCP_FULL_INFO reply shorter than its fixed head")

// fullHead is the decoded fixed part of struct mptcp_full_info.
type fullHead struct {
	tcpInfoKernel, tcpInfoUser uint32
	sfInfoKernel, sfInfoUser   uint32
	numSubflows, arraysUser    uint32
}

func parseHead(b []byte) (fullHead, error) {
	if len(b) < fullInfoHead {
		return fullHead{}, errShort
	}
	return fullHead{
		tcpInfoKernel: ne.Uint32(b[offSizeTCPInfoKernel:]),
		tcpInfoUser:   ne.Uint32(b[offSizeTCPInfoUser:]),
		sfInfoKernel:  ne.Uint32(b[offSizeSFInfoKernel:]),
		sfInfoUser:    ne.Uint32(b[offSizeSFInfoUser:]),
		numSubflows:   ne.Uint32(b[offNumSubflows:]),
		arraysUser:    ne.Uint32(b[offSizeArraysUser:]),
	}, nil
}

// parseFull decodes an MPTCP_FULL_INFO reply: reply is what the kernel
// wrote to optval (its returned optlen bytes: the 40-byte head, then as
// much of struct mptcp_info as both sides know), sf and ti are the arrays
// it filled. The strides are the size_*_user values of the reply, which
// the kernel lowered to its own struct sizes if ours were larger; fields
// past a stride, or past the end of the mptcp_info copy, read as zero.
// It never panics, whatever the bytes; at most min(num_subflows,
// size_arrays_user) subflows are returned, and an array too short for
// that many entries is an error.
func parseFull(reply, sf, ti []byte) (Info, error) {
	h, err := parseHead(reply)
	if err != nil {
		return Info{}, err
	}
	var info Info
	parseMPTCPInfo(&info, reply[fullInfoHead:])
	n := min(h.numSubflows, h.arraysUser)
	if n == 0 {
		return info, nil
	}
	if h.sfInfoUser == 0 || h.tcpInfoUser == 0 {
		return info, errors.New("mptcpinfo: kernel reported a zero-sized subflow or tcp_info entry")
	}
	if uint64(n)*uint64(h.sfInfoUser) > uint64(len(sf)) || uint64(n)*uint64(h.tcpInfoUser) > uint64(len(ti)) {
		return info, errors.New("mptcpinfo: MPTCP_FULL_INFO reply lists more subflow data than the arrays hold")
	}
	info.Subflows = make([]Subflow, n)
	for i := range info.Subflows {
		s := &info.Subflows[i]
		e := sf[uint64(i)*uint64(h.sfInfoUser):][:h.sfInfoUser]
		if len(e) >= sfID+4 {
			s.ID = ne.Uint32(e[sfID:])
		}
		s.Local = parseSockaddr(field(e, sfLocal, sockaddrSize))
		s.Remote = parseSockaddr(field(e, sfRemote, sockaddrSize))
		parseTCPInfo(s, ti[uint64(i)*uint64(h.tcpInfoUser):][:h.tcpInfoUser])
	}
	return info, nil
}

// field returns b[off:off+n], cut short (possibly empty) where b ends.
func field(b []byte, off, n int) []byte {
	if off >= len(b) {
		return nil
	}
	return b[off:min(len(b), off+n)]
}

func u8(b []byte, off int) uint8 {
	if off+1 > len(b) {
		return 0
	}
	return b[off]
}

func u32(b []byte, off int) uint32 {
	if off+4 > len(b) {
		return 0
	}
	return ne.Uint32(b[off:])
}

func u64(b []byte, off int) uint64 {
	if off+8 > len(b) {
		return 0
	}
	return ne.Uint64(b[off:])
}

// parseMPTCPInfo fills info's MPTCP-level fields from a struct mptcp_info
// prefix of any length.
func parseMPTCPInfo(info *Info, mi []byte) {
	info.ExtraSubflows = u8(mi, miSubflows)
	info.AddAddrSignal = u8(mi, miAddAddrSignal)
	info.AddAddrAccepted = u8(mi, miAddAddrAccepted)
	info.SubflowsMax = u8(mi, miSubflowsMax)
	info.AddAddrSignalMax = u8(mi, miAddAddrSignalMax)
	info.AddAddrAcceptedMax = u8(mi, miAddAddrAcceptedMax)
	info.Flags = u32(mi, miFlags)
	info.Token = u32(mi, miToken)
	info.Retransmits = u32(mi, miRetransmits)
	info.BytesRetrans = u64(mi, miBytesRetrans)
	info.BytesSent = u64(mi, miBytesSent)
	info.BytesReceived = u64(mi, miBytesReceived)
	info.BytesAcked = u64(mi, miBytesAcked)
	info.SubflowsTotal = u8(mi, miSubflowsTotal)
	info.Fallback = info.Flags&FlagFallback != 0
}

// parseTCPInfo fills s's tcp_info fields from a struct tcp_info prefix of
// any length.
func parseTCPInfo(s *Subflow, ti []byte) {
	s.State = u8(ti, tiState)
	s.RTT = time.Duration(u32(ti, tiRTT)) * time.Microsecond
	s.RTTVar = time.Duration(u32(ti, tiRTTVar)) * time.Microsecond
	s.Retrans = u32(ti, tiTotalRetrans)
	s.BytesAcked = u64(ti, tiBytesAcked)
	s.BytesReceived = u64(ti, tiBytesReceived)
}

// parseSockaddr decodes a struct sockaddr_in or sockaddr_in6; anything
// else, or too short, is the zero AddrPort.
func parseSockaddr(b []byte) netip.AddrPort {
	if len(b) < 2 {
		return netip.AddrPort{}
	}
	switch ne.Uint16(b) {
	case afInet: // family, be16 port, 4-byte address
		if len(b) < 8 {
			return netip.AddrPort{}
		}
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:]))
	case afInet6: // family, be16 port, be32 flowinfo, 16-byte address, u32 scope id
		if len(b) < 28 {
			return netip.AddrPort{}
		}
		a := netip.AddrFrom16([16]byte(b[8:24]))
		if zone := ne.Uint32(b[24:]); zone != 0 && a.Is6() && (a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast()) {
			a = a.WithZone(strconv.FormatUint(uint64(zone), 10))
		}
		return netip.AddrPortFrom(a, binary.BigEndian.Uint16(b[2:]))
	}
	return netip.AddrPort{}
}
