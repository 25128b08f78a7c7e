//go:build linux

package pathmgr

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"github.com/vishvananda/netns"
)

// Announce makes the kernel announce addrs (ADD_ADDR) on every MPTCP
// connection of this network namespace, in this order: signal endpoints.
// A port of 0 announces the address alone (joins go to the port the
// connection began on): a concentrator's address of the other family, so
// that a client's uplinks of that family can join its connections. A port
// announces that port too, and the kernel listens on it for joins: more
// 5-tuples between the same two addresses, so that equal-cost paths each
// carry some of a connection's subflows. An endpoint already on one of
// the address and port pairs (left by a crashed run, say) is replaced.
// withdraw removes what Announce added.
func Announce(addrs []netip.AddrPort) (withdraw func() error, err error) {
	ns, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("current network namespace: %w", err)
	}
	// ns stays open for withdraw, which may run on another thread.
	pm, err := OpenPM(ns)
	if err != nil {
		ns.Close()
		return nil, err
	}
	defer pm.Close()
	existing, err := pm.Endpoints()
	if err != nil {
		ns.Close()
		return nil, err
	}
	var ids []uint8
	remove := func() error {
		pm, err := OpenPM(ns)
		if err != nil {
			return err
		}
		defer pm.Close()
		var errs []error
		for _, id := range ids {
			errs = append(errs, pm.DelEndpoint(id))
		}
		return errors.Join(errs...)
	}
	var once sync.Once
	undo := func() (err error) {
		once.Do(func() { err = remove(); ns.Close() })
		return err
	}
	for _, ap := range addrs {
		a, port := ap.Addr().Unmap(), ap.Port()
		for _, e := range existing {
			if e.Addr == a && e.Port == port {
				if err := pm.DelEndpoint(e.ID); err != nil {
					return nil, errors.Join(fmt.Errorf("pathmgr: replace the endpoint on %s: %w", announced(a, port), err), undo())
				}
			}
		}
		ep, err := pm.AddEndpoint(Endpoint{Addr: a, Port: port, Flags: FlagSignal})
		if err != nil {
			return nil, errors.Join(fmt.Errorf("pathmgr: announce %s: %w", announced(a, port), err), undo())
		}
		ids = append(ids, ep.ID)
	}
	return undo, nil
}

// announced spells an announcement: the address, with its port if any.
func announced(a netip.Addr, port uint16) string {
	if port == 0 {
		return a.String()
	}
	return netip.AddrPortFrom(a, port).String()
}
