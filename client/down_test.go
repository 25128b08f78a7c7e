//go:build linux

package client

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/internal/journal"
	"github.com/mpvpn/mpvpn/internal/netnstest"
	"github.com/mpvpn/mpvpn/internal/sysctl"
)

// TestDownAfterCrash: the sysctls a crashed client changed (as its
// journal lists them) are put back by Down, newest entry first, so a
// setting changed twice ends at the host's own value; Down then has
// nothing left to do. The settings are per network namespace, so the
// test's own namespace is all it touches.
func TestDownAfterCrash(t *testing.T) {
	netnstest.Run(t, func() {
		path := filepath.Join(t.TempDir(), "client.journal")
		orig := map[string]string{}
		for _, name := range []string{"net.mptcp.blackhole_timeout", "net.mptcp.stale_loss_cnt", "net.ipv4.tcp_fastopen"} {
			v, err := sysctl.Proc.Get(name)
			if err != nil {
				netnstest.CannotRun(t, "sysctl %s: %v", name, err)
			}
			orig[name] = v
		}
		// What a client does, up to a kill -9.
		j, err := journal.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		host := &sysctl.Changes{Root: sysctl.Proc, Journal: func(name, before string) error {
			return j.Record(journal.Entry{Kind: kindSysctl, Name: name, Before: before})
		}}
		must := func(err error) {
			t.Helper()
			if err != nil {
				t.Fatal(err)
			}
		}
		must(host.Set("net.mptcp.blackhole_timeout", "0"))
		must(host.Set("net.mptcp.blackhole_timeout", "7")) // twice: the original must win
		must(host.AtMost("net.mptcp.stale_loss_cnt", 1))
		must(host.SetBits("net.ipv4.tcp_fastopen", 0x4))
		j.Keep() // the crash: nothing is restored

		lines, err := Down(path, time.Second, nil)
		if err != nil {
			t.Fatal(err)
		}
		for name, v := range orig {
			if got, _ := sysctl.Proc.Get(name); got != v {
				t.Errorf("%s = %s after down, want the host's own %s", name, got, v)
			}
		}
		if len(lines) != 3 || !strings.Contains(strings.Join(lines, "\n"), "net.mptcp.blackhole_timeout = "+orig["net.mptcp.blackhole_timeout"]) {
			t.Errorf("down said %q, want one line per setting put back", lines)
		}
		if _, err := os.Stat(path); !os.IsNotExist(err) {
			t.Errorf("the journal is still there after down: %v", err)
		}
		if lines, err := Down(path, time.Second, nil); err != nil || len(lines) != 0 {
			t.Errorf("a second down: %q, %v; want nothing to do", lines, err)
		}
	})
}

// TestDownUnknownKind: an entry this version cannot undo is an error, and
// the journal stays for a version that can.
func TestDownUnknownKind(t *testing.T) {
	path := filepath.Join(t.TempDir(), "client.journal")
	j, err := journal.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	j.Record(journal.Entry{Kind: "from-the-future"})
	j.Keep()
	if _, err := Down(path, time.Second, nil); err == nil || !strings.Contains(err.Error(), "from-the-future") {
		t.Fatalf("down of an unknown entry: %v", err)
	}
	if st, _ := journal.Inspect(path); !st.Exists {
		t.Fatal("the journal was removed although an entry was not undone")
	}
}

// TestValidate: mistakes in a Config are found without the host.
func TestValidate(t *testing.T) {
	good := func() Config {
		c := Config{Server: netip.MustParseAddrPort("203.0.113.1:7100"), Routes: []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}}
		c.ServerKey[0], c.Key[0] = 1, 2
		return c
	}
	tests := []struct {
		name string
		edit func(*Config)
		want string // "" = valid
	}{
		{"defaults", func(*Config) {}, ""},
		{"no server", func(c *Config) { c.Server = netip.AddrPort{} }, "--server"},
		{"no route", func(c *Config) { c.Routes = nil }, "--route"},
		{"host bits", func(c *Config) { c.Routes = append(c.Routes, netip.MustParsePrefix("10.0.0.1/8")) }, "host bits"},
		{"server-alt with an IPv4 server", func(c *Config) { c.ServerAlt = netip.MustParseAddrPort("198.51.100.1:7100") }, "--server-alt"},
		{"udp transport", func(c *Config) { c.UDPTransport = "carrier-pigeon" }, "--udp-transport"},
		{"duplicate without uplinks", func(c *Config) { c.UDPTransport = "stream"; c.UDPDuplicate = 100 }, "--udp-duplicate"},
		{"quic", func(c *Config) { c.QUIC = "maybe" }, "--quic"},
		{"dns address", func(c *Config) { c.DNSAddrs = []netip.Addr{netip.MustParseAddr("127.0.0.53")} }, "--dns-address"},
		{"mtu", func(c *Config) { c.MTU = 100 }, "--mtu"},
		{"table over the kernel's", func(c *Config) { c.Table = 100 }, "kernel's table 253"},
		{"table 0 is the default", func(c *Config) { c.Table = 0 }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := good()
			tt.edit(&c)
			err := c.Validate()
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("valid config refused: %v", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("err = %v, want one mentioning %q", err, tt.want)
			}
		})
	}
}
