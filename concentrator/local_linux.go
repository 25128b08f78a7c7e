package concentrator

import (
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// isLocalAddr asks the kernel how it would route to addr: a local or
// broadcast route means the address is this host's own. Asking at dial
// time covers addresses added after start, which a list taken at start
// would miss.
func isLocalAddr(addr netip.Addr) bool {
	routes, err := netlink.RouteGet(net.IP(addr.AsSlice()))
	if err != nil {
		return false
	}
	for _, r := range routes {
		if r.Type == unix.RTN_LOCAL || r.Type == unix.RTN_BROADCAST {
			return true
		}
	}
	return false
}
