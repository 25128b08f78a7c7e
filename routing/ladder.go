//go:build linux

package routing

import (
	"fmt"
	"net/netip"
	"strings"

	"golang.org/x/sys/unix"
)

// rule is one policy routing rule, as this package writes it or reads it
// back from the kernel. vishvananda/netlink's Rule is not used: its
// RuleAdd (v1.3.1) drops suppress_prefixlength for a table above 255, and
// its RuleList does not say what a rule does (lookup or unreachable).
type rule struct {
	family   int // unix.AF_INET or unix.AF_INET6
	prio     int
	action   uint8 // unix.FR_ACT_*; this package writes TO_TBL and UNREACHABLE
	table    int   // with FR_ACT_TO_TBL
	invert   bool  // `not`
	hasMark  bool
	mark     uint32
	mask     uint32
	src, dst netip.Prefix // invalid: any
	suppress int          // suppress_prefixlength; -1: none
	proto    uint8
	// other are the selectors this package never writes (iif, uidrange,
	// ...), as `ip rule` spells them. A rule with any is never mpvpn's.
	other []string
}

func familyName(f int) string {
	if f == unix.AF_INET6 {
		return "IPv6"
	}
	return "IPv4"
}

func tableName(t int) string {
	switch t {
	case unix.RT_TABLE_MAIN:
		return "main"
	case unix.RT_TABLE_LOCAL:
		return "local"
	case unix.RT_TABLE_DEFAULT:
		return "default"
	}
	return fmt.Sprint(t)
}

// selector is the rule's match, as `ip rule` would write it, e.g.
// "not fwmark 0x6d70" or "from all".
func (r rule) selector() string {
	var s []string
	if r.src.IsValid() {
		s = append(s, "from "+r.src.String())
	}
	if r.dst.IsValid() {
		s = append(s, "to "+r.dst.String())
	}
	if r.hasMark {
		if r.mask == ^uint32(0) {
			s = append(s, fmt.Sprintf("fwmark %#x", r.mark))
		} else {
			s = append(s, fmt.Sprintf("fwmark %#x/%#x", r.mark, r.mask))
		}
	}
	s = append(s, r.other...)
	if len(s) == 0 {
		s = append(s, "from all")
	}
	if r.invert {
		s = append([]string{"not"}, s...)
	}
	return strings.Join(s, " ")
}

// verdict is what the rule does, e.g. "lookup main suppress_prefixlength 0".
func (r rule) verdict() string {
	var v string
	switch r.action {
	case unix.FR_ACT_TO_TBL:
		v = "lookup " + tableName(r.table)
	case unix.FR_ACT_UNREACHABLE:
		v = "unreachable"
	case unix.FR_ACT_BLACKHOLE:
		v = "blackhole"
	case unix.FR_ACT_PROHIBIT:
		v = "prohibit"
	case unix.FR_ACT_GOTO:
		v = "goto"
	case unix.FR_ACT_NOP:
		v = "nop"
	default:
		v = fmt.Sprintf("action %d", r.action)
	}
	if r.suppress >= 0 {
		v += fmt.Sprintf(" suppress_prefixlength %d", r.suppress)
	}
	return v
}

// String is one line for logs and Cleanup, e.g.
// "rule 7201: fwmark 0x6d70 unreachable (IPv4)".
func (r rule) String() string {
	return fmt.Sprintf("rule %d: %s %s (%s)", r.prio, r.selector(), r.verdict(), familyName(r.family))
}

// owned reports whether r is mpvpn's under c (see the package comment).
func (c *Config) owned(r rule) bool {
	if !c.ownsPrio(r.prio) || len(r.other) > 0 {
		return false
	}
	return r.proto == Protocol || (r.action == unix.FR_ACT_TO_TBL && r.table == c.Table)
}

// ladder is the rules Apply installs for one family, in priority order:
// the order they are added in, so that mpvpn's own sockets are kept out
// of the TUN before anything is sent into it.
func ladder(c *Config, family int) []rule {
	base := func(offset int) rule {
		return rule{family: family, prio: c.RulePrio + offset, suppress: -1, proto: Protocol}
	}
	lookup := func(offset, table int) rule {
		r := base(offset)
		r.action, r.table = unix.FR_ACT_TO_TBL, table
		return r
	}
	unreachable := func(offset int) rule {
		r := base(offset)
		r.action = unix.FR_ACT_UNREACHABLE
		return r
	}
	marked := func(r rule, mark uint32) rule {
		r.hasMark, r.mark, r.mask = true, mark, ^uint32(0)
		return r
	}
	var out []rule
	out = append(out, marked(lookup(prioOwn, tableMain), c.Mark), marked(unreachable(prioOwnStop), c.Mark))
	if c.DirectMark != 0 {
		out = append(out, marked(lookup(prioDirect, tableMain), c.DirectMark), marked(unreachable(prioDirectStop), c.DirectMark))
	}
	if c.TunnelMark != 0 {
		out = append(out, marked(lookup(prioTunnel, c.Table), c.TunnelMark), marked(unreachable(prioTunnelStop), c.TunnelMark))
	}
	var stops []rule
	for _, p := range c.Exclude {
		if (family == unix.AF_INET6) != p.Addr().Is6() {
			continue
		}
		r := lookup(prioExclude, tableMain)
		r.dst = p
		out = append(out, r)
		s := unreachable(prioExcludeStop)
		s.dst = p
		stops = append(stops, s)
	}
	out = append(out, stops...)
	for _, p := range c.Pinned {
		if (family == unix.AF_INET6) != p.Addr().Is6() {
			continue
		}
		r := lookup(prioPinned, c.Table)
		r.dst = p
		out = append(out, r)
	}
	if c.RouteAll && c.AllowLAN {
		r := lookup(prioLAN, tableMain)
		r.suppress = suppressDefaults
		out = append(out, r)
	}
	r := lookup(prioTUN, c.Table)
	if !c.RouteAll {
		r.suppress = suppressDefaults
	}
	return append(out, r)
}
