//go:build linux

package main

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/mpvpn/mpvpn/client"
	"github.com/mpvpn/mpvpn/concentrator"
	"github.com/mpvpn/mpvpn/control"
	"github.com/mpvpn/mpvpn/internal/sysctl"
	"github.com/mpvpn/mpvpn/pathmgr"
	"github.com/mpvpn/mpvpn/tunnel"
)

func serverCommand() *cli.Command {
	return &cli.Command{
		Name:  "server",
		Usage: "run the concentrator: accept clients' flows and connect them to their destinations",
		Description: "  mpvpn server --listen 0.0.0.0:7100 --key server.key --peer <client public key>\n\n" +
			"Clients that do not prove one of the --peer keys get no byte back. By default the server\n" +
			"refuses destinations on its own host and on private, CGNAT, link-local, multicast and\n" +
			"cloud-metadata addresses; --allow-private lifts the private ones.",
		Flags: append([]cli.Flag{
			configFlag,
			&cli.StringFlag{Name: "listen", Value: "0.0.0.0:7100", Usage: "listen on this `ADDR:PORT` (Multipath TCP)"},
			&cli.PathFlag{Name: "key", Usage: "the server's private key `FILE` (from `mpvpn keygen`)"},
			&cli.StringSliceFlag{Name: "peer", Usage: "a client's public `KEY` allowed to connect (repeatable)"},
			&cli.BoolFlag{Name: "allow-private", Usage: "let clients reach loopback, private, CGNAT and link-local destinations and this host's own addresses (never the listener itself or cloud metadata)"},
			&cli.StringSliceFlag{Name: "deny", Usage: "always refuse destinations in this `CIDR`, even with --allow-private, also in IPv4-mapped, NAT64 and 6to4 forms (repeatable): for addresses of this host that are not on its interfaces, such as the public address a 1:1 NAT gives it (EC2, GCP)"},
			&cli.BoolFlag{Name: "fast-open", Usage: "accept TCP Fast Open on the listener, so a flow's first message rides in the SYN (off by default: Linux up to at least 6.18 stalls Multipath TCP connections that opened with data in the SYN once a second subflow joins; see the README)"},
			cipherFlag("auto takes a client's offer of AES-256-GCM when this CPU has AES instructions, else uses ChaCha20-Poly1305; aes-256-gcm takes every offer; chacha20-poly1305 takes none"),
			&cli.DurationFlag{Name: "dial-timeout", Value: concentratorDialTimeout, Usage: "give up connecting to a destination after this long"},
			&cli.IntFlag{Name: "max-flows-per-client", Value: 4096, Usage: "most flows one client key may have open at once; more are refused"},
			&cli.DurationFlag{Name: "handshake-timeout", Value: defaultHandshakeTimeout, Usage: "close a connection that has not authenticated this long after it was accepted; every rejected connection is closed at exactly this time, whatever it sent"},
			&cli.IntFlag{Name: "max-pooled-per-client", Value: 64, Usage: "most connections one client key may hold authenticated ahead of its flows (its --pool); more are answered Limited"},
			&cli.DurationFlag{Name: "pool-idle", Value: 6 * time.Minute, Usage: "close a client's pooled connection unused for this long (keep it above the client's 5 min renewal)"},
			&cli.IntFlag{Name: "max-flows", Value: 16384, Usage: "most flows open at once over all clients; more are refused"},
			&cli.IntFlag{Name: "handshake-rate", Value: 1000, Usage: "new flows per second one client key may open (a burst of --handshake-burst above it); more are refused, and other clients are not affected"},
			&cli.IntFlag{Name: "handshake-burst", Value: 2000, Usage: "how many new flows one client key may open at once above --handshake-rate"},
			&cli.IntFlag{Name: "max-half-open", Value: 4096, Usage: "most connections not yet authenticated, in all; when full, the oldest is closed to make room"},
			&cli.IntFlag{Name: "max-half-open-per-addr", Value: 32, Usage: "most connections not yet authenticated from one IPv4 address or IPv6 /64; over it, that source's oldest is closed"},
			&cli.IntFlag{Name: "max-half-open-per-48", Value: 256, Usage: "most connections not yet authenticated from one IPv6 /48; over it, that /48's oldest is closed"},
			&cli.StringSliceFlag{Name: "ports", Usage: "announce these extra `PORTS` (P1,P2,… or P1-P2; at most 8 with --announce's addresses) on every connection, on the --listen address (or on each --announce address when listening on all): MPTCP ADD_ADDR with a port, where the kernel takes joins, so that a client's --subflows over equal-cost paths (ECMP) differ in more than their source port"},
			&cli.StringSliceFlag{Name: "announce", Usage: "announce this `ADDR` of the concentrator's on every connection (MPTCP ADD_ADDR; repeatable): its address of the other family, so that a client's IPv6 uplinks join flows that began over IPv4 (or the other way round; the client names it with --server-alt)"},
			&cli.StringSliceFlag{Name: "vip", Usage: "the shared `ADDR` clients dial when this concentrator is one of a fleet behind it (ECMP anycast, a hash DNAT balancer; repeatable, one per family): joins to it are refused (the MP_CAPABLE C flag, net.mptcp.allow_join_initial_addr_port=0), so that a client's other subflows join the --announce address of its family, this member's own, instead of landing on another member; needs --announce"},
			&cli.StringFlag{Name: "dns-upstream", Usage: "answer the clients' DNS queries with the resolver at this `ADDR:PORT` (default: the first nameserver of this host's /etc/resolv.conf)"},
			&cli.BoolFlag{Name: "no-dns", Usage: "do not resolve for the clients (their lookups through mpvpn then fail)"},
			&cli.DurationFlag{Name: "frame-timeout", Value: 90 * time.Second, Usage: "close a flow whose client began a frame and did not finish it within this long (longer than the clients' --all-down-timeout)"},
		}, append(controlFlags(defaultServerSocket), logFlags...)...),
		Action: runServer,
	}
}

// concentratorDialTimeout stays below the client's handshake timeout (10 s)
// so the app hears "timed out" from the concentrator, not from its own side.
const concentratorDialTimeout = 7e9

// defaultHandshakeTimeout is tunnel's default handshake deadline.
const defaultHandshakeTimeout = 5e9

func runServer(c *cli.Context) error {
	if err := loadConfig(c); err != nil {
		return err
	}
	log, err := newLogger(c)
	if err != nil {
		return err
	}
	raiseNoFile(log)
	key, err := readKeyFileLog(c.Path("key"), log)
	if err != nil {
		return err
	}
	peers, err := parsePublicKeys("peer", c.StringSlice("peer"))
	if err != nil {
		return err
	}
	if len(peers) == 0 {
		return usageError("--peer is required: the public key of each client allowed to connect")
	}
	if n := c.Int("max-flows-per-client"); n <= 0 {
		return usageError("--max-flows-per-client %d: must be positive", n)
	}
	if d := c.Duration("handshake-timeout"); d <= 0 {
		return usageError("--handshake-timeout %v: must be positive", d)
	}
	for _, name := range []string{"max-flows", "max-pooled-per-client", "handshake-rate", "handshake-burst", "max-half-open", "max-half-open-per-addr", "max-half-open-per-48"} {
		if n := c.Int(name); n <= 0 {
			return usageError("--%s %d: must be positive", name, n)
		}
	}
	if c.Int("max-half-open-per-addr") > c.Int("max-half-open") || c.Int("max-half-open-per-48") > c.Int("max-half-open") {
		return usageError("--max-half-open-per-addr (%d) and --max-half-open-per-48 (%d) must not exceed --max-half-open (%d)",
			c.Int("max-half-open-per-addr"), c.Int("max-half-open-per-48"), c.Int("max-half-open"))
	}
	if d := c.Duration("frame-timeout"); d <= 0 {
		return usageError("--frame-timeout %v: must be positive", d)
	}
	var deny []netip.Prefix
	for _, d := range c.StringSlice("deny") {
		p, err := netip.ParsePrefix(d)
		if err != nil {
			return usageError("--deny %q: want a CIDR such as 198.51.100.10/32", d)
		}
		if p.Masked() != p {
			return usageError("--deny %q has host bits set; did you mean %s?", d, p.Masked())
		}
		deny = append(deny, p)
	}
	cipher, err := tunnel.ParseCipherPolicy(c.String("cipher"))
	if err != nil {
		return usageError("--cipher: %v", err)
	}
	var announce []netip.Addr
	for _, a := range c.StringSlice("announce") {
		ip, err := netip.ParseAddr(a)
		if err != nil || ip.Zone() != "" {
			return usageError("--announce %q: want an address of this host's, e.g. 2001:db8::1", a)
		}
		announce = append(announce, ip.Unmap())
	}
	signals, err := signalEndpoints(c.String("listen"), announce, c.StringSlice("ports"))
	if err != nil {
		return err
	}
	vips, err := parseVIPs(c.StringSlice("vip"), announce)
	if err != nil {
		return err
	}
	var dnsUp netip.AddrPort
	if v := c.String("dns-upstream"); v != "" {
		if dnsUp, err = netip.ParseAddrPort(v); err != nil || dnsUp.Port() == 0 {
			if a, aerr := netip.ParseAddr(v); aerr == nil {
				return usageError("--dns-upstream %q: give the port too, e.g. %s", v, netip.AddrPortFrom(a, 53))
			}
			return usageError("--dns-upstream %q: want ADDR:PORT, e.g. 192.0.2.53:53", v)
		}
		if c.Bool("no-dns") {
			return usageError("--dns-upstream and --no-dns contradict each other")
		}
	}
	srv, err := concentrator.Listen(c.Context, concentrator.Config{
		Listen:             c.String("listen"),
		Key:                key,
		Peers:              peers,
		AllowPrivate:       c.Bool("allow-private"),
		Deny:               deny,
		FastOpen:           c.Bool("fast-open"),
		Cipher:             cipher,
		DialTimeout:        c.Duration("dial-timeout"),
		HandshakeDeadline:  c.Duration("handshake-timeout"),
		MaxFlowsPerPeer:    c.Int("max-flows-per-client"),
		MaxFlows:           c.Int("max-flows"),
		MaxPooledPerPeer:   c.Int("max-pooled-per-client"),
		PoolIdle:           c.Duration("pool-idle"),
		PeerHandshakeRate:  c.Int("handshake-rate"),
		PeerHandshakeBurst: c.Int("handshake-burst"),
		MaxHalfOpen:        c.Int("max-half-open"),
		MaxHalfOpenPerAddr: c.Int("max-half-open-per-addr"),
		MaxHalfOpenPerSite: c.Int("max-half-open-per-48"),
		FrameTimeout:       c.Duration("frame-timeout"),
		DNSUpstream:        dnsUp,
		NoDNS:              c.Bool("no-dns"),
		FleetAnnounce:      fleetAnnounce(vips, announce),
		Logger:             log,
	})
	if err != nil {
		return err
	}
	defer srv.Close()

	// Liveness probes from the clients' uplinks come to the same port
	// over UDP (see package probe); binding it now makes a port taken by
	// someone else a configuration error, before the host is changed.
	stopProbes, err := serveProbes(c.Context, srv, key, peers, log)
	if err != nil {
		return err
	}
	defer stopProbes()

	dc, err := listenControl(c)
	if err != nil {
		return err
	}
	defer dc.ln.Close()

	// Host settings the concentrator needs; each is put back on exit.
	host := &sysctl.Changes{Root: sysctl.Proc}
	defer host.Restore()
	if v, err := sysctl.Proc.Get("net.mptcp.enabled"); err != nil || v != "1" {
		return fmt.Errorf("Multipath TCP is not enabled on this host (net.mptcp.enabled=%q, %v)", v, err)
	}
	if c.Bool("fast-open") {
		// Bit 0x2 lets the listener accept data in the SYN; keep
		// whatever client bit the host had.
		if err := host.SetBits("net.ipv4.tcp_fastopen", 0x2); err != nil {
			return err
		}
	}
	// The concentrator is the sender of downloads: its value decides how
	// fast a download leaves a path the client has not yet withdrawn.
	if err := host.AtMost("net.mptcp.stale_loss_cnt", client.StaleLossCount); err != nil {
		log.Warn("cannot tune stale-subflow detection", "err", err)
	}
	if len(vips) > 0 {
		// Per network namespace, so for every MPTCP listener in it:
		// a fleet member's host serves the fleet only.
		if err := host.Set("net.mptcp.allow_join_initial_addr_port", "0"); err != nil {
			return err
		}
	}
	// The server's subflow limit is how many extra subflows (joins) a
	// client connection may add: the kernel maximum, so a client with up
	// to 8 uplinks gets all of them.
	restoreLimits, err := pathmgr.RaiseLimits(8, 8)
	if err != nil {
		return err
	}
	defer restoreLimits()
	if len(signals) > 0 {
		withdraw, err := pathmgr.Announce(signals)
		if err != nil {
			return err
		}
		defer withdraw()
	}

	start := time.Now()
	fleet := fleetStatus(vips, signals)
	stopControl, err := dc.serve(func(flows bool) control.Status {
		st := serverStatus(srv, start, flows)
		st.Fleet = fleet
		return st
	}, log)
	if err != nil {
		return err
	}
	defer stopControl()

	log.Info("concentrator listening", "addr", srv.Addr().String(), "peers", len(peers), "allow_private", c.Bool("allow-private"))
	return srv.Serve(c.Context)
}

// parseVIPs checks --vip against the --announce addresses: a VIP is not
// this member's own address, and each has an announced address of its
// family for the joins its C flag sends away.
func parseVIPs(vals []string, announce []netip.Addr) ([]netip.Addr, error) {
	var vips []netip.Addr
	for _, v := range vals {
		ip, err := netip.ParseAddr(v)
		if err != nil || ip.Zone() != "" || ip.IsUnspecified() {
			return nil, usageError("--vip %q: want the fleet's shared address, e.g. 203.0.113.1", v)
		}
		ip = ip.Unmap()
		if slices.Contains(announce, ip) {
			return nil, usageError("--vip %s is also an --announce address: announce this member's own address, the one joins should reach", ip)
		}
		if !slices.ContainsFunc(announce, func(a netip.Addr) bool { return a.Is4() == ip.Is4() }) {
			return nil, usageError("--vip %s needs an --announce address of its family: joins to the VIP are refused, and without an address of this member's to join instead a client's flows would stay on one subflow", ip)
		}
		vips = append(vips, ip)
	}
	return vips, nil
}

// fleetAnnounce: in a fleet, the announced addresses a connection must not
// arrive at (concentrator.Config.FleetAnnounce).
func fleetAnnounce(vips, announce []netip.Addr) []netip.Addr {
	if len(vips) == 0 {
		return nil
	}
	return announce
}

// fleetStatus is what `mpvpn status --server` says of a fleet member: the
// shared address and what it announces instead (nil: not in a fleet).
func fleetStatus(vips []netip.Addr, signals []netip.AddrPort) *control.Fleet {
	if len(vips) == 0 {
		return nil
	}
	f := &control.Fleet{}
	for _, v := range vips {
		f.VIP = append(f.VIP, v.String())
	}
	for _, s := range signals {
		if s.Port() == 0 {
			f.Announce = append(f.Announce, s.Addr().String())
		} else {
			f.Announce = append(f.Announce, s.String())
		}
	}
	return f
}

// signalEndpoints is what the concentrator announces on every connection,
// in order: each --announce address alone, then each of ports on the
// --listen address, or, when that is a wildcard, on each --announce
// address (a port needs an address of this host's to be announced on).
// The kernel holds at most pathmgr.MaxEndpoints of them.
func signalEndpoints(listen string, announce []netip.Addr, ports []string) ([]netip.AddrPort, error) {
	var out []netip.AddrPort
	for _, a := range announce {
		out = append(out, netip.AddrPortFrom(a, 0))
	}
	var ps []uint16
	for _, p := range ports {
		lo, hi, isRange := strings.Cut(p, "-")
		first, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
		last, err2 := first, error(nil)
		if isRange {
			last, err2 = strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
		}
		if err1 != nil || err2 != nil || first == 0 || last < first {
			return nil, usageError("--ports %q: want ports such as 7101,7102 or a range 7101-7107", p)
		}
		if last-first >= pathmgr.MaxEndpoints {
			return nil, usageError("--ports %q: more than the kernel's %d announcements", p, pathmgr.MaxEndpoints)
		}
		for q := first; q <= last; q++ {
			ps = append(ps, uint16(q))
		}
	}
	if len(ps) == 0 {
		return out, nil
	}
	ap, err := netip.ParseAddrPort(listen)
	if err != nil {
		return nil, usageError("--listen %q: want ADDR:PORT", listen)
	}
	on := []netip.Addr{ap.Addr().Unmap()}
	if ap.Addr().IsUnspecified() {
		if len(announce) == 0 {
			return nil, usageError("--ports needs an address to announce them on: --listen on one of this host's addresses, or --announce it")
		}
		on = announce
	}
	for _, a := range on {
		for _, q := range ps {
			if q == ap.Port() {
				return nil, usageError("--ports %d is the --listen port: the clients join it already", q)
			}
			if slices.Contains(out, netip.AddrPortFrom(a, q)) {
				return nil, usageError("--ports %d is given twice", q)
			}
			out = append(out, netip.AddrPortFrom(a, q))
		}
	}
	if len(out) > pathmgr.MaxEndpoints {
		return nil, usageError("--announce and --ports make %d announcements; the kernel holds at most %d", len(out), pathmgr.MaxEndpoints)
	}
	return out, nil
}
