//go:build linux

// Package client is mpvpn's client engine: a Config, checked in full
// before the host is touched, and Run, which starts the pieces in order
// (path manager, probes, sysctls, TUN, tunnel, netstack, routes), serves
// the status socket and metrics, and undoes everything in reverse order
// when it stops.
//
// Every change Run makes to the host is written to a journal first
// (package internal/journal). A clean stop undoes them and removes the
// journal; after a crash or kill -9 the next start, or `mpvpn down`
// (Down), finds the journal and undoes what it lists, so the host is put
// back exactly as the crashed run found it.
package client

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"time"

	"github.com/mpvpn/mpvpn/cgroup"
	"github.com/mpvpn/mpvpn/dnsconf"
	"github.com/mpvpn/mpvpn/firewall"
	"github.com/mpvpn/mpvpn/pathmgr"
	"github.com/mpvpn/mpvpn/routing"
	"github.com/mpvpn/mpvpn/tun"
	"github.com/mpvpn/mpvpn/tunnel"
	"github.com/mpvpn/mpvpn/udprelay"
)

// DefaultUDPTransport is how datagrams cross by default (README,
// Decisions: chosen by measurement).
const DefaultUDPTransport = udprelay.TransportUplinks

// QUIC policies.
const (
	QUICBlock  = "block"
	QUICTunnel = "tunnel"
)

// Defaults of a Config.
const (
	// DefaultMark is the SO_MARK on every socket of mpvpn's ("mp" in
	// ASCII): routing sends marked packets around the TUN, never into it.
	DefaultMark           = 0x6d70
	DefaultTable          = 7100
	DefaultTUN            = "mpvpn0"
	DefaultAllDownTimeout = 60 * time.Second
	DefaultControl        = "/run/mpvpn/client.sock"
	DefaultJournal        = "/run/mpvpn/client.journal"
)

// DefaultTUNAddr is the TUN device's address: the apps' flows come from
// it, and it never leaves the host. DefaultTUNAddr6 is its IPv6 address
// whenever IPv6 may enter the TUN (RouteAll, an IPv6 route, a tunnel
// rule; a ULA of mpvpn's: fd + "mpv" in hex).
var (
	DefaultTUNAddr  = netip.MustParsePrefix("10.77.77.1/32")
	DefaultTUNAddr6 = netip.MustParsePrefix("fd6d:7076::1/128")
)

// Config is what a client runs with. Zero values take the defaults.
type Config struct {
	Server netip.AddrPort
	// ServerAlt, when set, is the concentrator's IPv4 address, Server
	// being its IPv6 one (--server-alt; the concentrator announces it,
	// mpvpn server --announce): each uplink then needs only one family,
	// and the IPv4 ones join the flows over it.
	ServerAlt netip.AddrPort
	ServerKey tunnel.PublicKey
	Key       tunnel.PrivateKey
	// Uplinks to carry flows over; empty: every interface with a
	// default route, in metric order.
	Uplinks []pathmgr.UplinkConfig
	// SubflowsPerUplink: how many subflows each uplink opens per flow
	// (0 means 1); more than one need ports the concentrator announces
	// (mpvpn server --ports), and spread a flow over equal-cost paths.
	SubflowsPerUplink int
	// Routes: destinations carried by mpvpn. RouteAll: everything, IPv4
	// and IPv6 (Routes then add nothing). Exclude: destinations that never
	// enter the tunnel. AllowLAN: with RouteAll, the directly connected
	// networks stay outside the tunnel.
	Routes   []netip.Prefix
	RouteAll bool
	Exclude  []netip.Prefix
	AllowLAN bool
	// Rules are the per-app rules, first match first (--rule).
	Rules []firewall.Rule
	// KillSwitch: nothing leaves an uplink but mpvpn's own traffic,
	// direct rules and (with AllowLAN) the LAN, also after a crash, until
	// the client starts again or `mpvpn down`.
	KillSwitch bool
	TUN        string
	TUNAddrs   []netip.Prefix
	// DNSAddrs are where mpvpn's resolver answers (--dns-address);
	// empty: DefaultDNSAddr, and DefaultDNSAddr6 when the TUN has an
	// IPv6 address. They are routed into the TUN in every mode.
	DNSAddrs []netip.Addr
	// DNSHook points the system's resolver at DNSAddrs while the client
	// runs (systemd-resolved, or ResolvConf); "": dnsconf.Auto with
	// RouteAll, dnsconf.Off otherwise.
	DNSHook    dnsconf.Mode
	ResolvConf string // "": /etc/resolv.conf
	// QUIC is what UDP to port 443 gets (--quic): QUICBlock (the
	// default) a port unreachable at once, so browsers use TCP, which
	// mpvpn spreads over every uplink; QUICTunnel the UDP relay.
	QUIC string
	// UDPTransport carries the UDP datagrams and pings:
	// udprelay.TransportStream (in one tunnel flow) or TransportUplinks
	// (as packets over the live uplink with the lowest RTT); "": the
	// default, DefaultUDPTransport. UDPDuplicate > 0 sends datagrams of
	// at most that many bytes over the two best uplinks (uplinks only).
	UDPTransport string
	UDPDuplicate int
	MTU          int
	Mark         uint32
	// Table is the first routing table and rule priority mpvpn owns; it
	// owns it and the next 199.
	Table    int
	FastOpen bool
	// Pool is how many connections to the concentrator the client keeps
	// through the handshake ahead of any flow, so that a new flow costs
	// one round trip to its verdict, not two; 0: none.
	Pool int
	// NoReuse: a flow's connection is closed when the flow ends instead
	// of going back into the pool for the next flow (--reuse=false).
	NoReuse bool
	// EarlyDestination: a flow that finds no pooled connection names its
	// destination in msg1 (tunnel.ClientConfig.EarlyDestination).
	EarlyDestination bool
	// Cipher: the transport ciphers offered to the concentrator besides
	// ChaCha20-Poly1305 (tunnel.ClientConfig.Cipher).
	Cipher tunnel.CipherPolicy
	// ProbeIdleInterval is the probe cadence per uplink while no flow is
	// open (0: probe.DefaultIdleInterval); the busy cadence is 100 ms.
	ProbeIdleInterval time.Duration
	AllDownTimeout    time.Duration
	// Control is the status socket's path, Metrics the address to serve
	// Prometheus metrics on ("": none), UI the dashboard's ("": none; see
	// package ui), Journal the host-state journal's path.
	Control, Metrics, UI, Journal string
	// ExecCgroups sets up `mpvpn exec`'s three cgroups and their rules
	// (first of all rules), under the cgroup v2 root in a directory named
	// Cgroup (default "mpvpn"; a test uses its own).
	ExecCgroups bool
	Cgroup      string
	// Version is shown by `mpvpn status`.
	Version string
	Logger  *slog.Logger
}

// withDefaults returns c with its zero values filled in.
func (c Config) withDefaults() Config {
	if c.TUN == "" {
		c.TUN = DefaultTUN
	}
	if len(c.TUNAddrs) == 0 {
		c.TUNAddrs = []netip.Prefix{DefaultTUNAddr}
		// IPv6 inside whenever IPv6 may enter the TUN: route-all, an
		// IPv6 route, or a rule that sends an app's traffic into it.
		v6 := c.RouteAll || slices.ContainsFunc(c.Routes, func(p netip.Prefix) bool { return p.Addr().Is6() }) ||
			slices.ContainsFunc(c.Rules, func(r firewall.Rule) bool { return r.Action == firewall.Tunnel })
		if v6 {
			c.TUNAddrs = append(c.TUNAddrs, DefaultTUNAddr6)
		}
	}
	if len(c.DNSAddrs) == 0 {
		c.DNSAddrs = []netip.Addr{DefaultDNSAddr}
		if slices.ContainsFunc(c.TUNAddrs, func(p netip.Prefix) bool { return p.Addr().Is6() }) {
			c.DNSAddrs = append(c.DNSAddrs, DefaultDNSAddr6)
		}
	}
	if c.DNSHook == "" {
		c.DNSHook = dnsconf.Off
		if c.RouteAll {
			c.DNSHook = dnsconf.Auto
		}
	}
	if c.QUIC == "" {
		c.QUIC = QUICBlock
	}
	if c.UDPTransport == "" {
		c.UDPTransport = DefaultUDPTransport
	}
	if c.MTU == 0 {
		c.MTU = tun.DefaultMTU
	}
	if c.Mark == 0 {
		c.Mark = DefaultMark
	}
	if c.Table == 0 {
		c.Table = DefaultTable
	}
	if c.AllDownTimeout == 0 {
		c.AllDownTimeout = DefaultAllDownTimeout
	}
	if c.Control == "" {
		c.Control = DefaultControl
	}
	if c.Journal == "" {
		c.Journal = DefaultJournal
	}
	if c.Cgroup == "" {
		c.Cgroup = cgroup.DefaultName
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// kernelTables are the kernel's own routing tables: unspec, default,
// main, local.
var kernelTables = []int{0, 253, 254, 255}

// tablesOwned is how many tables (and rule priorities) from Table on mpvpn
// owns: the path manager's per-uplink ones from Table (its fallback rules
// at Table+200), routing's from Table+100.
const tablesOwned = 200 + pathmgr.MaxUplinks

// Validate checks everything that can be checked without the host: a
// mistake here is one line and no change anywhere.
func (c Config) Validate() error {
	c = c.withDefaults()
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if !c.Server.IsValid() || c.Server.Port() == 0 {
		bad("--server is required (the concentrator's ADDR:PORT)")
	}
	if c.ServerAlt.IsValid() {
		// The kernel joins a subflow of either family only to a
		// connection whose socket is IPv6 (dual-stack); one opened over
		// IPv4 takes IPv4 subflows only (mptcp_pm_addr_families_match,
		// Linux 6.18).
		if c.ServerAlt.Port() == 0 || !c.ServerAlt.Addr().Unmap().Is4() || c.Server.Addr().Unmap().Is4() {
			bad("--server-alt %s: with both families, --server is the concentrator's IPv6 ADDR:PORT and --server-alt its IPv4 one (a flow opened over IPv4 cannot take IPv6 subflows)", c.ServerAlt)
		}
	}
	if c.ServerKey.IsZero() {
		bad("--server-key is required (the concentrator's public key)")
	}
	if c.Key.IsZero() {
		bad("--key is required (a file written by `mpvpn keygen`)")
	}
	if len(c.Routes) == 0 && !c.RouteAll && !slices.ContainsFunc(c.Rules, func(r firewall.Rule) bool { return r.Action == firewall.Tunnel }) {
		bad("--route, --route-all or a --rule ...=tunnel is required: which traffic goes through mpvpn")
	}
	if err := c.routing().Validate(); err != nil {
		errs = append(errs, err)
	}
	for _, p := range c.Routes {
		if !p.IsValid() || p.Masked() != p {
			bad("--route %s has host bits set; did you mean %s?", p, p.Masked())
		}
	}
	if c.MTU < 1280 || c.MTU > 65535 {
		bad("--mtu %d: want 1280 to 65535", c.MTU)
	}
	if c.Table < 1 || c.Table+tablesOwned-1 > 0x7fffffff {
		bad("--table %d: want a positive table number", c.Table)
	}
	for _, k := range kernelTables {
		if k >= c.Table && k < c.Table+tablesOwned {
			bad("--table %d: mpvpn owns tables %d to %d, which would include the kernel's table %d", c.Table, c.Table, c.Table+tablesOwned-1, k)
		}
	}
	if c.AllDownTimeout < 0 {
		bad("--all-down-timeout %v: must be positive", c.AllDownTimeout)
	}
	for _, a := range c.TUNAddrs {
		if !a.IsValid() {
			bad("--tun-addr: not an address with a prefix length")
		}
	}
	for _, a := range c.DNSAddrs {
		switch {
		case !a.IsValid() || a.Zone() != "":
			bad("--dns-address %s: want an IPv4 or IPv6 address without zone", a)
		case a.Is4In6():
			bad("--dns-address %s: give IPv4 addresses as such (%s)", a, a.Unmap())
		case !a.IsGlobalUnicast() && !a.IsPrivate():
			bad("--dns-address %s: want a unicast address that is routed into the TUN (e.g. %s)", a, DefaultDNSAddr)
		}
		for _, p := range c.Exclude {
			if p.Contains(a) {
				bad("--dns-address %s is inside --exclude %s: its queries would leave outside the tunnel", a, p)
			}
		}
	}
	if c.UDPTransport != udprelay.TransportStream && c.UDPTransport != udprelay.TransportUplinks {
		bad("--udp-transport %q: want %s or %s", c.UDPTransport, udprelay.TransportStream, udprelay.TransportUplinks)
	}
	if c.UDPDuplicate < 0 || c.UDPDuplicate > 65535 {
		bad("--udp-duplicate %d: want 0 (off) to 65535 bytes", c.UDPDuplicate)
	}
	if c.UDPDuplicate > 0 && c.UDPTransport != udprelay.TransportUplinks {
		bad("--udp-duplicate needs --udp-transport %s: the stream carries each datagram once, over every uplink", udprelay.TransportUplinks)
	}
	if c.QUIC != QUICBlock && c.QUIC != QUICTunnel {
		bad("--quic %q: want %s or %s", c.QUIC, QUICBlock, QUICTunnel)
	}
	if _, err := dnsconf.ParseMode(string(c.DNSHook)); err != nil {
		errs = append(errs, fmt.Errorf("--dns-hook: %w", err))
	}
	if c.SubflowsPerUplink < 0 || c.SubflowsPerUplink > pathmgr.MaxEndpoints {
		bad("--subflows %d: want 1 to %d per uplink (the kernel opens at most %d subflows beside a connection's first)", c.SubflowsPerUplink, pathmgr.MaxEndpoints, pathmgr.MaxEndpoints)
	}
	if len(c.Uplinks) > pathmgr.MaxUplinks {
		bad("%d uplinks: the kernel holds at most %d MPTCP endpoints", len(c.Uplinks), pathmgr.MaxUplinks)
	}
	return errors.Join(errs...)
}

// pathmgr is the path manager's Config for c (without uplinks).
func (c Config) pathmgr() pathmgr.Config {
	return pathmgr.Config{Uplinks: c.Uplinks, TableBase: c.Table, RulePrio: c.Table, Mark: c.Mark, Logger: c.Logger,
		IPv6: c.Server.IsValid() && !c.Server.Addr().Unmap().Is4(), AnyFamily: c.ServerAlt.IsValid(),
		SubflowsPerUplink: c.SubflowsPerUplink}
}

// routing is routing's Config for c: its table and rules 100 above the
// path manager's.
func (c Config) routing() routing.Config {
	// The resolver addresses enter the TUN in every mode: a host route
	// each, so that split mode and rules alone reach them too.
	routes := slices.Clone(c.Routes)
	var pinned []netip.Prefix
	for _, a := range c.DNSAddrs {
		p := netip.PrefixFrom(a, a.BitLen())
		if !a.IsValid() || slices.Contains(pinned, p) {
			continue
		}
		pinned = append(pinned, p)
		if !slices.Contains(routes, p) {
			routes = append(routes, p)
		}
	}
	rc := routing.Config{
		TUN:      c.TUN,
		Routes:   routes,
		Pinned:   pinned,
		RouteAll: c.RouteAll,
		Exclude:  c.Exclude,
		AllowLAN: c.AllowLAN,
		Mark:     c.Mark,
		Table:    c.Table + 100,
		RulePrio: c.Table + 100,
		Logger:   c.Logger,
	}
	if c.firewalled() {
		rc.DirectMark, rc.TunnelMark = firewall.DirectMark(c.Mark), firewall.TunnelMark(c.Mark)
	}
	return rc
}

// firewalled: the client runs nftables (per-app rules, `mpvpn exec`'s
// cgroups, the kill switch).
func (c Config) firewalled() bool { return len(c.Rules) > 0 || c.KillSwitch || c.ExecCgroups }
