//go:build linux

package concentrator

import (
	"errors"
	"fmt"
	"net/netip"
)

// ErrNotAllowed is returned for a destination the policy refuses. It is
// what the client app sees as a reset.
var ErrNotAllowed = errors.New("destination not allowed")

// Policy decides which destinations the concentrator will connect to. The
// concentrator is an authenticated proxy on the open internet: the bug every
// proxy ships first is letting clients reach the server's own loopback and
// LAN (shadowsocks-libev#2265), so host-scoped and private destinations are
// refused unless the operator opts in.
//
// It is checked twice: before dialling (fast refusal) and inside
// net.Dialer.Control on the address the socket actually connects to, after
// unmapping, so no later change to how the address is produced can bypass it.
//
// Every IPv4 address an IPv6 destination can stand for (IPv4-translated,
// NAT64, 6to4) is policed as well, with the same rules, the deny list and
// the listener check: a translator on the path delivers the flow to that
// IPv4 address, so allowing the IPv6 form would allow the IPv4 one.
type Policy struct {
	// AllowPrivate lifts the private, loopback, link-local, benchmarking
	// and own-address rules. The listener itself, metadata services,
	// unspecified, multicast, broadcast, reserved and Deny stay refused.
	AllowPrivate bool
	// Listen is the concentrator's own listener. Its port on any local
	// address is always refused (self-proxying loop).
	Listen netip.AddrPort
	// Deny lists prefixes refused always, even with AllowPrivate: for
	// addresses that are this host's but are not on its interfaces, such
	// as the public address a 1:1 NAT gives it (EC2, GCP).
	Deny []netip.Prefix
	// Own returns the current snapshot of this host's own addresses, or
	// nil while it is not known, in which case every destination is
	// refused: a check that cannot tell whether an address is the host's
	// own must not let it through. A nil Own means the host has no
	// addresses of its own (unit tests).
	Own func() *AddrSet
}

// AddrSet is an immutable set of addresses, compared without zones and
// with IPv4-mapped addresses unmapped.
type AddrSet struct {
	m map[netip.Addr]struct{}
}

// NewAddrSet returns a set holding addrs.
func NewAddrSet(addrs ...netip.Addr) *AddrSet {
	s := &AddrSet{m: make(map[netip.Addr]struct{}, len(addrs))}
	for _, a := range addrs {
		s.m[a.Unmap().WithZone("")] = struct{}{}
	}
	return s
}

// Contains reports whether a is in s.
func (s *AddrSet) Contains(a netip.Addr) bool {
	_, ok := s.m[a.Unmap().WithZone("")]
	return ok
}

// Len is the number of addresses in s.
func (s *AddrSet) Len() int { return len(s.m) }

// noAddrs is the own-address set of a Policy without Own.
var noAddrs = NewAddrSet()

// verdict is what a rule says about the addresses it covers.
type verdict int

const (
	// permit stops the rule search: the address itself is fine, while
	// its embedded IPv4 addresses, Deny and the own-address and listener
	// checks still apply.
	permit verdict = iota
	// private is refused unless AllowPrivate.
	private
	// never is refused even with AllowPrivate.
	never
)

type rule struct {
	prefix netip.Prefix
	why    string
	v      verdict
}

func mustPrefixes(rules []rule) []rule {
	for i := range rules {
		if !rules[i].prefix.IsValid() || rules[i].prefix.Masked() != rules[i].prefix {
			panic(fmt.Sprintf("bad policy prefix %d", i))
		}
	}
	return rules
}

func pfx(s string) netip.Prefix { p, _ := netip.ParsePrefix(s); return p }

// rules is checked in order and the first match decides; metadata entries
// come before the ranges that contain them so they are refused even when
// AllowPrivate lifts the range. The IANA IPv4 and IPv6 special-purpose
// address registries are the checklist; what is left out is noted at the
// end.
var rules = mustPrefixes([]rule{
	// Cloud metadata and credential services: AWS/GCP/Azure/OpenStack
	// IMDS, ECS task metadata, EKS Pod Identity, Tencent Cloud, AWS IMDS
	// and Pod Identity over IPv6 (inside the ULA range, hence listed),
	// Alibaba Cloud (inside CGNAT), and Azure's wire server, which hands
	// out VM extension settings and sits in public address space, so no
	// range rule would catch it.
	{pfx("169.254.169.254/32"), "cloud metadata", never},
	{pfx("169.254.170.2/32"), "cloud metadata", never},
	{pfx("169.254.170.23/32"), "cloud metadata", never},
	{pfx("169.254.0.23/32"), "cloud metadata", never},
	{pfx("fd00:ec2::254/128"), "cloud metadata", never},
	{pfx("fd00:ec2::23/128"), "cloud metadata", never},
	{pfx("100.100.100.200/32"), "cloud metadata", never},
	{pfx("168.63.129.16/32"), "cloud metadata", never},

	// IPv4.
	{pfx("0.0.0.0/8"), "unspecified", never}, // connect(0.0.0.0) reaches localhost on Linux
	// IETF protocol assignments (RFC 6890): DS-Lite, NAT64 discovery,
	// PCP and TURN anycast. Nothing in it is a destination a client needs
	// through us.
	{pfx("192.0.0.0/24"), "IETF protocol assignments", never},
	// Deprecated 6to4 relay anycast (RFC 7526): a relay, never a server.
	{pfx("192.88.99.0/24"), "6to4 relay anycast", never},
	{pfx("224.0.0.0/4"), "multicast", never},
	{pfx("255.255.255.255/32"), "broadcast", never},
	{pfx("240.0.0.0/4"), "reserved", never},
	{pfx("127.0.0.0/8"), "loopback", private},
	{pfx("10.0.0.0/8"), "private", private},
	{pfx("172.16.0.0/12"), "private", private},
	{pfx("192.168.0.0/16"), "private", private},
	{pfx("100.64.0.0/10"), "carrier-grade NAT", private},
	{pfx("169.254.0.0/16"), "link-local", private},
	// Benchmarking (RFC 2544), not globally reachable. Labs, and proxies'
	// fake-IP DNS modes, use it as a private range: treat it as one.
	{pfx("198.18.0.0/15"), "benchmarking", private},

	// IPv6. ::/128 and ::1/128 sit inside ::/96, so they come first.
	{pfx("::/128"), "unspecified", never},
	{pfx("::1/128"), "loopback", private},
	// IPv4-translated (RFC 2765, 6145): police the embedded address.
	{pfx("::ffff:0:0:0/96"), "", permit},
	// IPv4-compatible (deprecated): ::a.b.c.d routes nowhere useful and
	// only serves to disguise an IPv4 address.
	{pfx("::/96"), "IPv4-compatible IPv6", never},
	// NAT64 (RFC 6052 well-known, RFC 8215 local-use): police the
	// embedded address, for every layout the prefix allows.
	{pfx("64:ff9b::/96"), "", permit},
	{pfx("64:ff9b:1::/48"), "", permit},
	{pfx("ff00::/8"), "multicast", never},
	{pfx("fc00::/7"), "private", private},
	{pfx("fe80::/10"), "link-local", private},
	{pfx("fec0::/10"), "site-local (deprecated)", private},
	// Teredo (RFC 4380) tunnels to whatever IPv4 address and port the
	// address encodes (the server's in clear, the client's obfuscated),
	// which can be private or our own. No service a client needs lives
	// on a Teredo address, so refuse the range rather than trust a
	// decoding of it.
	{pfx("2001::/32"), "Teredo", never},
	{pfx("2001:2::/48"), "benchmarking", private}, // RFC 5180, as 198.18/15
	// Global unicast, including 6to4 (2002::/16, embedded IPv4 policed)
	// and the documentation prefixes 2001:db8::/32 and 3fff::/20, which
	// the internet does not route, so allowing them costs nothing.
	{pfx("2000::/3"), "", permit},
	// Everything else in IPv6 is unassigned or special (100::/64 discard,
	// 5f00::/16 SRv6, the rest of 64:ff9b::/32): nothing a client can
	// legitimately reach, and unknown forms are how embeddings slip past.
	{pfx("::/0"), "reserved IPv6 (outside 2000::/3)", never},
	// Left allowed on purpose: IPv4 TEST-NETs (192.0.2.0/24,
	// 198.51.100.0/24, 203.0.113.0/24; not routed on the internet, and the
	// test topology uses them as its public addresses), AS112 and AMT
	// (globally reachable), and the IPv6 ORCHID and AS112 blocks inside
	// 2001::/23 (identifiers that do not route, or global services).
})

// form is one address a destination stands for: the address itself, or
// an IPv4 address embedded in it.
type form struct {
	addr netip.Addr
	kind string // "" for the address itself, else how it is embedded
}

// Check returns nil if dst may be dialled, or an error wrapping
// ErrNotAllowed that says why not.
func (p *Policy) Check(dst netip.AddrPort) error {
	addr := dst.Addr().Unmap().WithZone("")
	if !addr.IsValid() {
		return fmt.Errorf("%w: invalid address", ErrNotAllowed)
	}
	if dst.Port() == 0 {
		return fmt.Errorf("%w: port 0", ErrNotAllowed)
	}
	own := noAddrs
	if p.Own != nil {
		if own = p.Own(); own == nil {
			return fmt.Errorf("%w: own-address set unavailable: cannot tell whether %s is this host's own", ErrNotAllowed, dst)
		}
	}
	forms := append([]form{{addr: addr}}, embeddedIPv4(addr)...)
	for _, f := range forms {
		if err := p.checkAddr(f.addr, own); err != nil {
			if f.kind == "" {
				return fmt.Errorf("%w: %s is %s", ErrNotAllowed, dst, err)
			}
			return fmt.Errorf("%w: %s embeds %s (%s), which is %s", ErrNotAllowed, dst, f.addr, f.kind, err)
		}
	}
	if dst.Port() == p.Listen.Port() {
		la := p.Listen.Addr().Unmap()
		listenAll := !la.IsValid() || la.IsUnspecified()
		for _, f := range forms {
			if f.addr == la || f.addr.IsLoopback() || (listenAll && own.Contains(f.addr)) {
				return fmt.Errorf("%w: %s is the concentrator's own listener", ErrNotAllowed, dst)
			}
		}
	}
	return nil
}

func (p *Policy) checkAddr(addr netip.Addr, own *AddrSet) error {
	for _, d := range p.Deny {
		if denyContains(d, addr) {
			return fmt.Errorf("in the operator's deny list (%s)", d)
		}
	}
	for _, r := range rules {
		if !r.prefix.Contains(addr) {
			continue
		}
		if r.v == never || (r.v == private && !p.AllowPrivate) {
			return errors.New(r.why)
		}
		break
	}
	if !p.AllowPrivate && own.Contains(addr) {
		return errors.New("the concentrator's own address")
	}
	return nil
}

// denyContains is d.Contains(a), with an IPv4-mapped d (as an operator may
// write ::ffff:198.51.100.10/128) matching the unmapped IPv4 addresses
// Check works with.
func denyContains(d netip.Prefix, a netip.Addr) bool {
	if d.Addr().Is4In6() && a.Is4() {
		return d.Contains(netip.AddrFrom16(a.As16()))
	}
	return d.Contains(a)
}

var (
	translated     = pfx("::ffff:0:0:0/96")
	nat64WellKnown = pfx("64:ff9b::/96")
	nat64Local     = pfx("64:ff9b:1::/48")
	sixToFour      = pfx("2002::/16")
)

// nat64Layouts are where RFC 6052 §2.2 puts the IPv4 address for each
// prefix length that fits inside the /48 local-use prefix: the byte
// offsets of its four octets, skipping the u-octet (byte 8, bits 64-71).
var nat64Layouts = []struct {
	bits int
	at   [4]int
}{
	{48, [4]int{6, 7, 9, 10}},
	{56, [4]int{7, 9, 10, 11}},
	{64, [4]int{9, 10, 11, 12}},
	{96, [4]int{12, 13, 14, 15}},
}

// embeddedIPv4 returns the IPv4 addresses an IPv6 address can be
// translated or tunnelled to: IPv4-translated (::ffff:0:0:0/96), NAT64
// (RFC 6052 well-known and RFC 8215 local-use prefixes) and 6to4
// (RFC 3056). Teredo is refused outright by the rules, so it is not
// decoded.
//
// The operator of a local-use NAT64 prefix picks its length, and nothing
// in the address says which, so every layout that fits is returned: the
// address is allowed only if all its readings are. In practice that
// refuses most of 64:ff9b:1::/48 (a /96 reading with zero bytes in the
// middle reads as 0.x.x.x under the /64 layout), which costs nothing: a
// local-use prefix means something only inside the network that
// configured it, not on the path from a concentrator.
func embeddedIPv4(a netip.Addr) []form {
	if !a.Is6() || a.Is4In6() {
		return nil
	}
	b := a.As16()
	switch {
	case translated.Contains(a):
		return []form{{netip.AddrFrom4([4]byte(b[12:16])), "IPv4-translated"}}
	case nat64WellKnown.Contains(a):
		return []form{{netip.AddrFrom4([4]byte(b[12:16])), "NAT64"}}
	case nat64Local.Contains(a):
		forms := make([]form, 0, len(nat64Layouts))
		for _, l := range nat64Layouts {
			v4 := netip.AddrFrom4([4]byte{b[l.at[0]], b[l.at[1]], b[l.at[2]], b[l.at[3]]})
			forms = append(forms, form{v4, fmt.Sprintf("NAT64, read as a /%d prefix", l.bits)})
		}
		return forms
	case sixToFour.Contains(a):
		return []form{{netip.AddrFrom4([4]byte(b[2:6])), "6to4"}}
	}
	return nil
}
