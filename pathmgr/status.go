//go:build linux

package pathmgr

import (
	"math"
	"net/netip"
	"time"
)

// State is what an uplink is doing for mpvpn's flows right now.
type State int

const (
	// StateDown: the uplink cannot carry anything: the interface is
	// missing, down or without carrier, or it has no address or no default
	// route. Nothing of mpvpn's is installed for it.
	StateDown State = iota
	// StateUp: table, rule and MPTCP endpoint in place; flows have a
	// subflow on it.
	StateUp
	// StateWithdrawn: the link looks fine but the uplink must not carry
	// data, because the concentrator does not answer over it (carrier up,
	// nothing gets through) or because it flaps. Its MPTCP endpoint is
	// removed, so its subflows close and their data is sent again on the
	// others; its table and rule stay, so the liveness probe can still
	// tell when it works again.
	StateWithdrawn
)

func (s State) String() string {
	switch s {
	case StateDown:
		return "down"
	case StateUp:
		return "up"
	case StateWithdrawn:
		return "withdrawn"
	}
	return "unknown"
}

// MarshalText makes a State a string in JSON.
func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// Status is one uplink as pathmgr sees it now.
type Status struct {
	Uplink           // addresses as installed; zero while down
	State  State     // up, down or withdrawn
	Reason string    // why it is down or withdrawn ("" when up)
	Since  time.Time // when State last changed
	// Transitions counts the uplink's changes of State since Start.
	Transitions uint64
	// Damped is set while a flapping uplink is held back.
	Damped bool
}

// Flap damping, after BGP's (RFC 2439) but in seconds: each time an
// uplink stops carrying data it gains a penalty of 1, which halves every
// dampHalfLife. An uplink whose penalty exceeds dampSuppress when it
// comes back is held back (withdrawn, and nothing is installed for it)
// until the penalty has decayed below dampReuse. One outage, or two a few
// seconds apart, never reaches the threshold, so a real failover and
// recovery are never delayed; a link that goes down and up every second is
// held back from its third flap until it has been quiet for about five
// seconds, and costs no netlink call in between.
const (
	dampHalfLife = 2 * time.Second
	dampSuppress = 2.0
	dampReuse    = 0.5
	dampMax      = 3.0
)

// damper is one uplink's flap penalty.
type damper struct {
	penalty    float64
	at         time.Time // when penalty was last updated
	suppressed bool
}

func (d *damper) value(now time.Time) float64 {
	if d.penalty == 0 {
		return 0
	}
	dt := now.Sub(d.at)
	if dt <= 0 {
		return d.penalty
	}
	return d.penalty * math.Exp2(-dt.Seconds()/dampHalfLife.Seconds())
}

// lost records that the uplink stopped carrying data at now.
func (d *damper) lost(now time.Time) {
	d.penalty = min(d.value(now)+1, dampMax)
	d.at = now
	if d.penalty > dampSuppress {
		d.suppressed = true
	}
}

// allow reports whether the uplink may come back at now, and if not, how
// long until it may.
func (d *damper) allow(now time.Time) (bool, time.Duration) {
	if !d.suppressed {
		return true, 0
	}
	v := d.value(now)
	if v < dampReuse {
		d.suppressed = false
		return true, 0
	}
	wait := time.Duration(math.Log2(v/dampReuse) * float64(dampHalfLife))
	return false, wait + time.Millisecond
}

// preferredSource picks the address new connections should start from:
// the first uplink (in configuration order) that is up and not a backup,
// else the first backup that is up. Invalid when none is up: the kernel
// then chooses, and the connection will most likely fail.
func preferredSource(st []Status, v6 bool) netip.Addr {
	for _, backup := range []bool{false, true} {
		for _, s := range st {
			// Of the concentrator's family: the connection's first
			// subflow goes to its address.
			if s.State == StateUp && s.Backup == backup && s.Addr.Is6() == v6 {
				return s.Addr
			}
		}
	}
	return netip.Addr{}
}
