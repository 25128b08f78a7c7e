//go:build linux

package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/test/netns/internal/netns"
	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// The concentrator's IPv6 address, and each ISP's IPv6 customer prefix.
var (
	conc6   = netip.MustParseAddr("2001:db8:ffff::1")
	ispPfx6 = [2]netip.Prefix{netip.MustParsePrefix("2001:db8:a::/64"), netip.MustParsePrefix("2001:db8:b::/64")}
)

// ipv6OnlyUplinks makes both uplinks IPv6 only: each ISP routes a /64 to
// its customer and IPv6 to the concentrator (2001:db8:ffff::1 on its
// loopback), dropping customer packets from any other source (BCP 38, in
// nftables, as for IPv4); the client has an address and a default route
// on each uplink (metrics 100 and 200, as DHCPv6/RA would leave them) and
// no IPv4 on either.
func (e *env) ipv6OnlyUplinks(t *testing.T) { e.ipv6Only(t, 0, 1) }

// ipv6Only makes the uplinks numbered which (0: wan0, 1: wan1) IPv6 only,
// as ipv6OnlyUplinks does for both.
func (e *env) ipv6Only(t *testing.T, which ...int) {
	t.Helper()
	tp := e.tp
	isps := []string{tp.ISPA, tp.ISPB}
	for _, i := range which {
		isp := isps[i]
		p := ispPfx6[i]
		gw := p.Addr().Next()                   // ::1, the ISP
		cli := gw.Next()                        // ::2, the client
		bb := fmt.Sprintf("2001:db8:%d::", i+1) // the ISP ↔ concentrator link
		conc := "ispa"
		if i == 1 {
			conc = "ispb"
		}
		for _, c := range []struct {
			ns   string
			args []string
		}{
			{isp, []string{"addr", "add", netip.PrefixFrom(gw, 64).String(), "dev", "cust", "nodad"}},
			{isp, []string{"addr", "add", bb + "1/64", "dev", "bb", "nodad"}},
			{isp, []string{"route", "add", "default", "via", bb + "2"}},
			{tp.Conc, []string{"addr", "add", bb + "2/64", "dev", conc, "nodad"}},
			{tp.Conc, []string{"route", "add", p.String(), "via", bb + "1"}},
			{tp.Client, []string{"addr", "add", netip.PrefixFrom(cli, 64).String(), "dev", fmt.Sprintf("wan%d", i), "nodad"}},
			{tp.Client, []string{"route", "add", "default", "via", gw.String(), "dev", fmt.Sprintf("wan%d", i), "metric", fmt.Sprint(100 * (i + 1))}},
		} {
			tp.Exec(c.ns, append([]string{"ip", "-6"}, c.args...)...)
		}
		if err := netns.Sysctl(isp, "net.ipv6.conf.all.forwarding", "1"); err != nil {
			t.Fatal(err)
		}
		rules := filepath.Join(t.TempDir(), "bcp38-6.nft")
		if err := writeText(rules, fmt.Sprintf("table ip6 isp6 {\n\tcounter bcp38 {}\n\tchain forward {\n\t\ttype filter hook forward priority 0; policy accept;\n\t\tiifname \"cust\" ip6 saddr != %s counter name bcp38 drop\n\t}\n}\n", p)); err != nil {
			t.Fatal(err)
		}
		tp.Exec(isp, "nft", "-f", rules)
	}
	tp.Exec(tp.Conc, "ip", "-6", "addr", "add", netip.PrefixFrom(conc6, 128).String(), "dev", "lo", "nodad")
	for _, i := range which {
		tp.Exec(tp.Client, "ip", "-4", "addr", "flush", "dev", fmt.Sprintf("wan%d", i))
	}
}

// TestIPv6Uplinks: with IPv6-only uplinks and the concentrator reached
// over IPv6, one flow uses both uplinks (an MPTCP endpoint on each IPv6
// address), bytes intact, no BCP 38 drop; IPv4 and IPv6 destinations are
// carried inside; UDP and ping go over the IPv6 paths.
func TestIPv6Uplinks(t *testing.T) {
	e := newSysEnv(t, options{topo: shaped()})
	tp := e.tp
	http6 := e.addIPv6Internet(t)
	e.ipv6OnlyUplinks(t)
	e.serverAddr = netip.AddrPortFrom(conc6, 7100)
	e.noRoute = true
	e.startClient(t, e.key(), "--route-all")
	e.waitUplinksUp(t)

	if out := tp.Output(tp.Client, "ip", "mptcp", "endpoint", "show"); !strings.Contains(out, "2001:db8:a::2") || !strings.Contains(out, "2001:db8:b::2") {
		t.Fatalf("the MPTCP endpoints are not the uplinks' IPv6 addresses:\n%s", out)
	}
	t.Run("one flow on both IPv6 uplinks", func(t *testing.T) {
		e.expectSource(t, "IPv4 destination over IPv6 uplinks", e.http, topo.DestAddr, viaTunnel, nil)
		const size = 8 << 20
		before, after := e.download(t, "big", e.randomFile(t, "big", size), "60")
		total, share := shares(before.rx, after.rx)
		t.Logf("download of %d bytes: %d bytes on the uplinks, wan0 %.0f%%, wan1 %.0f%%", size, total, 100*share[0], 100*share[1])
		for i, s := range share {
			if s < 0.1 {
				t.Errorf("wan%d carried %.0f%%: the flow does not use both IPv6 uplinks", i, 100*s)
			}
		}
		for i, isp := range []string{tp.ISPA, tp.ISPB} {
			if out := tp.Output(isp, "nft", "list", "counter", "ip6", "isp6", "bcp38"); !strings.Contains(out, "packets 0 ") {
				t.Errorf("ISP %d dropped packets with a foreign IPv6 source:\n%s", i, out)
			}
		}
	})
	t.Run("IPv6 destination", func(t *testing.T) {
		e.expectSource(t, "IPv6 get", http6, dest6, viaTunnel, nil, "-6")
	})
	t.Run("UDP and ping", func(t *testing.T) {
		code, out, _ := e.run(t, "ping", "-n", "-c", "3", "-i", "0.3", "-W", "3", topo.DestAddr.String())
		if code != 0 || !strings.Contains(out, "3 received") {
			t.Fatalf("ping over IPv6 uplinks: exit %d\n%s", code, out)
		}
		st, raw := e.status(t, "--socket", e.clientSocket())
		if st.UDP == nil || st.UDP.PathOut == 0 || st.UDP.PathIn == 0 {
			t.Errorf("the pings did not cross on the IPv6 paths:\n%s", raw)
		}
	})
}

func writeText(path, s string) error { return os.WriteFile(path, []byte(s), 0o644) }

// TestMixedFamilyUplinks: wan0 IPv4 only, wan1 IPv6 only; the client dials
// the concentrator's IPv6 address and names its IPv4 one (--server-alt),
// which the concentrator announces (--announce): one flow uses both
// uplinks, the IPv4 subflow joining the IPv6 connection; each uplink's
// probes go to the concentrator's address of its family.
func TestMixedFamilyUplinks(t *testing.T) {
	e := newSysEnv(t, options{topo: shaped(), serverArgs: []string{"--announce", topo.ConcAddr.String()}})
	tp := e.tp
	e.ipv6Only(t, 1)
	e.serverAddr = netip.AddrPortFrom(conc6, 7100)
	e.startClient(t, e.key(), "--server-alt", netip.AddrPortFrom(topo.ConcAddr, 7100).String())
	// Both uplinks up before the flow starts: the concentrator's
	// announcement reaches a connection once, and the kernel joins it
	// only from an endpoint that exists then.
	e.waitUplinksUp(t)
	e.expectSource(t, "through the tunnel", e.http, topo.DestAddr, viaTunnel, nil)
	const size = 8 << 20
	before, after := e.download(t, "big", e.randomFile(t, "big", size), "60")
	total, share := shares(before.rx, after.rx)
	t.Logf("download of %d bytes: %d bytes on the uplinks, wan0 (IPv4) %.0f%%, wan1 (IPv6) %.0f%%", size, total, 100*share[0], 100*share[1])
	for i, s := range share {
		if s < 0.1 {
			t.Errorf("wan%d carried %.0f%%: one flow does not use an IPv4 and an IPv6 uplink together\nclient endpoints:\n%s\nlimits: %s\nconcentrator endpoints:\n%s\nclient MPTCP counters:\n%s",
				i, 100*s, tp.Output(tp.Client, "ip", "mptcp", "endpoint", "show"), tp.Output(tp.Client, "ip", "mptcp", "limits", "show"),
				tp.Output(tp.Conc, "ip", "mptcp", "endpoint", "show"), tp.Output(tp.Client, "sh", "-c", "nstat -asz | grep -i -E 'AddAddr|Join|Echo'"))
		}
	}
}

// waitUplinksUp waits until both uplinks are up with their probes
// answered: an IPv6 uplink's first probe may wait a second for neighbour
// discovery on a path just configured, and the uplink is withdrawn
// meanwhile.
func (e *env) waitUplinksUp(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, raw := e.status(t, "--socket", e.clientSocket())
		up := 0
		for _, u := range st.Uplinks {
			if u.State == "up" && u.Probe {
				up++
			}
		}
		if up == 2 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("both uplinks should be up, each probing the concentrator's address of its family:\n%s", raw)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
