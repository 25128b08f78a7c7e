//go:build linux

// Package routing decides what enters the TUN: this first version routes
// the configured prefixes (--route) into it.
//
// # What mpvpn owns, and what survives a crash
//
//   - routing table Table (default 7200), holding `<prefix> dev <tun>` for
//     each configured prefix;
//   - rule `not fwmark <Mark> lookup <Table>` at priority RulePrio (default
//     7200), for each address family that has a prefix.
//
// The rule is what keeps mpvpn from routing into itself: its own sockets
// (the MPTCP connections to the concentrator, whose subflows all inherit
// the socket's SO_MARK) skip the TUN table even when a configured prefix
// covers the concentrator, and are routed by the host's tables as usual.
//
// Tables and rules live in the kernel and survive a crash of mpvpn (though
// a TUN device's routes vanish with the device). Apply therefore first
// removes every route in Table and every rule at RulePrio that looks up
// Table; Close removes what Apply added.
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

// Config says what to route into the TUN.
type Config struct {
	TUN    string         // interface name, e.g. "mpvpn0"; must exist and be up
	Routes []netip.Prefix // --route: destinations carried by mpvpn
	// Mark is the SO_MARK on mpvpn's own sockets; marked packets never
	// enter the TUN. Must not be 0.
	Mark     uint32
	Table    int          // 0 means DefaultTable
	RulePrio int          // 0 means DefaultRulePrio
	Logger   *slog.Logger // nil: discard
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

// check fills in defaults and validates the configuration.
func (c *Config) check() error {
	if c.Table == 0 {
		c.Table = DefaultTable
	}
	if c.RulePrio == 0 {
		c.RulePrio = DefaultRulePrio
	}
	if c.TUN == "" {
		return fmt.Errorf("no TUN interface named")
	}
	if c.Mark == 0 {
		return fmt.Errorf("fwmark 0 cannot tell mpvpn's own sockets apart: set a mark")
	}
	for _, r := range reservedTables {
		if c.Table == r {
			return fmt.Errorf("table %d is the kernel's own; choose another", c.Table)
		}
	}
	if c.Table < 0 || int64(c.Table) > 1<<32-1 {
		return fmt.Errorf("table %d: want 1 to %d", c.Table, int64(1<<32-1))
	}
	if c.RulePrio < 1 || c.RulePrio >= 32766 {
		return fmt.Errorf("rule priority %d: want 1 to 32765, so the rule comes before the main table's (32766)", c.RulePrio)
	}
	if len(c.Routes) == 0 {
		return fmt.Errorf("no routes: name the destinations (CIDRs) to carry through mpvpn")
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
	return nil
}

func checkPrefix(p netip.Prefix) error {
	if !p.IsValid() {
		return fmt.Errorf("route %q is not a valid prefix", p)
	}
	if p.Addr().Is4In6() {
		return fmt.Errorf("route %s: write IPv4 prefixes in IPv4 form (%s)", p, netip.PrefixFrom(p.Addr().Unmap(), max(p.Bits()-96, 0)))
	}
	if p.Masked() != p {
		return fmt.Errorf("route %s has host bits set; did you mean %s?", p, p.Masked())
	}
	if p.Bits() == 0 {
		return fmt.Errorf("route %s covers everything; sending all traffic through mpvpn needs route-all mode, which this version lacks", p)
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
