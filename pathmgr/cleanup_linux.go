//go:build linux

package pathmgr

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Cleanup removes what pathmgr owns under cfg in the calling thread's
// network namespace, without a Manager: for `mpvpn down`, and before the
// next start after a crash. That is every rule at RulePrio..+MaxUplinks-1
// or FallbackPrio..+MaxUplinks-1 that looks up one of
// TableBase..+MaxUplinks-1, every route in those
// tables, and the MPTCP endpoints it can tell are its own (see the package
// comment: bound to one of cfg.Uplinks' interfaces, `subflow` or `subflow
// backup`, no port; with no Uplinks it removes no endpoint). It restores
// nothing: the limits and rp_filter are the client's journal's to undo.
//
// It returns one line per thing removed, e.g.
//
//	rule 7100: from 192.0.2.2 fwmark 0x6d70 lookup 7100 (IPv4)
//	route table 7100: default via 192.0.2.1 dev wan0 (IPv4)
//	MPTCP endpoint 192.0.2.2 id 1 subflow dev wan0
//
// and tries everything, returning the joined errors.
func Cleanup(cfg Config) ([]string, error) {
	if err := cfg.checkIDs(); err != nil {
		return nil, fmt.Errorf("pathmgr: %w", err)
	}
	ns, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("pathmgr: current network namespace: %w", err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("pathmgr: rtnetlink: %w", err)
	}
	defer h.Close()

	done, err := removeRulesAndTables(h, &cfg)
	errs := []error{err}

	// Endpoints: only on the configured uplinks' interfaces.
	ifaces := map[int]string{}
	for _, u := range cfg.Uplinks {
		if l, err := h.LinkByName(u.Name); err == nil {
			ifaces[l.Attrs().Index] = u.Name
		}
	}
	if len(ifaces) > 0 {
		pm, err := OpenPM(ns)
		switch {
		case errors.Is(err, syscall.ENOENT):
			// No MPTCP path manager in this kernel: no endpoints either.
		case err != nil:
			errs = append(errs, err)
		default:
			defer pm.Close()
			eps, err := pm.Endpoints()
			errs = append(errs, err)
			for _, ep := range eps {
				name, ok := ifaces[ep.IfIndex]
				if !ok || !mpvpnShaped(ep) {
					continue
				}
				line := fmt.Sprintf("MPTCP endpoint %s id %d %s dev %s", ep.Addr, ep.ID, ep.Flags, name)
				if err := pm.DelEndpoint(ep.ID); err != nil {
					errs = append(errs, fmt.Errorf("delete %s: %w", line, err))
					continue
				}
				done = append(done, line)
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return done, fmt.Errorf("pathmgr: cleanup: %w", err)
	}
	return done, nil
}

// mpvpnShaped reports whether ep looks like the endpoints addEndpoint
// adds: `subflow`, maybe `fullmesh` and `backup`, no port, bound to an
// interface.
func mpvpnShaped(ep Endpoint) bool {
	return ep.IfIndex != 0 && ep.Port == 0 && ep.Flags&^(FlagBackup|FlagFullmesh) == FlagSubflow
}

// removeRulesAndTables deletes the rules at cfg's priorities that look up
// its tables (rules last in, first out: the ones that route into a table
// go before its routes), then every route in its tables, and says what it
// deleted. Start runs it on the stale state of a crashed run; Cleanup
// too.
func removeRulesAndTables(h *netlink.Handle, cfg *Config) ([]string, error) {
	var done []string
	var errs []error
	families := []int{netlink.FAMILY_V4, netlink.FAMILY_V6}
	for _, family := range families {
		rules, err := retryInterrupted(func() ([]netlink.Rule, error) { return h.RuleList(family) })
		if err != nil {
			errs = append(errs, fmt.Errorf("list rules: %w", err))
			continue
		}
		for _, r := range rules {
			if !cfg.ownedPrio(r.Priority) || !cfg.ownedTable(r.Table) {
				continue
			}
			r.Family = family
			if err := h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("delete %s: %w", ruleString(r), err))
				continue
			}
			done = append(done, ruleString(r))
		}
	}
	for _, family := range families {
		for t := cfg.TableBase; t < cfg.TableBase+MaxUplinks; t++ {
			routes, err := retryInterrupted(func() ([]netlink.Route, error) {
				return h.RouteListFiltered(family, &netlink.Route{Table: t}, netlink.RT_FILTER_TABLE)
			})
			if err != nil {
				errs = append(errs, fmt.Errorf("list table %d: %w", t, err))
				continue
			}
			for _, r := range routes {
				line := routeString(h, family, r)
				if err := h.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
					errs = append(errs, fmt.Errorf("delete %s: %w", line, err))
					continue
				}
				done = append(done, line)
			}
		}
	}
	return done, errors.Join(errs...)
}

func familyName(f int) string {
	if f == netlink.FAMILY_V6 {
		return "IPv6"
	}
	return "IPv4"
}

// ruleString is one line for errors and Cleanup, as `ip rule` words it,
// e.g. "rule 7100: from 192.0.2.2 fwmark 0x6d70 lookup 7100 (IPv4)".
// Only what pathmgr's rules use is spelled out.
func ruleString(r netlink.Rule) string {
	var s []string
	if r.Invert {
		s = append(s, "not")
	}
	s = append(s, "from "+netString(r.Src))
	if r.Dst != nil {
		s = append(s, "to "+netString(r.Dst))
	}
	if r.Mark != 0 || r.Mask != nil {
		if r.Mask == nil || *r.Mask == ^uint32(0) {
			s = append(s, fmt.Sprintf("fwmark %#x", r.Mark))
		} else {
			s = append(s, fmt.Sprintf("fwmark %#x/%#x", r.Mark, *r.Mask))
		}
	}
	if r.IifName != "" {
		s = append(s, "iif "+r.IifName)
	}
	if r.OifName != "" {
		s = append(s, "oif "+r.OifName)
	}
	s = append(s, fmt.Sprintf("lookup %d", r.Table))
	return fmt.Sprintf("rule %d: %s (%s)", r.Priority, strings.Join(s, " "), familyName(r.Family))
}

// netString writes a prefix as `ip rule` does: a host prefix without its
// length, none as "all".
func netString(n *net.IPNet) string {
	if n == nil {
		return "all"
	}
	if ones, bits := n.Mask.Size(); ones == bits {
		return n.IP.String()
	}
	return n.String()
}

// routeString is one line for errors and Cleanup, e.g.
// "route table 7100: default via 192.0.2.1 dev wan0 (IPv4)".
func routeString(h *netlink.Handle, family int, r netlink.Route) string {
	var s []string
	switch r.Type {
	case unix.RTN_UNICAST:
	case unix.RTN_UNREACHABLE:
		s = append(s, "unreachable")
	default:
		s = append(s, fmt.Sprintf("type %d", r.Type))
	}
	if isDefault(r.Dst) {
		s = append(s, "default")
	} else {
		s = append(s, r.Dst.String())
	}
	if r.Gw != nil {
		s = append(s, "via "+r.Gw.String())
	}
	// Linux puts IPv6 reject routes on lo; that says nothing.
	if r.LinkIndex != 0 && r.Type == unix.RTN_UNICAST {
		name := fmt.Sprintf("#%d", r.LinkIndex)
		if l, err := h.LinkByIndex(r.LinkIndex); err == nil {
			name = l.Attrs().Name
		}
		s = append(s, "dev "+name)
	}
	if r.Priority != 0 {
		s = append(s, fmt.Sprintf("metric %d", uint32(r.Priority)))
	}
	return fmt.Sprintf("route table %d: %s (%s)", r.Table, strings.Join(s, " "), familyName(family))
}
