package pathmgr

import (
	"fmt"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// DiscoverUplinks lists the interfaces that have an IPv4 default route in
// the main table, best metric first, as a DHCP client or NetworkManager
// leaves them (one default route per uplink): the uplinks mpvpn uses when
// none is named. Loopback, TUN/TAP devices and the names in exclude (the
// client's own TUN) are left out; so is anything beyond MaxUplinks, with
// an error, since the kernel could not hold their endpoints.
func DiscoverUplinks(exclude ...string) ([]UplinkConfig, error) {
	return discover(netlink.FAMILY_V4, exclude)
}

// DiscoverUplinks6 is DiscoverUplinks for a concentrator reached over
// IPv6: the interfaces with an IPv6 default route.
func DiscoverUplinks6(exclude ...string) ([]UplinkConfig, error) {
	return discover(netlink.FAMILY_V6, exclude)
}

func discover(family int, exclude []string) ([]UplinkConfig, error) {
	fam := "IPv4"
	if family == netlink.FAMILY_V6 {
		fam = "IPv6"
	}
	routes, err := netlink.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("pathmgr: list routes: %w", err)
	}
	slices.SortStableFunc(routes, func(a, b netlink.Route) int { return a.Priority - b.Priority })
	var out []UplinkConfig
	seen := map[int]bool{}
	add := func(idx int) {
		if idx == 0 || seen[idx] {
			return
		}
		seen[idx] = true
		l, err := netlink.LinkByIndex(idx)
		if err != nil {
			return
		}
		a := l.Attrs()
		if a.Flags&unix.IFF_LOOPBACK != 0 || l.Type() == "tuntap" || l.Type() == "tun" || slices.Contains(exclude, a.Name) {
			return
		}
		out = append(out, UplinkConfig{Name: a.Name})
	}
	for _, r := range routes {
		if !isDefault(r.Dst) || r.Type != unix.RTN_UNICAST {
			continue
		}
		add(r.LinkIndex)
		for _, nh := range r.MultiPath {
			add(nh.LinkIndex)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no interface has an %s default route; name the uplinks with --uplink", fam)
	}
	if len(out) > MaxUplinks {
		return nil, fmt.Errorf("%d interfaces have a default route: the kernel holds at most %d MPTCP endpoints; name the uplinks with --uplink", len(out), MaxEndpoints)
	}
	return out, nil
}
