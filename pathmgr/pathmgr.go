//go:build linux

// Package pathmgr turns the host's uplinks into MPTCP paths: for each
// uplink it keeps a source-routing table, a `from <addr>` rule and an
// in-kernel MPTCP endpoint, so that every subflow leaves through its own
// uplink and its own gateway.
//
// # What mpvpn owns, and what survives a crash
//
// Uplink i (0-based, in configuration order) uses
//
//   - routing table TableBase+i (default 7100+i), holding the uplink's
//     connected prefix, `default via <gw> dev <if>` and an `unreachable
//     default` at the highest metric, so a lookup there never falls through
//     to another table, and so never to another uplink;
//   - rule `from <addr> fwmark <Mark> lookup TableBase+i` at priority
//     RulePrio+i (IPv4, and IPv6 when the uplink has a global IPv6
//     address and an IPv6 default route). It matches mpvpn's own sockets
//     only (every one that binds an uplink's address, the tunnel's and the
//     probes', sets SO_MARK before bind, and MPTCP gives each subflow the
//     socket's mark, the path manager's too: TestSubflowsCarryTheMark,
//     Linux 6.18): an app that binds an uplink's address is routed by
//     the host's rules, and by mpvpn's route-all ladder into the TUN,
//     rather than out of the uplink around the tunnel. Without a Mark
//     (tools that run kernel MPTCP without mpvpn's sockets) the rule is
//     `from <addr> lookup TableBase+i`, matching every socket;
//   - with a Mark, also rule `from <addr> lookup TableBase+i` at priority
//     FallbackPrio+i (default RulePrio+200+i: after routing's ladder in
//     the client's layout, before main). It is for the unmarked packets
//     from the uplink's address that nothing before it routed: replies
//     the kernel sends without a socket, a RST to a late segment of a
//     closed subflow or an ICMP error to a late probe reply, carry no
//     mark (Linux 6.18, net.ipv4.fwmark_reflect=0), and through main they
//     would leave from another uplink with this one's source address,
//     which an ISP that filters sources (BCP 38) drops. In route-all
//     mode routing's ladder takes every unmarked packet into the TUN
//     before this rule, apps bound to the address included;
//   - MPTCP endpoint `<addr> dev <if> subflow [fullmesh] [backup]` on the IPv4
//     address, id chosen by the kernel (the concentrator is reached over
//     IPv4 in this version, and an IPv6 endpoint per uplink would halve the
//     kernel's budget of 8);
//   - net.ipv4.conf.<if>.rp_filter=2 when the effective value was 1
//     (strict reverse-path filtering drops MPTCP joins);
//   - the path manager's limits, raised to what the uplinks need
//     (Config.limits: one subflow per uplink, or SubflowsPerUplink each
//     and the announcements they use).
//
// Tables, rules, endpoints and sysctls live in the kernel, so all of it
// survives a crash of mpvpn (and none of it survives a reboot). Start
// therefore first removes what an earlier run left behind:
//
//   - every route in tables TableBase..TableBase+MaxUplinks-1 (these
//     numbers are mpvpn's by configuration: nothing else may use them);
//   - every rule at a priority in RulePrio..RulePrio+MaxUplinks-1 or
//     FallbackPrio..FallbackPrio+MaxUplinks-1 that looks up one of those
//     tables, with a mark or without (a rule there pointing elsewhere is
//     someone else's and is left alone);
//   - every MPTCP endpoint on a configured uplink's address (it would block
//     the new one anyway: the kernel refuses duplicate addresses), and
//     every endpoint bound to an uplink's interface whose address that
//     interface no longer has (the DHCP lease changed while mpvpn was
//     down). Endpoints carry no owner tag, so an endpoint that an
//     administrator put on an uplink's address is replaced by mpvpn's and
//     removed by Close.
//
// What a crash leaves that Start does not undo: the raised MPTCP limits and
// rp_filter=2 (both harmless, and the next Start treats them as the host's
// own values; the client journals them and undoes them itself).
//
// Cleanup removes the rules and routes above without a Manager, for `mpvpn
// down` and the next start, and the endpoints it can tell are mpvpn's:
// those bound (`dev`) to a configured uplink's interface, flagged `subflow`
// or `subflow backup`, without a port, which is how Start adds them.
// Endpoints carry no owner tag, so one of the same shape that somebody else
// added on an uplink's interface cannot be told apart and is removed too;
// one without `dev`, with other flags or on another interface is left
// alone. (A range of endpoint ids reserved for mpvpn does not help: the
// kernel gives an endpoint added without an id the next id above the
// highest in use, Linux 6.18, so other endpoints land in any range mpvpn
// uses. What would: the client journals each endpoint, id and address,
// before Start adds it, and Cleanup removes only the journalled ones.)
package pathmgr

import (
	"fmt"
	"log/slog"
	"net/netip"
)

// MaxEndpoints is the kernel's MPTCP_PM_ADDR_MAX: at most this many
// endpoints per network namespace, and the highest value either limit
// accepts ("limit greater than maximum"). Unchanged since Linux 5.7.
const MaxEndpoints = 8

// MaxUplinks is the most uplinks pathmgr manages: one MPTCP endpoint each,
// and the kernel holds at most MaxEndpoints per network namespace.
const MaxUplinks = MaxEndpoints

// Defaults for Config.
const (
	DefaultTableBase = 7100
	DefaultRulePrio  = 7100
	// FallbackOffset is how far after RulePrio (a higher number, so
	// later in the rule list) the fallback rules go by default: past
	// routing's 100 priorities, which the client puts at RulePrio+100.
	FallbackOffset = 200
)

// UplinkConfig names one uplink.
type UplinkConfig struct {
	Name   string // interface name, e.g. "wan0"
	Backup bool   // carry data only when no other uplink works
}

// Config says which uplinks to use and which kernel ids are mpvpn's.
type Config struct {
	Uplinks []UplinkConfig
	// TableBase: uplink i uses routing table TableBase+i. mpvpn owns the
	// MaxUplinks tables from TableBase on. 0 means DefaultTableBase.
	TableBase int
	// RulePrio: uplink i's `from <addr>` rule is at priority RulePrio+i.
	// mpvpn owns the MaxUplinks priorities from RulePrio on. 0 means
	// DefaultRulePrio.
	RulePrio int
	// FallbackPrio: with a Mark, uplink i's unmarked `from <addr>` rule
	// is at FallbackPrio+i (see the package comment); it must come after
	// routing's rules. mpvpn owns the MaxUplinks priorities from
	// FallbackPrio on, with a Mark or without. 0 means
	// RulePrio+FallbackOffset.
	FallbackPrio int
	// Mark is the SO_MARK on mpvpn's own sockets (the tunnel's and the
	// probes'); the `from <addr>` rules match it only. 0 makes them
	// match every socket, as before Mark existed: only for tools without
	// mpvpn's marked sockets, never with routing's route-all.
	Mark uint32
	// IPv6: the concentrator is reached over IPv6, so each uplink needs
	// a global IPv6 address and an IPv6 default route (IPv4 is then
	// optional), its MPTCP endpoint is on the IPv6 address, and Status
	// and Uplinks report that address as Addr (and its next hop as
	// Gateway). Otherwise IPv4 is the must, and IPv6 optional.
	IPv6 bool
	// AnyFamily: the concentrator is reachable over both families (it
	// announces its address of the other one: ADD_ADDR), so an uplink
	// needs either; its primary address is of the concentrator's family
	// (IPv6) when it has one, else of the other. Endpoints are then
	// fullmesh, so each pairs with the concentrator's address of its own
	// family, and the connections accept the announcement.
	AnyFamily bool
	// SubflowsPerUplink is how many subflows each uplink opens per
	// connection (0 means 1): one to the concentrator's address and one
	// to each further address or port it announces (ADD_ADDR), as far as
	// the kernel's limits allow (MaxEndpoints subflows beyond a
	// connection's first). Over equal-cost paths, hashing spreads the
	// different 5-tuples over them (the concentrator's --ports).
	SubflowsPerUplink int
	Logger            *slog.Logger // nil: discard
	// Journal, if set, is told each kernel setting pathmgr changes, with
	// its value before, ahead of the change (an error leaves the setting
	// alone and fails Start): kind JournalSysctl, name the sysctl (in
	// path form, "net/ipv4/conf/wan0/rp_filter", as an interface name may
	// hold a dot), or JournalLimits with the MPTCP limits before in
	// Limits.String form. Its tables, rules and endpoints need no entry:
	// Cleanup finds them from the Config.
	Journal func(kind, name, before string) error
	// OnChange, if set, is called by Run (from its goroutine, without
	// locks held) when an uplink's state or address changes, e.g. so the
	// liveness probe follows the uplink's new address.
	OnChange func(Status)
}

// Uplink is one uplink as pathmgr set it up.
type Uplink struct {
	Name       string
	Index      int        // ifindex
	Addr       netip.Addr // the source address subflows and probes leave from: IPv4 (IPv6 with Config.IPv6)
	Gateway    netip.Addr // its next hop; invalid for a point-to-point default (`default dev ppp0`)
	Addr6      netip.Addr // global IPv6 address, if the uplink has one and an IPv6 default route
	Gateway6   netip.Addr // IPv6 next hop (usually link-local), with Addr6
	Table      int
	RulePrio   int
	EndpointID uint8 // the kernel's id for the MPTCP endpoint on Addr
	Backup     bool
}

// String is a one-line summary, e.g. "wan0 192.0.2.2 via 192.0.2.1 table 7100 endpoint 1".
func (u Uplink) String() string {
	via := "direct"
	if u.Gateway.IsValid() {
		via = "via " + u.Gateway.String()
	}
	s := fmt.Sprintf("%s %s %s table %d endpoint %d", u.Name, u.Addr, via, u.Table, u.EndpointID)
	if u.Backup {
		s += " backup"
	}
	return s
}

// limits returns the path manager limits the uplinks need: subflows, how
// many subflows a connection may add to its first, and accept, how many
// of the concentrator's announcements (ADD_ADDR) it acts upon.
//
// With one subflow per uplink: one per uplink besides the first, which
// leaves room for a re-created subflow while the old one is still
// closing, and the concentrator of the other family (AnyFamily) announces
// one address. With n each (SubflowsPerUplink), an uplink opens one to
// the address the connection began on and one to each of n-1 announced
// ports: n-1 announcements (one more with AnyFamily) and uplinks×n
// subflows besides the first, one more again for a re-created subflow.
// The kernel default (2 subflows) is the floor; MaxEndpoints the ceiling
// of both.
func (c *Config) limits() (subflows, accept uint32) {
	var s, a int
	if n := c.SubflowsPerUplink; n > 1 {
		s, a = len(c.Uplinks)*n+1, n-1
		if c.AnyFamily {
			a++
		}
	} else {
		s = len(c.Uplinks)
		if c.AnyFamily {
			a = 2
		}
	}
	s = max(s, 2)
	return uint32(min(s, MaxEndpoints)), uint32(min(a, MaxEndpoints))
}

// fullmesh reports whether the uplinks' endpoints are fullmesh: a subflow
// to every address and port the concentrator announces, not only to the
// one the connection began on. Only where announcements are to be used:
// with one subflow each and one family, a plain `subflow` endpoint, whose
// re-created subflow after an outage joins at once (with fullmesh, in
// TestOutageDuringDownload on Linux 6.18, 2026-12-03, the uplink carried
// again only after some 4 s).
func (c *Config) fullmesh() bool {
	return c.AnyFamily || c.SubflowsPerUplink > 1
}

// ownedTable reports whether table t is in mpvpn's range.
func (c *Config) ownedTable(t int) bool {
	return t >= c.TableBase && t < c.TableBase+MaxUplinks
}

// ownedPrio reports whether priority p is in mpvpn's range.
func (c *Config) ownedPrio(p int) bool {
	return (p >= c.RulePrio && p < c.RulePrio+MaxUplinks) || (p >= c.FallbackPrio && p < c.FallbackPrio+MaxUplinks)
}

// reservedTables are the kernel's own: unspec, default, main, local.
var reservedTables = []int{0, 253, 254, 255}

// checkIDs fills in the default table base and priority and validates
// them: all that Cleanup needs.
func (c *Config) checkIDs() error {
	if c.TableBase == 0 {
		c.TableBase = DefaultTableBase
	}
	if c.RulePrio == 0 {
		c.RulePrio = DefaultRulePrio
	}
	if c.TableBase < 0 || int64(c.TableBase) > 1<<32-1-MaxUplinks {
		return fmt.Errorf("table base %d: want 1 to %d", c.TableBase, int64(1<<32-1-MaxUplinks))
	}
	for _, r := range reservedTables {
		if c.ownedTable(r) {
			return fmt.Errorf("tables %d-%d include the kernel's table %d; choose another table base", c.TableBase, c.TableBase+MaxUplinks-1, r)
		}
	}
	// Priority 0 is the `local` rule and 32766 the `main` one: a rule
	// after main would never see the packets it is for.
	if c.RulePrio < 1 || c.RulePrio+MaxUplinks-1 >= 32766 {
		return fmt.Errorf("rule priority %d: want 1 to %d, so mpvpn's rules come before the main table's (32766)", c.RulePrio, 32766-MaxUplinks)
	}
	if c.FallbackPrio == 0 {
		c.FallbackPrio = c.RulePrio + FallbackOffset
	}
	if c.FallbackPrio < c.RulePrio+MaxUplinks || c.FallbackPrio+MaxUplinks-1 >= 32766 {
		return fmt.Errorf("fallback rule priority %d: want %d to %d, after the marked rules (%d-%d) and before the main table's (32766)",
			c.FallbackPrio, c.RulePrio+MaxUplinks, 32766-MaxUplinks, c.RulePrio, c.RulePrio+MaxUplinks-1)
	}
	return nil
}

// check fills in defaults and validates what can be checked without
// looking at the host.
func (c *Config) check() error {
	if err := c.checkIDs(); err != nil {
		return err
	}
	switch n := len(c.Uplinks); {
	case n == 0:
		return fmt.Errorf("no uplinks configured")
	case n > MaxUplinks:
		return fmt.Errorf("%d uplinks configured: the kernel holds at most %d MPTCP endpoints, so at most %d uplinks (uplink %q is one too many)",
			n, MaxEndpoints, MaxUplinks, c.Uplinks[MaxUplinks].Name)
	}
	seen := map[string]bool{}
	for _, u := range c.Uplinks {
		if u.Name == "" {
			return fmt.Errorf("an uplink has no interface name")
		}
		if seen[u.Name] {
			return fmt.Errorf("uplink %s: listed twice", u.Name)
		}
		seen[u.Name] = true
	}
	return nil
}
