package routing

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Router owns the TUN table and its rules in one network namespace: the
// one the thread calling Apply was in. Its methods may be called from any
// goroutine.
type Router struct {
	cfg Config
	log *slog.Logger
	ns  netns.NsHandle
	nlh *netlink.Handle // rtnetlink, bound to ns

	mu     sync.Mutex
	closed bool
	routes []netlink.Route // added
	rules  []netlink.Rule  // added
}

// Apply validates cfg, removes what an earlier (crashed) run left in
// Table and at RulePrio, then routes cfg.Routes into the TUN through
// Table and adds the `not fwmark Mark lookup Table` rule for each address
// family used. On error nothing it added is left behind.
//
// Apply binds the Router to the network namespace of the calling OS
// thread (lock the thread first if it is not the process's own).
func Apply(cfg Config) (*Router, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	cfg.Routes = slices.Clone(cfg.Routes)
	if err := cfg.check(); err != nil {
		return nil, fmt.Errorf("routing: %w", err)
	}
	ns, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("routing: current network namespace: %w", err)
	}
	r := &Router{cfg: cfg, log: cfg.Logger, ns: ns}
	if r.nlh, err = netlink.NewHandleAt(ns, unix.NETLINK_ROUTE); err != nil {
		ns.Close()
		return nil, fmt.Errorf("routing: rtnetlink: %w", err)
	}

	tun, err := r.nlh.LinkByName(cfg.TUN)
	if err != nil {
		r.release()
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil, fmt.Errorf("routing: TUN %s: no such interface", cfg.TUN)
		}
		return nil, fmt.Errorf("routing: TUN %s: %w", cfg.TUN, err)
	}
	if tun.Attrs().Flags&net.FlagUp == 0 {
		r.release()
		return nil, fmt.Errorf("routing: TUN %s is down; bring it up before routing into it", cfg.TUN)
	}

	if err := r.removeStale(); err != nil {
		r.release()
		return nil, fmt.Errorf("routing: removing state left by an earlier run: %w", err)
	}
	if err := r.apply(tun.Attrs().Index); err != nil {
		return nil, errors.Join(fmt.Errorf("routing: %w", err), r.Close())
	}
	r.log.Info("routes into the TUN", "tun", cfg.TUN, "table", cfg.Table, "routes", fmt.Sprint(cfg.Routes), "bypass_mark", fmt.Sprintf("%#x", cfg.Mark))
	return r, nil
}

func (r *Router) apply(tunIndex int) error {
	families := map[int]bool{}
	for _, p := range r.cfg.Routes {
		fam := netlink.FAMILY_V4
		scope := netlink.SCOPE_LINK // as `ip route add P dev TUN` does for IPv4
		if p.Addr().Is6() {
			fam, scope = netlink.FAMILY_V6, netlink.SCOPE_UNIVERSE
		}
		families[fam] = true
		route := netlink.Route{
			Family:    fam,
			Table:     r.cfg.Table,
			LinkIndex: tunIndex,
			Dst:       &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())},
			Scope:     scope,
			Protocol:  unix.RTPROT_STATIC,
			Type:      unix.RTN_UNICAST,
		}
		if err := r.nlh.RouteAdd(&route); err != nil {
			return fmt.Errorf("add route %s dev %s table %d: %w", p, r.cfg.TUN, r.cfg.Table, err)
		}
		r.routes = append(r.routes, route)
	}
	// Rules last: until they exist, nothing looks the table up.
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		if !families[fam] {
			continue
		}
		rule := bypassRule(fam, r.cfg)
		if err := r.nlh.RuleAdd(rule); err != nil {
			return fmt.Errorf("add rule `not fwmark %#x lookup %d` at priority %d: %w", r.cfg.Mark, r.cfg.Table, r.cfg.RulePrio, err)
		}
		r.rules = append(r.rules, *rule)
	}
	return nil
}

// bypassRule is `not fwmark Mark/0xffffffff lookup Table` at RulePrio.
func bypassRule(family int, cfg Config) *netlink.Rule {
	mask := ^uint32(0)
	rule := netlink.NewRule()
	rule.Family = family
	rule.Priority = cfg.RulePrio
	rule.Table = cfg.Table
	rule.Mark = cfg.Mark
	rule.Mask = &mask
	rule.Invert = true
	return rule
}

// removeStale deletes the rules at RulePrio that look up Table, and every
// route in Table.
func (r *Router) removeStale() error {
	var errs []error
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := r.nlh.RuleListFiltered(fam, &netlink.Rule{Priority: r.cfg.RulePrio}, netlink.RT_FILTER_PRIORITY)
		if err != nil {
			return fmt.Errorf("list rules: %w", err)
		}
		for _, rule := range rules {
			if rule.Table != r.cfg.Table {
				continue
			}
			r.log.Warn("removing a stale rule", "rule", rule.String())
			if err := r.nlh.RuleDel(&rule); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("delete rule %s: %w", rule, err))
			}
		}
		routes, err := r.nlh.RouteListFiltered(fam, &netlink.Route{Table: r.cfg.Table}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return fmt.Errorf("list table %d: %w", r.cfg.Table, err)
		}
		for _, route := range routes {
			r.log.Warn("removing a stale route", "table", r.cfg.Table, "route", route.String())
			if err := r.nlh.RouteDel(&route); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("delete route %s: %w", route, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Close removes the rules, then the routes. Routes that went with the TUN
// device are no error. Calling it again does nothing.
func (r *Router) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	var errs []error
	for i := len(r.rules) - 1; i >= 0; i-- {
		if err := r.nlh.RuleDel(&r.rules[i]); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete rule %s: %w", r.rules[i], err))
		}
	}
	r.rules = nil
	for i := len(r.routes) - 1; i >= 0; i-- {
		if err := r.nlh.RouteDel(&r.routes[i]); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete route %s: %w", r.routes[i], err))
		}
	}
	r.routes = nil
	r.release()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("routing: close: %w", err)
	}
	return nil
}

func (r *Router) release() {
	r.nlh.Close()
	r.ns.Close()
}

// Routes returns the prefixes routed into the TUN.
func (r *Router) Routes() []netip.Prefix {
	return slices.Clone(r.cfg.Routes)
}
