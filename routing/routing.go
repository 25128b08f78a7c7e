//go:build linux

// Package routing decides what enters the TUN: the configured prefixes
// (split tunnelling, --route), or everything (route-all, as wg-quick and
// Tailscale do it on Linux), minus excluded destinations, the LAN if
// allowed, and what per-app marks send around the tunnel; and it keeps
// mpvpn's own sockets out of the TUN in every mode.
//
// # The rule ladder
//
// Everything is decided by policy rules at a documented base priority P
// (RulePrio, default 7200; mpvpn owns P..P+99 in both address families)
// and one routing table T (Table, default 7200). The same ladder is
// installed for IPv4 and IPv6; a rule whose mark is 0 (unused) is left
// out, and so are the rules of a mode that is off.
//
//	prio  selector              action                        why
//	----  --------------------  ----------------------------  ------------------------------------------
//	P+0   fwmark Mark           lookup main                   mpvpn's own sockets (tunnel connections,
//	                                                          probes) follow the host's routes ...
//	P+1   fwmark Mark           unreachable                   ... and stop here when main has no route,
//	                                                          so they can never loop into the TUN.
//	P+2   fwmark DirectMark     lookup main                   an app the firewall marked "direct" never
//	P+3   fwmark DirectMark     unreachable                   enters the TUN, not even when main has no
//	                                                          route (then it is unreachable).
//	P+4   fwmark TunnelMark     lookup T                      an app marked "tunnel" always enters it:
//	                                                          T holds a default route into the TUN
//	                                                          whenever TunnelMark is set, split mode too;
//	P+5   fwmark TunnelMark     unreachable                   when the TUN is gone (its routes go with
//	                                                          the device), it is dropped, never sent
//	                                                          out in the clear through main.
//	P+10  to <each Exclude>     lookup main                   excluded destinations go around the TUN in
//	P+11  to <each Exclude>     unreachable                   every mode, whatever route covers them;
//	                                                          with no route in main they are dropped.
//	P+15  to <each Pinned>      lookup T                      mpvpn's resolver addresses enter the TUN
//	                                                          even when a LAN route in main covers them.
//	P+20  all                   lookup main                   RouteAll with AllowLAN: every route in main
//	                            suppress_prefixlength 0       but a default one (connected networks, a
//	                                                          LAN's own routes) wins over the TUN.
//	P+30  all                   lookup T                      RouteAll: everything else enters the TUN.
//	P+30  all                   lookup T                      split: only the Routes do; T's default
//	                            suppress_prefixlength 0       route (there for TunnelMark) is ignored,
//	                                                          so the rest falls through to main.
//
// Table T holds `<prefix> dev <TUN>` for each of Routes, and `default dev
// <TUN>` (IPv4 and IPv6) with RouteAll or a TunnelMark.
//
// Above the ladder, at 7100+i, sit pathmgr's per-uplink rules, `from
// <uplink address> fwmark Mark lookup <uplink table>`: they match
// mpvpn's own sockets only, so an app that binds an uplink's address is
// routed by this ladder (into the TUN with RouteAll) and does not leave
// outside the tunnel. mpvpn's own unbound sockets reach P+0. Below it, at
// 7300+i, pathmgr's unmarked `from <uplink address> lookup <uplink
// table>` catches what the ladder let through from an uplink's address
// (in split mode; with RouteAll P+30 takes everything first), so that
// the kernel's socketless replies (RSTs, ICMP errors), which carry no
// mark, still leave through the uplink that owns their source address.
//
// Why Exclude is a pair of rules rather than `throw` routes in T: the
// ladder then states the precedence outright (marks, then Exclude, then
// the LAN, then the TUN), an excluded prefix wins over any Route however
// long, and a tunnel-marked app still reaches an excluded destination
// through the TUN (a throw in T would send it to P+5, unreachable). The
// price is a linear walk over the excluded prefixes for unmarked packets,
// which is fine for the tens of prefixes a person types.
//
// Marks are matched exactly (mask 0xffffffff): the firewall must set the
// whole mark, not OR bits into one.
//
// What the routing layer cannot stop (the firewall's kill switch must):
//
//   - A socket bound to an interface (SO_BINDTODEVICE, IP_UNICAST_IF:
//     DHCP clients, `ping -I wan0`) is only given routes through that
//     interface, so it skips T's routes into the TUN and leaves through
//     main. For IPv4 it is worse: when no rule finds a route for such a
//     socket, the kernel takes the destination for on-link and sends it
//     out of the bound interface anyway (ip_route_output_key_hash_rcu,
//     Linux 6.18), so the unreachable rules do not stop it either, not
//     even for a TunnelMark'ed app. IPv6 does answer unreachable.
//   - After a crash the TUN is gone and T's routes with it: unmarked
//     traffic falls through to main until Cleanup runs (TunnelMark'ed
//     traffic stays unreachable).
//   - AllowLAN trusts every non-default route in main: a network that
//     hands out a "LAN" covering public addresses (TunnelCrack's LocalNet,
//     e.g. routes pushed by DHCP option 121) takes those destinations out
//     of the tunnel.
//
// # What mpvpn owns, and what survives a crash
//
// Every rule and route this package adds carries the rtnetlink protocol
// number Protocol (`proto 109` in `ip rule` and `ip route`). It owns:
//
//   - the rules at priorities P..P+99 that carry Protocol, and the ones
//     there that look up T (an earlier version wrote `not fwmark Mark
//     lookup T` at P without the protocol);
//   - the routes in T that carry Protocol.
//
// Anything else, even at those priorities or in that table, is someone
// else's: CheckHost refuses to start next to it, and Cleanup never
// removes it.
//
// Tables and rules live in the kernel and survive a crash of mpvpn (a TUN
// device's routes vanish with the device). Apply therefore first removes
// what an earlier run left, Close removes what Apply added, and Cleanup
// removes all of it without a Router, for `mpvpn down` and the next start.
package routing

import (
	"fmt"
	"log/slog"
	"net/netip"
)

// Defaults for Config.
const (
	DefaultTable    = 7200
	DefaultRulePrio = 7200
)

// PrioRange is how many rule priorities mpvpn owns from RulePrio on.
const PrioRange = 100

// Protocol is the rtnetlink protocol number on every rule and route this
// package adds: how Cleanup and CheckHost tell them from anybody else's.
// Linux stores a rule's protocol since 4.17 (FRA_PROTOCOL) and, when a
// delete request names one, only deletes a rule that has it, so deleting
// mpvpn's rule cannot take a look-alike of someone else's. 109 is neither
// one of the kernel's RTPROT_* (Linux 6.18) nor in iproute2's rt_protos
// (6.1), checked 2026-12.
const Protocol = 109

// Offsets of the ladder's rules from RulePrio (see the package comment).
const (
	prioOwn          = 0
	prioOwnStop      = 1
	prioDirect       = 2
	prioDirectStop   = 3
	prioTunnel       = 4
	prioTunnelStop   = 5
	prioExclude      = 10
	prioExcludeStop  = 11
	prioPinned       = 15
	prioLAN          = 20
	prioTUN          = 30
	tableMain        = 254
	suppressDefaults = 0 // suppress_prefixlength 0: ignore /0 routes
)

// Config says what to route into the TUN. The zero values of RouteAll,
// Exclude, AllowLAN, DirectMark and TunnelMark give split tunnelling of
// Routes, as before they existed.
type Config struct {
	TUN string // interface name, e.g. "mpvpn0"; must exist and be up
	// Routes (--route) are carried by mpvpn. Without RouteAll they are
	// all that is (split tunnelling); with it they add nothing.
	Routes []netip.Prefix
	// RouteAll sends everything, IPv4 and IPv6, into the TUN, but what
	// the rules before it send elsewhere (see the package comment).
	RouteAll bool
	// Exclude lists destinations that never enter the TUN, in any mode:
	// they follow the main table (and are unreachable if it has no
	// route). Only a TunnelMark'ed app's packets still enter the TUN.
	Exclude []netip.Prefix
	// Pinned are destinations that always enter the TUN, ahead of the
	// LAN (mpvpn's resolver addresses: a LAN that covers them must not
	// take their queries in clear). Each must also be one of Routes.
	Pinned []netip.Prefix
	// AllowLAN, with RouteAll, keeps the host's directly connected
	// networks (every route in main but a default one) outside the
	// tunnel. Without it they too enter the TUN.
	AllowLAN bool
	// Mark is the SO_MARK on mpvpn's own sockets; marked packets never
	// enter the TUN. Must not be 0.
	Mark uint32
	// DirectMark (0: unused) marks packets that must never enter the
	// TUN: they follow main, and are unreachable if it has no route.
	DirectMark uint32
	// TunnelMark (0: unused) marks packets that always enter the TUN,
	// every destination, in split mode too; with the TUN gone they are
	// unreachable.
	TunnelMark uint32
	Table      int          // 0 means DefaultTable
	RulePrio   int          // 0 means DefaultRulePrio; mpvpn owns RulePrio..RulePrio+PrioRange-1
	Logger     *slog.Logger // nil: discard
}

// reservedTables are the kernel's own: unspec, default, main, local.
var reservedTables = []int{0, 253, 254, 255}

// nonsense are ranges a route into the TUN cannot mean anything for: the
// kernel answers loopback from the local table first, link-local and
// multicast never leave the link, and a tunnel carries TCP flows, which
// none of these are.
var nonsense = []struct {
	p    netip.Prefix
	what string
}{
	{netip.MustParsePrefix("127.0.0.0/8"), "loopback"},
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local"},
	{netip.MustParsePrefix("224.0.0.0/4"), "multicast"},
	{netip.MustParsePrefix("255.255.255.255/32"), "broadcast"},
	{netip.MustParsePrefix("::1/128"), "loopback"},
	{netip.MustParsePrefix("fe80::/10"), "link-local"},
	{netip.MustParsePrefix("ff00::/8"), "multicast"},
}

// Validate checks the configuration without looking at the host: what
// Apply would refuse before it changes anything. CheckHost looks at the
// host.
func (c Config) Validate() error {
	if err := c.check(); err != nil {
		return fmt.Errorf("routing: %w", err)
	}
	return nil
}

// checkIDs fills in the default table and priority and validates them:
// all that Cleanup and CheckHost need.
func (c *Config) checkIDs() error {
	if c.Table == 0 {
		c.Table = DefaultTable
	}
	if c.RulePrio == 0 {
		c.RulePrio = DefaultRulePrio
	}
	for _, r := range reservedTables {
		if c.Table == r {
			return fmt.Errorf("table %d is the kernel's own; choose another", c.Table)
		}
	}
	if c.Table < 0 || int64(c.Table) > 1<<32-1 {
		return fmt.Errorf("table %d: want 1 to %d", c.Table, int64(1<<32-1))
	}
	// Priority 0 is the `local` rule and 32766 the `main` one: a rule
	// after main would never see the packets it is for.
	if c.RulePrio < 1 || c.RulePrio+PrioRange-1 >= 32766 {
		return fmt.Errorf("rule priority %d: want 1 to %d, so mpvpn's %d priorities come before the main table's rule (32766)",
			c.RulePrio, 32766-PrioRange, PrioRange)
	}
	return nil
}

// ownsPrio reports whether priority p is in mpvpn's range.
func (c *Config) ownsPrio(p int) bool {
	return p >= c.RulePrio && p < c.RulePrio+PrioRange
}

// check fills in defaults and validates the configuration.
func (c *Config) check() error {
	if err := c.checkIDs(); err != nil {
		return err
	}
	if c.TUN == "" {
		return fmt.Errorf("no TUN interface named")
	}
	if c.Mark == 0 {
		return fmt.Errorf("fwmark 0 cannot tell mpvpn's own sockets apart: set a mark")
	}
	switch {
	case c.DirectMark != 0 && c.DirectMark == c.Mark:
		return fmt.Errorf("direct mark %#x is also the mark of mpvpn's own sockets; choose another", c.DirectMark)
	case c.TunnelMark != 0 && c.TunnelMark == c.Mark:
		return fmt.Errorf("tunnel mark %#x is also the mark of mpvpn's own sockets; choose another", c.TunnelMark)
	case c.TunnelMark != 0 && c.TunnelMark == c.DirectMark:
		return fmt.Errorf("tunnel mark and direct mark are both %#x; choose two", c.TunnelMark)
	}
	if c.AllowLAN && !c.RouteAll {
		return fmt.Errorf("allowing the LAN needs route-all: in split mode only the listed routes enter the TUN (list none that covers the LAN)")
	}
	if !c.RouteAll && len(c.Routes) == 0 && c.TunnelMark == 0 {
		return fmt.Errorf("no routes: name the destinations (CIDRs) to carry through mpvpn, or route all traffic")
	}
	seen := map[netip.Prefix]bool{}
	for _, p := range c.Routes {
		if err := checkPrefix(p); err != nil {
			return err
		}
		if seen[p] {
			return fmt.Errorf("route %s is listed twice", p)
		}
		seen[p] = true
	}
	for _, p := range c.Pinned {
		if !seen[p] {
			return fmt.Errorf("pinned %s is not one of the routes", p)
		}
	}
	excluded := map[netip.Prefix]bool{}
	for _, p := range c.Exclude {
		if err := checkExclude(p); err != nil {
			return err
		}
		if excluded[p] {
			return fmt.Errorf("excluded %s is listed twice", p)
		}
		excluded[p] = true
		for _, r := range c.Routes {
			if r.Bits() >= p.Bits() && p.Contains(r.Addr()) {
				return fmt.Errorf("route %s lies inside excluded %s: none of it would enter the TUN", r, p)
			}
		}
	}
	return nil
}

// checkForm is what every prefix must be: valid, IPv4 in IPv4 form, no
// host bits.
func checkForm(what string, p netip.Prefix) error {
	if !p.IsValid() {
		return fmt.Errorf("%s %q is not a valid prefix", what, p)
	}
	if p.Addr().Is4In6() {
		return fmt.Errorf("%s %s: write IPv4 prefixes in IPv4 form (%s)", what, p, netip.PrefixFrom(p.Addr().Unmap(), max(p.Bits()-96, 0)))
	}
	if p.Masked() != p {
		return fmt.Errorf("%s %s has host bits set; did you mean %s?", what, p, p.Masked())
	}
	return nil
}

func checkPrefix(p netip.Prefix) error {
	if err := checkForm("route", p); err != nil {
		return err
	}
	if p.Bits() == 0 {
		return fmt.Errorf("route %s covers everything; to send all traffic through mpvpn use route-all mode", p)
	}
	if p.Addr().IsUnspecified() && p.Bits() == p.Addr().BitLen() {
		return fmt.Errorf("route %s is the unspecified address", p)
	}
	for _, n := range nonsense {
		if p.Bits() >= n.p.Bits() && n.p.Contains(p.Addr()) {
			return fmt.Errorf("route %s is %s (%s): it cannot be carried through a tunnel", p, n.what, n.p)
		}
	}
	return nil
}

// checkExclude accepts link-local and the like (169.254.169.254, a cloud's
// metadata service, is a good thing to exclude from route-all), but not
// everything.
func checkExclude(p netip.Prefix) error {
	if err := checkForm("excluded", p); err != nil {
		return err
	}
	if p.Bits() == 0 {
		return fmt.Errorf("excluded %s covers everything: nothing would enter the TUN", p)
	}
	return nil
}

// defaultIntoTUN reports whether T holds default routes into the TUN.
func (c *Config) defaultIntoTUN() bool { return c.RouteAll || c.TunnelMark != 0 }
