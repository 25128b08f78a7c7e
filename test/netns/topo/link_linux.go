package topo

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"

	"github.com/mpvpn/mpvpn/test/netns/linkemu"
)

// Outages, as DESIGN.md lists them:
//
//	link down                     LinkDown / LinkUp
//	carrier up, nothing passes    Blackhole(u, true/false)
//	address lost and regained     RemoveAddr / RestoreAddr
//	a new address                 Renumber

func (tp *Topology) emu(u Uplink) emulator {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	tp.mu.Lock()
	defer tp.mu.Unlock()
	if u != A && u != B {
		tp.fatalf("no uplink %d", int(u))
	}
	if tp.emus[u] == nil {
		tp.fatalf("uplink %s has no link emulator (NoEmu)", u)
	}
	return tp.emus[u]
}

// SetLink replaces the parameters of uplink u's emulated link in direction d
// (linkemu.Up = client → ISP, Down, or Both). Blackhole is a parameter too:
// SetLink with a zero Blackhole turns it off.
func (tp *Topology) SetLink(u Uplink, d linkemu.Dir, p linkemu.Params) {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	if err := tp.emu(u).set(d, p); err != nil {
		tp.fatalf("link %s: %v", u, err)
	}
}

// UpdateLink changes only the keys given ("rate=20mbit loss=1%", see
// linkemu.Params.Set) of uplink u's link in direction d.
func (tp *Topology) UpdateLink(u Uplink, d linkemu.Dir, kv string) {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	if err := tp.emu(u).update(d, kv); err != nil {
		tp.fatalf("link %s: %v", u, err)
	}
}

// Blackhole makes uplink u's link drop everything, both ways, while both
// interfaces stay up ("carrier up, nothing passes"), or passes traffic
// again. Other parameters are kept.
func (tp *Topology) Blackhole(u Uplink, on bool) {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	v := "off"
	if on {
		v = "on"
	}
	tp.UpdateLink(u, linkemu.Both, "blackhole="+v)
}

// LinkStatus returns the parameters and counters of uplink u's link.
func (tp *Topology) LinkStatus(u Uplink) (up, down linkemu.Status) {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	up, down, err := tp.emu(u).status()
	if err != nil {
		tp.fatalf("link %s: %v", u, err)
	}
	return up, down
}

// LinkDown sets uplink u's interface down in the client (the kernel removes
// its routes, the wire sees no carrier).
func (tp *Topology) LinkDown(u Uplink) {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	if err := tp.ip(tp.Client, "link", "set", tp.Uplinks[u].Iface, "down"); err != nil {
		tp.fatalf("%v", err)
	}
}

// LinkUp sets uplink u's interface up and puts its default route back, as
// the DHCP client would once the link returns.
func (tp *Topology) LinkUp(u Uplink) {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	ul := tp.Uplinks[u]
	if err := tp.ip(tp.Client, "link", "set", ul.Iface, "up"); err != nil {
		tp.fatalf("%v", err)
	}
	if err := tp.ip(tp.Client, defaultRoute(ul)...); err != nil {
		tp.fatalf("%v", err)
	}
}

// RemoveAddr deletes uplink u's address from the client (lease lost); the
// kernel drops the routes through it.
func (tp *Topology) RemoveAddr(u Uplink) {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	ul := tp.Uplinks[u]
	if err := tp.ip(tp.Client, "addr", "del", ul.Prefix.String(), "dev", ul.Iface); err != nil {
		tp.fatalf("%v", err)
	}
}

// RestoreAddr puts uplink u's address and default route back (lease
// regained).
func (tp *Topology) RestoreAddr(u Uplink) {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	ul := tp.Uplinks[u]
	if err := tp.ip(tp.Client, "addr", "add", ul.Prefix.String(), "dev", ul.Iface); err != nil {
		tp.fatalf("%v", err)
	}
	if err := tp.ip(tp.Client, defaultRoute(ul)...); err != nil {
		tp.fatalf("%v", err)
	}
}

// Renumber gives uplink u a new address in its ISP's customer prefix (a new
// lease): the old address goes, the new one and the default route come.
// Uplinks[u] is updated (and Public, for the routed uplink).
func (tp *Topology) Renumber(u Uplink, addr netip.Addr) {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	ul := tp.Uplinks[u]
	np := netip.PrefixFrom(addr, ul.Prefix.Bits())
	if np.Masked() != ul.Prefix.Masked() || addr == ul.Gateway {
		tp.fatalf("renumber %s: %s is not a customer address in %s", u, addr, ul.Prefix.Masked())
	}
	// Old one first: with promote_secondaries off (the default), deleting a
	// primary address also deletes the secondaries of its subnet.
	if err := tp.ip(tp.Client, "addr", "del", ul.Prefix.String(), "dev", ul.Iface); err != nil {
		tp.fatalf("%v", err)
	}
	if err := tp.ip(tp.Client, "addr", "add", np.String(), "dev", ul.Iface); err != nil {
		tp.fatalf("%v", err)
	}
	if err := tp.ip(tp.Client, defaultRoute(ul)...); err != nil {
		tp.fatalf("%v", err)
	}
	tp.mu.Lock()
	tp.Uplinks[u].Addr, tp.Uplinks[u].Prefix = addr, np
	if !ul.NAT {
		tp.Uplinks[u].Public = addr
	}
	tp.mu.Unlock()
}

// IfaceBytes returns the byte counters of interface ifname in ns.
func (tp *Topology) IfaceBytes(ns, ifname string) (rx, tx uint64) {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	rx, tx, err := IfaceBytes(ns, ifname)
	if err != nil {
		tp.fatalf("%v", err)
	}
	return rx, tx
}

// IfaceBytes returns the byte counters of interface ifname in ns.
func IfaceBytes(ns, ifname string) (rx, tx uint64, err error) {
	out, err := run(exec.Command("ip", "-n", ns, "-j", "-s", "link", "show", "dev", ifname), nil)
	if err != nil {
		return 0, 0, err
	}
	var links []struct {
		Stats struct {
			RX struct{ Bytes uint64 } `json:"rx"`
			TX struct{ Bytes uint64 } `json:"tx"`
		} `json:"stats64"`
	}
	if err := json.Unmarshal([]byte(out), &links); err != nil || len(links) != 1 {
		return 0, 0, fmt.Errorf("ip -s link show %s in %s: unexpected output %q: %v", ifname, ns, out, err)
	}
	return links[0].Stats.RX.Bytes, links[0].Stats.TX.Bytes, nil
}

// BCP38Drops returns how many packets ISP u dropped for a source address
// outside its customer prefix.
func (tp *Topology) BCP38Drops(u Uplink) uint64 {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	out, err := tp.nsRun(tp.Uplinks[u].ISP, nil, "nft", "-j", "list", "counter", "ip", bcp38Table, "bcp38")
	if err != nil {
		tp.fatalf("%v", err)
	}
	var doc struct {
		Nftables []struct {
			Counter *struct{ Packets uint64 } `json:"counter"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		tp.fatalf("nft list counter: %v in %q", err, out)
	}
	for _, o := range doc.Nftables {
		if o.Counter != nil {
			return o.Counter.Packets
		}
	}
	tp.fatalf("nft list counter: no counter in %q", out)
	return 0
}
