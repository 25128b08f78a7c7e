package pathmgr

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// How Run paces itself.
const (
	// settle lets a burst of netlink events (an address going takes its
	// routes along, a DHCP client adds an address then a route) arrive
	// before the uplink is looked at again, so one change of the host is
	// one change of mpvpn's state, not several.
	settle = 20 * time.Millisecond
	// resync looks at every uplink again even without events: a netlink
	// socket that overflows (ENOBUFS) loses events, and this bounds how
	// long such a loss can leave an uplink wrong.
	resync = 2 * time.Second
	// resubscribe is the pause before a failed subscription is opened
	// again.
	resubscribe = time.Second
)

// Run watches the host's links, addresses and routes (rtnetlink multicast
// groups) and keeps every uplink's table, rule and MPTCP endpoint in step
// with them until ctx is done: an uplink that loses its carrier, its
// address or its gateway is withdrawn at once (its endpoint deleted, so
// the kernel closes its subflows and sends their data on the others); when
// it works again it is restored (the endpoint added back, so established
// connections get a subflow on it at once rather than at the next backed
// off retransmission); a new address moves the table, rule and endpoint.
// Run returns nil when ctx is done, and an error only if the watch cannot
// be started at all.
//
// Run reads the host on a netlink socket of its own and without holding
// the Manager's lock (see Manager), so its dumps never hold up a reader,
// SetReachable or Close, and never queue behind its own changes.
func (m *Manager) Run(ctx context.Context) error {
	h, err := m.openObserver()
	if err != nil {
		return err
	}
	defer h.Close()
	w, err := m.subscribe()
	if err != nil {
		return err
	}
	defer func() { w.stop() }()

	dirty := make([]bool, len(m.uplinks))
	markAll := func() {
		for i := range dirty {
			dirty[i] = true
		}
	}
	settleT := time.NewTimer(time.Hour)
	settleT.Stop()
	defer settleT.Stop()
	pending := false
	schedule := func(d time.Duration) {
		if !pending || d < settle {
			settleT.Reset(d)
			pending = true
		}
	}
	retryT := time.NewTimer(time.Hour)
	retryT.Stop()
	defer retryT.Stop()
	tick := time.NewTicker(resync)
	defer tick.Stop()

	// What changed while Start ran.
	markAll()
	schedule(0)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-w.failed:
			m.log.Warn("netlink watch lost; subscribing again")
			w.stop()
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(resubscribe):
			}
			if w, err = m.subscribe(); err != nil {
				return err
			}
			markAll()
			schedule(0)
		case lu := <-w.links:
			for i, u := range m.current().status {
				if u.Index == int(lu.Index) || u.Name == lu.Attrs().Name {
					dirty[i] = true
					schedule(settle)
				}
			}
		case au := <-w.addrs:
			for i, u := range m.current().status {
				if u.Index == au.LinkIndex {
					dirty[i] = true
					schedule(settle)
				}
			}
		case ru := <-w.routes:
			if ru.Table != unix.RT_TABLE_MAIN {
				continue // mpvpn's own tables, and others that say nothing about uplinks
			}
			for i, u := range m.current().status {
				if routeUses(ru.Route, u.Index) {
					dirty[i] = true
					schedule(settle)
				}
			}
		case pos := <-m.kick:
			// The liveness probe's verdict: no settling, it is one event.
			dirty[pos] = true
			schedule(0)
		case <-tick.C:
			markAll()
			schedule(0)
		case <-retryT.C:
			markAll()
			schedule(0)
		case <-settleT.C:
			pending = false
			if wait := m.reconcile(h, dirty); wait > 0 {
				retryT.Reset(wait)
			}
			clear(dirty)
		}
	}
}

// openObserver opens the socket Run reads the host through. Under mu only
// so that Close cannot close the namespace handle while it is used here.
func (m *Manager) openObserver() (*netlink.Handle, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errors.New("pathmgr: Run after Close")
	}
	h, err := netlink.NewHandleAt(m.ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("pathmgr: rtnetlink: %w", err)
	}
	return h, nil
}

func routeUses(r netlink.Route, idx int) bool {
	if r.LinkIndex == idx {
		return true
	}
	for _, nh := range r.MultiPath {
		if nh.LinkIndex == idx {
			return true
		}
	}
	return false
}

// reconcile looks at the dirty uplinks again through h and applies what it
// sees. It returns the shortest wait a damped uplink asked for (0: none).
//
// It reads first, without mu: the dumps are the slow part, and on a router
// with a large table they would otherwise hold up Close and every change.
// What it read may be a few milliseconds old when it is applied; a change
// of the host in between raises an event (or the resync sees it) and the
// uplink is looked at again.
func (m *Manager) reconcile(h *netlink.Handle, dirty []bool) time.Duration {
	var pos []int
	var names []string
	for i, d := range dirty {
		if d {
			pos = append(pos, i)
			names = append(names, m.uplinks[i].Name)
		}
	}
	if len(pos) == 0 {
		return 0
	}
	obs, errs := m.observeAll(h, names)

	var notify []Status
	var wait time.Duration
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return 0
	}
	if m.hooks.applying != nil {
		m.hooks.applying()
	}
	for j, i := range pos {
		u := m.uplinks[i]
		if errs[j] != nil {
			m.log.Warn("cannot read uplink", "uplink", u.Name, "err", errs[j])
			continue
		}
		before := u.status()
		retry, err := m.applyAt(u, obs[j], m.now())
		if err != nil {
			m.log.Warn("uplink change incomplete", "uplink", u.Name, "err", err)
		}
		if retry > 0 && (wait == 0 || retry < wait) {
			wait = retry
		}
		after := u.status()
		if after == before {
			continue
		}
		// Publish each uplink as soon as it is done, so a withdrawn
		// uplink stops being preferred before the next one's changes.
		m.publish()
		if after.State != before.State || after.Addr != before.Addr || after.Addr6 != before.Addr6 {
			notify = append(notify, after)
		}
	}
	m.mu.Unlock()
	if m.cfg.OnChange != nil {
		for _, s := range notify {
			m.cfg.OnChange(s)
		}
	}
	return wait
}

// watch is one set of rtnetlink subscriptions.
type watch struct {
	done   chan struct{}
	links  chan netlink.LinkUpdate
	addrs  chan netlink.AddrUpdate
	routes chan netlink.RouteUpdate
	failed chan struct{} // closed when a subscription reports an error
	subs   int           // how many of links, addrs, routes are subscribed
}

func (m *Manager) subscribe() (*watch, error) {
	w := &watch{
		done:   make(chan struct{}),
		links:  make(chan netlink.LinkUpdate, 64),
		addrs:  make(chan netlink.AddrUpdate, 64),
		routes: make(chan netlink.RouteUpdate, 64),
		failed: make(chan struct{}),
	}
	failCh := make(chan struct{}, 1)
	errCB := func(err error) {
		select {
		case <-w.done:
			// stop closed the sockets, and each subscription reports
			// its next receive failing: not a lost watch.
			return
		default:
		}
		m.log.Warn("netlink watch", "err", err)
		select {
		case failCh <- struct{}{}:
		default:
		}
	}
	// A large receive buffer: a route flush on a busy host is many
	// messages at once. resync catches what is lost anyway.
	const rcvbuf = 1 << 20
	ns := m.ns
	if err := netlink.LinkSubscribeWithOptions(w.links, w.done, netlink.LinkSubscribeOptions{Namespace: &ns, ErrorCallback: errCB, ReceiveBufferSize: rcvbuf}); err != nil {
		close(w.done)
		return nil, fmt.Errorf("pathmgr: watch links: %w", err)
	}
	w.subs++
	if err := netlink.AddrSubscribeWithOptions(w.addrs, w.done, netlink.AddrSubscribeOptions{Namespace: &ns, ErrorCallback: errCB, ReceiveBufferSize: rcvbuf}); err != nil {
		w.stop()
		return nil, fmt.Errorf("pathmgr: watch addresses: %w", err)
	}
	w.subs++
	if err := netlink.RouteSubscribeWithOptions(w.routes, w.done, netlink.RouteSubscribeOptions{Namespace: &ns, ErrorCallback: errCB, ReceiveBufferSize: rcvbuf}); err != nil {
		w.stop()
		return nil, fmt.Errorf("pathmgr: watch routes: %w", err)
	}
	w.subs++
	go func() {
		select {
		case <-failCh:
			close(w.failed)
		case <-w.done:
		}
	}()
	return w, nil
}

// stop ends the subscriptions and waits for their goroutines: each closes
// its channel when its socket is closed.
func (w *watch) stop() {
	select {
	case <-w.done:
		return
	default:
	}
	close(w.done)
	if w.subs > 0 {
		for range w.links {
		}
	}
	if w.subs > 1 {
		for range w.addrs {
		}
	}
	if w.subs > 2 {
		for range w.routes {
		}
	}
}
