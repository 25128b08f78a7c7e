//go:build linux

package main

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// --handshake-timeout must be positive; the check fails before the host is
// touched, so it runs as any user.
func TestServerHandshakeTimeoutFlag(t *testing.T) {
	priv, _, err := run(t, "", "keygen")
	if err != nil {
		t.Fatal(err)
	}
	pub, _, _ := run(t, priv, "pubkey")
	key := filepath.Join(t.TempDir(), "server.key")
	if err := os.WriteFile(key, []byte(priv), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"0s", "-1s", "soon"} {
		_, _, err := run(t, "", "server", "--key", key, "--peer", strings.TrimSpace(pub), "--handshake-timeout", v)
		if err == nil {
			t.Fatalf("mpvpn server --handshake-timeout %s succeeded", v)
		}
		if msg := oneLine(err); !strings.Contains(msg, "handshake-timeout") {
			t.Errorf("--handshake-timeout %s: error %q does not name the flag", v, msg)
		}
	}
}

// --ports and --announce become the signal endpoints, in order; the
// refusals name what is wrong before the host is touched.
func TestSignalEndpoints(t *testing.T) {
	a4, a6 := netip.MustParseAddr("203.0.113.1"), netip.MustParseAddr("2001:db8::1")
	ap := netip.AddrPortFrom
	tests := []struct {
		name     string
		listen   string
		announce []netip.Addr
		ports    []string
		want     []netip.AddrPort
		err      string // "" = no error
	}{
		{"nothing", "0.0.0.0:7100", nil, nil, nil, ""},
		{"announce only", "0.0.0.0:7100", []netip.Addr{a6}, nil, []netip.AddrPort{ap(a6, 0)}, ""},
		{"ports on the listen address", "203.0.113.1:7100", nil, []string{"7101", "7102"}, []netip.AddrPort{ap(a4, 7101), ap(a4, 7102)}, ""},
		{"a range", "203.0.113.1:7100", nil, []string{"7101-7103"}, []netip.AddrPort{ap(a4, 7101), ap(a4, 7102), ap(a4, 7103)}, ""},
		{"wildcard: on the announced address, after it", "0.0.0.0:7100", []netip.Addr{a4}, []string{"7101"}, []netip.AddrPort{ap(a4, 0), ap(a4, 7101)}, ""},
		{"specific listen and another family announced", "203.0.113.1:7100", []netip.Addr{a6}, []string{"7101"}, []netip.AddrPort{ap(a6, 0), ap(a4, 7101)}, ""},
		{"wildcard without an address", "0.0.0.0:7100", nil, []string{"7101"}, nil, "needs an address"},
		{"the listen port", "203.0.113.1:7100", nil, []string{"7100"}, nil, "the --listen port"},
		{"twice", "203.0.113.1:7100", nil, []string{"7101", "7101"}, nil, "twice"},
		{"backwards range", "203.0.113.1:7100", nil, []string{"7105-7101"}, nil, "want ports"},
		{"not a port", "203.0.113.1:7100", nil, []string{"http"}, nil, "want ports"},
		{"port 0", "203.0.113.1:7100", nil, []string{"0"}, nil, "want ports"},
		{"more than the kernel holds", "203.0.113.1:7100", nil, []string{"7101-7109"}, nil, "kernel"},
		{"more with the announcements", "0.0.0.0:7100", []netip.Addr{a4, a6}, []string{"7101-7104"}, nil, "at most 8"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := signalEndpoints(tt.listen, tt.announce, tt.ports)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("signalEndpoints = %v, %v; want an error with %q", got, err, tt.err)
				}
				return
			}
			if err != nil || !slices.Equal(got, tt.want) {
				t.Fatalf("signalEndpoints = %v, %v; want %v", got, err, tt.want)
			}
		})
	}
}

func TestParseVIPs(t *testing.T) {
	own4, own6 := netip.MustParseAddr("203.0.113.11"), netip.MustParseAddr("2001:db8::11")
	tests := []struct {
		name     string
		vips     []string
		announce []netip.Addr
		want     []netip.Addr
		err      string // "" = no error
	}{
		{"not in a fleet", nil, []netip.Addr{own6}, nil, ""},
		{"one VIP, own address announced", []string{"203.0.113.1"}, []netip.Addr{own4}, []netip.Addr{netip.MustParseAddr("203.0.113.1")}, ""},
		{"both families", []string{"203.0.113.1", "2001:db8::1"}, []netip.Addr{own4, own6}, []netip.Addr{netip.MustParseAddr("203.0.113.1"), netip.MustParseAddr("2001:db8::1")}, ""},
		{"mapped form is IPv4", []string{"::ffff:203.0.113.1"}, []netip.Addr{own4}, []netip.Addr{netip.MustParseAddr("203.0.113.1")}, ""},
		{"nothing to join instead", []string{"203.0.113.1"}, nil, nil, "needs an --announce address"},
		{"only the other family announced", []string{"203.0.113.1"}, []netip.Addr{own6}, nil, "of its family"},
		{"the VIP announced", []string{"203.0.113.1"}, []netip.Addr{netip.MustParseAddr("203.0.113.1"), own4}, nil, "also an --announce"},
		{"not an address", []string{"vip.example"}, []netip.Addr{own4}, nil, "shared address"},
		{"wildcard", []string{"0.0.0.0"}, []netip.Addr{own4}, nil, "shared address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseVIPs(tt.vips, tt.announce)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("parseVIPs = %v, %v; want an error with %q", got, err, tt.err)
				}
				return
			}
			if err != nil || !slices.Equal(got, tt.want) {
				t.Fatalf("parseVIPs = %v, %v; want %v", got, err, tt.want)
			}
		})
	}
}
