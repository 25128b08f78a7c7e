//go:build linux

package firewall

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"

	"github.com/google/nftables"
	"github.com/vishvananda/netns"
)

// Firewall owns mpvpn's nftables tables in one network namespace: the one
// the thread calling Apply was in. Its methods may be called from any
// goroutine.
type Firewall struct {
	log *slog.Logger
	ns  netns.NsHandle

	mu     sync.Mutex
	closed bool
}

// Apply validates cfg (resolving its cgroups) and then, in one nftables
// transaction, replaces whatever mpvpn tables are in the namespace (an
// earlier run's included, crashed or not) with the per-app table and the
// kill switch cfg describes. On error nothing has changed.
//
// Apply binds the Firewall to the network namespace of the calling OS
// thread (lock the thread first if it is not the process's own).
func Apply(cfg Config) (*Firewall, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r, err := cfg.resolve(log)
	if err != nil {
		return nil, fmt.Errorf("firewall: %w", err)
	}
	ns, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("firewall: current network namespace: %w", err)
	}
	f := &Firewall{log: log, ns: ns}
	if err := f.commit(r); err != nil {
		ns.Close()
		return nil, err
	}
	return f, nil
}

// Update replaces both tables with what cfg describes, in one transaction
// (a changed rule list, a kill switch turned on or off). On error the
// tables stay as they were. cfg.Logger is ignored: the Firewall keeps the
// logger it was made with.
func (f *Firewall) Update(cfg Config) error {
	r, err := cfg.resolve(f.log)
	if err != nil {
		return fmt.Errorf("firewall: %w", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return errors.New("firewall: update after Close")
	}
	return f.commit(r)
}

// conn is a netlink connection bound to the Firewall's namespace. Each
// Flush opens its own socket there, so no state is kept between calls.
func conn(ns netns.NsHandle) (*nftables.Conn, error) {
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	return c, nil
}

func (f *Firewall) commit(r *resolved) error {
	c, err := conn(f.ns)
	if err != nil {
		return fmt.Errorf("firewall: %w", err)
	}
	// One batch: the kernel commits both tables together or neither.
	replaceTable(c, table(PerAppTable), len(r.rules) > 0)
	if len(r.rules) > 0 {
		if err := addPerApp(c, r); err != nil {
			return fmt.Errorf("firewall: %w", err)
		}
	}
	replaceTable(c, table(KillSwitchTable), r.ks != nil)
	if r.ks != nil {
		if err := addKillSwitch(c, r); err != nil {
			return fmt.Errorf("firewall: %w", err)
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("firewall: apply (nothing changed): %w", err)
	}
	rules := make([]string, len(r.rules))
	for i, rule := range r.rules {
		rules[i] = rule.String()
	}
	f.log.Info("per-app rules", "table", "inet "+PerAppTable, "rules", rules, "own_mark", fmt.Sprintf("%#x", r.own), "direct_mark", fmt.Sprintf("%#x", r.direct), "tunnel_mark", fmt.Sprintf("%#x", r.tunnel))
	if r.ks != nil {
		lan := "not allowed"
		if r.ks.lan != nil {
			lan = fmt.Sprint(r.ks.lan)
		}
		f.log.Info("kill switch in force", "table", "inet "+KillSwitchTable, "tun", r.ks.tun, "lan", lan)
	} else {
		f.log.Info("no kill switch", "table", "inet "+KillSwitchTable)
	}
	return nil
}

// remove deletes the named tables (those present or not) in one batch.
func remove(ns netns.NsHandle, names ...string) error {
	c, err := conn(ns)
	if err != nil {
		return err
	}
	for _, n := range names {
		replaceTable(c, table(n), false)
	}
	return c.Flush()
}

// Close removes the per-app table and leaves the kill switch in force: a
// client that stops keeps blocking until it starts again or `mpvpn down`
// removes the kill switch. Calling it again does nothing.
func (f *Firewall) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil
	}
	f.closed = true
	defer f.ns.Close()
	if err := remove(f.ns, PerAppTable); err != nil {
		return fmt.Errorf("firewall: remove table inet %s: %w", PerAppTable, err)
	}
	f.log.Info("per-app rules removed; the kill switch, if any, stays", "table", "inet "+PerAppTable)
	return nil
}

// RemoveKillSwitch removes the kill switch, leaving the per-app table.
func (f *Firewall) RemoveKillSwitch() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return errors.New("firewall: RemoveKillSwitch after Close (use Cleanup)")
	}
	if err := remove(f.ns, KillSwitchTable); err != nil {
		return fmt.Errorf("firewall: remove table inet %s: %w", KillSwitchTable, err)
	}
	f.log.Info("kill switch removed", "table", "inet "+KillSwitchTable)
	return nil
}

// Cleanup removes mpvpn's tables from the network namespace of the calling
// thread, with no Firewall: for `mpvpn down` and for a start after a crash.
// It returns one line per table it removed ("nftables table inet
// mpvpn-killswitch"); other tables, whoever made them, are left alone.
func Cleanup() ([]string, error) {
	ns, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("firewall: current network namespace: %w", err)
	}
	defer ns.Close()
	c, err := conn(ns)
	if err != nil {
		return nil, fmt.Errorf("firewall: %w", err)
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("firewall: list tables: %w", err)
	}
	var found []string
	for _, t := range tables {
		if t.Name == PerAppTable || t.Name == KillSwitchTable {
			found = append(found, t.Name)
		}
	}
	if len(found) == 0 {
		return nil, nil
	}
	slices.Sort(found)
	if err := remove(ns, found...); err != nil {
		return nil, fmt.Errorf("firewall: cleanup: %w", err)
	}
	lines := make([]string, len(found))
	for i, n := range found {
		lines[i] = "nftables table inet " + n
	}
	return lines, nil
}
