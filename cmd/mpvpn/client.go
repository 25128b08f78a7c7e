//go:build linux

package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os/user"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/mpvpn/mpvpn/cgroup"
	"github.com/mpvpn/mpvpn/client"
	"github.com/mpvpn/mpvpn/dnsconf"
	"github.com/mpvpn/mpvpn/firewall"
	"github.com/mpvpn/mpvpn/pathmgr"
	"github.com/mpvpn/mpvpn/probe"
	"github.com/mpvpn/mpvpn/tun"
	"github.com/mpvpn/mpvpn/tunnel"
)

func clientCommand() *cli.Command {
	return &cli.Command{
		Name:  "client",
		Usage: "carry this host's TCP flows over all uplinks to an mpvpn server",
		Description: "  mpvpn client --server 203.0.113.1:7100 --server-key <key> --key client.key \\\n" +
			"               --uplink wan0 --uplink wan1 --route 198.51.100.0/24\n\n" +
			"Each TCP flow to a --route destination is terminated on the TUN device and carried as one\n" +
			"Multipath TCP connection with a subflow on every --uplink. Each uplink's gateway is the\n" +
			"default route the host already has on that interface.",
		Flags: append([]cli.Flag{
			configFlag,
			&cli.StringFlag{Name: "server", Usage: "the concentrator's `ADDR:PORT`"},
			&cli.StringFlag{Name: "server-alt", Usage: "the concentrator's IPv4 `ADDR:PORT`, --server being its IPv6 one (it announces it: mpvpn server --announce): uplinks of either family then carry the same flows"},
			&cli.StringFlag{Name: "server-key", Usage: "the concentrator's public `KEY`"},
			&cli.PathFlag{Name: "key", Usage: "this client's private key `FILE` (from `mpvpn keygen`)"},
			&cli.StringSliceFlag{Name: "uplink", Usage: "an uplink `IFACE` to carry flows over (repeatable); IFACE:backup carries data only when no other uplink works. Default: every interface with a default route"},
			&cli.StringSliceFlag{Name: "route", Usage: "send flows to this `CIDR` through mpvpn (repeatable)"},
			&cli.BoolFlag{Name: "route-all", Usage: "send everything through mpvpn, IPv4 and IPv6 (mpvpn's own traffic, --exclude destinations, direct rules and, with --allow-lan, the LAN excepted)"},
			&cli.StringSliceFlag{Name: "exclude", Usage: "never send this `CIDR` through mpvpn, also with --route-all (repeatable)"},
			&cli.BoolFlag{Name: "allow-lan", Usage: "with --route-all or --kill-switch, keep the networks the uplinks are directly connected to reachable outside the tunnel"},
			&cli.StringSliceFlag{Name: "rule", Usage: "a per-app rule `SELECTOR=ACTION` (repeatable; first match wins): SELECTOR uid:N, uid:NAME or cgroup:PATH (cgroup v2, e.g. cgroup:/system.slice/backup.service); ACTION tunnel, direct or block"},
			&cli.BoolFlag{Name: "kill-switch", Usage: "let nothing leave an uplink but mpvpn's own traffic, direct rules and (with --allow-lan) the LAN; stays in force if the client crashes, until it starts again or `mpvpn down`"},
			&cli.BoolFlag{Name: "exec-cgroups", Value: true, Usage: "set up the cgroups of `mpvpn exec` and their rules"},
			&cli.StringFlag{Name: "cgroup", Value: cgroup.DefaultName, Usage: "the top-level cgroup `NAME` of `mpvpn exec`'s cgroups (another one for a second client on the host, or a test)"},
			&cli.StringFlag{Name: "tun", Value: client.DefaultTUN, Usage: "the TUN device's `NAME`"},
			&cli.StringSliceFlag{Name: "dns-address", Usage: "answer DNS (UDP and TCP port 53) on this `IP`, through the tunnel to the concentrator's resolver (repeatable; routed into the TUN in every mode); default 10.77.77.53, and fd6d:7076::53 when the TUN has an IPv6 address"},
			&cli.StringFlag{Name: "dns-hook", Usage: "point the system's resolver at the --dns-address values while the client runs: `MODE` auto (systemd-resolved when it runs, else /etc/resolv.conf), resolved, resolv.conf or off; put back on stop, `mpvpn down` and after a crash; default auto with --route-all, else off"},
			&cli.StringFlag{Name: "quic", Value: "block", Usage: "what UDP to port 443 (QUIC, HTTP/3) gets: `block` (a port unreachable at once, so browsers fall back to TCP, which mpvpn spreads over every uplink) or tunnel (relayed like other UDP)"},
			&cli.StringFlag{Name: "udp-transport", Usage: "how UDP datagrams and pings cross: `MODE` stream (in one tunnel flow over every uplink) or uplinks (as packets over the live uplink with the lowest round-trip time); default " + client.DefaultUDPTransport},
			&cli.IntFlag{Name: "udp-duplicate", Usage: "with --udp-transport uplinks, send datagrams of at most `BYTES` over the two best uplinks, and have their answers sent so too (voice, games); 0: off"},
			&cli.BoolFlag{Name: "reuse", Value: true, Usage: "a flow that ended cleanly leaves its connection in the pool for the next flow (one flow at a time per connection, within 5 min of its handshake), so a new flow costs neither end a handshake; needs --pool"},
			&cli.StringSliceFlag{Name: "tun-addr", Usage: "the TUN device's address `PREFIX` (repeatable; apps' flows come from it); default 10.77.77.1/32, and fd6d:7076::1/128 when IPv6 may enter the TUN (--route-all, an IPv6 --route, a tunnel rule)"},
			&cli.BoolFlag{Name: "early-destination", Usage: "a flow that finds no pooled connection (--pool) names its destination in the handshake's first message, one round trip sooner; that message can be replayed and its destination is not forward secret, so a fleet of concentrators (each with its own replay cache) would dial a replay once per member. Off: destinations travel only under forward-secret keys"},
			&cli.IntFlag{Name: "subflows", Value: 1, Usage: "open `N` subflows per uplink for every flow, to the server's address and to the ports it announces (mpvpn server --ports), so that equal-cost paths (ECMP) each carry some; at most 8 beside a flow's first subflow in all"},
			&cli.IntFlag{Name: "mtu", Value: tun.DefaultMTU, Usage: "the TUN device's MTU; it is local to this host, so large is fast"},
			&cli.UintFlag{Name: "mark", Value: client.DefaultMark, Usage: "SO_MARK on mpvpn's own sockets, so they bypass the TUN"},
			&cli.IntFlag{Name: "table", Value: 7100, Usage: "first routing `TABLE` (and rule priority) mpvpn uses; it owns this one and the next 199"},
			&cli.DurationFlag{Name: "all-down-timeout", Value: 60 * time.Second, Usage: "when every uplink is down, flows wait this long for one to come back, then are reset"},
			&cli.IntFlag{Name: "pool", Value: tunnel.DefaultPoolSize, Usage: "keep `N` connections to the server authenticated ahead of any flow (renewed every 5 min, two after 10 min without a new flow), so a new flow's first byte waits one round trip less; 0: off"},
			&cli.DurationFlag{Name: "probe-idle-interval", Value: probe.DefaultIdleInterval, Usage: "probe each uplink this often while no flow is open (every 100 ms while one is), so an idle metered uplink carries a twentieth of the probe traffic; 100ms: never back off"},
			&cli.BoolFlag{Name: "fast-open", Value: true, Usage: "TCP Fast Open to the server, so a new flow costs no extra round trip once a cookie is cached"},
			cipherFlag("auto offers the server AES-256-GCM when this CPU has AES instructions (the server takes it if its CPU has them too), else only ChaCha20-Poly1305; aes-256-gcm always offers it; chacha20-poly1305 never does"),
			journalFlag,
		}, append(controlFlags(defaultClientSocket), logFlags...)...),
		Action: runClient,
	}
}

// parseClient turns the command line (and --config file) into the
// client's Config; Config.Validate, in client.Run, checks the rest.
func parseClient(c *cli.Context, log *slog.Logger) (*client.Config, error) {
	cipher, err := tunnel.ParseCipherPolicy(c.String("cipher"))
	if err != nil {
		return nil, usageError("--cipher: %v", err)
	}
	cfg := client.Config{
		TUN:               c.String("tun"),
		MTU:               c.Int("mtu"),
		SubflowsPerUplink: c.Int("subflows"),
		Table:             c.Int("table"),
		FastOpen:          c.Bool("fast-open"),
		Pool:              c.Int("pool"),
		NoReuse:           !c.Bool("reuse"),
		EarlyDestination:  c.Bool("early-destination"),
		Cipher:            cipher,
		ProbeIdleInterval: c.Duration("probe-idle-interval"),
		AllDownTimeout:    c.Duration("all-down-timeout"),
		Control:           c.Path("control"),
		Metrics:           c.String("metrics"),
		UI:                c.String("ui"),
		Journal:           c.Path("journal"),
		Version:           version,
		Logger:            log,
	}
	if c.String("server") == "" {
		return nil, usageError("--server is required (the concentrator's ADDR:PORT)")
	}
	if cfg.Server, err = netip.ParseAddrPort(c.String("server")); err != nil {
		return nil, usageError("--server %q: want ADDR:PORT, e.g. 203.0.113.1:7100", c.String("server"))
	}
	if v := c.String("server-alt"); v != "" {
		if cfg.ServerAlt, err = netip.ParseAddrPort(v); err != nil {
			return nil, usageError("--server-alt %q: want ADDR:PORT, e.g. [2001:db8::1]:7100", v)
		}
	}
	if c.String("server-key") == "" {
		return nil, usageError("--server-key is required (the concentrator's public key)")
	}
	if cfg.ServerKey, err = tunnel.ParsePublicKey(strings.TrimSpace(c.String("server-key"))); err != nil {
		return nil, fmt.Errorf("--server-key: %w", err)
	}
	if cfg.Key, err = readKeyFileLog(c.Path("key"), log); err != nil {
		return nil, err
	}
	if n := c.Int("subflows"); n < 1 {
		return nil, usageError("--subflows %d: want at least 1 per uplink", n)
	}
	for _, u := range c.StringSlice("uplink") {
		name, opt, _ := strings.Cut(u, ":")
		switch opt {
		case "", "backup":
		default:
			return nil, usageError("--uplink %q: the only option is IFACE:backup", u)
		}
		cfg.Uplinks = append(cfg.Uplinks, pathmgr.UplinkConfig{Name: name, Backup: opt == "backup"})
	}
	for _, r := range c.StringSlice("route") {
		p, err := netip.ParsePrefix(r)
		if err != nil {
			return nil, usageError("--route %q: want a CIDR such as 198.51.100.0/24", r)
		}
		if p.Masked() != p {
			return nil, usageError("--route %q has host bits set; did you mean %s?", r, p.Masked())
		}
		cfg.Routes = append(cfg.Routes, p)
	}
	for _, r := range c.StringSlice("exclude") {
		p, err := netip.ParsePrefix(r)
		if err != nil {
			return nil, usageError("--exclude %q: want a CIDR such as 192.0.2.0/24", r)
		}
		if p.Masked() != p {
			return nil, usageError("--exclude %q has host bits set; did you mean %s?", r, p.Masked())
		}
		cfg.Exclude = append(cfg.Exclude, p)
	}
	cfg.RouteAll, cfg.AllowLAN, cfg.KillSwitch = c.Bool("route-all"), c.Bool("allow-lan"), c.Bool("kill-switch")
	cfg.ExecCgroups, cfg.Cgroup = c.Bool("exec-cgroups"), c.String("cgroup")
	for _, r := range c.StringSlice("rule") {
		rule, err := parseRule(r)
		if err != nil {
			return nil, usageError("--rule %q: %v", r, err)
		}
		cfg.Rules = append(cfg.Rules, rule)
	}
	for _, t := range c.StringSlice("tun-addr") {
		a, err := netip.ParsePrefix(t)
		if err != nil {
			return nil, usageError("--tun-addr %q: want an address with a prefix length, e.g. 10.77.77.1/32", t)
		}
		cfg.TUNAddrs = append(cfg.TUNAddrs, a)
	}
	for _, d := range c.StringSlice("dns-address") {
		a, err := netip.ParseAddr(d)
		if err != nil {
			return nil, usageError("--dns-address %q: want an IP address, e.g. 10.77.77.53", d)
		}
		cfg.DNSAddrs = append(cfg.DNSAddrs, a)
	}
	cfg.QUIC = c.String("quic")
	cfg.UDPTransport = c.String("udp-transport")
	cfg.UDPDuplicate = c.Int("udp-duplicate")
	if h := c.String("dns-hook"); h != "" {
		m, err := dnsconf.ParseMode(h)
		if err != nil {
			return nil, usageError("--dns-hook: %v", err)
		}
		cfg.DNSHook = m
	}
	if m := c.Uint("mark"); m == 0 || m > 0xffffffff {
		return nil, usageError("--mark %d: want 1 to 4294967295", m)
	}
	cfg.Mark = uint32(c.Uint("mark"))
	if cfg.AllDownTimeout <= 0 {
		return nil, usageError("--all-down-timeout %v: must be positive", cfg.AllDownTimeout)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &cfg, nil
}

// parseRule reads SELECTOR=ACTION: uid:N, uid:NAME or cgroup:PATH, then
// tunnel, direct or block.
func parseRule(s string) (firewall.Rule, error) {
	sel, act, ok := strings.Cut(s, "=")
	if !ok {
		return firewall.Rule{}, errors.New("want SELECTOR=ACTION, e.g. uid:1000=tunnel")
	}
	a, err := firewall.ParseAction(act)
	if err != nil {
		return firewall.Rule{}, err
	}
	kind, arg, _ := strings.Cut(sel, ":")
	switch {
	case kind == "uid" && arg != "":
		if n, err := strconv.ParseUint(arg, 10, 32); err == nil {
			return firewall.Rule{Selector: firewall.UID(uint32(n)), Action: a}, nil
		}
		u, err := user.Lookup(arg)
		if err != nil {
			return firewall.Rule{}, fmt.Errorf("no user %q: %w", arg, err)
		}
		n, err := strconv.ParseUint(u.Uid, 10, 32)
		if err != nil {
			return firewall.Rule{}, fmt.Errorf("user %q has uid %q", arg, u.Uid)
		}
		return firewall.Rule{Selector: firewall.UID(uint32(n)), Action: a}, nil
	case kind == "cgroup" && strings.HasPrefix(arg, "/"):
		p, err := cgroup.CleanPath(arg)
		if err != nil {
			return firewall.Rule{}, err
		}
		return firewall.Rule{Selector: firewall.Cgroup(p), Action: a}, nil
	}
	return firewall.Rule{}, fmt.Errorf("selector %q: want uid:N, uid:NAME or cgroup:/PATH", sel)
}

func runClient(c *cli.Context) error {
	if err := loadConfig(c); err != nil {
		return err
	}
	log, err := newLogger(c)
	if err != nil {
		return err
	}
	raiseNoFile(log)
	cfg, err := parseClient(c, log)
	if err != nil {
		return err
	}
	return client.Run(c.Context, *cfg)
}

func downCommand() *cli.Command {
	return &cli.Command{
		Name:  "down",
		Usage: "remove everything a client left on this host, running or crashed, and say what was removed",
		Description: "  mpvpn down\n\n" +
			"A running client is asked to stop, and undoes its changes itself; what a crashed or\n" +
			"killed client left (routes, rules, sysctls, ... as its journal lists them) is undone here.",
		Flags: []cli.Flag{
			journalFlag,
			&cli.DurationFlag{Name: "wait", Value: 15 * time.Second, Usage: "how long a running client is given to stop"},
		},
		Action: func(c *cli.Context) error {
			lines, err := client.Down(c.Path("journal"), c.Duration("wait"), nil)
			for _, l := range lines {
				fmt.Fprintln(c.App.Writer, "removed:", l)
			}
			if err != nil {
				return err
			}
			if len(lines) == 0 {
				fmt.Fprintln(c.App.Writer, "nothing to remove: no mpvpn client has left anything on this host")
			}
			return nil
		},
	}
}

var journalFlag = &cli.PathFlag{Name: "journal", Value: client.DefaultJournal, Usage: "the client's host-state journal `FILE`: every change to the host, written before it is made"}
