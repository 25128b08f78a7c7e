//go:build linux

package firewall

import (
	"bufio"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/internal/netnstest"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// sendRaw sends one ICMP (IPv4) or ICMPv6 message of type typ from a raw
// socket bound to dev, with the given hop limit (IPv6), and returns the
// send's error.
func sendRaw(t *testing.T, dst netip.Addr, dev string, typ byte, hops int) error {
	t.Helper()
	fam, proto := unix.AF_INET, unix.IPPROTO_ICMP
	if dst.Is6() {
		fam, proto = unix.AF_INET6, unix.IPPROTO_ICMPV6
	}
	fd, err := unix.Socket(fam, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		t.Fatalf("raw socket: %v", err)
	}
	defer unix.Close(fd)
	if dev != "" {
		if err := unix.BindToDevice(fd, dev); err != nil {
			t.Fatal(err)
		}
	}
	msg := make([]byte, 24) // type, code, checksum, 4 reserved/id bytes, 16 target bytes
	msg[0] = typ
	if dst.Is6() {
		unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MULTICAST_HOPS, hops)
		unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_UNICAST_HOPS, hops)
		copy(msg[8:], dst.AsSlice()) // as an NS's target (any 16 bytes do)
	} else {
		// ICMPv4 needs its checksum filled in by the sender.
		var sum uint32
		for i := 0; i < len(msg); i += 2 {
			sum += uint32(msg[i])<<8 | uint32(msg[i+1])
		}
		for sum > 0xffff {
			sum = sum&0xffff + sum>>16
		}
		msg[2], msg[3] = byte(^sum>>8), byte(^sum)
	}
	return unix.Sendto(fd, msg, 0, sockaddr(netip.AddrPortFrom(dst, 0), dev))
}

const (
	icmpEcho     = 8
	icmpv6Echo   = 128
	ndpNS        = icmpv6NeighborSolicit
	solicitedFor = "ff02::1:ff00:7"
)

// leakProbes sends, from unmarked sockets of this process, a TCP connect,
// a UDP datagram, a DNS query and an ICMP echo to a public address, and a
// TCP connect to a LAN host. With blocked, each must fail at once and
// nothing may leave wan0 or lan0; without, each must leave (the positive
// control: the monitors do see probes).
func leakProbes(t *testing.T, fam family, lanPeer netip.Addr, blocked bool, base uint16) {
	t.Helper()
	what := fam.name + " (kill switch off)"
	if blocked {
		what = fam.name + " (kill switch on)"
	}
	wan, lan := startCapture(t, "wan0"), startCapture(t, "lan0")
	tcpPort, udpPort, lanPort := base, base+1, base+2

	r := probe{Net: "tcp", Dst: netip.AddrPortFrom(fam.public, tcpPort)}.run()
	seen := wan.to(fam.public, tcpPort)
	if blocked && (r.State != "refused" || r.Elapsed > time.Second || len(seen) != 0) {
		t.Errorf("%s: TCP connect to %s: %+v, %d packets on wan0; want refused at once, none out", what, fam.public, r, len(seen))
	}
	if !blocked && (r.State != "pending" || len(seen) == 0) {
		t.Errorf("%s: TCP connect to %s: %+v, %d packets on wan0; want the SYN out", what, fam.public, r, len(seen))
	}

	for _, port := range []uint16{udpPort, 53} {
		r = probe{Net: "udp", Dst: netip.AddrPortFrom(fam.public, port)}.run()
		seen = wan.to(fam.public, port)
		if blocked && (r.Errno != "EPERM" || r.RecvErrno != fam.udpErr || len(seen) != 0) {
			t.Errorf("%s: UDP to %s port %d: %+v, %d packets on wan0; want EPERM then %s, none out", what, fam.public, port, r, len(seen), fam.udpErr)
		}
		if !blocked && (r.State != "sent" || len(seen) == 0) {
			t.Errorf("%s: UDP to %s port %d: %+v, %d packets on wan0; want it out", what, fam.public, port, r, len(seen))
		}
	}

	echo := byte(icmpEcho)
	if fam.public.Is6() {
		echo = icmpv6Echo
	}
	err := sendRaw(t, fam.public, "", echo, 64)
	seen = wan.to(fam.public, 0)
	if blocked && (!errors.Is(err, unix.EPERM) || len(seen) != 0) {
		t.Errorf("%s: ICMP echo to %s: %v, %v on wan0; want EPERM, none out", what, fam.public, err, seen)
	}
	if !blocked && (err != nil || len(seen) == 0) {
		t.Errorf("%s: ICMP echo to %s: %v, nothing on wan0; want it out", what, fam.public, err)
	}

	r = probe{Net: "tcp", Dst: netip.AddrPortFrom(lanPeer, lanPort)}.run()
	seen = lan.to(lanPeer, lanPort)
	if blocked && (r.State != "refused" || len(seen) != 0) {
		t.Errorf("%s: TCP connect to the LAN host %s: %+v, %d packets on lan0; want refused, none out", what, lanPeer, r, len(seen))
	}
	if !blocked && (r.State != "pending" || len(seen) == 0) {
		t.Errorf("%s: TCP connect to the LAN host %s: %+v; want the SYN out of lan0", what, lanPeer, r)
	}
}

// allowedProbes checks what the kill switch lets out of wan0: mpvpn's own
// and Direct-marked sockets, DHCPv4 and DHCPv6 client messages, NDP and MLD;
// and that Tunnel-marked packets, with no TUN, are refused, as are look-
// alikes of the exceptions (NDP and MLD with a routable hop limit, DHCPv6
// from a global address, an ICMPv6 echo to a link-local group).
func allowedProbes(t *testing.T, fam family, base uint16) {
	t.Helper()
	wan := startCapture(t, "wan0")
	for i, c := range []struct {
		name  string
		mark  uint32
		state string
	}{{"Own", own, "pending"}, {"Direct", direct, "pending"}, {"Tunnel (no TUN)", tunnel, "refused"}} {
		port := base + uint16(i)
		r := probe{Net: "tcp", Dst: netip.AddrPortFrom(fam.public, port), Mark: c.mark}.run()
		seen := wan.to(fam.public, port)
		if r.State != c.state || (c.state == "pending") != (len(seen) > 0) {
			t.Errorf("%s: %s-marked TCP connect: %+v, %d packets on wan0; want %s", fam.name, c.name, r, len(seen), c.state)
		}
	}
	if fam.public.Is4() {
		bcast := netip.MustParseAddr("255.255.255.255")
		r := probe{Net: "udp", Dst: netip.AddrPortFrom(bcast, 67), SrcPort: 68, Device: "wan0"}.run()
		if seen := wan.to(bcast, 67); r.State != "sent" || len(seen) == 0 {
			t.Errorf("DHCPv4 discover: %+v, %v on wan0; want it out", r, seen)
		}
		return
	}
	dhcp6 := netip.MustParseAddr("ff02::1:2")
	r := probe{Net: "udp", Dst: netip.AddrPortFrom(dhcp6, 547), SrcPort: 546, Device: "wan0"}.run()
	if seen := wan.to(dhcp6, 547); r.State != "sent" || len(seen) == 0 || !seen[0].Src.IsLinkLocalUnicast() {
		t.Errorf("DHCPv6 solicit: %+v, %v on wan0; want it out from a link-local address", r, seen)
	}
	r = probe{Net: "udp", Dst: netip.AddrPortFrom(fam.public, 547), SrcPort: 546}.run()
	if seen := wan.to(fam.public, 547); r.State != "error" || len(seen) != 0 {
		t.Errorf("DHCPv6 ports from a global address to a public one: %+v, %v on wan0; want it refused", r, seen)
	}
	sol := netip.MustParseAddr(solicitedFor)
	if err := sendRaw(t, sol, "wan0", ndpNS, 255); err != nil {
		t.Errorf("NDP neighbour solicitation: %v", err)
	}
	if seen := wan.to(sol, 0); len(seen) == 0 || seen[0].ICMPType != ndpNS || seen[0].HopLimit != 255 {
		t.Errorf("NDP neighbour solicitation did not leave wan0: %v", seen)
	}
	mld := netip.MustParseAddr("ff02::16")
	if err := sendRaw(t, mld, "wan0", icmpv6MLD2Report, 1); err != nil {
		t.Errorf("MLDv2 report: %v", err)
	}
	if seen := wan.to(mld, 0); len(seen) == 0 || seen[0].ICMPType != icmpv6MLD2Report {
		t.Errorf("an MLDv2 report did not leave wan0: %v", seen)
	}
	if err := sendRaw(t, fam.public, "wan0", icmpv6MLD2Report, 64); !errors.Is(err, unix.EPERM) {
		t.Errorf("an MLD report with hop limit 64 to %s: %v, want EPERM", fam.public, err)
	}
	// An NS to a public address with a routable hop limit is no NDP.
	if err := sendRaw(t, fam.public, "wan0", ndpNS, 64); !errors.Is(err, unix.EPERM) {
		t.Errorf("an NS with hop limit 64 to %s: %v, want EPERM", fam.public, err)
	}
	all := netip.MustParseAddr("ff02::1")
	if err := sendRaw(t, all, "wan0", icmpv6Echo, 255); !errors.Is(err, unix.EPERM) {
		t.Errorf("an ICMPv6 echo to ff02::1: %v, want EPERM", err)
	}
	for _, p := range wan.packets() {
		if p.Proto == unix.IPPROTO_ICMPV6 && p.ICMPType == icmpv6Echo || p.Dst == fam.public && p.Proto == unix.IPPROTO_ICMPV6 {
			t.Errorf("left wan0: %v", p)
		}
	}
}

// TestKillSwitch is SECURITY.md §6 tests 20, 24 and 25 on one machine: with
// no TUN (the client is down or crashed), nothing unmarked leaves either
// interface, over IPv4 or IPv6, and every attempt fails at once; mpvpn's own
// and Direct traffic, DHCP and NDP do leave. The positive control comes first
// and last: without the kill switch the same probes are seen leaving.
func TestKillSwitch(t *testing.T) {
	netnstest.Run(t, func() {
		topology(t)
		for _, fam := range families {
			leakProbes(t, fam, lanPeerOf(fam), false, 2000)
		}
		f, err := Apply(Config{Mark: own, KillSwitch: &KillSwitch{TUN: "mpvpn0"}})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("kill switch:\n%s", nft(t, "list", "table", "inet", KillSwitchTable))
		for _, fam := range families {
			leakProbes(t, fam, lanPeerOf(fam), true, 2100)
			allowedProbes(t, fam, 2200)
		}
		if c := counters(t, KillSwitchTable); c["anything else, TCP: a reset"] == 0 || c["anything else: ICMP admin-prohibited"] == 0 {
			t.Errorf("the reject rules counted nothing: %v", c)
		}
		// Loopback stays open.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		if r := (probe{Net: "tcp", Dst: netip.MustParseAddrPort(ln.Addr().String())}).run(); r.State != "connected" {
			t.Errorf("loopback with the kill switch on: %+v", r)
		}
		// The uplink's own address is loopback too.
		if r := (probe{Net: "tcp", Dst: netip.AddrPortFrom(wanAddr4, 9)}).run(); r.State != "refused" || r.Errno != "ECONNREFUSED" {
			t.Errorf("connect to this machine's own address: %+v (want the closed port's reset)", r)
		}
		if err := f.RemoveKillSwitch(); err != nil {
			t.Fatal(err)
		}
		for _, fam := range families {
			leakProbes(t, fam, lanPeerOf(fam), false, 2300)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
	})
}

func lanPeerOf(fam family) netip.Addr {
	if fam.public.Is4() {
		return lanPeer4
	}
	return lanPeer6
}

// TestKillSwitchLAN: with the LAN allowed, the LAN host is reachable over
// IPv4 and IPv6, but DNS to it is not (SECURITY.md §6 test 23), and a
// "LAN" prefix that covers a public address is not honoured (TunnelCrack
// LocalNet, test 26).
func TestKillSwitchLAN(t *testing.T) {
	netnstest.Run(t, func() {
		topology(t)
		rogue := []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24"), netip.MustParsePrefix("2001:db8:ffff::/48"), netip.MustParsePrefix("0.0.0.0/1")}
		f, err := Apply(Config{Mark: own, KillSwitch: &KillSwitch{TUN: "mpvpn0", AllowLAN: true, LAN: append(append([]netip.Prefix{}, lanPrefix...), rogue...)}})
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		defer f.RemoveKillSwitch()
		listing := nft(t, "list", "table", "inet", KillSwitchTable)
		for _, p := range rogue {
			if strings.Contains(listing, p.String()) {
				t.Errorf("the public prefix %s became part of the LAN:\n%s", p, listing)
			}
		}
		wan, lan := startCapture(t, "wan0"), startCapture(t, "lan0")
		for _, fam := range families {
			peer := lanPeerOf(fam)
			r := probe{Net: "tcp", Dst: netip.AddrPortFrom(peer, 3000)}.run()
			if seen := lan.to(peer, 3000); r.State != "pending" || len(seen) == 0 {
				t.Errorf("%s: the allowed LAN host: %+v, %v on lan0; want the SYN out", fam.name, r, seen)
			}
			r = probe{Net: "udp", Dst: netip.AddrPortFrom(peer, 53)}.run()
			if seen := lan.to(peer, 53); r.Errno != "EPERM" || len(seen) != 0 {
				t.Errorf("%s: UDP DNS to the LAN host: %+v, %v; want it refused", fam.name, r, seen)
			}
			r = probe{Net: "tcp", Dst: netip.AddrPortFrom(peer, 53)}.run()
			if seen := lan.to(peer, 53); r.State != "refused" || len(seen) != 0 {
				t.Errorf("%s: TCP DNS to the LAN host: %+v, %v; want it refused", fam.name, r, seen)
			}
			r = probe{Net: "tcp", Dst: netip.AddrPortFrom(fam.public, 3001)}.run()
			if seen := wan.to(fam.public, 3001); r.State != "refused" || len(seen) != 0 {
				t.Errorf("%s: a public address inside a rogue \"LAN\" prefix: %+v, %v on wan0; want refused", fam.name, r, seen)
			}
		}
	})
}

// TestKillSwitchCrash: while the TUN exists, unmarked packets routed into
// it pass; when it goes (the client's process died, and the kernel removed
// the device and its routes), the same packets fall through to the main
// table and are refused instead of leaving the uplink.
func TestKillSwitchCrash(t *testing.T) {
	netnstest.Run(t, func() {
		topology(t)
		closeTUN := tun(t, "mpvpn0")
		routeVia(t, "198.51.100.0/24", "mpvpn0", unix.RT_TABLE_MAIN)
		routeVia(t, "2001:db8:ffff::/48", "mpvpn0", unix.RT_TABLE_MAIN)
		f, err := Apply(Config{Mark: own, KillSwitch: &KillSwitch{TUN: "mpvpn0"}})
		if err != nil {
			t.Fatal(err)
		}
		defer func() {
			f.RemoveKillSwitch()
			f.Close()
		}()
		for _, fam := range families {
			wan, tn := startCapture(t, "wan0"), startCapture(t, "mpvpn0")
			r := probe{Net: "tcp", Dst: netip.AddrPortFrom(fam.public, 4000)}.run()
			if in := tn.to(fam.public, 4000); r.State != "pending" || len(in) == 0 || len(wan.to(fam.public, 4000)) != 0 {
				t.Errorf("%s: into the TUN with the kill switch on: %+v, %v in the TUN; want it let in", fam.name, r, in)
			}
		}
		closeTUN()
		for _, fam := range families {
			wan := startCapture(t, "wan0")
			r := probe{Net: "tcp", Dst: netip.AddrPortFrom(fam.public, 4001)}.run()
			if seen := wan.to(fam.public, 4001); r.State != "refused" || r.Elapsed > time.Second || len(seen) != 0 {
				t.Errorf("%s: after the TUN went: %+v, %v on wan0; want refused at once, none out", fam.name, r, seen)
			}
		}
	})
}

// TestKillSwitchSurvivesKill9 is SECURITY.md §6 test 17 in small: a process
// applies the kill switch and per-app rules and is killed with SIGKILL; the
// tables stay in force until Cleanup, after which traffic leaves again.
func TestKillSwitchSurvivesKill9(t *testing.T) {
	netnstest.Run(t, func() {
		topology(t)
		before := ruleset(t)
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), helperEnv+"=apply", "FIREWALL="+mustJSON(helperConfig{Mark: own, UIDs: map[string]string{"61003": "block"}, TUN: "mpvpn0"}))
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "ready\n" {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("helper: %q, %v", line, err)
		}
		cmd.Process.Kill()
		cmd.Wait()
		for _, fam := range families {
			wan := startCapture(t, "wan0")
			r := probe{Net: "tcp", Dst: netip.AddrPortFrom(fam.public, 5000)}.run()
			if seen := wan.to(fam.public, 5000); r.State != "refused" || len(seen) != 0 {
				t.Errorf("%s: after kill -9 of the client: %+v, %v on wan0; want the kill switch still in force", fam.name, r, seen)
			}
		}
		lines, err := Cleanup()
		if err != nil {
			t.Fatal(err)
		}
		if want := []string{"nftables table inet mpvpn", "nftables table inet mpvpn-killswitch"}; strings.Join(lines, "\n") != strings.Join(want, "\n") {
			t.Errorf("Cleanup: %q, want %q", lines, want)
		}
		if after := ruleset(t); after != before {
			t.Errorf("Cleanup did not restore the ruleset:\nbefore:\n%s\nafter:\n%s", before, after)
		}
		for _, fam := range families {
			leakProbes(t, fam, lanPeerOf(fam), false, 5100)
		}
	})
}

// TestKillSwitchForward: a router in front of a LAN. Its client's traffic,
// forwarded, must not leave the uplink either when the TUN is gone. With
// the client's LAN allowed the client's connect is refused at once (the
// router's reset reaches it); with no LAN allowed nothing leaves either, and
// the client waits (the reset to it is itself refused: see the package
// comment). The positive control: with no kill switch the forwarded SYN
// leaves the uplink.
func TestKillSwitchForward(t *testing.T) {
	netnstest.Run(t, func() {
		topology(t)
		client := lanClient(t)
		for _, s := range []string{"net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"} {
			if err := os.WriteFile("/proc/sys/"+s, []byte("1"), 0); err != nil {
				t.Fatal(err)
			}
		}
		clientLAN := []netip.Prefix{netip.MustParsePrefix("192.168.60.0/24"), netip.MustParsePrefix("fd00:60::/64")}
		for i, c := range []struct {
			name  string
			ks    *KillSwitch
			state string // the client's connect
			out   bool   // seen on wan0
		}{
			{"no kill switch (positive control)", nil, "pending", true},
			{"kill switch, the client's LAN allowed", &KillSwitch{TUN: "mpvpn0", AllowLAN: true, LAN: clientLAN}, "refused", false},
			{"kill switch, no LAN allowed", &KillSwitch{TUN: "mpvpn0"}, "pending", false},
		} {
			f, err := Apply(Config{Mark: own, KillSwitch: c.ks})
			if err != nil {
				t.Fatal(err)
			}
			for _, fam := range families {
				port := uint16(6000 + 10*i)
				wan := startCapture(t, "wan0")
				r := client(probe{Net: "tcp", Dst: netip.AddrPortFrom(fam.public, port)})
				seen := wan.to(fam.public, port)
				if r.State != c.state || (len(seen) > 0) != c.out {
					t.Errorf("%s, %s: the LAN client's connect: %+v, %d forwarded packets on wan0; want %s, out=%v", c.name, fam.name, r, len(seen), c.state, c.out)
				}
				if c.state == "refused" && r.Elapsed > time.Second {
					t.Errorf("%s, %s: the refusal took %v", c.name, fam.name, r.Elapsed)
				}
			}
			if c.ks != nil {
				if n := counters(t, KillSwitchTable); n["anything else, TCP: a reset"] == 0 {
					t.Errorf("%s: the forward chain's reject counted nothing: %v", c.name, n)
				}
				f.RemoveKillSwitch()
			}
			f.Close()
		}
	})
}

// lanClient makes a second namespace, a host on the router's LAN (lan1,
// 192.168.60.0/24 and fd00:60::/64) whose default route is the router, and
// returns a function that runs a probe from it.
func lanClient(t *testing.T) func(probe) probeResult {
	t.Helper()
	router, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { router.Close() })
	clientNS, err := netns.New() // the thread is in the client namespace now
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { clientNS.Close() })
	back := func() {
		if err := netns.Set(router); err != nil {
			t.Fatalf("back to the router's namespace: %v", err)
		}
	}
	lo, _ := vnl.LinkByName("lo")
	vnl.LinkSetUp(lo)
	back()
	veth := &vnl.Veth{LinkAttrs: vnl.LinkAttrs{Name: "lan1"}, PeerName: "lan1c"}
	if err := vnl.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	peer, _ := vnl.LinkByName("lan1c")
	if err := vnl.LinkSetNsFd(peer, int(clientNS)); err != nil {
		t.Fatal(err)
	}
	configure := func(name string, addrs []string, gw4, gw6 string) {
		l, err := vnl.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		// ARP stays on: the two ends must address each other's MAC.
		for _, a := range addrs {
			addr, _ := vnl.ParseAddr(a)
			addr.Flags = unix.IFA_F_NODAD
			if err := vnl.AddrAdd(l, addr); err != nil {
				t.Fatal(err)
			}
		}
		if err := vnl.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
		for _, gw := range []string{gw4, gw6} {
			if gw == "" {
				continue
			}
			ip := net.ParseIP(gw)
			dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
			if ip.To4() == nil {
				dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
			}
			if err := vnl.RouteAdd(&vnl.Route{LinkIndex: l.Attrs().Index, Dst: dst, Gw: ip}); err != nil {
				t.Fatal(err)
			}
		}
	}
	configure("lan1", []string{"192.168.60.1/24", "fd00:60::1/64"}, "", "")
	if err := netns.Set(clientNS); err != nil {
		t.Fatal(err)
	}
	configure("lan1c", []string{"192.168.60.9/24", "fd00:60::9/64"}, "192.168.60.1", "fd00:60::1")
	back()
	return func(p probe) probeResult {
		if err := netns.Set(clientNS); err != nil {
			t.Fatal(err)
		}
		defer back()
		return p.run()
	}
}
