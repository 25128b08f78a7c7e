//go:build linux

package concentrator

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

// testOwn is the host the policy tests pretend to run on: a public IPv4
// and IPv6 address besides loopback.
var testOwn = NewAddrSet(
	netip.MustParseAddr("203.0.113.1"),
	netip.MustParseAddr("2001:db8::a"),
	netip.MustParseAddr("127.0.0.1"),
	netip.MustParseAddr("::1"),
)

func testPolicy(allowPrivate bool, deny ...string) *Policy {
	p := &Policy{
		AllowPrivate: allowPrivate,
		Listen:       netip.MustParseAddrPort("0.0.0.0:7100"),
		Own:          func() *AddrSet { return testOwn },
	}
	for _, d := range deny {
		p.Deny = append(p.Deny, netip.MustParsePrefix(d))
	}
	return p
}

type policyCase struct {
	dst          string
	allow        bool // default policy
	allowPrivate bool // with --allow-private
}

func checkCases(t *testing.T, tests []policyCase, deny ...string) {
	t.Helper()
	for _, tc := range tests {
		t.Run(tc.dst, func(t *testing.T) {
			dst := netip.MustParseAddrPort(tc.dst)
			for _, mode := range []struct {
				allowPrivate bool
				want         bool
			}{{false, tc.allow}, {true, tc.allowPrivate}} {
				err := testPolicy(mode.allowPrivate, deny...).Check(dst)
				if got := err == nil; got != mode.want {
					t.Errorf("allowPrivate=%v: allowed=%v, want %v (err %v)", mode.allowPrivate, got, mode.want, err)
				}
				if err != nil && !errors.Is(err, ErrNotAllowed) {
					t.Errorf("error %v does not wrap ErrNotAllowed", err)
				}
			}
		})
	}
}

func TestPolicy(t *testing.T) {
	checkCases(t, []policyCase{
		// The table from SECURITY.md §6 test 10.
		{"127.0.0.1:80", false, true},
		{"[::1]:80", false, true},
		{"0.0.0.0:80", false, false},
		{"[::]:80", false, false},
		{"169.254.169.254:80", false, false},
		{"169.254.170.2:80", false, false},
		{"[fd00:ec2::254]:80", false, false},
		{"100.100.100.200:80", false, false},
		{"10.0.0.1:80", false, true},
		{"172.16.0.1:80", false, true},
		{"192.168.1.1:80", false, true},
		{"100.64.0.1:80", false, true},
		{"[fc00::1]:80", false, true},
		{"[fe80::1]:80", false, true},
		{"[::ffff:127.0.0.1]:80", false, true},
		{"[::ffff:169.254.169.254]:80", false, false},
		{"[64:ff9b::a9fe:a9fe]:80", false, false}, // NAT64 form of 169.254.169.254
		{"[64:ff9b::a00:1]:80", false, true},      // NAT64 form of 10.0.0.1
		{"[2002:7f00:1::]:80", false, true},       // 6to4 form of 127.0.0.1
		{"[::127.0.0.1]:80", false, false},        // IPv4-compatible
		{"224.0.0.1:80", false, false},
		{"[ff02::1]:80", false, false},
		{"255.255.255.255:80", false, false},
		{"240.0.0.1:80", false, false},
		{"203.0.113.1:80", false, true},    // own address, other port
		{"203.0.113.1:7100", false, false}, // own listener
		{"127.0.0.1:7100", false, false},   // own listener via loopback
		{"198.51.100.10:0", false, false},  // port 0

		// More cloud metadata: Azure's wire server (public space),
		// Tencent Cloud, EKS Pod Identity.
		{"168.63.129.16:80", false, false},
		{"169.254.0.23:80", false, false},
		{"169.254.170.23:80", false, false},
		{"[fd00:ec2::23]:80", false, false},
		{"[64:ff9b::a83f:8110]:80", false, false}, // NAT64 of the wire server
		// IETF protocol assignments, the deprecated 6to4 relay anycast.
		{"192.0.0.1:80", false, false},
		{"192.0.0.170:80", false, false},
		{"192.88.99.1:80", false, false},
		// Benchmarking: private, as the test topology's links are.
		{"198.18.0.1:80", false, true},
		{"198.19.255.254:80", false, true},
		{"[2001:2::1]:80", false, true},
		// Deprecated site-local.
		{"[fec0::1]:80", false, true},
		// IPv4-translated (::ffff:0:a.b.c.d).
		{"[::ffff:0:7f00:1]:80", false, true},
		{"[::ffff:0:a9fe:a9fe]:80", false, false},
		{"[::ffff:0:a00:1]:80", false, true},
		{"[::ffff:0:101:101]:443", true, true},
		// Local-use NAT64: every RFC 6052 reading is policed. Here the /64
		// reading is 10.0.0.1 while the others are public ...
		{"[64:ff9b:1:101:a:0:101:101]:80", false, true},
		// ... here the /48 reading is 169.254.169.254.
		{"[64:ff9b:1:a9fe:a9:fe00:101:101]:80", false, false},
		// ... and the /96 one.
		{"[64:ff9b:1:101:1:101:a9fe:a9fe]:80", false, false},
		// A /96 layout with zeros in the middle reads as 0.0.0.x under
		// the /64 layout: refused, as documented.
		{"[64:ff9b:1::101:101]:443", false, false},
		// All four readings are 1.1.1.1.
		{"[64:ff9b:1:101:1:101:101:101]:443", true, true},
		// Teredo, whatever it embeds (the RFC 4380 example; a private
		// server and client).
		{"[2001:0:4136:e378:8000:63bf:3fff:fdd2]:80", false, false},
		{"[2001:0:a00:1:0:0:f5ff:fffe]:80", false, false},
		// IPv6 outside 2000::/3: discard-only, SRv6, the unassigned rest
		// of 64:ff9b::/32, plain unassigned space.
		{"[100::1]:80", false, false},
		{"[5f00::1]:80", false, false},
		{"[64:ff9b:2::101:101]:80", false, false},
		{"[64:ff9b::1:0:0:101:101]:80", false, false},
		{"[4000::1]:80", false, false},
		{"[e000::1]:80", false, false},
		// The listener through an embedding: it reaches 127.0.0.1:7100
		// or 203.0.113.1:7100 through a translator on this host.
		{"[64:ff9b::7f00:1]:7100", false, false},
		{"[::ffff:0:7f00:1]:7100", false, false},
		{"[2002:7f00:1::]:7100", false, false},
		{"[64:ff9b::cb00:7101]:7100", false, false},
		{"[2002:cb00:7101::1]:7100", false, false},
		{"[64:ff9b:1:101:1:101:7f00:1]:7100", false, false},
		// Own addresses through an embedding, and over IPv6.
		{"[64:ff9b::cb00:7101]:80", false, true},
		{"[::ffff:0:cb00:7101]:80", false, true},
		{"[2002:cb00:7101::1]:80", false, true},
		{"[2001:db8::a]:80", false, true},
		{"[2001:db8::a]:7100", false, false},
		{"[fe80::1%eth0]:7100", false, true}, // zone dropped; not own

		// Public destinations pass.
		{"198.51.100.10:80", true, true},
		{"[2001:db8::1]:443", true, true},
		{"1.1.1.1:443", true, true},
		{"[64:ff9b::101:101]:443", true, true}, // NAT64 of 1.1.1.1
		{"[2002:101:101::1]:443", true, true},  // 6to4 of 1.1.1.1
		{"192.0.2.10:80", true, true},          // TEST-NETs stay public
		{"203.0.113.50:80", true, true},
		{"[3fff::1]:443", true, true},
		{"198.51.100.10:7100", true, true}, // the listener port elsewhere
	})
}

// Deny is refused in every mode and in every form that reaches the
// denied address.
func TestPolicyDeny(t *testing.T) {
	checkCases(t, []policyCase{
		{"198.51.100.10:80", false, false},
		{"198.51.100.10:443", false, false},
		{"[::ffff:198.51.100.10]:80", false, false},
		{"[::ffff:0:c633:640a]:80", false, false},
		{"[64:ff9b::c633:640a]:80", false, false},
		{"[2002:c633:640a::1]:80", false, false},
		{"[64:ff9b:1:101:1:101:c633:640a]:80", false, false},
		{"[2001:db8:dead::1]:80", false, false},
		{"192.0.2.77:80", false, false}, // denied in its IPv4-mapped form
		// Outside the denied prefixes nothing changes.
		{"198.51.100.11:80", true, true},
		{"[2001:db8:beef::1]:80", true, true},
		{"10.0.0.1:80", false, true},
	}, "198.51.100.10/32", "2001:db8:dead::/48", "::ffff:192.0.2.77/128")
}

// While the own-address set is unknown, everything is refused, with a
// reason that says so.
func TestPolicyOwnUnavailable(t *testing.T) {
	for _, allowPrivate := range []bool{false, true} {
		p := testPolicy(allowPrivate)
		p.Own = func() *AddrSet { return nil }
		for _, dst := range []string{"1.1.1.1:443", "[2001:db8::1]:443", "127.0.0.1:80"} {
			err := p.Check(netip.MustParseAddrPort(dst))
			if !errors.Is(err, ErrNotAllowed) || !strings.Contains(err.Error(), "own-address set unavailable") {
				t.Errorf("allowPrivate=%v, %s: %v, want refused as own-address set unavailable", allowPrivate, dst, err)
			}
		}
	}
}

// embeddings are the IPv6 forms of v4 that reach it through a translator
// or tunnel, built here independently of embeddedIPv4. fill supplies the
// bits the embedding leaves free.
func embeddings(v4 netip.Addr, fill [16]byte) []netip.Addr {
	a := v4.As4()
	var out []netip.Addr
	put := func(prefix string, at [4]int) {
		b := fill
		p := netip.MustParsePrefix(prefix).Addr().As16()
		n := netip.MustParsePrefix(prefix).Bits() / 8
		copy(b[:n], p[:n])
		for i, j := range at {
			b[j] = a[i]
		}
		out = append(out, netip.AddrFrom16(b))
	}
	put("::ffff:0:0:0/96", [4]int{12, 13, 14, 15}) // IPv4-translated
	b := [16]byte{10: 0xff, 11: 0xff}
	copy(b[12:], a[:])
	out = append(out, netip.AddrFrom16(b)) // IPv4-mapped
	// IPv4-compatible, except for :: and ::1, which are IPv6's own
	// unspecified and loopback addresses, not forms of 0.0.0.0/0.0.0.1.
	if a != [4]byte{} && a != [4]byte{3: 1} {
		put("::/96", [4]int{12, 13, 14, 15})
	}
	put("64:ff9b::/96", [4]int{12, 13, 14, 15})
	put("64:ff9b:1::/48", [4]int{6, 7, 9, 10})
	put("64:ff9b:1::/56", [4]int{7, 9, 10, 11})
	put("64:ff9b:1::/64", [4]int{9, 10, 11, 12})
	put("64:ff9b:1::/96", [4]int{12, 13, 14, 15})
	put("2002::/16", [4]int{2, 3, 4, 5})
	put("2001::/32", [4]int{4, 5, 6, 7}) // Teredo server
	return out
}

func FuzzPolicy(f *testing.F) {
	f.Add([]byte{127, 0, 0, 1}, uint16(80), []byte{})
	f.Add(netip.MustParseAddr("::ffff:10.0.0.1").AsSlice(), uint16(443), []byte{})
	f.Add(netip.MustParseAddr("64:ff9b::a9fe:a9fe").AsSlice(), uint16(80), []byte{})
	f.Add(netip.MustParseAddr("64:ff9b:1:101:a:0:101:101").AsSlice(), uint16(80), []byte{1, 2, 3})
	f.Add([]byte{203, 0, 113, 1}, uint16(7100), []byte{0xff})
	f.Add([]byte{198, 51, 100, 10}, uint16(443), make([]byte, 16))
	f.Add([]byte{168, 63, 129, 16}, uint16(80), []byte{9})
	policies := []*Policy{
		testPolicy(false),
		testPolicy(true),
		testPolicy(true, "198.51.100.0/28", "::ffff:192.0.2.0/120"),
	}
	f.Fuzz(func(t *testing.T, b []byte, port uint16, fillBytes []byte) {
		a, ok := netip.AddrFromSlice(b)
		if !ok {
			return
		}
		var fill [16]byte
		copy(fill[:], fillBytes)
		for _, p := range policies {
			err := p.Check(netip.AddrPortFrom(a, port))
			// Whatever the form, an address that unmaps to a denied
			// IPv4 address must be denied too.
			if err == nil && a.Is4In6() {
				if p.Check(netip.AddrPortFrom(a.Unmap(), port)) != nil {
					t.Fatalf("%v allowed but its unmapped form is denied", a)
				}
			}
			// A refused IPv4 address is refused in every IPv6 form
			// that carries it, whatever the free bits hold.
			if err != nil && a.Unmap().Is4() {
				for _, e := range embeddings(a.Unmap(), fill) {
					if p.Check(netip.AddrPortFrom(e, port)) == nil {
						t.Fatalf("%v refused (%v) but its embedding %v is allowed", a, err, e)
					}
				}
			}
			// An allowed IPv6 address allows every IPv4 address it can
			// be read as.
			if err == nil {
				for _, e := range embeddedIPv4(a.Unmap()) {
					if err := p.Check(netip.AddrPortFrom(e.addr, port)); err != nil {
						t.Fatalf("%v allowed but its %s reading %v is refused: %v", a, e.kind, e.addr, err)
					}
				}
			}
		}
	})
}
