//go:build linux

package client

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"

	"github.com/mpvpn/mpvpn/cgroup"
	"github.com/mpvpn/mpvpn/firewall"
	"github.com/mpvpn/mpvpn/internal/journal"
	"github.com/mpvpn/mpvpn/pathmgr"
	"github.com/mpvpn/mpvpn/routing"
)

// The state of each piece as its journal entry records it: what its
// Cleanup needs to find everything the piece owns without the piece
// running.
type (
	pathmgrState struct {
		TableBase, RulePrio int
		Mark                uint32
		Uplinks             []string
	}
	routingState struct {
		TUN                          string
		Table, RulePrio              int
		Mark, DirectMark, TunnelMark uint32
	}
	cgroupState struct {
		Mount, Name string
	}
)

func pathmgrStateOf(c Config) pathmgrState {
	st := pathmgrState{TableBase: c.Table, RulePrio: c.Table, Mark: c.Mark}
	for _, u := range c.Uplinks {
		st.Uplinks = append(st.Uplinks, u.Name)
	}
	return st
}

func (st pathmgrState) config() pathmgr.Config {
	pc := pathmgr.Config{TableBase: st.TableBase, RulePrio: st.RulePrio, Mark: st.Mark}
	for _, n := range st.Uplinks {
		pc.Uplinks = append(pc.Uplinks, pathmgr.UplinkConfig{Name: n})
	}
	return pc
}

func routingStateOf(rc routing.Config) routingState {
	return routingState{TUN: rc.TUN, Table: rc.Table, RulePrio: rc.RulePrio, Mark: rc.Mark, DirectMark: rc.DirectMark, TunnelMark: rc.TunnelMark}
}

func (st routingState) config() routing.Config {
	return routing.Config{TUN: st.TUN, Table: st.Table, RulePrio: st.RulePrio, Mark: st.Mark, DirectMark: st.DirectMark, TunnelMark: st.TunnelMark}
}

func mustJSON(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		panic("client: journal state: " + err.Error()) // plain structs: cannot fail
	}
	return b
}

// startFirewall sets up `mpvpn exec`'s cgroups, the per-app rules and the
// kill switch, each journalled first, and appends their undoing to undos.
func startFirewall(cfg Config, j *journal.Journal, undos *[]func() error) (*firewall.Firewall, error) {
	log := cfg.Logger
	rules := cfg.Rules
	m, merr := cgroup.Mount()
	if cfg.ExecCgroups && errors.Is(merr, cgroup.ErrNoCgroup2) {
		// A host with cgroup v1 only (or a namespace that does not see
		// the host's cgroup2, as under `ip netns exec`): no `mpvpn exec`,
		// which is no reason not to run.
		log.Warn("no cgroup v2 mounted: `mpvpn exec` will not work", "err", merr)
		cfg.ExecCgroups = false
		if !cfg.firewalled() {
			return nil, nil
		}
	}
	if cfg.ExecCgroups {
		if merr != nil {
			return nil, fmt.Errorf("the cgroups of `mpvpn exec`: %w", merr)
		}
		tree := cgroup.Tree{Mount: m, Name: cfg.Cgroup}
		if err := j.Record(journal.Entry{Kind: kindCgroup, Data: mustJSON(cgroupState{Mount: m, Name: cfg.Cgroup})}); err != nil {
			return nil, err
		}
		lines, err := tree.Setup()
		for _, l := range lines {
			log.Debug("cgroup", "created", l)
		}
		*undos = append(*undos, func() error {
			lines, err := tree.Cleanup()
			for _, l := range lines {
				log.Debug("cgroup", "cleanup", l)
			}
			return err
		})
		if err != nil {
			return nil, err
		}
		// `mpvpn exec` wins over any rule for the user who ran it.
		rules = append([]firewall.Rule{
			{Selector: firewall.Cgroup(tree.Path(cgroup.KindTunnel)), Action: firewall.Tunnel},
			{Selector: firewall.Cgroup(tree.Path(cgroup.KindDirect)), Action: firewall.Direct},
			{Selector: firewall.Cgroup(tree.Path(cgroup.KindBlock)), Action: firewall.Block},
		}, rules...)
	}
	fc := firewall.Config{Mark: cfg.Mark, Rules: rules, Logger: log}
	if cfg.KillSwitch {
		lan, err := lanPrefixes(cfg.Uplinks)
		if err != nil {
			return nil, err
		}
		fc.KillSwitch = &firewall.KillSwitch{TUN: cfg.TUN, AllowLAN: cfg.AllowLAN, LAN: lan}
	}
	if err := j.Record(journal.Entry{Kind: kindFirewall}); err != nil {
		return nil, err
	}
	fw, err := firewall.Apply(fc)
	if err != nil {
		return nil, err
	}
	// On a clean stop the kill switch goes too: the user stopped the
	// VPN. After a crash it stays, until the next start or `mpvpn down`.
	// RemoveKillSwitch before Close: a closed Firewall refuses it.
	*undos = append(*undos, func() error {
		var err error
		if cfg.KillSwitch {
			err = fw.RemoveKillSwitch()
		}
		if cerr := fw.Close(); cerr != nil && err == nil {
			err = cerr
		}
		return err
	})
	log.Info("firewall", "rules", len(rules), "kill_switch", cfg.KillSwitch, "allow_lan", cfg.AllowLAN)
	return fw, nil
}

// lanPrefixes are the networks directly connected to the uplinks: what
// the kill switch lets through when the LAN is allowed.
func lanPrefixes(uplinks []pathmgr.UplinkConfig) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, u := range uplinks {
		l, err := netlink.LinkByName(u.Name)
		if err != nil {
			return nil, fmt.Errorf("uplink %s: %w", u.Name, err)
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return nil, fmt.Errorf("uplink %s: addresses: %w", u.Name, err)
		}
		for _, a := range addrs {
			if p, ok := prefixOf(a.IPNet); ok {
				out = append(out, p)
			}
		}
	}
	return out, nil
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	bits, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), bits).Masked(), true
}
