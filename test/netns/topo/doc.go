//go:build linux

// Package topo builds mpvpn's test network in network namespaces: a client
// with two uplinks through emulated links to two ISPs (one routed, one
// CGNAT, both enforcing BCP 38), a concentrator that does not forward, and
// an "internet" host behind it.
//
//	P-cli wan0 192.0.2.2/24 ── [P-la: linkemu wire] ── P-ispa 192.0.2.1 (routed; BCP38) ─ 198.18.1.1/24 ─┐
//	P-cli wan1 100.64.0.2/24 ─ [P-lb: linkemu wire] ── P-ispb 100.64.0.1 (CGNAT masquerade to           │
//	                                                     198.18.2.1; BCP38) ─ 198.18.2.1/24 ─────────────┤
//	                                      P-conc: lo 203.0.113.1/32 (mpvpn server listens here),         │
//	                                      198.18.1.2 / 198.18.2.2 toward the ISPs, 198.18.3.1 ─ P-inet  ─┘
//	                                      ip_forward=0 (the only way to the internet is through mpvpn)
//	P-inet: 198.18.3.2/24, lo 198.51.100.10/32 (HTTP, iperf3, dnsmasq); route back to 203.0.113.1 via conc
//	P-cli: default via 192.0.2.1 dev wan0 metric 100, default via 100.64.0.1 dev wan1 metric 200
//
// P is a per-topology prefix ("mv" + 4 random hex digits by default), so
// tests can run side by side. Interface names inside the namespaces:
//
//	P-cli   wan0, wan1
//	P-la    cli (peer of wan0), isp (peer of P-ispa's cust)     — same in P-lb
//	P-ispa  cust 192.0.2.1/24, bb 198.18.1.1/24 (default via 198.18.1.2)
//	P-ispb  cust 100.64.0.1/24, bb 198.18.2.1/24 (default via 198.18.2.2)
//	P-conc  lo 203.0.113.1/32, ispa 198.18.1.2/24, ispb 198.18.2.2/24, inet 198.18.3.1/24
//	        routes: 192.0.2.0/24 via 198.18.1.1; 198.51.100.0/24 via 198.18.3.2 src 203.0.113.1
//	P-inet  conc 198.18.3.2/24, lo 198.51.100.10/32; 203.0.113.1 via 198.18.3.1
//
// Details that matter to tests:
//
//   - The link namespaces are layer 2 only: linkemu copies frames between
//     cli and isp, so ARP crosses the emulated link too (a blackhole or heavy
//     loss also starves ARP, as on a real link). GRO/GSO/TSO, scatter-gather
//     and tx checksum offload are off on the four interfaces around each
//     wire so frames are MTU-sized with finished checksums. IPv6 is disabled
//     in P-la/P-lb (the wire itself never speaks); elsewhere it is left at the
//     kernel default, but nothing is addressed or routed for it.
//   - BCP 38 is an nftables rule in each ISP (table ip isp, chain forward):
//     packets from cust whose source is not the ISP's customer prefix are
//     counted in the named counter bcp38 and dropped. rp_filter is 0 in
//     every namespace except P-cli, where it is 2 (loose, what desktop
//     distributions ship) — strict mode would drop replies on the
//     second uplink.
//   - P-conc has no default route: a destination outside 192.0.2.0/24,
//     198.18.x.0/24 and 198.51.100.0/24 is unreachable from it (ENETUNREACH);
//     198.51.100.0/24 addresses other than .10 are routed to P-inet, which
//     silently drops them (a connect times out); a closed port on .10 is
//     refused.
//   - Everything is deleted by Close (t.Cleanup with New): processes started
//     by Start and anything else still running inside the namespaces are
//     killed by PID, then the namespaces are deleted. A test binary killed
//     outright (go test -timeout) cannot clean up; `mpvpn-topo down --all`
//     removes such leftovers.
package topo
