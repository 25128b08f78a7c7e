//go:build linux

// Package firewall keeps mpvpn's two nftables tables: the per-app rules
// (table inet mpvpn), which mark an application's packets so that the ip
// rules of the routing package send them into the TUN, past it, or nowhere,
// and the kill switch (table inet mpvpn-killswitch), which rejects whatever
// would leave the machine outside the tunnel. It talks netlink through
// github.com/google/nftables and never runs `nft`.
//
// # Marks (the contract with the routing package)
//
//   - Own = Config.Mark (default 0x6d70): the SO_MARK on mpvpn's own sockets
//     (the MPTCP connections to the concentrator, the probes). This package
//     never changes a packet that carries it, and the kill switch lets it out.
//   - Direct = Own+1: the packet must not enter the TUN; routing's rule sends
//     it to the main table.
//   - Tunnel = Own+2: the packet must enter the TUN.
//
// The routing package adds the ip rules that act on the marks; this package
// only sets them.
//
// # Per-app rules: table inet mpvpn
//
// One base chain of type route at hook output. A route chain is what makes a
// mark set here count: the kernel remembers the packet's mark, addresses and
// TOS before the chain runs and, if the chain accepted the packet and any of
// them changed, looks the route up again with the new mark
// (nf_route_table_hook4/6 → ip_route_me_harder/ip6_route_me_harder,
// net/netfilter/nft_chain_route.c; read 2026-12, Linux 6.18; the same since
// nftables' first route chains in 3.13). A filter chain would set the mark
// after the routing decision was made, and it would change nothing.
//
// The rules are tried in the order given and the first match wins. They
// match the socket's owner (`meta skuid`: the fsuid of the process that
// created the socket) or its cgroup v2 (`socket cgroupv2 level N <id>`,
// whose id the cgroup package resolves: the cgroup must exist when the rule
// is added, see package cgroup). Before them, three kinds of packets are
// accepted untouched: those carrying the Own mark; those to the machine
// itself (output interface lo: nothing to route); and NDP and MLD, which the
// kernel sends from sockets of its own that a rule for uid 0 or the root
// cgroup would otherwise match and re-route away from the link. A rule for
// uid 0 or the root cgroup still matches the kernel's TCP resets and ICMP
// errors (Apply warns).
//
// Block is a reject, never a silent drop, so an app learns at once: TCP gets
// a reset (connect() fails with ECONNREFUSED), everything else an ICMP
// administratively-prohibited error (IPv4 code 13, IPv6 type 1 code 1). For
// UDP the send itself fails with EPERM (a rejected packet is a dropped one
// for the sending socket), and a connected socket's next receive reports
// EHOSTUNREACH (IPv4) or EACCES (IPv6) from the ICMP error.
//
// Rerouting keeps the source address the socket chose before the mark was
// set. With route-all, an unmarked socket's source is the TUN's address;
// rerouted out of an uplink as Direct it would leave with an address the
// uplink cannot answer. So when there is a direct rule, a nat chain at
// postrouting masquerades Direct-marked packets whose source is not an
// address of their output interface (`fib saddr . oif type != local`). That
// turns on conntrack in the namespace. Tunnel-marked packets need nothing of
// the kind: they end in mpvpn's own stack, which answers any source (its
// answers to an uplink's address then arrive on the TUN, which the
// reverse-path filter must let in: routing's business).
//
// # Kill switch: table inet mpvpn-killswitch
//
// Filter chains at output and forward, after the per-app route chain (so
// they see its marks and the re-routed output interface). Allowed out, in
// this order: loopback; the TUN (by name, so the rule holds before the
// device exists and after it is gone); the Own and Direct marks; DHCPv4
// client messages (UDP 68 to 67, to any address: a renewal is unicast to
// the server, and only root can bind port 68) and DHCPv6 ones (UDP 546 to
// 547 from a link-local address); NDP (router and neighbour solicitation and
// advertisement, redirect) with hop limit 255, which cannot be routed; MLD
// reports with hop limit 1 (not in Mullvad's list: without them a switch
// that snoops MLD stops delivering the neighbour solicitations NDP needs);
// and, when the LAN is allowed, the LAN prefixes, link-local multicast and
// the limited broadcast, except DNS (port 53, TCP and UDP), which is
// rejected even to the LAN (SECURITY.md §6 tests 20 and 23). Everything else
// is rejected as block is (TCP reset, ICMP admin-prohibited), so an app's
// new connection fails at once instead of hanging. The kill switch covers
// IPv4 and IPv6 alike.
//
// A crash is the case it is for: the TUN device disappears with the process,
// its routes go with it, and packets that would have entered it fall through
// to the main table, out of an uplink, unmarked: the output chain rejects
// them there. The Tunnel mark does not let a packet out either: with no TUN,
// routing's rules make it unreachable, and should they be missing too it
// ends on an uplink and is rejected here.
//
// Forward: a machine that routes for a LAN (a router in front of it) must not
// leak its clients' traffic either. Forwarded packets may enter the TUN or
// come out of it (its replies to the LAN's flows), may carry the Direct
// mark, and may go to the allowed LAN; everything else forwarded is
// rejected. The reject goes back to the LAN client as an output packet of
// this machine, so it passes only when the LAN is allowed: a router's own
// LAN must be among the allowed prefixes, or its clients see timeouts
// instead of resets.
//
// Input is not filtered, deliberately: the kill switch is about what leaves
// the machine, and every answer to an inbound packet is an output packet that
// passes the same checks. Filtering input would add no protection against a
// leak and would break the host's own inbound traffic (DHCP and RA replies,
// SSH from the LAN, the concentrator's replies to mpvpn's sockets, which
// carry no mark). Inbound probes of the TUN address from the LAN
// (CVE-2019-14899) are a matter of the reverse-path filter, not of this
// table.
//
// The LAN prefixes come from the network (a DHCP server hands them out), and
// a rogue one can hand out a "LAN" that covers public addresses to pull
// traffic out of the tunnel (TunnelCrack LocalNet, SECURITY.md §4.2). So
// only prefixes inside the private and link-local ranges (10/8, 172.16/12,
// 192.168/16, 169.254/16, fc00::/7, fe80::/10) are allowed; others are left
// out, with a warning. mpvpn's own traffic is let out by its mark, not by
// the concentrator's address, so a spoofed concentrator address exempts no
// app's traffic (TunnelCrack ServerIP).
//
// # What survives, and atomicity
//
// nftables tables are kernel state of the network namespace and outlive the
// process that made them (mpvpn sets no NFT_TABLE_F_OWNER flag, which would
// tie a table to its netlink socket). That is what keeps the kill switch in
// force when the client crashes or is killed, until the client starts again
// (Apply replaces it) or `mpvpn down` removes it (Cleanup). The per-app table
// survives too, and does no harm: with no TUN its Tunnel-marked packets are
// rejected by the kill switch.
//
// Every change is one nftables transaction (one netlink batch, which the
// kernel commits whole or not at all): Apply and Update replace both tables
// together, with no moment in which the old kill switch is gone and the new
// one not yet in force. A table is replaced by `add table` (create if
// absent), `delete table`, then the new contents, so the batch needs no
// knowledge of what is there. Close removes the per-app table only;
// RemoveKillSwitch the kill switch; Cleanup, with no Firewall, both. None of
// them touches any other table.
//
// Not handled: somebody else flushing the ruleset (`nft flush ruleset`)
// removes both tables silently (SECURITY.md §6 test 21); packets sent
// without a full socket (TCP time-wait ACKs, kernel-made resets) are not
// matched by uid or cgroup and follow the unmarked route; a route chain of
// somebody else's at a later priority could re-route a packet after the kill
// switch has judged it.
package firewall

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"strconv"
	"strings"

	"github.com/mpvpn/mpvpn/cgroup"
)

// Table names. They are mpvpn's: Cleanup removes exactly these.
const (
	PerAppTable     = "mpvpn"
	KillSwitchTable = "mpvpn-killswitch"
)

// DefaultMark is the Own mark mpvpn's sockets carry unless configured.
const DefaultMark = 0x6d70

// DirectMark is the mark of packets that must not enter the TUN.
func DirectMark(own uint32) uint32 { return own + 1 }

// TunnelMark is the mark of packets that must enter the TUN.
func TunnelMark(own uint32) uint32 { return own + 2 }

// Action is what a rule does with the packets it matches.
type Action int

// The actions.
const (
	Tunnel Action = iota + 1 // mark Tunnel: through the TUN
	Direct                   // mark Direct: past the TUN, main table
	Block                    // reject
)

func (a Action) String() string {
	switch a {
	case Tunnel:
		return "tunnel"
	case Direct:
		return "direct"
	case Block:
		return "block"
	}
	return "Action(" + strconv.Itoa(int(a)) + ")"
}

// ParseAction reads "tunnel", "direct" or "block".
func ParseAction(s string) (Action, error) {
	for _, a := range []Action{Tunnel, Direct, Block} {
		if s == a.String() {
			return a, nil
		}
	}
	return 0, fmt.Errorf("unknown action %q: want tunnel, direct or block", s)
}

// Selector says whose packets a rule matches: a socket owner's uid, or a
// cgroup v2. Make one with UID or Cgroup.
type Selector struct {
	kind   selectorKind
	uid    uint32
	cgroup string
}

type selectorKind int

const (
	selUID selectorKind = iota + 1
	selCgroup
)

// UID matches sockets created by a process whose fsuid was uid. A user
// name is the caller's to resolve.
func UID(uid uint32) Selector { return Selector{kind: selUID, uid: uid} }

// Cgroup matches sockets created in the cgroup v2 at path (relative to the
// cgroup2 mount, e.g. "/system.slice/backup.service") or below it.
func Cgroup(path string) Selector { return Selector{kind: selCgroup, cgroup: path} }

func (s Selector) String() string {
	switch s.kind {
	case selUID:
		return "uid " + strconv.FormatUint(uint64(s.uid), 10)
	case selCgroup:
		return "cgroup " + s.cgroup
	}
	return "no selector"
}

// Rule is one per-app rule.
type Rule struct {
	Selector Selector
	Action   Action
}

func (r Rule) String() string { return r.Selector.String() + " " + r.Action.String() }

// KillSwitch configures the kill switch.
type KillSwitch struct {
	TUN      string         // the TUN interface's name, e.g. "mpvpn0"; need not exist
	AllowLAN bool           // let the machine reach LAN below
	LAN      []netip.Prefix // the connected prefixes (only private and link-local ones are used)
}

// Config is the whole firewall state: the per-app rules and the kill switch.
type Config struct {
	// Mark is the Own mark (SO_MARK of mpvpn's sockets); Direct and Tunnel
	// are Mark+1 and Mark+2. Must not be 0.
	Mark uint32
	// Rules are tried in order; the first match wins. None: no per-app
	// table. The cgroups of `mpvpn exec` (cgroup.Tree.Path) take rules like
	// any other; put them first, so that an explicit `mpvpn exec` wins over
	// a rule for the user who ran it.
	Rules []Rule
	// KillSwitch, if not nil, is put in force; nil removes one left by an
	// earlier run.
	KillSwitch *KillSwitch
	// CgroupMount is the cgroup2 mount cgroup rules are relative to; ""
	// finds it (cgroup.Mount) when a rule needs it.
	CgroupMount string
	Logger      *slog.Logger // nil: discard
}

// resolved is a validated Config with cgroups resolved to ids.
type resolved struct {
	own, direct, tunnel uint32
	rules               []resolvedRule
	ks                  *resolvedKS
}

type resolvedRule struct {
	Rule
	n      int // 1-based position in Config.Rules
	cgroup cgroup.Cgroup
}

type resolvedKS struct {
	tun string
	lan []netip.Prefix // allowed prefixes, nil when the LAN is not allowed
}

// privateRanges are where an allowed LAN prefix must lie (see the package
// comment on TunnelCrack LocalNet).
var privateRanges = []netip.Prefix{
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("fc00::/7"),
	netip.MustParsePrefix("fe80::/10"),
}

func private(p netip.Prefix) bool {
	for _, r := range privateRanges {
		if r.Addr().BitLen() == p.Addr().BitLen() && p.Bits() >= r.Bits() && r.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

// resolve validates cfg and resolves its cgroups. It touches nothing.
func (cfg *Config) resolve(log *slog.Logger) (*resolved, error) {
	if cfg.Mark == 0 {
		return nil, errors.New("fwmark 0 cannot tell mpvpn's own sockets apart: set a mark")
	}
	if cfg.Mark > math.MaxUint32-2 {
		return nil, fmt.Errorf("mark %#x: Direct and Tunnel (mark+1, mark+2) must fit in 32 bits", cfg.Mark)
	}
	r := &resolved{own: cfg.Mark, direct: DirectMark(cfg.Mark), tunnel: TunnelMark(cfg.Mark)}
	seen := map[string]int{}
	mount := cfg.CgroupMount
	for i, rule := range cfg.Rules {
		n := i + 1
		switch rule.Action {
		case Tunnel, Direct, Block:
		default:
			return nil, fmt.Errorf("rule %d (%s): no action: want tunnel, direct or block", n, rule.Selector)
		}
		rr := resolvedRule{Rule: rule, n: n}
		switch rule.Selector.kind {
		case selUID:
			if rule.Selector.uid == math.MaxUint32 {
				return nil, fmt.Errorf("rule %d: uid %d is the invalid uid (-1)", n, rule.Selector.uid)
			}
			if rule.Selector.uid == 0 {
				log.Warn("a rule for uid 0 also matches packets the kernel sends from its own sockets (TCP resets, ICMP errors)", "rule", n)
			}
		case selCgroup:
			if mount == "" {
				m, err := cgroup.Mount()
				if err != nil {
					return nil, fmt.Errorf("rule %d (%s): %w", n, rule.Selector, err)
				}
				mount = m
			}
			c, err := cgroup.Resolve(mount, rule.Selector.cgroup)
			if err != nil {
				return nil, fmt.Errorf("rule %d (%s): %w (nftables matches a cgroup by its id, so it must exist before the rule is added)", n, rule.Selector, err)
			}
			rr.cgroup = c
			rr.Selector.cgroup = c.Path
			if c.Level == 0 {
				log.Warn("a rule for the root cgroup matches every socket, the kernel's own included (TCP resets, ICMP errors)", "rule", n)
			}
		default:
			return nil, fmt.Errorf("rule %d: no selector: want a uid or a cgroup", n)
		}
		key := rr.Selector.String()
		if m, dup := seen[key]; dup {
			return nil, fmt.Errorf("rule %d repeats the selector of rule %d (%s); the first match wins, so it would never apply", n, m, key)
		}
		seen[key] = n
		r.rules = append(r.rules, rr)
	}
	if ks := cfg.KillSwitch; ks != nil {
		if err := checkIfname(ks.TUN); err != nil {
			return nil, fmt.Errorf("kill switch: TUN: %w", err)
		}
		rks := &resolvedKS{tun: ks.TUN}
		if ks.AllowLAN {
			rks.lan = []netip.Prefix{}
			dup := map[netip.Prefix]bool{}
			for _, p := range ks.LAN {
				if !p.IsValid() {
					return nil, fmt.Errorf("kill switch: LAN prefix %q is not valid", p)
				}
				if p.Addr().Is4In6() && p.Bits() >= 96 {
					p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
				}
				p = p.Masked()
				if !private(p) {
					log.Warn("kill switch: a LAN prefix outside the private and link-local ranges is not allowed (a rogue network could use it to pull traffic out of the tunnel)", "prefix", p.String())
					continue
				}
				if !dup[p] {
					dup[p] = true
					rks.lan = append(rks.lan, p)
				}
			}
		}
		r.ks = rks
	}
	return r, nil
}

// checkIfname checks an interface name as the kernel would take it.
func checkIfname(name string) error {
	switch {
	case name == "":
		return errors.New("no interface named")
	case len(name) > 15:
		return fmt.Errorf("interface name %q is longer than 15 bytes", name)
	case name == "lo":
		return errors.New("lo is loopback, not a TUN")
	case strings.ContainsAny(name, "/: \t\n\x00"):
		return fmt.Errorf("interface name %q has a character Linux does not allow", name)
	}
	return nil
}
