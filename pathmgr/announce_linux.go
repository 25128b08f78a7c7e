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
// connection of this network namespace: signal endpoints, for a
// concentrator reachable over both families, so that a client's uplinks
// of the other family can join its connections. An endpoint already on
// one of the addresses (left by a crashed run, say) is replaced. withdraw
// removes what Announce added.
func Announce(addrs []netip.Addr) (withdraw func() error, err error) {
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
	for _, a := range addrs {
		a = a.Unmap()
		for _, e := range existing {
			if e.Addr == a {
				if err := pm.DelEndpoint(e.ID); err != nil {
					return nil, errors.Join(fmt.Errorf("pathmgr: replace the endpoint on %s: %w", a, err), undo())
				}
			}
		}
		ep, err := pm.AddEndpoint(Endpoint{Addr: a, Flags: FlagSignal})
		if err != nil {
			return nil, errors.Join(fmt.Errorf("pathmgr: announce %s: %w", a, err), undo())
		}
		ids = append(ids, ep.ID)
	}
	return undo, nil
}
