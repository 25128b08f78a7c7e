package pathmgr

import (
	"context"
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

// Manager owns the uplinks' tables, rules and MPTCP endpoints in one network
// namespace: the one the thread calling Start was in. Its methods may be
// called from any goroutine: its netlink sockets are opened in that
// namespace, and sysctls are written from a thread that joins it. A netlink
// watcher can therefore run in its own goroutine and act per uplink (up and
// down below work on one uplinkState; DEL_ADDR on an uplink going away and
// ADD_ADDR on its return give existing connections fresh subflows).
type Manager struct {
	cfg Config
	log *slog.Logger
	ns  netns.NsHandle  // where everything lives; closed by Close
	nlh *netlink.Handle // rtnetlink, bound to ns
	pm  *PM             // mptcp_pm, bound to ns

	mu      sync.Mutex
	closed  bool
	uplinks []*uplinkState
	limits  *limitsChange
}

// uplinkState is one uplink and everything added for it, so that it can be
// taken down and brought back on its own (the netlink watcher will do that
// when an uplink goes away and returns).
type uplinkState struct {
	Uplink
	conn4, conn6 []netlink.Route // connected routes copied from main
	onlink4      bool            // the main default route had `onlink`
	onlink6      bool

	routes   []netlink.Route // added to the uplink's table
	rules    []netlink.Rule  // added
	endpoint *Endpoint       // added
	rpFilter *sysctlChange   // changed
}

// Start validates every uplink (interface exists, has an IPv4 address and a
// default route in main) before it changes anything, then removes what a
// crashed earlier run left in mpvpn's tables, rule priorities and on the
// uplinks' addresses, and sets up each uplink (see the package comment).
// On any error it undoes what it did and returns one error naming the
// uplink.
//
// Start binds the Manager to the network namespace of the calling OS
// thread (lock the thread first if it is not the process's own).
func Start(ctx context.Context, cfg Config) (*Manager, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	cfg.Uplinks = slices.Clone(cfg.Uplinks)
	if err := cfg.check(); err != nil {
		return nil, fmt.Errorf("pathmgr: %w", err)
	}
	ns, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("pathmgr: current network namespace: %w", err)
	}
	m := &Manager{cfg: cfg, log: cfg.Logger, ns: ns}
	if m.nlh, err = netlink.NewHandleAt(ns, unix.NETLINK_ROUTE); err != nil {
		ns.Close()
		return nil, fmt.Errorf("pathmgr: rtnetlink: %w", err)
	}
	if m.pm, err = OpenPM(ns); err != nil {
		m.nlh.Close()
		ns.Close()
		return nil, fmt.Errorf("pathmgr: %w", err)
	}

	// Look before touching: every uplink must be usable.
	for i, uc := range cfg.Uplinks {
		u, err := m.discover(i, uc)
		if err != nil {
			m.release()
			return nil, fmt.Errorf("pathmgr: uplink %s: %w", uc.Name, err)
		}
		m.uplinks = append(m.uplinks, u)
	}
	if err := ctx.Err(); err != nil {
		m.release()
		return nil, err
	}

	if err := m.removeStale(); err != nil {
		m.release()
		return nil, fmt.Errorf("pathmgr: removing state left by an earlier run: %w", err)
	}
	for _, u := range m.uplinks {
		if err := ctx.Err(); err != nil {
			return nil, errors.Join(err, m.Close())
		}
		if err := m.up(u); err != nil {
			return nil, errors.Join(fmt.Errorf("pathmgr: uplink %s: %w", u.Name, err), m.Close())
		}
	}
	// subflows_max counts the subflows a connection may add to its first
	// one; one per uplink leaves room for a re-created subflow while the
	// old one is still closing. The kernel default is 2, and 2 is kept as a
	// floor so a single-uplink client behaves like the kernel's default.
	want := uint32(max(len(m.uplinks), 2))
	lc, err := raiseLimits(m.pm, Limits{Subflows: want})
	if err != nil {
		return nil, errors.Join(fmt.Errorf("pathmgr: %w", err), m.Close())
	}
	m.limits = lc
	return m, nil
}

// Uplinks returns the uplinks as set up, in configuration order.
func (m *Manager) Uplinks() []Uplink {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Uplink, 0, len(m.uplinks))
	for _, u := range m.uplinks {
		out = append(out, u.Uplink)
	}
	return out
}

// Close removes everything Start added and restores what it changed. It
// tries every step and returns the joined errors; calling it again does
// nothing.
func (m *Manager) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	var errs []error
	if m.limits != nil {
		errs = append(errs, m.limits.restore(m.pm))
	}
	for i := len(m.uplinks) - 1; i >= 0; i-- {
		errs = append(errs, m.down(m.uplinks[i]))
	}
	m.release()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("pathmgr: close: %w", err)
	}
	return nil
}

// release closes the handles.
func (m *Manager) release() {
	m.pm.Close()
	m.nlh.Close()
	m.ns.Close()
}

// discover reads uplink i from the host without changing anything.
func (m *Manager) discover(i int, uc UplinkConfig) (*uplinkState, error) {
	link, err := m.nlh.LinkByName(uc.Name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil, fmt.Errorf("no such interface")
		}
		return nil, fmt.Errorf("look up interface: %w", err)
	}
	idx := link.Attrs().Index
	if link.Attrs().Flags&net.FlagUp == 0 {
		return nil, fmt.Errorf("interface %s is down", uc.Name)
	}
	u := &uplinkState{Uplink: Uplink{
		Name:     uc.Name,
		Index:    idx,
		Table:    m.cfg.TableBase + i,
		RulePrio: m.cfg.RulePrio + i,
		Backup:   uc.Backup,
	}}

	// IPv4 is a must: the concentrator is reached over it.
	gw, src, onlink, ok, err := m.defaultVia(idx, netlink.FAMILY_V4)
	if err != nil {
		return nil, err
	}
	addr, conn, err := m.pickAddr(link, netlink.FAMILY_V4, src)
	if err != nil {
		return nil, err
	}
	if !addr.IsValid() {
		return nil, fmt.Errorf("no IPv4 address on %s (MPTCP subflows and source routing need one)", uc.Name)
	}
	if !ok {
		return nil, fmt.Errorf("no IPv4 default route on %s in the main table (mpvpn sends each uplink's traffic to the gateway the host already uses there, e.g. the one DHCP installed)", uc.Name)
	}
	u.Addr, u.Gateway, u.onlink4, u.conn4 = addr, gw, onlink, conn

	// IPv6 is optional: source routing only, when the uplink has both a
	// global address and a default route.
	gw6, src6, onlink6, ok6, err := m.defaultVia(idx, netlink.FAMILY_V6)
	if err != nil {
		return nil, err
	}
	addr6, conn6, err := m.pickAddr(link, netlink.FAMILY_V6, src6)
	if err != nil {
		return nil, err
	}
	switch {
	case addr6.IsValid() && ok6:
		u.Addr6, u.Gateway6, u.onlink6, u.conn6 = addr6, gw6, onlink6, conn6
	case addr6.IsValid():
		m.log.Debug("uplink has an IPv6 address but no IPv6 default route; IPv6 source routing skipped", "uplink", uc.Name, "addr", addr6.String())
	}
	return u, nil
}

// defaultVia finds the best (lowest metric) default route in main that
// leaves through ifindex idx, as a DHCP client or RA leaves one per
// interface. ok is false when there is none; gw is invalid for a
// point-to-point default without a next hop.
func (m *Manager) defaultVia(idx, family int) (gw, src netip.Addr, onlink, ok bool, err error) {
	routes, err := m.nlh.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return netip.Addr{}, netip.Addr{}, false, false, fmt.Errorf("list routes: %w", err)
	}
	best := -1
	for _, r := range routes {
		if !isDefault(r.Dst) || r.Type != unix.RTN_UNICAST {
			continue
		}
		var hopGw net.IP
		var hopFlags int
		found := false
		if r.LinkIndex == idx {
			hopGw, hopFlags, found = r.Gw, r.Flags, true
		}
		for _, nh := range r.MultiPath {
			if !found && nh.LinkIndex == idx {
				hopGw, hopFlags, found = nh.Gw, nh.Flags, true
			}
		}
		if !found || (best >= 0 && r.Priority >= best) {
			continue
		}
		best = r.Priority
		gw, _ = netip.AddrFromSlice(hopGw)
		gw = gw.Unmap()
		src, _ = netip.AddrFromSlice(r.Src)
		src = src.Unmap()
		onlink = hopFlags&unix.RTNH_F_ONLINK != 0
		ok = true
	}
	return gw, src, onlink, ok, nil
}

func isDefault(dst *net.IPNet) bool {
	if dst == nil {
		return true
	}
	ones, _ := dst.Mask.Size()
	return ones == 0
}

// pickAddr chooses the uplink's source address of a family: the default
// route's preferred source if it is on the link, else the first usable
// global address (primary, not tentative, deprecated or temporary). It also
// returns the link's connected routes in main, which the uplink's table
// copies so that traffic from the address to its own subnet stays on link.
func (m *Manager) pickAddr(link netlink.Link, family int, prefsrc netip.Addr) (netip.Addr, []netlink.Route, error) {
	addrs, err := m.nlh.AddrList(link, family)
	if err != nil {
		return netip.Addr{}, nil, fmt.Errorf("list addresses: %w", err)
	}
	const unusable = unix.IFA_F_TENTATIVE | unix.IFA_F_DADFAILED | unix.IFA_F_DEPRECATED | unix.IFA_F_SECONDARY
	var chosen, fallback netip.Addr
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok || a.Scope != unix.RT_SCOPE_UNIVERSE {
			continue
		}
		ip = ip.Unmap()
		if ip == prefsrc {
			chosen = ip
			break
		}
		if a.Flags&unusable != 0 || (family == netlink.FAMILY_V6 && !ip.IsGlobalUnicast()) {
			continue
		}
		// Temporary (privacy) addresses change every day; a stable
		// one keeps the rule valid.
		if a.Flags&unix.IFA_F_TEMPORARY != 0 {
			if !fallback.IsValid() {
				fallback = ip
			}
			continue
		}
		if !chosen.IsValid() {
			chosen = ip
		}
	}
	if !chosen.IsValid() {
		chosen = fallback
	}
	if !chosen.IsValid() {
		return netip.Addr{}, nil, nil
	}
	routes, err := m.nlh.RouteListFiltered(family, &netlink.Route{LinkIndex: link.Attrs().Index, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
	if err != nil {
		return netip.Addr{}, nil, fmt.Errorf("list routes: %w", err)
	}
	var conn []netlink.Route
	for _, r := range routes {
		if r.Protocol != unix.RTPROT_KERNEL || r.Gw != nil || isDefault(r.Dst) || r.Type != unix.RTN_UNICAST {
			continue
		}
		conn = append(conn, r)
	}
	return chosen, conn, nil
}

// removeStale deletes what an earlier, crashed run may have left: routes in
// mpvpn's tables, rules at mpvpn's priorities pointing into them, and MPTCP
// endpoints on (or bound to) the uplinks. See the package comment.
func (m *Manager) removeStale() error {
	var errs []error
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rules, err := m.nlh.RuleList(family)
		if err != nil {
			return fmt.Errorf("list rules: %w", err)
		}
		for _, r := range rules {
			if !m.cfg.ownedPrio(r.Priority) || !m.cfg.ownedTable(r.Table) {
				continue
			}
			m.log.Warn("removing a stale rule", "rule", r.String())
			if err := m.nlh.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("delete rule %s: %w", r, err))
			}
		}
		for t := m.cfg.TableBase; t < m.cfg.TableBase+MaxUplinks; t++ {
			errs = append(errs, m.flushTable(family, t))
		}
	}

	eps, err := m.pm.Endpoints()
	if err != nil {
		return err
	}
	for _, ep := range eps {
		if !m.staleEndpoint(ep) {
			continue
		}
		m.log.Warn("removing a stale MPTCP endpoint", "endpoint", ep.String())
		if err := m.pm.DelEndpoint(ep.ID); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// staleEndpoint reports whether ep is on an uplink's address, or bound to
// an uplink's interface with an address the interface no longer has.
func (m *Manager) staleEndpoint(ep Endpoint) bool {
	for _, u := range m.uplinks {
		if ep.Addr == u.Addr || (u.Addr6.IsValid() && ep.Addr == u.Addr6) {
			return true
		}
		if ep.IfIndex == u.Index && !m.linkHasAddr(u.Index, ep.Addr) {
			return true
		}
	}
	return false
}

func (m *Manager) linkHasAddr(idx int, a netip.Addr) bool {
	link, err := m.nlh.LinkByIndex(idx)
	if err != nil {
		return false
	}
	addrs, err := m.nlh.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return true // unsure: keep the endpoint
	}
	for _, x := range addrs {
		if ip, ok := netip.AddrFromSlice(x.IP); ok && ip.Unmap() == a {
			return true
		}
	}
	return false
}

// flushTable deletes every route of a family in table t.
func (m *Manager) flushTable(family, t int) error {
	routes, err := m.nlh.RouteListFiltered(family, &netlink.Route{Table: t}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list table %d: %w", t, err)
	}
	var errs []error
	for _, r := range routes {
		m.log.Warn("removing a stale route", "table", t, "route", r.String())
		if err := m.nlh.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("delete route %s from table %d: %w", r, t, err))
		}
	}
	return errors.Join(errs...)
}

// unreachableMetric is the highest metric: the `unreachable default` loses
// to any real default route in the table but catches every lookup when
// there is none.
func unreachableMetric() int { return int(^uint32(0)) }

// tableRoutes builds the routes of an uplink's table for one family.
func tableRoutes(u *uplinkState, family int) []netlink.Route {
	var conn []netlink.Route
	var gw netip.Addr
	var onlink bool
	var zero *net.IPNet
	if family == netlink.FAMILY_V4 {
		conn, gw, onlink = u.conn4, u.Gateway, u.onlink4
		zero = &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
	} else {
		conn, gw, onlink = u.conn6, u.Gateway6, u.onlink6
		zero = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
	}
	var out []netlink.Route
	for _, c := range conn {
		out = append(out, netlink.Route{
			Family:    family,
			Table:     u.Table,
			LinkIndex: u.Index,
			Dst:       c.Dst,
			Src:       c.Src,
			Scope:     c.Scope,
			Protocol:  unix.RTPROT_STATIC,
			Type:      unix.RTN_UNICAST,
		})
	}
	def := netlink.Route{
		Family:    family,
		Table:     u.Table,
		LinkIndex: u.Index,
		Dst:       zero,
		Protocol:  unix.RTPROT_STATIC,
		Type:      unix.RTN_UNICAST,
	}
	if gw.IsValid() {
		def.Gw = gw.AsSlice()
		if onlink {
			def.Flags = unix.RTNH_F_ONLINK
		}
	} else {
		def.Scope = netlink.SCOPE_LINK
	}
	out = append(out, def, netlink.Route{
		Family:   family,
		Table:    u.Table,
		Dst:      zero,
		Priority: unreachableMetric(),
		Protocol: unix.RTPROT_STATIC,
		Type:     unix.RTN_UNREACHABLE,
	})
	return out
}

// up adds an uplink's table, rules and endpoint, and loosens rp_filter.
// What it added is recorded in u, so down can undo a partial up.
func (m *Manager) up(u *uplinkState) error {
	families := []int{netlink.FAMILY_V4}
	if u.Addr6.IsValid() {
		families = append(families, netlink.FAMILY_V6)
	}
	for _, family := range families {
		for _, r := range tableRoutes(u, family) {
			if err := m.nlh.RouteAdd(&r); err != nil {
				return fmt.Errorf("add route %s to table %d: %w", r, u.Table, err)
			}
			u.routes = append(u.routes, r)
		}
		src := u.Addr
		if family == netlink.FAMILY_V6 {
			src = u.Addr6
		}
		rule := netlink.NewRule()
		rule.Family = family
		rule.Priority = u.RulePrio
		rule.Table = u.Table
		rule.Src = prefixIPNet(netip.PrefixFrom(src, src.BitLen()))
		if err := m.nlh.RuleAdd(rule); err != nil {
			return fmt.Errorf("add rule `from %s lookup %d` at priority %d: %w", src, u.Table, u.RulePrio, err)
		}
		u.rules = append(u.rules, *rule)
	}

	flags := FlagSubflow
	if u.Backup {
		flags |= FlagBackup
	}
	ep, err := m.pm.AddEndpoint(Endpoint{Addr: u.Addr, Flags: flags, IfIndex: u.Index})
	if err != nil {
		return err
	}
	u.endpoint = &ep
	u.EndpointID = ep.ID

	if err := inNetns(m.ns, func() error {
		c, err := loosenRPFilter(u.Name)
		u.rpFilter = c
		return err
	}); err != nil {
		return err
	}
	m.log.Info("uplink up", "uplink", u.String())
	return nil
}

// down removes what up added, newest first, and returns the joined errors.
// Things already gone (the interface vanished and took its routes along)
// are not errors.
func (m *Manager) down(u *uplinkState) error {
	var errs []error
	if u.rpFilter != nil {
		errs = append(errs, inNetns(m.ns, u.rpFilter.restore))
		u.rpFilter = nil
	}
	if u.endpoint != nil {
		// Delete by id only if the id still names our endpoint: the
		// kernel reuses ids.
		cur, err := m.pm.Endpoint(u.endpoint.ID)
		switch {
		case err == nil && cur.Addr == u.endpoint.Addr:
			errs = append(errs, m.pm.DelEndpoint(u.endpoint.ID))
		case err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT):
			errs = append(errs, err)
		}
		u.endpoint = nil
		u.EndpointID = 0
	}
	for i := len(u.rules) - 1; i >= 0; i-- {
		if err := m.nlh.RuleDel(&u.rules[i]); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete rule %s: %w", u.rules[i], err))
		}
	}
	u.rules = nil
	for i := len(u.routes) - 1; i >= 0; i-- {
		if err := m.nlh.RouteDel(&u.routes[i]); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete route %s from table %d: %w", u.routes[i], u.Table, err))
		}
	}
	u.routes = nil
	return errors.Join(errs...)
}

func prefixIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
