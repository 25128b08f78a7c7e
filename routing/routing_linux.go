//go:build linux

package routing

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
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
	k   *kernel // bound to ns

	mu     sync.Mutex
	closed bool
	routes []netlink.Route // added
	rules  []rule          // added
}

// Apply validates cfg, checks that nothing of anybody else's uses the
// table or the rule priorities (CheckHost), removes what an earlier
// (crashed) run left there, then fills the table and installs the rule
// ladder (see the package comment). On error nothing it added is left
// behind.
//
// Apply binds the Router to the network namespace of the calling OS
// thread (lock the thread first if it is not the process's own).
func Apply(cfg Config) (*Router, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	cfg.Routes = slices.Clone(cfg.Routes)
	cfg.Exclude = slices.Clone(cfg.Exclude)
	if err := cfg.check(); err != nil {
		return nil, fmt.Errorf("routing: %w", err)
	}
	ns, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("routing: current network namespace: %w", err)
	}
	r := &Router{cfg: cfg, log: cfg.Logger, ns: ns}
	if r.k, err = openKernel(ns); err != nil {
		ns.Close()
		return nil, fmt.Errorf("routing: %w", err)
	}
	fams, err := families(r.k, &cfg)
	if err != nil {
		r.release()
		return nil, fmt.Errorf("routing: %w", err)
	}
	if err := checkHost(r.k, &cfg, fams); err != nil {
		r.release()
		return nil, fmt.Errorf("routing: %w", err)
	}

	tun, err := r.k.nlh.LinkByName(cfg.TUN)
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

	stale, err := removeOwned(r.k, &cfg, fams)
	for _, s := range stale {
		r.log.Warn("removed what an earlier run left", "what", s)
	}
	if err != nil {
		r.release()
		return nil, fmt.Errorf("routing: removing state left by an earlier run: %w", err)
	}
	if err := r.apply(tun.Attrs().Index, fams); err != nil {
		return nil, errors.Join(fmt.Errorf("routing: %w", err), r.Close())
	}
	mode := "split"
	if cfg.RouteAll {
		mode = "route-all"
	}
	r.log.Info("routes into the TUN", "tun", cfg.TUN, "mode", mode, "table", cfg.Table, "rule_prio", cfg.RulePrio,
		"routes", fmt.Sprint(cfg.Routes), "exclude", fmt.Sprint(cfg.Exclude), "allow_lan", cfg.AllowLAN,
		"bypass_mark", fmt.Sprintf("%#x", cfg.Mark), "direct_mark", fmt.Sprintf("%#x", cfg.DirectMark), "tunnel_mark", fmt.Sprintf("%#x", cfg.TunnelMark))
	return r, nil
}

// families are the address families to route: IPv4, and IPv6 unless the
// kernel has none (booted with ipv6.disable=1, where nothing can leak
// over IPv6 either). A host whose uplinks have no IPv6 still gets the
// IPv6 ladder: harmless there, and in place when an uplink gains IPv6.
func families(k *kernel, c *Config) ([]int, error) {
	if _, err := k.rules(unix.AF_INET6); errors.Is(err, unix.EAFNOSUPPORT) {
		for _, p := range slices.Concat(c.Routes, c.Exclude) {
			if p.Addr().Is6() {
				return nil, fmt.Errorf("%s is IPv6, and this kernel has IPv6 turned off", p)
			}
		}
		return []int{unix.AF_INET}, nil
	} else if err != nil {
		return nil, err
	}
	return []int{unix.AF_INET, unix.AF_INET6}, nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func (r *Router) apply(tunIndex int, fams []int) error {
	dsts := slices.Clone(r.cfg.Routes)
	if r.cfg.defaultIntoTUN() {
		for _, fam := range fams {
			if fam == unix.AF_INET6 {
				dsts = append(dsts, netip.PrefixFrom(netip.IPv6Unspecified(), 0))
			} else {
				dsts = append(dsts, netip.PrefixFrom(netip.IPv4Unspecified(), 0))
			}
		}
	}
	for _, p := range dsts {
		fam := unix.AF_INET
		scope := netlink.SCOPE_LINK // as `ip route add P dev TUN` does for IPv4
		if p.Addr().Is6() {
			fam, scope = unix.AF_INET6, netlink.SCOPE_UNIVERSE
		}
		route := netlink.Route{
			Family:    fam,
			Table:     r.cfg.Table,
			LinkIndex: tunIndex,
			Dst:       ipNet(p),
			Scope:     scope,
			Protocol:  Protocol,
			Type:      unix.RTN_UNICAST,
		}
		if err := r.k.nlh.RouteAdd(&route); err != nil {
			return fmt.Errorf("add route %s dev %s table %d: %w", p, r.cfg.TUN, r.cfg.Table, err)
		}
		r.routes = append(r.routes, route)
	}
	// Rules last, in priority order: until they exist nothing looks the
	// table up, and mpvpn's own sockets are kept out of the TUN before
	// anything is sent into it.
	for _, fam := range fams {
		for _, rule := range ladder(&r.cfg, fam) {
			if err := r.k.addRule(rule); err != nil {
				return fmt.Errorf("add %s: %w", rule, err)
			}
			r.rules = append(r.rules, rule)
		}
	}
	return nil
}

// CheckHost reports, without changing anything, rules and routes of
// somebody else's that use what cfg would make mpvpn's: a rule at one of
// its priorities, a rule anywhere that looks up its table, a route in its
// table. What an earlier run of mpvpn left is not in the way (Apply and
// Cleanup remove it). It checks cfg's table and priorities as Validate
// does, nothing else, and needs no TUN yet. It looks at the network
// namespace of the calling thread.
func CheckHost(cfg Config) error {
	if err := cfg.checkIDs(); err != nil {
		return fmt.Errorf("routing: %w", err)
	}
	ns, err := netns.Get()
	if err != nil {
		return fmt.Errorf("routing: current network namespace: %w", err)
	}
	defer ns.Close()
	k, err := openKernel(ns)
	if err != nil {
		return fmt.Errorf("routing: %w", err)
	}
	defer k.close()
	fams, err := families(k, &cfg)
	if err != nil {
		return fmt.Errorf("routing: %w", err)
	}
	if err := checkHost(k, &cfg, fams); err != nil {
		return fmt.Errorf("routing: %w", err)
	}
	return nil
}

func checkHost(k *kernel, c *Config, fams []int) error {
	var found []string
	for _, fam := range fams {
		rules, err := k.rules(fam)
		if err != nil {
			return err
		}
		for _, r := range rules {
			switch {
			case c.owned(r):
			case c.ownsPrio(r.prio):
				found = append(found, r.String())
			case r.action == unix.FR_ACT_TO_TBL && r.table == c.Table:
				found = append(found, r.String())
			}
		}
		routes, err := k.tableRoutes(fam, c.Table)
		if err != nil {
			return err
		}
		for _, rt := range routes {
			if rt.Protocol != Protocol {
				found = append(found, k.routeString(fam, rt))
			}
		}
	}
	if len(found) > 0 {
		return fmt.Errorf("table %d or rule priorities %d-%d are in use by something other than mpvpn; choose another table, or remove:\n  %s",
			c.Table, c.RulePrio, c.RulePrio+PrioRange-1, strings.Join(found, "\n  "))
	}
	return nil
}

// Cleanup removes every rule and route of mpvpn's under cfg's table and
// priorities (see the package comment), in the calling thread's network
// namespace, without a Router: for `mpvpn down`, and before the next
// start after a crash. Only cfg's Table and RulePrio matter. It returns
// one line per thing removed, e.g.
//
//	rule 7201: fwmark 0x6d70 unreachable (IPv4)
//	route table 7200: default dev mpvpn0 (IPv6)
//
// and tries everything, returning the joined errors. Nothing of anybody
// else's is removed, even at mpvpn's priorities or in its table.
func Cleanup(cfg Config) ([]string, error) {
	if err := cfg.checkIDs(); err != nil {
		return nil, fmt.Errorf("routing: %w", err)
	}
	ns, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("routing: current network namespace: %w", err)
	}
	defer ns.Close()
	k, err := openKernel(ns)
	if err != nil {
		return nil, fmt.Errorf("routing: %w", err)
	}
	defer k.close()
	fams := []int{unix.AF_INET, unix.AF_INET6}
	if _, err := k.rules(unix.AF_INET6); errors.Is(err, unix.EAFNOSUPPORT) {
		fams = fams[:1]
	}
	done, err := removeOwned(k, &cfg, fams)
	if err != nil {
		return done, fmt.Errorf("routing: cleanup: %w", err)
	}
	return done, nil
}

// removeOwned deletes mpvpn's rules, the ladder's end first (so the last
// to go are the ones that keep mpvpn's own sockets out of the TUN), then
// its routes, and says what it deleted.
func removeOwned(k *kernel, c *Config, fams []int) ([]string, error) {
	var done []string
	var errs []error
	for _, fam := range fams {
		rules, err := k.rules(fam)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		slices.SortStableFunc(rules, func(a, b rule) int { return b.prio - a.prio })
		for _, r := range rules {
			if !c.owned(r) {
				continue
			}
			if err := k.delRule(r); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("delete %s: %w", r, err))
				continue
			}
			done = append(done, r.String())
		}
	}
	for _, fam := range fams {
		routes, err := k.tableRoutes(fam, c.Table)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, rt := range routes {
			if rt.Protocol != Protocol {
				continue
			}
			line := k.routeString(fam, rt)
			if err := k.nlh.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("delete %s: %w", line, err))
				continue
			}
			done = append(done, line)
		}
	}
	return done, errors.Join(errs...)
}

func (k *kernel) tableRoutes(fam, table int) ([]netlink.Route, error) {
	var routes []netlink.Route
	var err error
	for attempt := 1; attempt <= dumpAttempts; attempt++ {
		routes, err = k.nlh.RouteListFiltered(fam, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("list %s table %d: %w", familyName(fam), table, err)
	}
	return routes, nil
}

var routeTypes = map[int]string{
	unix.RTN_UNREACHABLE: "unreachable", unix.RTN_BLACKHOLE: "blackhole", unix.RTN_PROHIBIT: "prohibit",
	unix.RTN_THROW: "throw", unix.RTN_LOCAL: "local", unix.RTN_BROADCAST: "broadcast", unix.RTN_MULTICAST: "multicast",
}

// routeString is one line for errors and Cleanup, e.g.
// "route table 7200: 198.51.100.0/24 dev mpvpn0 (IPv4)".
func (k *kernel) routeString(fam int, rt netlink.Route) string {
	var s []string
	if rt.Type != unix.RTN_UNICAST {
		if n, ok := routeTypes[rt.Type]; ok {
			s = append(s, n)
		} else {
			s = append(s, fmt.Sprintf("type %d", rt.Type))
		}
	}
	dst := "default"
	if rt.Dst != nil {
		if ones, _ := rt.Dst.Mask.Size(); ones > 0 {
			dst = rt.Dst.String()
		}
	}
	s = append(s, dst)
	if rt.Gw != nil {
		s = append(s, "via "+rt.Gw.String())
	}
	if rt.LinkIndex != 0 {
		name := fmt.Sprintf("#%d", rt.LinkIndex)
		if l, err := k.nlh.LinkByIndex(rt.LinkIndex); err == nil {
			name = l.Attrs().Name
		}
		s = append(s, "dev "+name)
	}
	if rt.Priority != 0 {
		s = append(s, fmt.Sprintf("metric %d", uint32(rt.Priority)))
	}
	if rt.Protocol != Protocol {
		s = append(s, fmt.Sprintf("proto %d", rt.Protocol))
	}
	return fmt.Sprintf("route table %d: %s (%s)", rt.Table, strings.Join(s, " "), familyName(fam))
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
		if err := r.k.delRule(r.rules[i]); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete %s: %w", r.rules[i], err))
		}
	}
	r.rules = nil
	for i := len(r.routes) - 1; i >= 0; i-- {
		if err := r.k.nlh.RouteDel(&r.routes[i]); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENODEV) {
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
	r.k.close()
	r.ns.Close()
}

// Routes returns the prefixes routed into the TUN (without the default
// routes of RouteAll and TunnelMark).
func (r *Router) Routes() []netip.Prefix {
	return slices.Clone(r.cfg.Routes)
}
