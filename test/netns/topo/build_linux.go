package topo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/test/netns/internal/netns"
	"github.com/mpvpn/mpvpn/test/netns/linkemu"
)

// Addresses of the backbone (ISPs ↔ concentrator ↔ internet).
var (
	ispABackbone  = netip.MustParsePrefix("198.18.1.1/24")
	concToISPA    = netip.MustParsePrefix("198.18.1.2/24")
	ispBBackbone  = netip.MustParsePrefix("198.18.2.1/24")
	concToISPB    = netip.MustParsePrefix("198.18.2.2/24")
	concToInet    = netip.MustParsePrefix("198.18.3.1/24")
	inetToConc    = netip.MustParsePrefix("198.18.3.2/24")
	clientA       = netip.MustParsePrefix("192.0.2.2/24")
	clientB       = netip.MustParsePrefix("100.64.0.2/24")
	gatewayA      = netip.MustParsePrefix("192.0.2.1/24")
	gatewayB      = netip.MustParsePrefix("100.64.0.1/24")
	offloadsOff   = []string{"tx", "off", "sg", "off", "tso", "off", "gso", "off", "gro", "off"}
	warmupTimeout = 10 * time.Second
)

func build(tb testing.TB, opts Options) (tp *Topology, err error) {
	prefix := opts.Prefix
	if prefix == "" {
		prefix = NewPrefix()
	}
	if !prefixRE.MatchString(prefix) {
		return nil, fmt.Errorf("topo: prefix %q: want 1-16 letters, digits or _", prefix)
	}
	if opts.Fleet == 1 || opts.Fleet < 0 || opts.Fleet > MaxFleet {
		return nil, fmt.Errorf("topo: a fleet of %d: want 2 to %d concentrators (or 0: one, no fleet)", opts.Fleet, MaxFleet)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.RunDir == "" {
		opts.RunDir = DefaultRunDir(prefix)
	}
	if err := os.MkdirAll(opts.RunDir, 0o755); err != nil {
		return nil, fmt.Errorf("topo: %w", err)
	}
	name := func(role string) string { return prefix + "-" + role }
	tp = &Topology{
		Prefix: prefix,
		Client: name(roleClient), ISPA: name(roleISPA), ISPB: name(roleISPB),
		Conc: name(roleConc), Inet: name(roleInet),
		ConcAddr: ConcAddr, DestAddr: DestAddr,
		RunDir: opts.RunDir, NoEmu: opts.NoEmu,
		tb: tb, log: log.With("topo", prefix), opts: opts,
	}
	if !opts.NoEmu {
		tp.WireA, tp.WireB = name(roleWireA), name(roleWireB)
	}
	for i := range opts.Fleet {
		tp.Members = append(tp.Members, newMember(prefix, i+1))
	}
	tp.Uplinks = [2]UplinkInfo{
		{Iface: "wan0", Addr: clientA.Addr(), Prefix: clientA, Gateway: gatewayA.Addr(), Metric: 100,
			Public: clientA.Addr(), ISP: tp.ISPA, Wire: tp.WireA, ConcSide: concToISPA.Addr()},
		{Iface: "wan1", Addr: clientB.Addr(), Prefix: clientB, Gateway: gatewayB.Addr(), Metric: 200,
			Public: ispBBackbone.Addr(), NAT: true, ISP: tp.ISPB, Wire: tp.WireB, ConcSide: concToISPB.Addr()},
	}
	if opts.SecondClient {
		tp.Client2 = name(roleClient2)
		tp.Uplinks2 = tp.secondUplinks()
	}
	defer func() {
		if err != nil {
			err = errors.Join(fmt.Errorf("topo %s: %w", prefix, err), tp.Close())
			tp = nil
		}
	}()
	start := time.Now()
	for _, step := range []struct {
		name string
		fn   func() error
	}{
		{"namespaces", tp.addNamespaces},
		{"links", tp.addLinks},
		{"addresses and routes", tp.addAddresses},
		{"nftables", tp.addFirewalls},
		{"link emulators", tp.startEmulators},
		{"warm-up", tp.warmUp},
	} {
		if err := step.fn(); err != nil {
			return tp, fmt.Errorf("%s: %w", step.name, err)
		}
	}
	tp.log.Info("topology up", "took", time.Since(start).Round(time.Millisecond), "noemu", opts.NoEmu)
	return tp, nil
}

// ip runs `ip -n ns args...`.
func (tp *Topology) ip(ns string, args ...string) error {
	_, err := run(exec.Command("ip", append([]string{"-n", ns}, args...)...), nil)
	return err
}

// nsRun runs args inside ns (ip netns exec) with stdin.
func (tp *Topology) nsRun(ns string, stdin []byte, args ...string) (string, error) {
	return run(tp.Cmd(ns, args...), stdin)
}

// run runs cmd and returns its stdout; the error carries stderr.
func run(cmd *exec.Cmd, stdin []byte) (string, error) {
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(errb.String() + "\n" + out.String())
		return out.String(), fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, msg)
	}
	return out.String(), nil
}

func (tp *Topology) addNamespaces() error {
	roles := slices.Clone(allRoles)
	if tp.Client2 != "" {
		roles = append(roles, roleClient2)
	}
	roles = append(roles, fleetRoles(len(tp.Members))...)
	for _, role := range roles {
		if tp.NoEmu && (role == roleWireA || role == roleWireB) {
			continue
		}
		ns := tp.Prefix + "-" + role
		if _, err := run(exec.Command("ip", "netns", "add", ns), nil); err != nil {
			return err
		}
		tp.mu.Lock()
		tp.created = append(tp.created, ns)
		tp.mu.Unlock()

		rp := "0"
		if role == roleClient || role == roleClient2 {
			rp = "2"
		}
		fwd := "0"
		if role == roleISPA || role == roleISPB || (role == roleConc && len(tp.Members) > 0) {
			fwd = "1"
		}
		settings := [][2]string{
			{"net.ipv4.conf.all.rp_filter", rp},
			{"net.ipv4.conf.default.rp_filter", rp},
			{"net.ipv4.ip_forward", fwd},
		}
		if cc := tp.opts.CongestionControl; cc != "" {
			settings = append(settings, [2]string{"net.ipv4.tcp_congestion_control", cc})
		}
		if role == roleWireA || role == roleWireB {
			// Before the veths appear, so they never get an IPv6 address and
			// the wire never sends a frame of its own.
			settings = append(settings,
				[2]string{"net.ipv6.conf.all.disable_ipv6", "1"},
				[2]string{"net.ipv6.conf.default.disable_ipv6", "1"})
		}
		for _, s := range settings {
			if err := netns.Sysctl(ns, s[0], s[1]); err != nil {
				return err
			}
		}
		if err := tp.ip(ns, "link", "set", "lo", "up"); err != nil {
			return err
		}
	}
	return nil
}

// veth creates a veth pair with one end in each namespace.
func (tp *Topology) veth(ns1, if1, ns2, if2 string) error {
	return tp.ip(ns1, "link", "add", if1, "type", "veth", "peer", "name", if2, "netns", ns2)
}

func (tp *Topology) addLinks() error {
	type end struct{ ns, ifname string }
	var pairs [][2]end
	var wireEnds []end // every interface on either side of a wire
	for u, wire := range []string{tp.WireA, tp.WireB} {
		cli := end{tp.Client, tp.Uplinks[u].Iface}
		isp := end{tp.Uplinks[u].ISP, "cust"}
		if tp.NoEmu {
			pairs = append(pairs, [2]end{cli, isp})
			continue
		}
		wc, wi := end{wire, "cli"}, end{wire, "isp"}
		pairs = append(pairs, [2]end{cli, wc}, [2]end{wi, isp})
		wireEnds = append(wireEnds, cli, wc, wi, isp)
	}
	for i := 1; i < tp.opts.ECMP; i++ {
		pairs = append(pairs, [2]end{{tp.ISPA, ecmpName("bb", i)}, {tp.Conc, ecmpName("ispa", i)}})
	}
	if tp.Client2 != "" {
		for _, ul := range tp.Uplinks2 {
			pairs = append(pairs, [2]end{{tp.Client2, ul.Iface}, {ul.ISP, "cust2"}})
		}
	}
	for _, m := range tp.Members {
		pairs = append(pairs, [2]end{{tp.Conc, m.If}, {m.NS, "edge"}})
	}
	pairs = append(pairs,
		[2]end{{tp.ISPA, "bb"}, {tp.Conc, "ispa"}},
		[2]end{{tp.ISPB, "bb"}, {tp.Conc, "ispb"}},
		[2]end{{tp.Conc, "inet"}, {tp.Inet, "conc"}},
	)
	for _, p := range pairs {
		if err := tp.veth(p[0].ns, p[0].ifname, p[1].ns, p[1].ifname); err != nil {
			return err
		}
	}
	for _, e := range wireEnds {
		// ethtool reports features it cannot change on stderr and still
		// exits 0 if it changed the others; the wire counts any oversize
		// frame that would betray a missed offload.
		if _, err := tp.nsRun(e.ns, nil, append([]string{"ethtool", "-K", e.ifname}, offloadsOff...)...); err != nil {
			return err
		}
	}
	for _, wire := range []string{tp.WireA, tp.WireB} {
		if wire == "" {
			continue
		}
		for _, ifname := range []string{"cli", "isp"} {
			// arp off: the wire's own kernel ignores the ARP it carries.
			if err := tp.ip(wire, "link", "set", ifname, "promisc", "on", "arp", "off", "up"); err != nil {
				return err
			}
		}
	}
	return nil
}

func (tp *Topology) addAddresses() error {
	a, b := tp.Uplinks[A], tp.Uplinks[B]
	type cmd struct {
		ns   string
		args []string
	}
	addr := func(ns string, p netip.Prefix, dev string) cmd {
		return cmd{ns, []string{"addr", "add", p.String(), "dev", dev}}
	}
	up := func(ns, dev string) cmd { return cmd{ns, []string{"link", "set", dev, "up"}} }
	cmds := []cmd{
		addr(tp.Client, a.Prefix, a.Iface), addr(tp.Client, b.Prefix, b.Iface),
		up(tp.Client, a.Iface), up(tp.Client, b.Iface),

		addr(tp.ISPA, gatewayA, "cust"), addr(tp.ISPA, ispABackbone, "bb"),
		up(tp.ISPA, "cust"), up(tp.ISPA, "bb"),
		addr(tp.ISPB, gatewayB, "cust"), addr(tp.ISPB, ispBBackbone, "bb"),
		up(tp.ISPB, "cust"), up(tp.ISPB, "bb"),

		addr(tp.Conc, concToISPA, "ispa"), addr(tp.Conc, concToISPB, "ispb"), addr(tp.Conc, concToInet, "inet"),
		up(tp.Conc, "ispa"), up(tp.Conc, "ispb"), up(tp.Conc, "inet"),

		addr(tp.Inet, netip.PrefixFrom(DestAddr, 32), "lo"), addr(tp.Inet, inetToConc, "conc"),
		up(tp.Inet, "conc"),

		// The client's default routes, as two DHCP clients leave them.
		{tp.Client, defaultRoute(a)},
		{tp.Client, defaultRoute(b)},
		// The ISPs' way to "the internet" is the concentrator's side.
		{tp.ISPA, []string{"route", "add", "default", "via", concToISPA.Addr().String()}},
		{tp.ISPB, []string{"route", "add", "default", "via", concToISPB.Addr().String()}},
		// ISP A's customers are publicly routed; ISP B's are NATed to
		// 198.18.2.1, which is on-link.
		{tp.Conc, []string{"route", "add", gatewayA.Masked().String(), "via", ispABackbone.Addr().String()}},
	}
	if len(tp.Members) == 0 {
		cmds = append(cmds,
			addr(tp.Conc, netip.PrefixFrom(ConcAddr, 32), "lo"),
			cmd{tp.Conc, []string{"route", "add", DestNet.String(), "via", inetToConc.Addr().String(), "src", ConcAddr.String()}},
			cmd{tp.Inet, []string{"route", "add", ConcAddr.String() + "/32", "via", concToInet.Addr().String()}})
	} else {
		// The edge only routes; the members dial from their own
		// addresses, all in the concentrators' /24.
		cmds = append(cmds,
			cmd{tp.Conc, []string{"route", "add", DestNet.String(), "via", inetToConc.Addr().String()}},
			cmd{tp.Inet, []string{"route", "add", netip.PrefixFrom(ConcAddr, 24).Masked().String(), "via", concToInet.Addr().String()}})
	}
	if tp.opts.ECMP > 1 {
		// The single routes above become multipath ones over every path.
		toConc := []string{"route", "replace", "default"}
		toISP := []string{"route", "replace", gatewayA.Masked().String()}
		for i := range tp.opts.ECMP {
			isp, conc := ecmpAddrs(i)
			if i > 0 {
				cmds = append(cmds,
					addr(tp.ISPA, isp, ecmpName("bb", i)), up(tp.ISPA, ecmpName("bb", i)),
					addr(tp.Conc, conc, ecmpName("ispa", i)), up(tp.Conc, ecmpName("ispa", i)))
			}
			toConc = append(toConc, "nexthop", "via", conc.Addr().String(), "dev", ecmpName("bb", i))
			toISP = append(toISP, "nexthop", "via", isp.Addr().String(), "dev", ecmpName("ispa", i))
		}
		cmds = append(cmds, cmd{tp.ISPA, toConc}, cmd{tp.Conc, toISP})
	}
	for _, c := range cmds {
		if err := tp.ip(c.ns, c.args...); err != nil {
			return err
		}
	}
	if tp.opts.ECMP > 1 {
		if err := tp.setUpECMP(); err != nil {
			return err
		}
	}
	if tp.Client2 != "" {
		if err := tp.addSecondClient(); err != nil {
			return err
		}
	}
	if len(tp.Members) > 0 {
		return tp.addFleet()
	}
	return nil
}

// ecmpName is the name of ECMP path i's interface: base for path 0.
func ecmpName(base string, i int) string {
	if i == 0 {
		return base
	}
	return base + strconv.Itoa(i)
}

// ecmpAddrs are ECMP path i's addresses on ISP A's and the concentrator's
// side.
func ecmpAddrs(i int) (isp, conc netip.Prefix) {
	if i == 0 {
		return ispABackbone, concToISPA
	}
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18, byte(100 + i), 1}), 24),
		netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18, byte(100 + i), 2}), 24)
}

// setUpECMP hashes on ports as well as addresses at both ends of the
// paths, and shapes each path both ways.
func (tp *Topology) setUpECMP() error {
	for _, ns := range []string{tp.ISPA, tp.Conc} {
		if err := netns.Sysctl(ns, "net.ipv4.fib_multipath_hash_policy", "1"); err != nil {
			return err
		}
	}
	if tp.opts.ECMPRate == "" {
		return nil
	}
	for i := range tp.opts.ECMP {
		for _, end := range [][2]string{{tp.ISPA, ecmpName("bb", i)}, {tp.Conc, ecmpName("ispa", i)}} {
			// A burst of 32 KiB and 20 ms of queue, as a switch port's
			// shallow buffer.
			if _, err := tp.nsRun(end[0], nil, "tc", "qdisc", "add", "dev", end[1], "root", "tbf",
				"rate", tp.opts.ECMPRate, "burst", "32kb", "latency", "20ms"); err != nil {
				return fmt.Errorf("shape ECMP path %d (%s): %w", i, end[1], err)
			}
		}
	}
	return nil
}

// defaultRoute is the `ip route replace` arguments of u's default route.
func defaultRoute(u UplinkInfo) []string {
	return []string{"route", "replace", "default", "via", u.Gateway.String(), "dev", u.Iface, "metric", strconv.Itoa(u.Metric)}
}

// bcp38Table is the ISPs' nftables table; the named counter counts the drops.
const bcp38Table = "isp"

func (tp *Topology) addFirewalls() error {
	for u := range tp.Uplinks {
		ul := tp.Uplinks[u]
		customers := []netip.Prefix{ul.Prefix.Masked()}
		second := ""
		if tp.Client2 != "" {
			p := tp.Uplinks2[u].Prefix.Masked()
			customers = append(customers, p)
			second = fmt.Sprintf("\n\t\tiifname \"cust2\" ip saddr != %s counter name \"bcp38\" drop", p)
		}
		rules := fmt.Sprintf(`table ip %[1]s {
	counter bcp38 {
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		# BCP 38: a customer may only send from its own prefix.
		iifname "cust" ip saddr != %[2]s counter name "bcp38" drop%[3]s
	}
`, bcp38Table, ul.Prefix.Masked(), second)
		if ul.NAT {
			var set []string
			for _, p := range customers {
				set = append(set, p.String())
			}
			rules += fmt.Sprintf(`	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		# Carrier-grade NAT: every customer behind the backbone address.
		oifname "bb" ip saddr { %s } masquerade
	}
`, strings.Join(set, ", "))
		}
		rules += "}\n"
		if _, err := tp.nsRun(ul.ISP, []byte(rules), "nft", "-f", "-"); err != nil {
			return err
		}
	}
	return nil
}

// emulator is a link emulator in-process or behind a control socket.
type emulator interface {
	set(d linkemu.Dir, p linkemu.Params) error
	update(d linkemu.Dir, kv string) error
	status() (up, down linkemu.Status, err error)
	close() error
}

type inProcess struct{ w *linkemu.Wire }

func (e inProcess) set(d linkemu.Dir, p linkemu.Params) error { return e.w.Set(d, p) }

func (e inProcess) update(d linkemu.Dir, kv string) error {
	for _, dd := range []linkemu.Dir{linkemu.Up, linkemu.Down} {
		if d != linkemu.Both && d != dd {
			continue
		}
		p := e.w.Params(dd)
		if err := p.Set(kv); err != nil {
			return err
		}
		if err := e.w.Set(dd, p); err != nil {
			return err
		}
	}
	return nil
}

func (e inProcess) status() (up, down linkemu.Status, err error) {
	return linkemu.Status{Params: e.w.Params(linkemu.Up), Stats: e.w.Stats(linkemu.Up)},
		linkemu.Status{Params: e.w.Params(linkemu.Down), Stats: e.w.Stats(linkemu.Down)}, nil
}

// close stops the wire and reports an error that stopped it earlier.
func (e inProcess) close() error {
	e.w.Close()
	select {
	case err := <-e.w.Err():
		return err
	default:
		return nil
	}
}

// daemon is a linkemu process in the link namespace.
type daemon struct {
	c    linkemu.Client
	cmd  *exec.Cmd
	done chan struct{}
}

func (e *daemon) set(d linkemu.Dir, p linkemu.Params) error {
	return e.c.Set(context.Background(), d, p)
}

func (e *daemon) update(d linkemu.Dir, kv string) error {
	return e.c.Update(context.Background(), d, kv)
}

func (e *daemon) status() (up, down linkemu.Status, err error) {
	return e.c.Status(context.Background())
}

// close stops a daemon this process started (mpvpn-topo down stops those of
// other processes through the namespace sweep).
func (e *daemon) close() error {
	if e.cmd.Process == nil {
		return nil
	}
	e.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-e.done:
	case <-time.After(5 * time.Second):
		e.cmd.Process.Kill()
		<-e.done
	}
	return nil
}

func (tp *Topology) startEmulators() error {
	if tp.NoEmu {
		return nil
	}
	for u, l := range []Link{tp.opts.A, tp.opts.B} {
		wire := tp.Uplinks[u].Wire
		var e emulator
		var err error
		if len(tp.opts.LinkemuCmd) == 0 {
			var w *linkemu.Wire
			w, err = linkemu.New(linkemu.Config{
				A: "cli", B: "isp", NetNS: wire, Up: l.Up, Down: l.Down,
				Seed: tp.opts.Seed, Logger: tp.log.With("link", Uplink(u).String()),
			})
			if err == nil {
				e = inProcess{w}
			}
		} else {
			e, err = tp.startDaemon(Uplink(u), l)
		}
		if err != nil {
			return fmt.Errorf("link %s: %w", Uplink(u), err)
		}
		tp.mu.Lock()
		tp.emus[u] = e
		tp.mu.Unlock()
	}
	return nil
}

func (tp *Topology) startDaemon(u Uplink, l Link) (*daemon, error) {
	ul := tp.Uplinks[u]
	sock := ControlSocket(tp.RunDir, u)
	base := "l" + u.String()
	logf, err := os.Create(tp.RunDir + "/" + base + ".log")
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	args := append([]string{"netns", "exec", ul.Wire}, tp.opts.LinkemuCmd...)
	args = append(args, "-a", "cli", "-b", "isp", "-ctl", sock,
		"-up", l.Up.String(), "-down", l.Down.String(), "-seed", strconv.FormatUint(tp.opts.Seed, 10))
	cmd := exec.Command("ip", args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own session: the daemon outlives mpvpn-topo up and its terminal.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	d := &daemon{c: linkemu.Client{Path: sock, Timeout: time.Second}, cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(d.done) }()
	os.WriteFile(tp.RunDir+"/"+base+".pid", []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := d.c.Do(context.Background(), "ping"); err == nil {
			return d, nil
		}
		select {
		case <-d.done:
			b, _ := os.ReadFile(logf.Name())
			return nil, fmt.Errorf("linkemu daemon exited: %s", strings.TrimSpace(string(b)))
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			d.close()
			return nil, fmt.Errorf("linkemu daemon: control socket %s not answering", sock)
		}
	}
}

// warmUp resolves ARP across each wire (so the first measurement of a test
// does not include it) and proves the uplinks pass traffic.
func (tp *Topology) warmUp() error {
	for u, l := range []Link{tp.opts.A, tp.opts.B} {
		if l.Up.Blackhole || l.Down.Blackhole || l.Up.Loss >= 0.5 || l.Down.Loss >= 0.5 {
			continue
		}
		ul := tp.Uplinks[u]
		deadline := time.Now().Add(warmupTimeout)
		for {
			r, err := Ping(tp.Client, ul.Gateway, PingOptions{Iface: ul.Iface, Count: 1, Timeout: 500*time.Millisecond + 2*(l.Up.Delay+l.Up.Jitter+l.Down.Delay+l.Down.Jitter)})
			if err != nil {
				return err
			}
			if r.Received > 0 {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("uplink %s: gateway %s does not answer through %s", Uplink(u), ul.Gateway, ul.Iface)
			}
		}
	}
	return nil
}
