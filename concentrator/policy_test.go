package concentrator

import (
	"errors"
	"net/netip"
	"testing"
)

func TestPolicy(t *testing.T) {
	own := netip.MustParseAddr("203.0.113.1")
	isLocal := func(a netip.Addr) bool { return a == own || a.IsLoopback() }
	listen := netip.MustParseAddrPort("0.0.0.0:7100")

	tests := []struct {
		dst          string
		allow        bool // default policy
		allowPrivate bool // with --allow-private
	}{
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
		// Public destinations pass.
		{"198.51.100.10:80", true, true},
		{"[2001:db8::1]:443", true, true},
		{"1.1.1.1:443", true, true},
		{"[64:ff9b::101:101]:443", true, true}, // NAT64 of 1.1.1.1
	}
	for _, tc := range tests {
		t.Run(tc.dst, func(t *testing.T) {
			dst := netip.MustParseAddrPort(tc.dst)
			for _, mode := range []struct {
				allowPrivate bool
				want         bool
			}{{false, tc.allow}, {true, tc.allowPrivate}} {
				p := &Policy{AllowPrivate: mode.allowPrivate, Listen: listen, IsLocal: isLocal}
				err := p.Check(dst)
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

func FuzzPolicy(f *testing.F) {
	f.Add([]byte{127, 0, 0, 1}, uint16(80))
	f.Add(netip.MustParseAddr("::ffff:10.0.0.1").AsSlice(), uint16(443))
	f.Add(netip.MustParseAddr("64:ff9b::a9fe:a9fe").AsSlice(), uint16(80))
	p := &Policy{Listen: netip.MustParseAddrPort("0.0.0.0:7100")}
	f.Fuzz(func(t *testing.T, b []byte, port uint16) {
		a, ok := netip.AddrFromSlice(b)
		if !ok {
			return
		}
		err := p.Check(netip.AddrPortFrom(a, port))
		// Whatever the form, an address that unmaps to a denied IPv4
		// address must be denied too.
		if err == nil && a.Is4In6() {
			if p.Check(netip.AddrPortFrom(a.Unmap(), port)) != nil {
				t.Fatalf("%v allowed but its unmapped form is denied", a)
			}
		}
	})
}
