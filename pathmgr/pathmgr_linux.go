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
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Manager owns the uplinks' tables, rules and MPTCP endpoints in one network
// namespace: the one the thread calling Start was in. Its methods may be
// called from any goroutine: its netlink sockets are opened in that
// namespace, and sysctls are written from a thread that joins it. Run keeps
// the uplinks in step with the host (links, addresses, routes) and with
// SetReachable (the liveness probe's verdicts).
//
// # Who waits for whom
//
// Every new flow asks PreferredSource, and a router's routing table can be
// large enough that dumping it takes a while, so no reader waits on
// netlink: Status, Uplinks and PreferredSource read an immutable view that
// the writers publish after every change, and SetReachable only flips an
// atomic flag and wakes Run. Run reads the host (the dumps) on a socket of
// its own without holding mu; it takes mu only to decide what the reading
// means and to make the changes, and publishes a new view before letting
// go. Close takes mu too, so it never tears down under Run's changes.
type Manager struct {
	cfg Config
	log *slog.Logger
	ns  netns.NsHandle  // where everything lives; closed by Close
	nlh *netlink.Handle // rtnetlink, bound to ns: Start's reading of the host, and every change
	pm  *PM             // mptcp_pm, bound to ns

	// changes counts netlink writes (routes, rules, endpoints): a flapping
	// uplink must not turn into a storm of them.
	changes atomic.Uint64
	// kick asks Run to look at an uplink again now (by position).
	kick chan int

	// uplinks is fixed by Start: neither the slice nor an uplink's Name
	// and pos change afterwards, so SetReachable finds an uplink without a
	// lock. The rest of each uplinkState is mu's, apart from unreachable.
	uplinks []*uplinkState
	// view is what readers see; see publish.
	view atomic.Pointer[view]

	// mu serialises the writers: Run's decisions and the netlink changes
	// that carry them out, and Close. Nothing holds it across a netlink
	// dump, and no reader takes it.
	mu     sync.Mutex
	closed bool
	limits *limitsChange
	now    func() time.Time

	hooks hooks
}

// hooks let tests stop Run at a chosen point, to show who waits for it.
// Set them between Start and Run; nil in production.
type hooks struct {
	observing func() // in Run's reading of the host, after the dumps, without mu
	applying  func() // in Run's decisions, with mu held, before any change
}

// view is every uplink's state as last published. It is never modified
// once published, so readers share it without a lock.
type view struct {
	status []Status // in configuration order
	// preferred is preferredSource(status), worked out once per change
	// rather than once per flow.
	preferred netip.Addr
}

// publish makes the uplinks' current state the one readers see. Writers
// call it with mu held (Start before the Manager is shared) after every
// change, so a reader never sees a state that is not also mu's.
func (m *Manager) publish() {
	st := make([]Status, len(m.uplinks))
	for i, u := range m.uplinks {
		st[i] = u.status()
	}
	m.view.Store(&view{status: st, preferred: preferredSource(st, m.cfg.IPv6)})
}

// current is the view to read: the last published one, or an empty one
// for a Manager that Start did not make.
func (m *Manager) current() *view {
	if v := m.view.Load(); v != nil {
		return v
	}
	return &view{}
}

// uplinkState is one uplink and everything installed for it, so that it
// can be taken down and brought back on its own.
type uplinkState struct {
	Uplink
	pos         int
	state       State
	reason      string
	since       time.Time
	transitions uint64
	// unreachable: the liveness probe says nothing gets through. Atomic,
	// because SetReachable sets it from the prober's goroutine without mu.
	unreachable atomic.Bool
	damp        damper

	conn4, conn6 []netlink.Route // connected routes copied from main
	onlink4      bool            // the main default route had `onlink`
	onlink6      bool
	// Inside, Addr and Gateway are always IPv4 (invalid when there is
	// none); v6 makes Addr6 the uplink's primary address (Config.IPv6).
	v6 bool

	routes   []netlink.Route // added to the uplink's table
	rules    []netlink.Rule  // added
	endpoint *Endpoint       // added
	rpFilter *sysctlChange   // changed
}

func (u *uplinkState) plumbed() bool { return len(u.routes) > 0 || len(u.rules) > 0 }

func (u *uplinkState) status() Status {
	return Status{Uplink: u.public(), State: u.state, Reason: u.reason, Since: u.since, Transitions: u.transitions, Damped: u.damp.suppressed}
}

// public is the Uplink as Status and Uplinks report it: Addr is the
// primary address.
func (u *uplinkState) public() Uplink {
	up := u.Uplink
	if u.v6 {
		up.Addr, up.Gateway = u.Addr6, u.Gateway6
	}
	return up
}

// primary is the address the uplink's endpoint is on.
func (u *uplinkState) primary() netip.Addr {
	if u.v6 {
		return u.Addr6
	}
	return u.Addr
}

// Start validates every uplink (interface exists and is up, has an IPv4
// address and a default route in main) before it changes anything, then
// removes what a crashed earlier run left in mpvpn's tables, rule
// priorities and on the uplinks' addresses, and sets up each uplink (see
// the package comment). On any error it undoes what it did and returns one
// error naming the uplink. An uplink without carrier is not an error: it
// starts down and comes up when Run sees its carrier.
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
	m := &Manager{cfg: cfg, log: cfg.Logger, ns: ns, kick: make(chan int, MaxUplinks), now: time.Now}
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
	names := make([]string, len(cfg.Uplinks))
	for i, uc := range cfg.Uplinks {
		names[i] = uc.Name
	}
	obs, errs := m.observeAll(m.nlh, names)
	for i, uc := range cfg.Uplinks {
		o, err := obs[i], errs[i]
		if err == nil && !o.usable() && o.err != errNoCarrier {
			err = o.err
		}
		if err != nil {
			m.release()
			return nil, fmt.Errorf("pathmgr: uplink %s: %w", uc.Name, err)
		}
		m.uplinks = append(m.uplinks, &uplinkState{
			Uplink: Uplink{Name: uc.Name, Index: o.index, Table: cfg.TableBase + i, RulePrio: cfg.RulePrio + i, Backup: uc.Backup},
			v6:     cfg.IPv6,
			pos:    i,
			since:  m.now(),
			reason: "starting",
		})
	}
	if err := ctx.Err(); err != nil {
		m.release()
		return nil, err
	}

	if err := m.removeStale(obs); err != nil {
		m.release()
		return nil, fmt.Errorf("pathmgr: removing state left by an earlier run: %w", err)
	}
	for i, u := range m.uplinks {
		if err := ctx.Err(); err != nil {
			return nil, errors.Join(err, m.Close())
		}
		if err := m.apply(u, obs[i]); err != nil {
			return nil, errors.Join(fmt.Errorf("pathmgr: uplink %s: %w", u.Name, err), m.Close())
		}
	}
	want, accept := m.cfg.limits()
	lc, err := raiseLimits(m.pm, Limits{Subflows: want, AddAddrAccepted: accept}, m.cfg.Journal)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("pathmgr: %w", err), m.Close())
	}
	m.limits = lc
	m.publish()
	return m, nil
}

// Uplinks returns the uplinks as installed, in configuration order (an
// uplink that is down has no addresses). It reads the last published view:
// no lock, no netlink.
func (m *Manager) Uplinks() []Uplink {
	st := m.current().status
	out := make([]Uplink, len(st))
	for i, s := range st {
		out[i] = s.Uplink
	}
	return out
}

// Status returns every uplink's state, in configuration order. It reads
// the last published view: no lock, no netlink.
func (m *Manager) Status() []Status { return slices.Clone(m.current().status) }

// PreferredSource is the address a new connection to the concentrator
// should be bound to, so that its first subflow leaves through an uplink
// that works (the main table's default route may point at one that is
// withdrawn): the first uplink that is up and not a backup, else a backup
// that is up. Invalid when none is up. Every new flow asks, so it is one
// atomic load: no lock, no netlink.
func (m *Manager) PreferredSource() netip.Addr { return m.current().preferred }

// Changes is the number of routes, rules and endpoints added or removed
// since Start.
func (m *Manager) Changes() uint64 { return m.changes.Load() }

// SetReachable records the liveness probe's verdict on an uplink: false
// withdraws it (its endpoint goes, its table and rule stay), true lets it
// carry data again. Run applies it at once. It never blocks: the prober
// must not wait behind Run's netlink work.
func (m *Manager) SetReachable(name string, ok bool) {
	for _, u := range m.uplinks {
		if u.Name != name || !u.unreachable.CompareAndSwap(ok, !ok) {
			continue
		}
		select {
		case m.kick <- u.pos:
		default: // Run's periodic pass picks it up
		}
	}
}

// Close removes everything Start added and restores what it changed. It
// tries every step and returns the joined errors; calling it again does
// nothing. Stop Run first (cancel its context and wait).
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
		u := m.uplinks[i]
		errs = append(errs, m.delEndpoint(u), m.unplumb(u))
	}
	m.publish()
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

// observation is an uplink as the host has it now.
type observation struct {
	index    int
	err      error // why it cannot carry data; nil when it can
	addr, gw netip.Addr
	onlink   bool
	conn4    []netlink.Route
	addr6    netip.Addr
	v6       bool // the primary address is addr6
	gw6      netip.Addr
	onlink6  bool
	conn6    []netlink.Route
}

func (o observation) usable() bool { return o.err == nil }

var (
	errNoInterface = errors.New("no such interface")
	errNoCarrier   = errors.New("no carrier")
)

// hostTables is what observe reads from the host besides the links: the
// main table's routes and every interface's addresses, by family. One dump
// of each serves every uplink, because the kernel answers a filtered dump
// with the whole table and netlink filters it here: asking per uplink
// would read a router's full table several times per uplink.
type hostTables struct {
	routes map[int][]netlink.Route // main table only
	addrs  map[int][]netlink.Addr
}

// dumpAttempts bounds how often a dump is read again when the kernel
// reports that the table changed while it was being read (NLM_F_DUMP_INTR,
// common on a router whose table is busy). After that the pass fails, and
// the next event or resync reads again.
const dumpAttempts = 3

func retryInterrupted[T any](dump func() ([]T, error)) ([]T, error) {
	for i := 1; ; i++ {
		r, err := dump()
		if err == nil || !errors.Is(err, netlink.ErrDumpInterrupted) || i == dumpAttempts {
			return r, err
		}
	}
}

// dumpHost reads the host's tables through h.
func dumpHost(h *netlink.Handle) (hostTables, error) {
	t := hostTables{routes: map[int][]netlink.Route{}, addrs: map[int][]netlink.Addr{}}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := retryInterrupted(func() ([]netlink.Route, error) {
			return h.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		})
		if err != nil {
			return t, fmt.Errorf("list routes: %w", err)
		}
		addrs, err := retryInterrupted(func() ([]netlink.Addr, error) { return h.AddrList(nil, family) })
		if err != nil {
			return t, fmt.Errorf("list addresses: %w", err)
		}
		t.routes[family], t.addrs[family] = routes, addrs
	}
	return t, nil
}

// observeAll reads the named uplinks from the host through h without
// changing anything, and without taking mu: Run calls it on a socket of
// its own while readers and SetReachable go on. errs[i] is a failure to
// ask about names[i]; what makes an uplink unusable is in its
// observation's err.
func (m *Manager) observeAll(h *netlink.Handle, names []string) (obs []observation, errs []error) {
	obs, errs = make([]observation, len(names)), make([]error, len(names))
	t, err := dumpHost(h)
	if err != nil {
		for i := range errs {
			errs[i] = err
		}
		return obs, errs
	}
	if m.hooks.observing != nil {
		m.hooks.observing()
	}
	for i, name := range names {
		obs[i], errs[i] = observe(h, t, name, m.cfg.IPv6, m.cfg.AnyFamily)
	}
	return obs, errs
}

// observe reads one uplink: its link through h, the rest from t. The
// concentrator's family (IPv6 when v6) is a must, the other optional.
func observe(h *netlink.Handle, t hostTables, name string, v6, anyFamily bool) (observation, error) {
	var o observation
	link, err := h.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			o.err = errNoInterface
			return o, nil
		}
		return o, fmt.Errorf("look up interface: %w", err)
	}
	o.index = link.Attrs().Index
	if link.Attrs().Flags&net.FlagUp == 0 {
		o.err = fmt.Errorf("interface %s is down", name)
		return o, nil
	}

	gw, src, onlink, ok := defaultVia(t.routes[netlink.FAMILY_V4], o.index)
	addr, conn := pickAddr(t, o.index, netlink.FAMILY_V4, src)
	gw6, src6, onlink6, ok6 := defaultVia(t.routes[netlink.FAMILY_V6], o.index)
	addr6, conn6 := pickAddr(t, o.index, netlink.FAMILY_V6, src6)
	// The concentrator's family is a must: subflows and probes leave
	// from that address.
	if anyFamily {
		// Either family will do: the concentrator's when the uplink has
		// it, else the other.
		has4, has6 := addr.IsValid() && ok, addr6.IsValid() && ok6
		v6 = (v6 && has6) || (!v6 && !has4 && has6)
	}
	o.v6 = v6
	must, mustOK, fam := addr, ok, "IPv4"
	if v6 {
		must, mustOK, fam = addr6, ok6, "IPv6"
	}
	switch {
	case !must.IsValid():
		o.err = fmt.Errorf("no %s address on %s (the concentrator is reached over %s; MPTCP subflows and source routing need one)", fam, name, fam)
		return o, nil
	case !mustOK:
		o.err = fmt.Errorf("no %s default route on %s in the main table (mpvpn sends each uplink's traffic to the gateway the host already uses there, e.g. the one DHCP installed)", fam, name)
		return o, nil
	}
	// The other family: source routing only, when the uplink has both an
	// address and a default route.
	if addr.IsValid() && ok {
		o.addr, o.gw, o.onlink, o.conn4 = addr, gw, onlink, conn
	}
	if addr6.IsValid() && ok6 {
		o.addr6, o.gw6, o.onlink6, o.conn6 = addr6, gw6, onlink6, conn6
	}
	// Carrier last: an uplink without it is otherwise fine (a cable
	// pulled), and Start accepts it. IFF_LOWER_UP is the carrier; the
	// operational state of a veth or Wi-Fi follows it.
	if link.Attrs().RawFlags&unix.IFF_LOWER_UP == 0 {
		o.err = errNoCarrier
	}
	return o, nil
}

// samePlumbing reports whether what is installed for u matches o.
func samePlumbing(u *uplinkState, o observation) bool {
	return u.Index == o.index && u.v6 == o.v6 && u.Addr == o.addr && u.Gateway == o.gw && u.onlink4 == o.onlink &&
		u.Addr6 == o.addr6 && u.Gateway6 == o.gw6 && u.onlink6 == o.onlink6 &&
		sameDsts(u.conn4, o.conn4) && sameDsts(u.conn6, o.conn6)
}

func sameDsts(a, b []netlink.Route) bool {
	return slices.EqualFunc(a, b, func(x, y netlink.Route) bool {
		return x.Dst.String() == y.Dst.String() && x.Src.Equal(y.Src)
	})
}

// apply brings what is installed for u in line with o, the liveness verdict
// and the damper, and records u's new state. Withdrawing is never delayed;
// coming back may be, for a flapping uplink (see damper), and then apply
// returns how long until it should be tried again.
func (m *Manager) apply(u *uplinkState, o observation) error {
	_, err := m.applyAt(u, o, m.now())
	return err
}

func (m *Manager) applyAt(u *uplinkState, o observation, now time.Time) (retry time.Duration, err error) {
	var errs []error
	wasUp := u.state == StateUp
	if u.plumbed() && (!o.usable() || !samePlumbing(u, o)) {
		errs = append(errs, m.delEndpoint(u), m.unplumb(u))
		if o.usable() {
			m.log.Info("uplink changed", "uplink", u.Name, "addr", o.addr.String(), "gateway", o.gw.String())
		}
	}
	state, reason := StateUp, ""
	switch {
	case !o.usable():
		state, reason = StateDown, o.err.Error()
		// The probe's verdict was about the uplink as it was; when it
		// is back it is probed afresh (and assumed to work until then).
		u.unreachable.Store(false)
	case u.unreachable.Load():
		state, reason = StateWithdrawn, "the concentrator does not answer over it"
	}
	if state != StateUp && wasUp {
		u.damp.lost(now)
	}
	if o.usable() && !u.plumbed() {
		if ok, wait := u.damp.allow(now); !ok {
			state, reason, retry = StateWithdrawn, "flapping: held back", wait
		} else if err := m.plumb(u, o); err != nil {
			errs = append(errs, err, m.unplumb(u))
			state, reason = StateDown, err.Error()
		}
	}
	if state == StateUp && u.endpoint == nil {
		if ok, wait := u.damp.allow(now); !ok {
			state, reason, retry = StateWithdrawn, "flapping: held back", wait
		} else if err := m.addEndpoint(u); err != nil {
			errs = append(errs, err)
			state, reason = StateWithdrawn, err.Error()
		}
	}
	if state != StateUp {
		errs = append(errs, m.delEndpoint(u))
	}
	if !u.plumbed() {
		u.Addr, u.Gateway, u.Addr6, u.Gateway6 = netip.Addr{}, netip.Addr{}, netip.Addr{}, netip.Addr{}
	}
	if o.index != 0 {
		u.Index = o.index
	}
	if state != u.state || reason != u.reason {
		if state != u.state {
			u.transitions++
			u.since = now
		}
		u.state, u.reason = state, reason
		lvl := slog.LevelInfo
		if u.damp.suppressed {
			lvl = slog.LevelDebug // a flapping link would flood the log
		}
		m.log.Log(context.Background(), lvl, "uplink "+state.String(), "uplink", u.Name, "addr", u.primary().String(), "reason", reason, "endpoint", u.EndpointID)
	}
	return retry, errors.Join(errs...)
}

// defaultVia finds the best (lowest metric) default route among main's
// routes that leaves through ifindex idx, as a DHCP client or RA leaves one
// per interface. ok is false when there is none; gw is invalid for a
// point-to-point default without a next hop.
func defaultVia(main []netlink.Route, idx int) (gw, src netip.Addr, onlink, ok bool) {
	best := -1
	for _, r := range main {
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
	return gw, src, onlink, ok
}

func isDefault(dst *net.IPNet) bool {
	if dst == nil {
		return true
	}
	ones, _ := dst.Mask.Size()
	return ones == 0
}

// pickAddr chooses the source address of a family for the link with index
// idx: the default route's preferred source if it is on the link, else the
// first usable global address (primary, not tentative, deprecated or
// temporary). It also returns the link's connected routes in main, which
// the uplink's table copies so that traffic from the address to its own
// subnet stays on link.
func pickAddr(t hostTables, idx, family int, prefsrc netip.Addr) (netip.Addr, []netlink.Route) {
	const unusable = unix.IFA_F_TENTATIVE | unix.IFA_F_DADFAILED | unix.IFA_F_DEPRECATED | unix.IFA_F_SECONDARY
	var chosen, fallback netip.Addr
	for _, a := range t.addrs[family] {
		if a.LinkIndex != idx {
			continue
		}
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
		return netip.Addr{}, nil
	}
	var conn []netlink.Route
	for _, r := range t.routes[family] {
		if r.LinkIndex != idx || r.Protocol != unix.RTPROT_KERNEL || r.Gw != nil || isDefault(r.Dst) || r.Type != unix.RTN_UNICAST {
			continue
		}
		conn = append(conn, r)
	}
	return chosen, conn
}

// removeStale deletes what an earlier, crashed run may have left: routes in
// mpvpn's tables, rules at mpvpn's priorities pointing into them, and MPTCP
// endpoints on (or bound to) the uplinks. See the package comment.
func (m *Manager) removeStale(obs []observation) error {
	var errs []error
	done, err := removeRulesAndTables(m.nlh, &m.cfg)
	for _, d := range done {
		m.log.Warn("removed what an earlier run left", "what", d)
	}
	errs = append(errs, err)

	eps, err := m.pm.Endpoints()
	if err != nil {
		return err
	}
	for _, ep := range eps {
		if !m.staleEndpoint(ep, obs) {
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
func (m *Manager) staleEndpoint(ep Endpoint, obs []observation) bool {
	for i, u := range m.uplinks {
		o := obs[i]
		if (o.addr.IsValid() && ep.Addr == o.addr) || (o.addr6.IsValid() && ep.Addr == o.addr6) {
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

// plumb installs an uplink's table and rules for o, and loosens rp_filter.
// What it added is recorded in u, so unplumb can undo a partial plumb.
func (m *Manager) plumb(u *uplinkState, o observation) error {
	u.Index = o.index
	u.Addr, u.Gateway, u.onlink4, u.conn4 = o.addr, o.gw, o.onlink, o.conn4
	u.v6 = o.v6
	u.Addr6, u.Gateway6, u.onlink6, u.conn6 = o.addr6, o.gw6, o.onlink6, o.conn6
	var families []int
	if u.Addr.IsValid() {
		families = append(families, netlink.FAMILY_V4)
	}
	if u.Addr6.IsValid() {
		families = append(families, netlink.FAMILY_V6)
	}
	for _, family := range families {
		for _, r := range tableRoutes(u, family) {
			m.changes.Add(1)
			if err := m.nlh.RouteAdd(&r); err != nil {
				return fmt.Errorf("add route %s to table %d: %w", r, u.Table, err)
			}
			u.routes = append(u.routes, r)
		}
		src := u.Addr
		if family == netlink.FAMILY_V6 {
			src = u.Addr6
		}
		rules := []*netlink.Rule{sourceRule(family, u.RulePrio, u, src, m.cfg.Mark)}
		if m.cfg.Mark != 0 {
			rules = append(rules, sourceRule(family, m.cfg.FallbackPrio+u.pos, u, src, 0))
		}
		for _, rule := range rules {
			m.changes.Add(1)
			if err := m.nlh.RuleAdd(rule); err != nil {
				return fmt.Errorf("add %s: %w", ruleString(*rule), err)
			}
			u.rules = append(u.rules, *rule)
		}
	}
	if u.rpFilter == nil {
		if err := inNetns(m.ns, func() error {
			c, err := loosenRPFilter(u.Name, m.cfg.Journal)
			u.rpFilter = c
			return err
		}); err != nil {
			return err
		}
	}
	return nil
}

// sourceRule is `from <src> fwmark <mark> lookup <uplink's table>` at
// priority prio (without the fwmark when mark is 0). The mask is the
// whole mark: routing's ladder matches mpvpn's marks exactly too.
func sourceRule(family, prio int, u *uplinkState, src netip.Addr, mark uint32) *netlink.Rule {
	rule := netlink.NewRule()
	rule.Family = family
	rule.Priority = prio
	rule.Table = u.Table
	rule.Src = prefixIPNet(netip.PrefixFrom(src, src.BitLen()))
	if mark != 0 {
		mask := ^uint32(0)
		rule.Mark, rule.Mask = mark, &mask
	}
	return rule
}

// addEndpoint adds the uplink's MPTCP endpoint. The kernel's path manager
// then adds a subflow from it to every established connection at once
// (and to every new one).
func (m *Manager) addEndpoint(u *uplinkState) error {
	flags := FlagSubflow
	if u.Backup {
		flags |= FlagBackup
	}
	if m.cfg.fullmesh() {
		flags |= FlagFullmesh
	}
	m.changes.Add(1)
	ep, err := m.pm.AddEndpoint(Endpoint{Addr: u.primary(), Flags: flags, IfIndex: u.Index})
	if err != nil {
		return err
	}
	u.endpoint = &ep
	u.EndpointID = ep.ID
	return nil
}

// delEndpoint removes the uplink's MPTCP endpoint, if it has one: the
// kernel closes the subflows using it (the first subflow of a connection
// too, when it was opened from the endpoint's address), and their unacked
// data goes out on the others.
func (m *Manager) delEndpoint(u *uplinkState) error {
	if u.endpoint == nil {
		return nil
	}
	var err error
	// Delete by id only if the id still names our endpoint: the kernel
	// reuses ids.
	cur, gerr := m.pm.Endpoint(u.endpoint.ID)
	switch {
	case gerr == nil && cur.Addr == u.endpoint.Addr:
		m.changes.Add(1)
		err = m.pm.DelEndpoint(u.endpoint.ID)
	case gerr != nil && !errors.Is(gerr, unix.EINVAL) && !errors.Is(gerr, unix.ENOENT):
		err = gerr
	}
	u.endpoint = nil
	u.EndpointID = 0
	return err
}

// unplumb removes what plumb added, newest first, and returns the joined
// errors. Things already gone (the interface went down and took its routes
// along) are not errors.
func (m *Manager) unplumb(u *uplinkState) error {
	var errs []error
	if u.rpFilter != nil {
		errs = append(errs, inNetns(m.ns, u.rpFilter.restore))
		u.rpFilter = nil
	}
	for i := len(u.rules) - 1; i >= 0; i-- {
		m.changes.Add(1)
		if err := m.nlh.RuleDel(&u.rules[i]); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete rule %s: %w", u.rules[i], err))
		}
	}
	u.rules = nil
	for i := len(u.routes) - 1; i >= 0; i-- {
		m.changes.Add(1)
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
