//go:build linux

package client

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mpvpn/mpvpn/cgroup"
	"github.com/mpvpn/mpvpn/dnsconf"
	"github.com/mpvpn/mpvpn/firewall"
	"github.com/mpvpn/mpvpn/internal/journal"
	"github.com/mpvpn/mpvpn/internal/sysctl"
	"github.com/mpvpn/mpvpn/pathmgr"
	"github.com/mpvpn/mpvpn/routing"
)

// Journal entry kinds a client writes.
const (
	// kindSysctl: Name was Before when mpvpn changed it.
	kindSysctl = "sysctl"
	// kindLimits: the MPTCP limits were Before (pathmgr.Limits.String).
	kindLimits = "mptcp-limits"
	// kindPathmgr: the path manager's tables, rules and endpoints (Data:
	// pathmgrState), removed by pathmgr.Cleanup.
	kindPathmgr = "pathmgr"
	// kindRouting: routing's table and rules (Data: routingState),
	// removed by routing.Cleanup.
	kindRouting = "routing"
	// kindFirewall: nftables tables inet mpvpn and inet mpvpn-killswitch,
	// removed by firewall.Cleanup.
	kindFirewall = "firewall"
	// kindCgroup: `mpvpn exec`'s cgroups (Data: cgroupState), removed
	// when empty.
	kindCgroup = "cgroup"
	// kindDNS: the system resolver pointed at mpvpn's (Data:
	// dnsconf.State), put back by dnsconf.Undo.
	kindDNS = "dns"
)

// Down removes everything a client left on the host, as its journal at
// path lists it, and returns one line per thing undone. A client that is
// running is asked to stop first (SIGTERM) and given stopWait to undo its
// own changes; whatever it could not, Down undoes. No journal: nothing to
// do.
func Down(path string, stopWait time.Duration, log *slog.Logger) ([]string, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	st, err := journal.Inspect(path)
	if err != nil {
		return nil, err
	}
	var lines []string
	if st.Live {
		if err := syscall.Kill(st.PID, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
			return nil, fmt.Errorf("stop the running client (pid %d): %w", st.PID, err)
		}
		lines = append(lines, fmt.Sprintf("stopped the running client (pid %d)", st.PID))
		deadline := time.Now().Add(stopWait)
		for st.Live {
			if time.Now().After(deadline) {
				return lines, fmt.Errorf("the client (pid %d) did not stop within %v; kill it and run `mpvpn down` again", st.PID, stopWait)
			}
			time.Sleep(50 * time.Millisecond)
			if st, err = journal.Inspect(path); err != nil {
				return lines, err
			}
		}
		if !st.Exists {
			return append(lines, "it undid all its changes itself"), nil
		}
	}
	if !st.Exists {
		return lines, nil
	}
	done, err := undo(st.Entries, log)
	lines = append(lines, done...)
	if err != nil {
		return lines, err
	}
	if err := journal.Remove(path); err != nil {
		return lines, err
	}
	return lines, nil
}

// undo reverts entries, newest first (but those of the kinds in skip),
// and says what it did. It goes on after a failure, so that one change
// that cannot be undone does not keep the others in place; the errors are
// joined.
func undo(entries []journal.Entry, log *slog.Logger, skip ...string) ([]string, error) {
	var lines []string
	var errs []error
	// A setting changed more than once is put back to its value before
	// the first change, the host's own; the later entries only hold
	// mpvpn's intermediate values.
	first := map[string]int{}
	for i, e := range entries {
		if _, ok := first[e.Name]; e.Kind == kindSysctl && !ok {
			first[e.Name] = i
		}
	}
	for i := len(entries) - 1; i >= 0; i-- {
		e := entries[i]
		if slices.Contains(skip, e.Kind) {
			continue
		}
		switch e.Kind {
		case kindLimits:
			l, err := pathmgr.ParseLimits(e.Before)
			if err == nil {
				err = pathmgr.SetLimitsTo(l)
			}
			if err != nil {
				errs = append(errs, err)
				continue
			}
			lines = append(lines, "MPTCP limits: "+e.Before)
		case kindPathmgr, kindRouting, kindCgroup, kindDNS:
			done, err := undoState(e)
			lines = append(lines, done...)
			if err != nil {
				errs = append(errs, err)
			}
		case kindFirewall:
			done, err := firewall.Cleanup()
			lines = append(lines, done...)
			if err != nil {
				errs = append(errs, err)
			}
		case kindSysctl:
			if first[e.Name] != i {
				continue
			}
			cur, err := sysctl.Proc.Get(e.Name)
			if err != nil {
				if errors.Is(err, os.ErrNotExist) {
					continue // a setting of a module since unloaded
				}
				errs = append(errs, err)
				continue
			}
			if cur == e.Before {
				continue
			}
			if err := sysctl.Proc.Set(e.Name, e.Before); err != nil {
				errs = append(errs, err)
				continue
			}
			lines = append(lines, fmt.Sprintf("sysctl %s = %s (mpvpn had set %s)", e.Name, e.Before, cur))
		default:
			errs = append(errs, fmt.Errorf("journal entry of kind %q: this mpvpn does not know how to undo it (a newer version wrote it?)", e.Kind))
		}
	}
	return lines, errors.Join(errs...)
}

// undoState removes what a piece owns, as its entry describes it.
func undoState(e journal.Entry) ([]string, error) {
	switch e.Kind {
	case kindPathmgr:
		var st pathmgrState
		if err := json.Unmarshal(e.Data, &st); err != nil {
			return nil, fmt.Errorf("journal entry %s: %w", e.Kind, err)
		}
		return pathmgr.Cleanup(st.config())
	case kindRouting:
		var st routingState
		if err := json.Unmarshal(e.Data, &st); err != nil {
			return nil, fmt.Errorf("journal entry %s: %w", e.Kind, err)
		}
		return routing.Cleanup(st.config())
	case kindCgroup:
		var st cgroupState
		if err := json.Unmarshal(e.Data, &st); err != nil {
			return nil, fmt.Errorf("journal entry %s: %w", e.Kind, err)
		}
		m, err := cgroupMountNow(st.Mount)
		if err != nil {
			return nil, err
		}
		return cgroup.Tree{Mount: m, Name: st.Name}.Cleanup()
	case kindDNS:
		var st dnsconf.State
		if err := json.Unmarshal(e.Data, &st); err != nil {
			return nil, fmt.Errorf("journal entry %s: %w", e.Kind, err)
		}
		line, err := dnsconf.Undo(st, nil)
		if line == "" {
			return nil, err
		}
		return []string{"DNS: " + line}, err
	}
	return nil, fmt.Errorf("journal entry of kind %q: no state to undo", e.Kind)
}

// cgroupMountNow is where this process finds the cgroup v2 hierarchy a
// client made its cgroups in under mount: there if it is still cgroup2
// as seen from here, else wherever this process has cgroup2 mounted (its
// mount namespace may differ from the client's, e.g. `ip netns exec` or a
// service's private mounts). With none it is an error, not "nothing
// there": a missing directory on some other file system says nothing
// about the cgroups, and the journal must be kept.
func cgroupMountNow(mount string) (string, error) {
	var sfs unix.Statfs_t
	if err := unix.Statfs(mount, &sfs); err == nil && sfs.Type == unix.CGROUP2_SUPER_MAGIC {
		return mount, nil
	}
	m, err := cgroup.Mount()
	if err != nil {
		return "", fmt.Errorf("the cgroups of `mpvpn exec` (made under %s, which is not cgroup2 here): %w", mount, err)
	}
	return m, nil
}
