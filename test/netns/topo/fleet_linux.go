package topo

import (
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/mpvpn/mpvpn/test/netns/internal/netns"
)

// A fleet (Options.Fleet) is several concentrators behind the one address
// clients dial, ConcAddr, used as a VIP: the concentrator's namespace
// becomes the data centre's edge router and member i (1-based) lives in
// <prefix>-c<i>, joined to the edge by its own link ("edge" in the member,
// "m<i>" on the edge, 198.19.i.0/24). Every member holds the VIP and its
// own unicast address, MemberAddr(i), on lo; which member a connection to
// the VIP reaches is the edge's choice (Balance), and the unicast
// addresses are routed to their member whatever the balancer does, so a
// subflow that joins one reaches the member that holds its connection.

// MaxFleet is the most members a topology holds.
const MaxFleet = 8

// Member is one concentrator of a fleet.
type Member struct {
	NS   string     // <prefix>-c<i>
	Addr netip.Addr // its own unicast address, MemberAddr(i)
	Link netip.Addr // its side of the link to the edge
	Edge netip.Addr // the edge's side
	If   string     // the edge's interface toward it: m<i>
}

// newMember describes member i (from 1) of the fleet of prefix.
func newMember(prefix string, i int) Member {
	edge, member := memberLink(i)
	return Member{NS: prefix + "-" + memberRole(i), Addr: MemberAddr(i),
		Link: member.Addr(), Edge: edge.Addr(), If: "m" + strconv.Itoa(i)}
}

// ParseBalancer parses "anycast" or "hash-dnat".
func ParseBalancer(s string) (Balancer, error) {
	for _, b := range []Balancer{Anycast, HashDNAT} {
		if s == b.String() {
			return b, nil
		}
	}
	return 0, fmt.Errorf("topo: balancer %q: want anycast or hash-dnat", s)
}

// BalancePrefix is Balance for the fleet of a topology another process
// built (mpvpn-topo up --fleet): its members are found by their
// namespaces.
func BalancePrefix(prefix string, b Balancer, members ...int) error {
	names, err := Leftovers(prefix)
	if err != nil {
		return err
	}
	tp := &Topology{Prefix: prefix, Conc: prefix + "-" + roleConc, log: slog.New(slog.DiscardHandler)}
	for i := 1; i <= MaxFleet && slices.Contains(names, prefix+"-"+memberRole(i)); i++ {
		tp.Members = append(tp.Members, newMember(prefix, i))
	}
	return tp.Balance(b, members...)
}

// MemberAddr is fleet member i's own address (i from 1): 203.0.113.(10+i).
func MemberAddr(i int) netip.Addr { return netip.AddrFrom4([4]byte{203, 0, 113, byte(10 + i)}) }

func memberLink(i int) (edge, member netip.Prefix) {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, byte(i), 1}), 24),
		netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, byte(i), 2}), 24)
}

// Balancer is how the edge spreads connections to the VIP over the
// members.
type Balancer int

const (
	// Anycast routes the VIP to every member with an equal-cost multipath
	// route hashed on the 5-tuple (fib_multipath_hash_policy=1), as BGP
	// anycast from each member leaves a router's table.
	Anycast Balancer = iota
	// HashDNAT rewrites the VIP to a member's backend address (its side
	// of its link to the edge, Member.Link) chosen by a hash of the
	// client's address and port (nftables jhash … mod N map), TCP and
	// UDP alike; conntrack keeps a connection on its member. Not to the
	// member's own address: the kernel never announces (ADD_ADDR) the
	// address a connection's first subflow already uses, so clients
	// would have nothing to join.
	HashDNAT
)

func (b Balancer) String() string {
	switch b {
	case Anycast:
		return "anycast"
	case HashDNAT:
		return "hash-dnat"
	}
	return "balancer(" + strconv.Itoa(int(b)) + ")"
}

// lbTable is the edge's nftables table for HashDNAT.
const lbTable = "lb"

// Balance spreads new connections to the VIP over the members named (by
// number, from 1; none: all of them), the way b does, replacing what the
// edge did before. Taking a member out is what a health check (or the BGP
// session of a dead member) does: connections the edge already sends to
// it are not moved by HashDNAT (conntrack), while Anycast rehashes some of
// the others, as a plain multipath route does.
func (tp *Topology) Balance(b Balancer, members ...int) error {
	if len(tp.Members) == 0 {
		return fmt.Errorf("topo: Balance: not a fleet (Options.Fleet)")
	}
	if len(members) == 0 {
		for i := range tp.Members {
			members = append(members, i+1)
		}
	}
	for _, m := range members {
		if m < 1 || m > len(tp.Members) {
			return fmt.Errorf("topo: Balance: no member %d (of %d)", m, len(tp.Members))
		}
	}
	// Both ways out first, so exactly one is in force afterwards.
	flush := fmt.Sprintf("add table ip %[1]s\ndelete table ip %[1]s\n", lbTable)
	if _, err := tp.nsRun(tp.Conc, []byte(flush), "nft", "-f", "-"); err != nil {
		return err
	}
	vip := netip.PrefixFrom(ConcAddr, 32).String()
	tp.ip(tp.Conc, "route", "del", vip) // absent the first time
	switch b {
	case Anycast:
		args := []string{"route", "replace", vip}
		for _, m := range members {
			mb := tp.Members[m-1]
			args = append(args, "nexthop", "via", mb.Link.String(), "dev", mb.If)
		}
		return tp.ip(tp.Conc, args...)
	case HashDNAT:
		var elems []string
		for i, m := range members {
			elems = append(elems, fmt.Sprintf("%d : %s", i, tp.Members[m-1].Link))
		}
		// What a health check does when it takes a member out: the
		// connections conntrack still sends to the others stay, those
		// to a member left out go (a client's UDP probes would
		// otherwise keep reaching a dead member for as long as they
		// keep the entry alive).
		for i, mb := range tp.Members {
			if slices.Contains(members, i+1) {
				continue
			}
			if err := tp.forgetConntrack(mb.Link); err != nil {
				return err
			}
		}
		rules := fmt.Sprintf(`table ip %s {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr %s meta l4proto { tcp, udp } dnat to jhash ip saddr . th sport mod %d map { %s }
	}
}
`, lbTable, ConcAddr, len(members), strings.Join(elems, ", "))
		_, err := tp.nsRun(tp.Conc, []byte(rules), "nft", "-f", "-")
		return err
	}
	return fmt.Errorf("topo: Balance: unknown balancer %v", b)
}

// forgetConntrack deletes the edge's conntrack entries of connections
// NATed to addr.
func (tp *Topology) forgetConntrack(addr netip.Addr) error {
	return netns.Do(tp.Conc, func() error {
		f := &netlink.ConntrackFilter{}
		if err := f.AddIP(netlink.ConntrackReplySrcIP, addr.AsSlice()); err != nil {
			return err
		}
		_, err := netlink.ConntrackDeleteFilters(netlink.ConntrackTable, unix.AF_INET, f)
		return err
	})
}

// memberRole is member i's (from 1) namespace role: c<i>.
func memberRole(i int) string { return "c" + strconv.Itoa(i) }

// fleetRoles are the member namespaces' roles: c1, c2, …
func fleetRoles(n int) []string {
	var roles []string
	for i := 1; i <= n; i++ {
		roles = append(roles, memberRole(i))
	}
	return roles
}

// addFleet joins the members to the edge, addresses and routes them, and
// starts with Anycast over all of them.
func (tp *Topology) addFleet() error {
	if err := netns.Sysctl(tp.Conc, "net.ipv4.fib_multipath_hash_policy", "1"); err != nil {
		return err
	}
	for i, mb := range tp.Members {
		edge, member := memberLink(i + 1)
		steps := [][]string{
			{"link", "set", "edge", "up"},
			{"addr", "add", member.String(), "dev", "edge"},
			{"addr", "add", netip.PrefixFrom(ConcAddr, 32).String(), "dev", "lo"},
			{"addr", "add", netip.PrefixFrom(mb.Addr, 32).String(), "dev", "lo"},
			// What a member dials leaves from its own address, so the
			// answers come back to it and not to whichever member the VIP
			// hashes to.
			{"route", "add", "default", "via", edge.Addr().String(), "src", mb.Addr.String()},
		}
		for _, s := range steps {
			if err := tp.ip(mb.NS, s...); err != nil {
				return err
			}
		}
		for _, s := range [][]string{
			{"addr", "add", edge.String(), "dev", mb.If},
			{"link", "set", mb.If, "up"},
			{"route", "add", netip.PrefixFrom(mb.Addr, 32).String(), "via", member.Addr().String(), "dev", mb.If},
		} {
			if err := tp.ip(tp.Conc, s...); err != nil {
				return err
			}
		}
	}
	return tp.Balance(Anycast)
}

// The second client (Options.SecondClient) is another household on the
// same two ISPs, joined to them directly (no emulated link): on ISP A
// with a routed prefix of its own, on ISP B behind the same carrier-grade
// NAT address as the first client.
var (
	client2A  = netip.MustParsePrefix("198.18.10.2/24")
	gateway2A = netip.MustParsePrefix("198.18.10.1/24")
	client2B  = netip.MustParsePrefix("100.64.1.2/24")
	gateway2B = netip.MustParsePrefix("100.64.1.1/24")
)

const roleClient2 = "cli2"

// secondUplinks describes the second client's uplinks.
func (tp *Topology) secondUplinks() [2]UplinkInfo {
	return [2]UplinkInfo{
		{Iface: "wan0", Addr: client2A.Addr(), Prefix: client2A, Gateway: gateway2A.Addr(), Metric: 100,
			Public: client2A.Addr(), ISP: tp.ISPA, ConcSide: concToISPA.Addr()},
		{Iface: "wan1", Addr: client2B.Addr(), Prefix: client2B, Gateway: gateway2B.Addr(), Metric: 200,
			Public: ispBBackbone.Addr(), NAT: true, ISP: tp.ISPB, ConcSide: concToISPB.Addr()},
	}
}

// addSecondClient addresses and routes the second client's links (made
// in addLinks).
func (tp *Topology) addSecondClient() error {
	for u, ul := range tp.Uplinks2 {
		gw := []netip.Prefix{gateway2A, gateway2B}[u]
		for _, c := range []struct {
			ns   string
			args []string
		}{
			{tp.Client2, []string{"addr", "add", ul.Prefix.String(), "dev", ul.Iface}},
			{tp.Client2, []string{"link", "set", ul.Iface, "up"}},
			{tp.Client2, defaultRoute(ul)},
			{ul.ISP, []string{"addr", "add", gw.String(), "dev", "cust2"}},
			{ul.ISP, []string{"link", "set", "cust2", "up"}},
		} {
			if err := tp.ip(c.ns, c.args...); err != nil {
				return err
			}
		}
	}
	// ISP A's second prefix is routed to it like the first.
	return tp.ip(tp.Conc, "route", "add", client2A.Masked().String(), "via", ispABackbone.Addr().String())
}
