//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/urfave/cli/v2"
	"github.com/vishvananda/netlink"

	"github.com/mpvpn/mpvpn/internal/sysctl"
	"github.com/mpvpn/mpvpn/internal/uplinkstats"
	"github.com/mpvpn/mpvpn/pathmgr"
	"github.com/mpvpn/mpvpn/probe"
	"github.com/mpvpn/mpvpn/routing"
	"github.com/mpvpn/mpvpn/stack"
	"github.com/mpvpn/mpvpn/tun"
	"github.com/mpvpn/mpvpn/tunnel"
)

// defaultMark is the SO_MARK on every tunnel socket ("mp" in ASCII): routing
// sends marked packets around the TUN, never into it.
const defaultMark = 0x6d70

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
			&cli.StringFlag{Name: "server-key", Usage: "the concentrator's public `KEY`"},
			&cli.PathFlag{Name: "key", Usage: "this client's private key `FILE` (from `mpvpn keygen`)"},
			&cli.StringSliceFlag{Name: "uplink", Usage: "an uplink `IFACE` to carry flows over (repeatable); IFACE:backup carries data only when no other uplink works. Default: every interface with a default route"},
			&cli.StringSliceFlag{Name: "route", Usage: "send flows to this `CIDR` through mpvpn (repeatable)"},
			&cli.StringFlag{Name: "tun", Value: "mpvpn0", Usage: "the TUN device's `NAME`"},
			&cli.StringFlag{Name: "tun-addr", Value: "10.77.77.1/32", Usage: "the TUN device's address `PREFIX` (apps' flows come from it)"},
			&cli.IntFlag{Name: "mtu", Value: tun.DefaultMTU, Usage: "the TUN device's MTU; it is local to this host, so large is fast"},
			&cli.UintFlag{Name: "mark", Value: defaultMark, Usage: "SO_MARK on mpvpn's own sockets, so they bypass the TUN"},
			&cli.IntFlag{Name: "table", Value: 7100, Usage: "first routing `TABLE` (and rule priority) mpvpn uses; it owns this one and the next 199"},
			&cli.DurationFlag{Name: "all-down-timeout", Value: 60 * time.Second, Usage: "when every uplink is down, flows wait this long for one to come back, then are reset"},
			&cli.BoolFlag{Name: "fast-open", Value: true, Usage: "TCP Fast Open to the server, so a new flow costs no extra round trip once a cookie is cached"},
		}, append(controlFlags(defaultClientSocket), logFlags...)...),
		Action: runClient,
	}
}

// clientConfig is the parsed, validated command line: everything that can
// be wrong with it is found before the host is touched.
type clientConfig struct {
	server    netip.AddrPort
	serverKey tunnel.PublicKey
	key       tunnel.PrivateKey
	uplinks   []pathmgr.UplinkConfig
	routes    []netip.Prefix
	tunName   string
	tunAddr   netip.Prefix
	mtu       int
	mark      uint32
	table     int
	fastOpen  bool
	allDown   time.Duration
}

func parseClient(c *cli.Context, log *slog.Logger) (*clientConfig, error) {
	var cfg clientConfig
	var err error
	if c.String("server") == "" {
		return nil, usageError("--server is required (the concentrator's ADDR:PORT)")
	}
	if cfg.server, err = netip.ParseAddrPort(c.String("server")); err != nil {
		return nil, usageError("--server %q: want ADDR:PORT, e.g. 203.0.113.1:7100", c.String("server"))
	}
	if c.String("server-key") == "" {
		return nil, usageError("--server-key is required (the concentrator's public key)")
	}
	if cfg.serverKey, err = tunnel.ParsePublicKey(strings.TrimSpace(c.String("server-key"))); err != nil {
		return nil, fmt.Errorf("--server-key: %w", err)
	}
	if cfg.key, err = readKeyFileLog(c.Path("key"), log); err != nil {
		return nil, err
	}
	for _, u := range c.StringSlice("uplink") {
		name, opt, _ := strings.Cut(u, ":")
		switch opt {
		case "", "backup":
		default:
			return nil, usageError("--uplink %q: the only option is IFACE:backup", u)
		}
		cfg.uplinks = append(cfg.uplinks, pathmgr.UplinkConfig{Name: name, Backup: opt == "backup"})
	}
	for _, r := range c.StringSlice("route") {
		p, err := netip.ParsePrefix(r)
		if err != nil {
			return nil, usageError("--route %q: want a CIDR such as 198.51.100.0/24", r)
		}
		if p.Masked() != p {
			return nil, usageError("--route %q has host bits set; did you mean %s?", r, p.Masked())
		}
		cfg.routes = append(cfg.routes, p)
	}
	if len(cfg.routes) == 0 {
		return nil, usageError("--route is required: which destinations go through mpvpn")
	}
	cfg.tunName = c.String("tun")
	if cfg.tunAddr, err = netip.ParsePrefix(c.String("tun-addr")); err != nil {
		return nil, usageError("--tun-addr %q: want an address with a prefix length, e.g. 10.77.77.1/32", c.String("tun-addr"))
	}
	cfg.mtu = c.Int("mtu")
	if cfg.mtu < 1280 || cfg.mtu > 65535 {
		return nil, usageError("--mtu %d: want 1280 to 65535", cfg.mtu)
	}
	if m := c.Uint("mark"); m == 0 || m > 0xffffffff {
		return nil, usageError("--mark %d: want 1 to 4294967295", m)
	}
	cfg.mark = uint32(c.Uint("mark"))
	cfg.table = c.Int("table")
	cfg.fastOpen = c.Bool("fast-open")
	if cfg.allDown = c.Duration("all-down-timeout"); cfg.allDown <= 0 {
		return nil, usageError("--all-down-timeout %v: must be positive", cfg.allDown)
	}
	return &cfg, nil
}

func runClient(c *cli.Context) (err error) {
	if err := loadConfig(c); err != nil {
		return err
	}
	log, err := newLogger(c)
	if err != nil {
		return err
	}
	cfg, err := parseClient(c, log)
	if err != nil {
		return err
	}
	if v, gerr := sysctl.Proc.Get("net.mptcp.enabled"); gerr != nil || v != "1" {
		return fmt.Errorf("Multipath TCP is not enabled on this host (net.mptcp.enabled=%q, %v)", v, gerr)
	}

	if err := checkTUNName(cfg.tunName); err != nil {
		return err
	}
	// The status socket (and metrics port) before anything else changes:
	// a second client, or a port in use, is a configuration error.
	dc, err := listenControl(c)
	if err != nil {
		return err
	}
	defer dc.ln.Close()
	if len(cfg.uplinks) == 0 {
		// No --uplink: every interface with a default route.
		if cfg.uplinks, err = pathmgr.DiscoverUplinks(cfg.tunName); err != nil {
			return err
		}
		log.Info("uplinks discovered from the default routes", "uplinks", fmt.Sprint(cfg.uplinks))
	}

	// From here on the host changes; every step is undone on the way out,
	// in reverse order, also when a later step fails.
	var undo []func() error
	defer func() {
		for i := len(undo) - 1; i >= 0; i-- {
			if uerr := undo[i](); uerr != nil {
				log.Warn("cleanup", "err", uerr)
			}
		}
	}()

	// pathmgr validates every uplink (exists, has an address and a
	// gateway) before it changes anything. Its changes reach the liveness
	// prober, which exists only once pathmgr does.
	var prober atomic.Pointer[probe.Prober]
	pm, err := pathmgr.Start(c.Context, pathmgr.Config{
		Uplinks:   cfg.uplinks,
		TableBase: cfg.table,
		RulePrio:  cfg.table,
		Logger:    log,
		OnChange: func(s pathmgr.Status) {
			if pr := prober.Load(); pr != nil {
				probePath(pr, s)
			}
		},
	})
	if err != nil {
		return err
	}
	undo = append(undo, pm.Close)

	// Liveness: a probe per uplink to the concentrator, so an uplink
	// whose link is up while nothing gets through is withdrawn within
	// about half a second, and restored as quickly when it answers again.
	pr, err := probe.NewProber(probe.ProberConfig{
		Server:    cfg.server,
		Key:       cfg.key,
		ServerKey: cfg.serverKey,
		Mark:      cfg.mark,
		Logger:    log,
		OnChange:  pm.SetReachable,
	})
	if err != nil {
		return err
	}
	undo = append(undo, pr.Close)
	for _, s := range pm.Status() {
		probePath(pr, s)
	}
	prober.Store(pr)
	// The watcher keeps the uplinks in step with the host until the end;
	// it is stopped (and waited for) before pm.Close runs.
	watchCtx, stopWatch := context.WithCancel(context.Background())
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		if err := pm.Run(watchCtx); err != nil {
			log.Error("uplink watcher stopped; uplinks are no longer kept in step with the host", "err", err)
		}
	}()
	undo = append(undo, func() error { stopWatch(); <-watchDone; return nil })

	host := &sysctl.Changes{Root: sysctl.Proc}
	undo = append(undo, host.Restore)
	// The kernel can silently turn MPTCP off for an hour after a few lost
	// MP_CAPABLE SYNs (net.mptcp.blackhole_timeout, v6.12+); for a VPN
	// whose whole point is multipath, a brief outage of the concentrator
	// must not do that. Connections that really meet an MPTCP-stripping
	// middlebox still fall back one by one and are counted.
	if err := host.Set("net.mptcp.blackhole_timeout", "0"); err != nil {
		log.Warn("cannot disable the MPTCP blackhole detection", "err", err)
	}
	if err := tuneStaleSubflows(host); err != nil {
		log.Warn("cannot tune stale-subflow detection", "err", err)
	}
	// A connection whose last subflow is gone lives close_timeout (60 s by
	// default, "make-after-break"); flows must be able to wait as long as
	// --all-down-timeout says.
	if err := raiseSysctl(host, "net.mptcp.close_timeout", int(cfg.allDown.Seconds()+0.999)); err != nil {
		log.Warn("cannot raise net.mptcp.close_timeout", "err", err)
	}
	if cfg.fastOpen {
		if err := orSysctl(host, "net.ipv4.tcp_fastopen", 0x1); err != nil {
			return err
		}
	}

	dev, err := tun.Open(tun.Config{Name: cfg.tunName, MTU: cfg.mtu, Addrs: []netip.Prefix{cfg.tunAddr}}, log)
	if err != nil {
		return fmt.Errorf("TUN %s: %w", cfg.tunName, err)
	}
	undo = append(undo, dev.Close)

	tc, err := tunnel.NewClient(tunnel.ClientConfig{
		Server:    cfg.server,
		ServerKey: cfg.serverKey,
		Key:       cfg.key,
		Mark:      cfg.mark,
		FastOpen:  cfg.fastOpen,
		Source:    pm.PreferredSource,
		Now:       concentratorClock(pr, time.Now()),
		Logger:    log,
	})
	if err != nil {
		return err
	}

	// With every uplink down, flows wait (MPTCP keeps a connection with
	// no subflow, and the path manager gives it new ones when an uplink
	// returns), but not for ever.
	wdCtx, stopWD := context.WithCancel(context.Background())
	wdDone := make(chan struct{})
	go func() {
		defer close(wdDone)
		resetWhenAllDown(wdCtx, pm, tc, cfg.allDown, time.Second, log)
	}()
	undo = append(undo, func() error { stopWD(); <-wdDone; return nil })

	st, err := stack.New(stack.Config{
		Device: dev.Inner(),
		MTU:    cfg.mtu,
		Dialer: tunnelDialer{tc},
		Logger: log,
	})
	if err != nil {
		return err
	}
	undo = append(undo, st.Close)

	// Routes last: until now nothing was sent into the TUN.
	rt, err := routing.Apply(routing.Config{
		TUN:      cfg.tunName,
		Routes:   cfg.routes,
		Mark:     cfg.mark,
		Table:    cfg.table + 100,
		RulePrio: cfg.table + 100,
		Logger:   log,
	})
	if err != nil {
		return err
	}
	undo = append(undo, rt.Close)

	stats := &clientStats{tc: tc, pm: pm, pr: pr, meter: uplinkstats.New(), start: time.Now(), srv: cfg.server, netstack: st.Stats}
	sampleCtx, stopSampling := context.WithCancel(context.Background())
	sampleDone := make(chan struct{})
	go func() { defer close(sampleDone); stats.run(sampleCtx, time.Second) }()
	undo = append(undo, func() error { stopSampling(); <-sampleDone; return nil })
	stopControl, err := dc.serve(stats.status, log)
	if err != nil {
		return err
	}
	undo = append(undo, stopControl)

	var names []string
	for _, u := range pm.Uplinks() {
		names = append(names, fmt.Sprintf("%s(%s via %s)", u.Name, u.Addr, u.Gateway))
	}
	log.Info("client up", "server", cfg.server.String(), "tun", cfg.tunName, "uplinks", strings.Join(names, " "), "routes", fmt.Sprint(cfg.routes))
	<-c.Context.Done()
	log.Info("client shutting down")
	return nil
}

// resetWhenAllDown resets every flow once no uplink has been up for
// bound, until ctx is done. It looks every tick; the outage is dated from
// when the last uplink left the up state (pathmgr's Since), not from the
// tick that saw it, and the reset fires on a timer at exactly bound after
// that, so flows get what --all-down-timeout promises, neither a tick
// less nor up to two more. It resets once per outage: flows opened during
// it fail on their own.
func resetWhenAllDown(ctx context.Context, pm interface{ Status() []pathmgr.Status }, tc interface{ AbortAll() int }, bound, tick time.Duration, log *slog.Logger) {
	t := time.NewTicker(tick)
	defer t.Stop()
	var (
		downSince time.Time
		reset     bool
		timer     *time.Timer
		fire      <-chan time.Time
	)
	stopTimer := func() {
		if timer != nil {
			timer.Stop()
			timer, fire = nil, nil
		}
	}
	defer stopTimer()
	check := func(now time.Time) {
		st := pm.Status()
		if slices.ContainsFunc(st, func(s pathmgr.Status) bool { return s.State == pathmgr.StateUp }) {
			if !downSince.IsZero() {
				log.Info("an uplink is back", "all_down_for", now.Sub(downSince).Round(time.Millisecond).String())
			}
			downSince, reset = time.Time{}, false
			stopTimer()
			return
		}
		if downSince.IsZero() {
			// The last uplink to change state is the last one that
			// was up (or it changed between two states that are not
			// up, which only dates the outage later).
			for _, s := range st {
				if s.Since.After(downSince) {
					downSince = s.Since
				}
			}
			if downSince.IsZero() || downSince.After(now) {
				downSince = now
			}
			log.Warn("every uplink is down; flows wait for one to return", "up_to", bound.String())
		}
		if reset {
			return
		}
		if left := bound - now.Sub(downSince); left > 0 {
			if timer == nil {
				timer = time.NewTimer(left)
				fire = timer.C
			}
			return
		}
		reset = true
		stopTimer()
		n := tc.AbortAll()
		log.Warn("every uplink has been down too long; flows reset", "flows", n, "down_for", now.Sub(downSince).Round(time.Millisecond).String())
	}
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			check(now)
		case now := <-fire:
			timer, fire = nil, nil
			check(now)
		}
	}
}

// probePath makes the prober follow an uplink: probed from its address
// while pathmgr has it installed (up or withdrawn), not at all while down.
func probePath(pr *probe.Prober, s pathmgr.Status) {
	if s.State != pathmgr.StateDown && s.Addr.IsValid() {
		pr.SetPath(s.Name, s.Addr)
	} else {
		pr.RemovePath(s.Name)
	}
}

// tunnelDialer carries a netstack flow through the tunnel: the app's
// source address stays on this host, only the destination travels.
type tunnelDialer struct{ c *tunnel.Client }

func (d tunnelDialer) DialTCP(ctx context.Context, _, dst netip.AddrPort) (net.Conn, error) {
	c, err := d.c.DialTCP(ctx, dst)
	if err != nil {
		// Not a typed nil: the stack checks the interface against nil.
		return nil, err
	}
	return c, nil
}

// checkTUNName refuses a --tun name already used by an interface that is
// not a TUN device, before anything on the host changes (the kernel would
// refuse it later, after the uplinks were set up).
func checkTUNName(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("--tun %s: %w", name, err)
	}
	if l.Type() != "tuntap" {
		return fmt.Errorf("--tun %s: an interface of type %s already has that name", name, l.Type())
	}
	return nil
}
