//go:build linux

package client

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/mpvpn/mpvpn/control"
	"github.com/mpvpn/mpvpn/dnsconf"
	"github.com/mpvpn/mpvpn/internal/journal"
	"github.com/mpvpn/mpvpn/internal/sysctl"
	"github.com/mpvpn/mpvpn/internal/uplinkstats"
	"github.com/mpvpn/mpvpn/pathmgr"
	"github.com/mpvpn/mpvpn/probe"
	"github.com/mpvpn/mpvpn/routing"
	"github.com/mpvpn/mpvpn/stack"
	"github.com/mpvpn/mpvpn/tun"
	"github.com/mpvpn/mpvpn/tunnel"
	"github.com/mpvpn/mpvpn/udprelay"
	"github.com/mpvpn/mpvpn/ui"
)

// StaleLossCount is net.mptcp.stale_loss_cnt on both ends: how many MPTCP
// retransmission intervals without progress mark a subflow stale, so its
// data is re-sent on the others. The kernel's 4 means seconds of
// backed-off timeouts before a silent path is given up; 2 takes a dead
// path out after two intervals while a single late ACK still does not.
const StaleLossCount = 2

// Run runs the client until ctx is done, then undoes everything it did.
// Whatever is wrong with cfg, the host or another mpvpn client running is
// found before anything on the host changes.
func Run(ctx context.Context, cfg Config) (err error) {
	if err := cfg.Validate(); err != nil {
		return err
	}
	cfg = cfg.withDefaults()
	log := cfg.Logger
	host := &sysctl.Changes{Root: sysctl.Proc}
	if v, gerr := host.Root.Get("net.mptcp.enabled"); gerr != nil || v != "1" {
		return fmt.Errorf("Multipath TCP is not enabled on this host (net.mptcp.enabled=%q, %v)", v, gerr)
	}
	if err := checkTUNName(cfg.TUN); err != nil {
		return err
	}
	// A journal left by a crashed run is undone first, so that this run
	// finds the host as it was (its sysctls above all: read now, they
	// would be the crashed run's values, not the host's).
	st, err := journal.Inspect(cfg.Journal)
	if err != nil {
		return err
	}
	if st.Live {
		return fmt.Errorf("another mpvpn client is running (pid %d; journal %s)", st.PID, cfg.Journal)
	}
	// A kill switch a crashed run left stays in force until this run's
	// own replaces it, in one nftables transaction: no gap in between.
	keepFirewall := cfg.KillSwitch && slices.ContainsFunc(st.Entries, func(e journal.Entry) bool { return e.Kind == kindFirewall })
	if st.Exists {
		log.Warn("an earlier client did not stop cleanly; undoing what it left", "journal", cfg.Journal, "pid", st.PID, "started", st.Started)
		var skip []string
		if keepFirewall {
			skip = append(skip, kindFirewall)
		}
		lines, uerr := undo(st.Entries, log, skip...)
		for _, l := range lines {
			log.Info("undone", "what", l)
		}
		if uerr != nil {
			return fmt.Errorf("undoing what an earlier client left (see `mpvpn down`): %w", uerr)
		}
		if err := journal.Remove(cfg.Journal); err != nil {
			return err
		}
	}
	// The status socket and the metrics port before anything changes: a
	// socket or port in use is a configuration error.
	cl, err := control.Listen(cfg.Control)
	if err != nil {
		return fmt.Errorf("--control: %w", err)
	}
	defer cl.Close()
	var status atomic.Pointer[func() control.Status]
	var uiURL atomic.Pointer[string]
	started := time.Now()
	statusNow := func() control.Status {
		if f := status.Load(); f != nil {
			return (*f)()
		}
		return control.Status{Role: "client", Version: cfg.Version, Started: started, Server: cfg.Server.String()}
	}
	getStatus := func() control.Status {
		st := statusNow()
		if u := uiURL.Load(); u != nil {
			st.UI = *u
		}
		return st
	}
	ctlCtx, stopCtl := context.WithCancel(context.Background())
	defer stopCtl()
	if cfg.Metrics != "" {
		ms, err := control.ServeMetrics(ctlCtx, cfg.Metrics, control.NewCollector(getStatus), log)
		if err != nil {
			return fmt.Errorf("--metrics: %w", err)
		}
		defer ms.Close()
		log.Info("metrics", "url", "http://"+ms.Addr().String()+"/metrics")
	}
	if cfg.UI != "" {
		us, err := ui.Serve(ctlCtx, ui.Config{Addr: cfg.UI, Status: statusNow, Logger: log})
		if err != nil {
			return fmt.Errorf("--ui: %w", err)
		}
		defer us.Close()
		u := us.URL()
		uiURL.Store(&u)
	}
	if len(cfg.Uplinks) == 0 {
		discover := pathmgr.DiscoverUplinks
		if !cfg.Server.Addr().Unmap().Is4() {
			discover = pathmgr.DiscoverUplinks6
		}
		if cfg.Uplinks, err = discover(cfg.TUN); err != nil && !cfg.ServerAlt.IsValid() {
			return err
		}
		if cfg.ServerAlt.IsValid() {
			// Either family will do: the other's default routes too.
			other := pathmgr.DiscoverUplinks6
			if !cfg.Server.Addr().Unmap().Is4() {
				other = pathmgr.DiscoverUplinks
			}
			more, oerr := other(cfg.TUN)
			if err != nil && oerr != nil {
				return err
			}
			for _, u := range more {
				if !slices.ContainsFunc(cfg.Uplinks, func(x pathmgr.UplinkConfig) bool { return x.Name == u.Name }) {
					cfg.Uplinks = append(cfg.Uplinks, u)
				}
			}
		}
		log.Info("uplinks discovered from the default routes", "uplinks", fmt.Sprint(cfg.Uplinks))
	}
	if err := routing.CheckHost(cfg.routing()); err != nil {
		return err
	}

	// From here on the host changes: each change is journalled first and
	// undone on the way out, in reverse order, also when a later step
	// fails. A journal that could not be undone in full is kept for the
	// next start or `mpvpn down`.
	j, err := journal.Open(cfg.Journal)
	if err != nil {
		return err
	}
	var undos []func() error
	defer func() {
		var errs []error
		for i := len(undos) - 1; i >= 0; i-- {
			if uerr := undos[i](); uerr != nil {
				log.Warn("cleanup", "err", uerr)
				errs = append(errs, uerr)
			}
		}
		if len(errs) > 0 {
			j.Keep()
			log.Warn("not everything could be undone; `mpvpn down` (or the next start) will try again", "journal", cfg.Journal)
			return
		}
		if derr := j.Discard(); derr != nil {
			log.Warn("cleanup", "err", derr)
		}
	}()
	if keepFirewall {
		if err := j.Record(journal.Entry{Kind: kindFirewall}); err != nil {
			return err
		}
	}
	host.Journal = func(name, before string) error {
		return j.Record(journal.Entry{Kind: kindSysctl, Name: name, Before: before})
	}
	undos = append(undos, host.Restore)

	// pathmgr validates every uplink (exists, has an address and a
	// gateway) before it changes anything. Its changes reach the liveness
	// prober, which exists only once pathmgr does.
	var prober atomic.Pointer[probe.Prober]
	var tunnelClient atomic.Pointer[tunnel.Client]
	var udpRelay atomic.Pointer[udprelay.Client]
	pcfg := cfg.pathmgr()
	pcfg.OnChange = func(s pathmgr.Status) {
		if pr := prober.Load(); pr != nil {
			probePath(pr, s)
		}
		// A pooled connection may have its subflows only on the
		// uplink that went; new ones start on one that works.
		if tc := tunnelClient.Load(); tc != nil && s.State != pathmgr.StateUp {
			tc.Flush()
		}
	}
	pcfg.Journal = func(kind, name, before string) error {
		switch kind {
		case pathmgr.JournalSysctl:
			return j.Record(journal.Entry{Kind: kindSysctl, Name: name, Before: before})
		case pathmgr.JournalLimits:
			return j.Record(journal.Entry{Kind: kindLimits, Before: before})
		}
		return fmt.Errorf("pathmgr journals %q, which the client cannot undo", kind)
	}
	if err := j.Record(journal.Entry{Kind: kindPathmgr, Data: mustJSON(pathmgrStateOf(cfg))}); err != nil {
		return err
	}
	pm, err := pathmgr.Start(ctx, pcfg)
	if err != nil {
		return err
	}
	undos = append(undos, pm.Close)

	// The firewall next, once pathmgr has found the uplinks sound: with
	// the kill switch, nothing leaks while the rest comes up (mpvpn's own
	// sockets are marked, and pass).
	if cfg.firewalled() {
		if _, err := startFirewall(cfg, j, &undos); err != nil {
			return err
		}
	}

	// Liveness: a probe per uplink to the concentrator, so an uplink
	// whose link is up while nothing gets through is withdrawn within
	// about half a second, and restored as quickly when it answers again.
	pr, err := probe.NewProber(probe.ProberConfig{
		Server:    cfg.Server,
		ServerAlt: cfg.ServerAlt,
		Key:       cfg.Key,
		ServerKey: cfg.ServerKey,
		Mark:      cfg.Mark,
		Logger:    log,
		OnChange:  pm.SetReachable,
		// Probes back off while no flow is open (a metered uplink
		// idles cheaply) and are back at full rate the moment one
		// opens.
		Busy: func() bool {
			if tc := tunnelClient.Load(); tc != nil && tc.Busy() {
				return true
			}
			r := udpRelay.Load()
			return r != nil && r.Stats().Flows > 0
		},
		IdleInterval: cfg.ProbeIdleInterval,
	})
	if err != nil {
		return err
	}
	undos = append(undos, pr.Close)
	for _, s := range pm.Status() {
		probePath(pr, s)
	}
	prober.Store(pr)
	// The watcher keeps the uplinks in step with the host until the end;
	// it is stopped (and waited for) before pm.Close runs.
	undos = append(undos, goUntil(func(ctx context.Context) {
		if err := pm.Run(ctx); err != nil {
			log.Error("uplink watcher stopped; uplinks are no longer kept in step with the host", "err", err)
		}
	}))

	if err := tuneHost(host, cfg); err != nil {
		return err
	}

	dev, err := tun.Open(tun.Config{Name: cfg.TUN, MTU: cfg.MTU, Addrs: cfg.TUNAddrs}, log)
	if err != nil {
		return fmt.Errorf("TUN %s: %w", cfg.TUN, err)
	}
	undos = append(undos, dev.Close)

	tc, err := tunnel.NewClient(tunnel.ClientConfig{
		Server:           cfg.Server,
		ServerKey:        cfg.ServerKey,
		Key:              cfg.Key,
		Mark:             cfg.Mark,
		FastOpen:         cfg.FastOpen,
		Source:           pm.PreferredSource,
		Now:              concentratorClock(pr, time.Now()),
		Horizon:          pr.ServerHorizon,
		PoolSize:         poolSize(cfg.Pool),
		NoReuse:          cfg.NoReuse,
		Cipher:           cfg.Cipher,
		EarlyDestination: cfg.EarlyDestination,
		Logger:           log,
	})
	if err != nil {
		return err
	}
	tunnelClient.Store(tc)
	undos = append(undos, goUntil(func(ctx context.Context) {
		if err := tc.RunPool(ctx); err != nil {
			log.Error("connection pool stopped", "err", err)
		}
	}))

	// With every uplink down, flows wait (MPTCP keeps a connection with
	// no subflow, and the path manager gives it new ones when an uplink
	// returns), but not for ever.
	undos = append(undos, goUntil(func(ctx context.Context) {
		resetWhenAllDown(ctx, pm, tc, cfg.AllDownTimeout, time.Second, log)
	}))

	// mpvpn's resolver: queries to the resolver addresses go through the
	// tunnel to the concentrator's. Closed after the netstack (undos run
	// in reverse), which stops handing it queries first.
	var netstack atomic.Pointer[stack.Stack]
	fwd, err := newForwarder(tc, &netstack, cfg)
	if err != nil {
		return err
	}
	undos = append(undos, fwd.Close)
	relay, err := newRelay(tc, &netstack, pr, cfg)
	if err != nil {
		return err
	}
	undos = append(undos, relay.Close)
	udpRelay.Store(relay)

	st2, err := stack.New(stack.Config{
		Device: dev.Inner(),
		MTU:    cfg.MTU,
		Dialer: netstackDialer{c: tc, dns: fwd, resolvers: cfg.DNSAddrs},
		UDP:    udpHandler{dns: fwd, relay: relay, resolvers: cfg.DNSAddrs, quicBlock: cfg.QUIC == QUICBlock},
		Echo:   relay,
		Logger: log,
	})
	if err != nil {
		return err
	}
	netstack.Store(st2)
	undos = append(undos, st2.Close)

	// The first flows after a start find the pool filled, as later ones
	// do; a concentrator that does not answer delays the start by at
	// most this wait (flows then dial afresh until the pool fills).
	if cfg.Pool > 0 && !tc.WaitPool(ctx, cfg.Pool, poolStartWait) {
		log.Warn("the connection pool is not filled yet; the first flows cost a round trip more", "pool", tc.Stats().Pooled, "want", cfg.Pool, "waited", poolStartWait)
	}

	// Routes last: until now nothing was sent into the TUN.
	rcfg := cfg.routing()
	if err := j.Record(journal.Entry{Kind: kindRouting, Data: mustJSON(routingStateOf(rcfg))}); err != nil {
		return err
	}
	rt, err := routing.Apply(rcfg)
	if err != nil {
		return err
	}
	undos = append(undos, rt.Close)

	// The system's resolver points at mpvpn's once queries can reach it,
	// and back before the routes go.
	if cfg.DNSHook != dnsconf.Off {
		dst, err := dnsconf.Prepare(dnsconf.Config{Mode: cfg.DNSHook, Link: cfg.TUN, Servers: cfg.DNSAddrs, Path: cfg.ResolvConf, Logger: log})
		if err != nil {
			return fmt.Errorf("--dns-hook %s: %w", cfg.DNSHook, err)
		}
		if err := j.Record(journal.Entry{Kind: kindDNS, Data: mustJSON(dst)}); err != nil {
			return err
		}
		if err := dnsconf.Apply(dst, log); err != nil {
			return fmt.Errorf("--dns-hook %s: %w", cfg.DNSHook, err)
		}
		undos = append(undos, func() error {
			line, err := dnsconf.Undo(dst, log)
			if line != "" {
				log.Info("DNS", "undone", line)
			}
			return err
		})
		log.Info("system DNS points at mpvpn", "how", dst.Backend, "servers", fmt.Sprint(cfg.DNSAddrs))
	}

	stats := &stats{tc: tc, pm: pm, pr: pr, meter: uplinkstats.New(), start: started, srv: cfg.Server, version: cfg.Version, netstack: st2.Stats, dns: fwd.Stats, udp: relay.Stats}
	undos = append(undos, goUntil(func(ctx context.Context) { stats.run(ctx, time.Second) }))
	f := stats.status
	status.Store(&f)
	served := make(chan struct{})
	go func() {
		defer close(served)
		if err := cl.Serve(ctlCtx, getStatus, log); err != nil {
			log.Warn("status socket stopped", "err", err)
		}
	}()
	undos = append(undos, func() error { stopCtl(); <-served; return nil })

	var names []string
	for _, u := range pm.Uplinks() {
		names = append(names, fmt.Sprintf("%s(%s via %s)", u.Name, u.Addr, u.Gateway))
	}
	log.Info("client up", "server", cfg.Server.String(), "tun", cfg.TUN, "uplinks", strings.Join(names, " "), "routes", fmt.Sprint(cfg.Routes),
		"route_all", cfg.RouteAll, "exclude", fmt.Sprint(cfg.Exclude), "allow_lan", cfg.AllowLAN, "rules", len(cfg.Rules), "kill_switch", cfg.KillSwitch, "dns", fmt.Sprint(cfg.DNSAddrs), "dns_hook", cfg.DNSHook, "quic", cfg.QUIC, "udp_transport", cfg.UDPTransport)
	<-ctx.Done()
	log.Info("client shutting down")
	return nil
}

// tuneHost sets the sysctls the client needs; each is journalled and put
// back on exit.
func tuneHost(host *sysctl.Changes, cfg Config) error {
	log := cfg.Logger
	// The kernel can silently turn MPTCP off for an hour after a few lost
	// MP_CAPABLE SYNs (net.mptcp.blackhole_timeout, v6.12+); for a VPN
	// whose whole point is multipath, a brief outage of the concentrator
	// must not do that. Connections that really meet an MPTCP-stripping
	// middlebox still fall back one by one and are counted.
	if err := host.Set("net.mptcp.blackhole_timeout", "0"); err != nil {
		log.Warn("cannot disable the MPTCP blackhole detection", "err", err)
	}
	if err := host.AtMost("net.mptcp.stale_loss_cnt", StaleLossCount); err != nil {
		log.Warn("cannot tune stale-subflow detection", "err", err)
	}
	// A connection whose last subflow is gone lives close_timeout (60 s by
	// default, "make-after-break"); flows must be able to wait as long as
	// --all-down-timeout says.
	if err := host.AtLeast("net.mptcp.close_timeout", int(cfg.AllDownTimeout.Seconds()+0.999)); err != nil {
		log.Warn("cannot raise net.mptcp.close_timeout", "err", err)
	}
	if cfg.FastOpen {
		if err := host.SetBits("net.ipv4.tcp_fastopen", 0x1); err != nil {
			return err
		}
	}
	return nil
}

// goUntil runs fn in a goroutine until the returned stop is called; stop
// cancels fn's context and waits for it to return.
func goUntil(fn func(ctx context.Context)) (stop func() error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); fn(ctx) }()
	return func() error { cancel(); <-done; return nil }
}

// probePath makes the prober follow an uplink: probed from its address
// while pathmgr has it installed (up or withdrawn), not at all while down.
// poolStartWait bounds how long a start waits for the pool: two round
// trips (connect, handshake) on all but the worst paths, with a cold
// probe clock.
const poolStartWait = 3 * time.Second

// poolSize maps --pool (0: off) to tunnel.ClientConfig.PoolSize (0: the
// default, negative: off).
func poolSize(n int) int {
	if n <= 0 {
		return -1
	}
	return n
}

func probePath(pr *probe.Prober, s pathmgr.Status) {
	if s.State != pathmgr.StateDown && s.Addr.IsValid() {
		pr.SetPath(s.Name, s.Addr)
	} else {
		pr.RemovePath(s.Name)
	}
}

// checkTUNName refuses a TUN name already used by an interface that is
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
