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
type Policy struct {
	// AllowPrivate lifts the private, loopback, link-local and own-address
	// rules. The listener itself, metadata services, unspecified,
	// multicast, broadcast and reserved addresses stay refused.
	AllowPrivate bool
	// Listen is the concentrator's own listener. Its port on any local
	// address is always refused (self-proxying loop).
	Listen netip.AddrPort
	// IsLocal reports whether addr is one of this host's own addresses.
	// nil means no address is local (unit tests).
	IsLocal func(netip.Addr) bool
}

type rule struct {
	prefix netip.Prefix
	why    string
	always bool // refused even with AllowPrivate
}

func mustPrefixes(rules []rule) []rule {
	for i := range rules {
		if !rules[i].prefix.IsValid() {
			panic(fmt.Sprintf("bad policy prefix %d", i))
		}
	}
	return rules
}

func pfx(s string) netip.Prefix { p, _ := netip.ParsePrefix(s); return p }

// rules is checked in order; metadata entries come before the ranges that
// contain them so they are refused even when AllowPrivate lifts the range.
var rules = mustPrefixes([]rule{
	// Cloud metadata: AWS/GCP/Azure IMDS, ECS task metadata, AWS IMDS over
	// IPv6 (inside the ULA range, hence listed explicitly), Alibaba Cloud
	// (inside CGNAT).
	{pfx("169.254.169.254/32"), "cloud metadata", true},
	{pfx("169.254.170.2/32"), "cloud metadata", true},
	{pfx("fd00:ec2::254/128"), "cloud metadata", true},
	{pfx("100.100.100.200/32"), "cloud metadata", true},

	// connect(0.0.0.0) reaches localhost on Linux.
	{pfx("0.0.0.0/8"), "unspecified", true},
	{pfx("::/128"), "unspecified", true},
	{pfx("224.0.0.0/4"), "multicast", true},
	{pfx("ff00::/8"), "multicast", true},
	{pfx("255.255.255.255/32"), "broadcast", true},
	{pfx("240.0.0.0/4"), "reserved", true},

	{pfx("127.0.0.0/8"), "loopback", false},
	{pfx("::1/128"), "loopback", false},
	{pfx("10.0.0.0/8"), "private", false},
	{pfx("172.16.0.0/12"), "private", false},
	{pfx("192.168.0.0/16"), "private", false},
	{pfx("fc00::/7"), "private", false},
	{pfx("100.64.0.0/10"), "carrier-grade NAT", false},
	{pfx("169.254.0.0/16"), "link-local", false},
	{pfx("fe80::/10"), "link-local", false},
	// IPv4-compatible IPv6 (deprecated): ::a.b.c.d routes nowhere useful
	// and only serves to disguise an IPv4 address.
	{pfx("::/96"), "IPv4-compatible IPv6", true},
})

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
	if err := p.checkAddr(addr); err != nil {
		return fmt.Errorf("%w: %s is %s", ErrNotAllowed, dst, err)
	}
	// An IPv6 address that embeds an IPv4 one (NAT64, 6to4) reaches that
	// IPv4 address through a translator: police the embedded address too.
	if v4, kind, ok := embeddedIPv4(addr); ok {
		if err := p.checkAddr(v4); err != nil {
			return fmt.Errorf("%w: %s embeds %s (%s), which is %s", ErrNotAllowed, dst, v4, kind, err)
		}
	}
	if dst.Port() == p.Listen.Port() {
		listenAll := !p.Listen.Addr().IsValid() || p.Listen.Addr().IsUnspecified()
		if addr == p.Listen.Addr().Unmap() || (listenAll && p.isLocal(addr)) || addr.IsLoopback() {
			return fmt.Errorf("%w: %s is the concentrator's own listener", ErrNotAllowed, dst)
		}
	}
	return nil
}

func (p *Policy) checkAddr(addr netip.Addr) error {
	for _, r := range rules {
		if r.prefix.Contains(addr) {
			if r.always || !p.AllowPrivate {
				return errors.New(r.why)
			}
			return nil
		}
	}
	if !p.AllowPrivate && p.isLocal(addr) {
		return errors.New("the concentrator's own address")
	}
	return nil
}

func (p *Policy) isLocal(addr netip.Addr) bool {
	return p.IsLocal != nil && p.IsLocal(addr)
}

var (
	nat64WellKnown = pfx("64:ff9b::/96")
	nat64Local     = pfx("64:ff9b:1::/48")
	sixToFour      = pfx("2002::/16")
)

// embeddedIPv4 extracts the IPv4 address carried inside a NAT64 (RFC 6052
// well-known and RFC 8215 local-use prefixes) or 6to4 (RFC 3056) address.
func embeddedIPv4(a netip.Addr) (netip.Addr, string, bool) {
	if !a.Is6() {
		return netip.Addr{}, "", false
	}
	b := a.As16()
	switch {
	case nat64WellKnown.Contains(a):
		return netip.AddrFrom4([4]byte(b[12:16])), "NAT64", true
	case nat64Local.Contains(a):
		// RFC 8215 leaves the prefix length to the operator; /96 is the
		// common one (the IPv4 address in the last 32 bits).
		return netip.AddrFrom4([4]byte(b[12:16])), "NAT64", true
	case sixToFour.Contains(a):
		return netip.AddrFrom4([4]byte(b[2:6])), "6to4", true
	}
	return netip.Addr{}, "", false
}
