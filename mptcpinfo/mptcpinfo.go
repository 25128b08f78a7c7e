//go:build linux

// Package mptcpinfo reads per-subflow statistics of a kernel Multipath TCP
// socket with getsockopt(SOL_MPTCP, MPTCP_FULL_INFO), and the single path's
// TCP_INFO when the socket is plain TCP (MPTCP fell back, or never was).
package mptcpinfo

import (
	"net/netip"
	"time"
)

// Subflow is one subflow of an MPTCP connection.
//
// The kernel's struct mptcp_subflow_info carries only an id and the two
// addresses, and struct tcp_info has no MPTCP flags, so a subflow's backup
// bit is not available through MPTCP_FULL_INFO and there is no Backup field.
type Subflow struct {
	ID            uint32 // kernel subflow id (msk-local, from 1); 0 when Fallback
	Local, Remote netip.AddrPort
	RTT, RTTVar   time.Duration // tcpi_rtt, tcpi_rttvar
	BytesAcked    uint64        // tcpi_bytes_acked: sent and acknowledged
	BytesReceived uint64        // tcpi_bytes_received
	Retrans       uint32        // tcpi_total_retrans
	State         uint8         // tcpi_state (1 = TCP_ESTABLISHED)
}

// Info is a snapshot of one socket.
//
// The MPTCP-level fields come from struct mptcp_info; they are zero when
// Fallback is set, and a field the running kernel's struct does not have
// yet (it copies only its own size) is zero too.
type Info struct {
	Fallback bool      // plain TCP: Subflows has the one path, from TCP_INFO
	Subflows []Subflow // at most one entry per subflow the kernel listed

	Token              uint32 // mptcpi_token
	Flags              uint32 // mptcpi_flags (FlagFallback, FlagRemoteKeyReceived)
	ExtraSubflows      uint8  // mptcpi_subflows: subflows besides the initial one
	SubflowsMax        uint8  // mptcpi_subflows_max: the netns limit
	SubflowsTotal      uint8  // mptcpi_subflows_total: all subflows (Linux 6.10+)
	AddAddrSignal      uint8  // mptcpi_add_addr_signal: ADD_ADDRs sent
	AddAddrAccepted    uint8  // mptcpi_add_addr_accepted: ADD_ADDRs accepted
	AddAddrSignalMax   uint8  // mptcpi_add_addr_signal_max
	AddAddrAcceptedMax uint8  // mptcpi_add_addr_accepted_max
	Retransmits        uint32 // mptcpi_retransmits: MPTCP-level retransmissions
	BytesRetrans       uint64 // mptcpi_bytes_retrans: MPTCP-level bytes retransmitted
	BytesSent          uint64 // mptcpi_bytes_sent: at the MPTCP level, retransmissions included
	BytesReceived      uint64 // mptcpi_bytes_received: data-level bytes received in sequence
	BytesAcked         uint64 // mptcpi_bytes_acked: data-level bytes acknowledged by the peer
}

// Bits of Info.Flags (MPTCP_INFO_FLAG_* in include/uapi/linux/mptcp.h).
const (
	FlagFallback          = 1 << 0
	FlagRemoteKeyReceived = 1 << 1
)

// StateEstablished is TCP_ESTABLISHED as tcp_info reports it in
// Subflow.State.
const StateEstablished = 1

// AddrShare is one address's part of a connection.
type AddrShare struct {
	Addr netip.Addr
	// Subflows counts its established subflows: the kernel keeps a
	// connection's first subflow listed after it closed (it carries the
	// socket's state), and that one is no path in use.
	Subflows int
	// BytesReceived and BytesAcked sum all its subflows', closed or not.
	BytesReceived, BytesAcked uint64
}

// ByAddr sums the connection's subflows per address, in the order the
// addresses first appear: their local addresses (a client's uplinks), or
// with remote their remote ones (the addresses a concentrator sees its
// client's subflows come from).
func (info Info) ByAddr(remote bool) []AddrShare {
	var out []AddrShare
	for _, sf := range info.Subflows {
		ap := sf.Local
		if remote {
			ap = sf.Remote
		}
		a := ap.Addr().Unmap()
		i := 0
		for i < len(out) && out[i].Addr != a {
			i++
		}
		if i == len(out) {
			out = append(out, AddrShare{Addr: a})
		}
		if sf.State == StateEstablished {
			out[i].Subflows++
		}
		out[i].BytesReceived += sf.BytesReceived
		out[i].BytesAcked += sf.BytesAcked
	}
	return out
}
