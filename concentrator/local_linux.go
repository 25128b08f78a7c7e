package concentrator

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ownAddrs keeps the set of this host's own addresses, for Policy.Own.
//
// A policy check runs on every flow, so it must not wait on netlink: the
// set is kept current from an address subscription and published as an
// immutable snapshot that Policy.Own loads without locking. While the
// subscription is broken the snapshot is nil, and the policy refuses
// everything until it is whole again (fail closed: a missed address would
// let clients reach the host itself).
//
// The subscription only says that something changed; the set is then read
// in full with a dump. Applying the updates themselves would not do:
// netlink.AddrUpdate (v1.3.1) drops the broadcast address, and with
// ListExisting the end of the initial listing is not reported, so there
// would be no moment at which the set is known to be complete.
//
// Between a change and the dump that follows it (a millisecond or so) the
// previous snapshot is in use; refusing every flow across each router
// advertisement's address refresh would cost more than that window risks.
type ownAddrs struct {
	log       *slog.Logger
	ns        netns.NsHandle // netns.None(): the calling thread's namespace
	subscribe subscribeFunc

	cur  atomic.Pointer[AddrSet]
	stop chan struct{}
	done chan struct{}
	once sync.Once
}

type subscribeFunc func(chan<- netlink.AddrUpdate, <-chan struct{}, netlink.AddrSubscribeOptions) error

const (
	// dumpTimeout bounds one netlink request, so a stuck socket cannot
	// hang the tracker, and with it Close.
	dumpTimeout = 5 * time.Second
	// The resubscription backoff: quick for a transient error (a burst of
	// changes overflowing the socket), slow enough not to spin on a
	// persistent one.
	minBackoff = 100 * time.Millisecond
	maxBackoff = 5 * time.Second
	// dumpRetries is how often a dump the kernel marked interrupted (the
	// addresses changed while it ran) is repeated before giving up.
	dumpRetries = 5
)

// startOwnAddrs subscribes to address changes in ns and reads the first
// set before it returns, so a concentrator never serves without one. ns
// is netns.None() for the namespace of the calling thread: only tests pass
// another, since entering a namespace needs CAP_SYS_ADMIN. subscribe is
// netlink.AddrSubscribeWithOptions unless a test replaces it.
func startOwnAddrs(log *slog.Logger, ns netns.NsHandle, subscribe subscribeFunc) (*ownAddrs, error) {
	if subscribe == nil {
		subscribe = netlink.AddrSubscribeWithOptions
	}
	o := &ownAddrs{
		log:       log,
		ns:        ns,
		subscribe: subscribe,
		stop:      make(chan struct{}),
		done:      make(chan struct{}),
	}
	s, err := o.open()
	if err != nil {
		return nil, err
	}
	go o.run(s)
	return o, nil
}

// Snapshot is the current set, or nil while it is not known.
func (o *ownAddrs) Snapshot() *AddrSet { return o.cur.Load() }

// Close stops the tracker and waits for it; the snapshot is nil after.
// It may be called more than once.
func (o *ownAddrs) Close() {
	o.once.Do(func() { close(o.stop) })
	<-o.done
}

// subscription is one netlink address subscription and the handle its
// dumps go through. Both are made in the tracker's namespace when it is
// opened, so they stay there whichever thread later uses them.
type subscription struct {
	updates chan netlink.AddrUpdate
	done    chan struct{}
	errc    chan error
	h       *netlink.Handle
}

// open subscribes, then dumps: in that order, a change made during the
// dump also shows up as an update, and is read by the next dump.
func (o *ownAddrs) open() (*subscription, error) {
	h, err := netlink.NewHandleAt(o.ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink handle: %w", err)
	}
	if err := h.SetSocketTimeout(dumpTimeout); err != nil {
		h.Close()
		return nil, fmt.Errorf("netlink handle timeout: %w", err)
	}
	s := &subscription{
		// Room for a burst (an interface coming up with several
		// addresses) while a dump runs; beyond it the kernel drops and
		// the subscription resets.
		updates: make(chan netlink.AddrUpdate, 64),
		done:    make(chan struct{}),
		errc:    make(chan error, 1),
		h:       h,
	}
	ns := o.ns
	err = o.subscribe(s.updates, s.done, netlink.AddrSubscribeOptions{
		Namespace: &ns,
		// Every report counts as a break, the non-fatal ones too (a
		// message that did not parse is an address we did not see).
		ErrorCallback: func(err error) {
			select {
			case s.errc <- err:
			default:
			}
		},
	})
	if err != nil {
		// The library may have started only the goroutine that waits on
		// done; nothing will close updates, so do not drain it.
		close(s.done)
		h.Close()
		return nil, fmt.Errorf("subscribe to address changes: %w", err)
	}
	if err := o.dump(s); err != nil {
		s.close()
		return nil, err
	}
	return s, nil
}

// close ends the subscription and waits for the library's receiver to
// exit (it closes updates when its socket is closed under it).
func (s *subscription) close() {
	close(s.done)
	for range s.updates {
	}
	s.h.Close()
}

// dump reads every address of every interface and publishes the set.
func (o *ownAddrs) dump(s *subscription) error {
	var addrs []netlink.Addr
	var err error
	for range dumpRetries {
		addrs, err = s.h.AddrList(nil, netlink.FAMILY_ALL)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("list addresses: %w", err)
	}
	o.cur.Store(ownSet(addrs))
	return nil
}

// ownSet is the addresses of all interfaces, plus the IPv4 broadcast
// addresses the kernel gives them a broadcast route for: the one set on
// the address, if any, and the subnet's directed broadcast (prefixes
// shorter than /31). The kernel counts those as local, as the route lookup
// this replaces did.
func ownSet(addrs []netlink.Addr) *AddrSet {
	var set []netip.Addr
	for _, a := range addrs {
		if a.IPNet == nil {
			continue
		}
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		set = append(set, ip)
		if !ip.Is4() {
			continue
		}
		if b, ok := netip.AddrFromSlice(a.Broadcast); ok && b.Unmap().Is4() {
			set = append(set, b.Unmap())
		}
		if ones, bits := a.Mask.Size(); bits == 8*net.IPv4len && ones < 31 {
			set = append(set, directedBroadcast(netip.PrefixFrom(ip, ones)))
		}
	}
	return NewAddrSet(set...)
}

func directedBroadcast(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	for i := p.Bits(); i < 32; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	return netip.AddrFrom4(b)
}

// run follows s until Close, resubscribing whenever it breaks.
func (o *ownAddrs) run(s *subscription) {
	defer close(o.done)
	defer o.cur.Store(nil)
	backoff := minBackoff
	for {
		err := o.follow(s)
		s.close()
		if err == nil {
			return // Close
		}
		o.cur.Store(nil)
		o.log.Warn("own-address set unavailable, refusing every destination until it is read again", "err", err)
		for {
			t := time.NewTimer(backoff)
			select {
			case <-o.stop:
				t.Stop()
				return
			case <-t.C:
			}
			backoff = min(2*backoff, maxBackoff)
			if s, err = o.open(); err == nil {
				break
			}
			o.log.Warn("cannot read the own-address set", "err", err, "retry_in", backoff)
		}
		backoff = minBackoff
		o.log.Info("own-address set read again", "addrs", o.cur.Load().Len())
	}
}

// follow dumps again after each burst of changes, and returns nil on Close
// or the error that broke the subscription.
func (o *ownAddrs) follow(s *subscription) error {
	for {
		select {
		case <-o.stop:
			return nil
		case err := <-s.errc:
			return fmt.Errorf("address subscription: %w", err)
		case _, ok := <-s.updates:
			if !ok {
				// The receiver reports why before it closes updates.
				select {
				case err := <-s.errc:
					return fmt.Errorf("address subscription: %w", err)
				default:
					return errors.New("address subscription closed")
				}
			}
			// One dump covers the whole burst.
			for drained := false; !drained; {
				select {
				case _, ok := <-s.updates:
					drained = !ok
				default:
					drained = true
				}
			}
			if err := o.dump(s); err != nil {
				return err
			}
		}
	}
}
