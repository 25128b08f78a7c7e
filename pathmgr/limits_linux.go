package pathmgr

import (
	"fmt"
	"sync"

	"github.com/vishvananda/netns"
)

// SetLimits sets the MPTCP path manager's limits in the calling thread's
// network namespace (`ip mptcp limits set subflows N add_addr_accepted M`).
// Each must be at most MaxEndpoints (8).
func SetLimits(subflows, addAddrAccepted uint32) error {
	pm, err := OpenPM(netns.None())
	if err != nil {
		return err
	}
	defer pm.Close()
	return pm.SetLimits(Limits{Subflows: subflows, AddAddrAccepted: addAddrAccepted})
}

// RaiseLimits raises the MPTCP limits in the calling thread's network
// namespace to at least the given values (a higher value already set is
// kept) and returns a function that puts back the old values, unless they
// were changed again in between. The concentrator uses it with 8, 8.
func RaiseLimits(subflows, addAddrAccepted uint32) (restore func() error, err error) {
	// The restore may run on another thread: remember the namespace.
	ns, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("current network namespace: %w", err)
	}
	pm, err := OpenPM(ns)
	if err != nil {
		ns.Close()
		return nil, err
	}
	defer pm.Close()
	lc, err := raiseLimits(pm, Limits{Subflows: subflows, AddAddrAccepted: addAddrAccepted}, nil)
	if err != nil {
		ns.Close()
		return nil, err
	}
	var once sync.Once
	return func() error {
		var err error // a second call does nothing
		once.Do(func() { err = restoreIn(ns, lc) })
		return err
	}, nil
}

func restoreIn(ns netns.NsHandle, lc *limitsChange) error {
	defer ns.Close()
	pm, err := OpenPM(ns)
	if err != nil {
		return err
	}
	defer pm.Close()
	return lc.restore(pm)
}

// limitsChange remembers the limits before and after a raise.
type limitsChange struct {
	old, set Limits
}

func raiseLimits(pm *PM, want Limits, journal func(kind, name, before string) error) (*limitsChange, error) {
	old, err := pm.Limits()
	if err != nil {
		return nil, err
	}
	set := Limits{
		Subflows:        max(old.Subflows, want.Subflows),
		AddAddrAccepted: max(old.AddAddrAccepted, want.AddAddrAccepted),
	}
	if set == old {
		return &limitsChange{old: old, set: set}, nil
	}
	if journal != nil {
		if err := journal(JournalLimits, "", old.String()); err != nil {
			return nil, err
		}
	}
	if err := pm.SetLimits(set); err != nil {
		return nil, err
	}
	return &limitsChange{old: old, set: set}, nil
}

// restore puts the old limits back if they are still the ones we set.
func (c *limitsChange) restore(pm *PM) error {
	if c.old == c.set {
		return nil
	}
	cur, err := pm.Limits()
	if err != nil {
		return err
	}
	if cur != c.set {
		return nil
	}
	return pm.SetLimits(c.old)
}

// Journal kinds (Config.Journal).
const (
	JournalSysctl = "sysctl"
	JournalLimits = "mptcp-limits"
)

// String is the limits as `ip mptcp limits` prints them, which
// ParseLimits reads back.
func (l Limits) String() string {
	return fmt.Sprintf("add_addr_accepted %d subflows %d", l.AddAddrAccepted, l.Subflows)
}

// ParseLimits reads what Limits.String writes.
func ParseLimits(s string) (Limits, error) {
	var l Limits
	if _, err := fmt.Sscanf(s, "add_addr_accepted %d subflows %d", &l.AddAddrAccepted, &l.Subflows); err != nil {
		return Limits{}, fmt.Errorf("MPTCP limits %q: %w", s, err)
	}
	return l, nil
}

// SetLimitsTo sets the limits in the calling thread's network namespace
// to l (what `mpvpn down` puts back from a journal).
func SetLimitsTo(l Limits) error { return SetLimits(l.Subflows, l.AddAddrAccepted) }
