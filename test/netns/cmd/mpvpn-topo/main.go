//go:build linux

// Command mpvpn-topo builds, changes and removes mpvpn's test topology
// (package github.com/mpvpn/mpvpn/test/netns/topo) for shell scripts such as
// scripts/demo.sh and scripts/bench.sh, so they run on the same network as
// the Go tests.
//
//	eval "$(mpvpn-topo up --rate-a 40mbit --delay-a 10ms --rate-b 20mbit --delay-b 30ms)"
//	trap 'mpvpn-topo down --prefix "$PREFIX"' EXIT
//	ip netns exec "$NS_CONC" mpvpn server ... &
//	mpvpn-topo link --prefix "$PREFIX" --uplink b --blackhole on
//	mpvpn-topo stats --prefix "$PREFIX"
//
// The link emulators run as daemons (this same binary, `mpvpn-topo linkemu`)
// in P-la and P-lb, with control sockets and logs under
// /run/mpvpn-test/<prefix>/. Delays are one-way: a 20 ms RTT uplink is
// --delay-a 10ms.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/mpvpn/mpvpn/test/netns/linkemu"
	"github.com/mpvpn/mpvpn/test/netns/topo"
)

const usage = `usage: mpvpn-topo <command> [flags]

commands:
  up      build a topology; prints its names and addresses as KEY=value lines
  link    change an uplink's emulated link (only the flags given)
  stats   show the emulated links' parameters and counters
  balance spread a fleet's connections to the VIP (up --fleet) by ECMP anycast or hash DNAT, over all members or some
  down    delete a topology (idempotent), or every mv????-* one with --all
  linkemu run a link emulator daemon (what up starts in P-la and P-lb)

Run "mpvpn-topo <command> -h" for its flags.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	args := os.Args[2:]
	switch os.Args[1] {
	case "up":
		err = up(args, os.Stdout, os.Stderr)
	case "link":
		err = link(ctx, args, os.Stdout, os.Stderr)
	case "stats":
		err = stats(ctx, args, os.Stdout, os.Stderr)
	case "down":
		err = down(args, os.Stdout, os.Stderr)
	case "balance":
		err = balance(args, os.Stderr)
	case "linkemu":
		err = linkemu.RunDaemon(ctx, args, os.Stderr)
	case "-h", "--help", "help":
		fmt.Fprint(os.Stdout, usage)
		return
	default:
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "mpvpn-topo:", err)
		}
		stop()
		os.Exit(1)
	}
}

// linkFlags are the shorthand link flags of up, per uplink.
type linkFlags struct {
	rate, delay, jitter, loss, queue *string
	up, down                         *string
}

func addLinkFlags(fs *flag.FlagSet, u string) linkFlags {
	return linkFlags{
		rate:   fs.String("rate-"+u, "", "uplink "+u+": rate both ways, e.g. 40mbit"),
		delay:  fs.String("delay-"+u, "", "uplink "+u+": one-way delay both ways, e.g. 10ms"),
		jitter: fs.String("jitter-"+u, "", "uplink "+u+": extra random delay both ways, e.g. 2ms"),
		loss:   fs.String("loss-"+u, "", "uplink "+u+": loss both ways, e.g. 1%"),
		queue:  fs.String("queue-"+u, "", "uplink "+u+": bottleneck queue in bytes (default 100 ms at the rate)"),
		up:     fs.String("up-"+u, "", "uplink "+u+": client→ISP parameters, key=value list (see link -h), applied last"),
		down:   fs.String("down-"+u, "", "uplink "+u+": ISP→client parameters, key=value list, applied last"),
	}
}

func (f linkFlags) link() (topo.Link, error) {
	var kv []string
	for _, p := range []struct {
		key string
		v   *string
	}{{"rate", f.rate}, {"delay", f.delay}, {"jitter", f.jitter}, {"loss", f.loss}, {"queue", f.queue}} {
		if *p.v != "" {
			kv = append(kv, p.key+"="+*p.v)
		}
	}
	both, err := linkemu.ParseParams(strings.Join(kv, " "))
	if err != nil {
		return topo.Link{}, err
	}
	l := topo.Symmetric(both)
	if err := l.Up.Set(*f.up); err != nil {
		return l, err
	}
	err = l.Down.Set(*f.down)
	return l, err
}

func up(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("up", flag.ContinueOnError)
	fs.SetOutput(stderr)
	prefix := fs.String("prefix", "", "namespace name prefix (default mv + 4 random hex digits)")
	runDir := fs.String("run-dir", "", "logs and control sockets (default /run/mpvpn-test/<prefix>)")
	noEmu := fs.Bool("no-emu", false, "direct veths to the ISPs: no link emulators, no shaping")
	seed := fs.Uint64("seed", 0, "random seed of the emulators (0 = random)")
	ecmp := fs.Int("ecmp", 0, "join ISP A and the concentrator by N equal-cost paths (L4 hashing); 0 or 1: one link")
	ecmpRate := fs.String("ecmp-rate", "", "shape each ECMP path to this rate both ways (tbf), e.g. 20mbit")
	cc := fs.String("cc", "", "every namespace's TCP congestion control, e.g. reno (default: the host's)")
	fleet := fs.Int("fleet", 0, "put N concentrators (namespaces c1…cN) behind the concentrator's address as a VIP, balanced by ECMP anycast; 0: one concentrator")
	client2 := fs.Bool("second-client", false, "add a second client namespace (cli2) on both ISPs")
	emuBin := fs.String("linkemu", "", "linkemu binary to run (default: this binary's linkemu command)")
	verbose := fs.Bool("v", false, "log to stderr")
	fa, fb := addLinkFlags(fs, "a"), addLinkFlags(fs, "b")
	if err := fs.Parse(args); err != nil {
		return err
	}
	la, err := fa.link()
	if err != nil {
		return fmt.Errorf("uplink a: %w", err)
	}
	lb, err := fb.link()
	if err != nil {
		return fmt.Errorf("uplink b: %w", err)
	}
	opts := topo.Options{Prefix: *prefix, RunDir: *runDir, NoEmu: *noEmu, A: la, B: lb, Seed: *seed, ECMP: *ecmp, ECMPRate: *ecmpRate,
		Fleet: *fleet, SecondClient: *client2, CongestionControl: *cc}
	if *verbose {
		opts.Logger = slog.New(slog.NewTextHandler(stderr, nil))
	}
	if *emuBin != "" {
		opts.LinkemuCmd = []string{*emuBin}
	} else {
		self, err := os.Executable()
		if err != nil {
			return err
		}
		opts.LinkemuCmd = []string{self, "linkemu"}
	}
	// The topology outlives this command: no Close on success.
	tp, err := topo.Build(opts)
	if err != nil {
		return err
	}
	for _, l := range tp.Env() {
		fmt.Fprintln(stdout, l)
	}
	return nil
}

func commonFlags(fs *flag.FlagSet) (prefix, runDir *string) {
	prefix = fs.String("prefix", "", "topology prefix (required)")
	runDir = fs.String("run-dir", "", "run directory given to up (default /run/mpvpn-test/<prefix>)")
	return
}

func resolveRunDir(prefix, runDir string) (string, error) {
	if prefix == "" {
		return "", errors.New("--prefix is required")
	}
	if runDir == "" {
		runDir = topo.DefaultRunDir(prefix)
	}
	return runDir, nil
}

func link(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("link", flag.ContinueOnError)
	fs.SetOutput(stderr)
	prefix, runDir := commonFlags(fs)
	uplink := fs.String("uplink", "", "a or b (required)")
	dir := fs.String("dir", "both", "up (client→ISP), down or both")
	keys := map[string]*string{
		"rate":      fs.String("rate", "", "rate, e.g. 40mbit (0 = unlimited)"),
		"delay":     fs.String("delay", "", "one-way delay, e.g. 10ms"),
		"jitter":    fs.String("jitter", "", "extra random delay up to this, e.g. 2ms"),
		"loss":      fs.String("loss", "", "loss probability, e.g. 1% or 0.01"),
		"queue":     fs.String("queue", "", "bottleneck queue in bytes, e.g. 150000 or 64kb (0 = 100 ms at the rate)"),
		"burst":     fs.String("burst", "", "token bucket depth in bytes (0 = 1 ms at the rate)"),
		"blackhole": fs.String("blackhole", "", "on: drop everything while the link stays up; off: pass again"),
		"reorder":   fs.String("reorder", "", "on: let jitter reorder frames"),
	}
	set := fs.String("set", "", "more key=value pairs, as the control protocol takes them")
	if err := fs.Parse(args); err != nil {
		return err
	}
	rd, err := resolveRunDir(*prefix, *runDir)
	if err != nil {
		return err
	}
	u, err := topo.ParseUplink(*uplink)
	if err != nil {
		return err
	}
	d, err := linkemu.ParseDir(*dir)
	if err != nil {
		return err
	}
	var kv []string
	fs.Visit(func(f *flag.Flag) {
		if _, ok := keys[f.Name]; ok {
			kv = append(kv, f.Name+"="+f.Value.String())
		}
	})
	if *set != "" {
		kv = append(kv, *set)
	}
	c := linkemu.Client{Path: topo.ControlSocket(rd, u)}
	r, err := c.Do(ctx, "set "+d.String()+" "+strings.Join(kv, " "))
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s up   %s\n%s down %s\n", u, r.Up.Params, u, r.Down.Params)
	return nil
}

func stats(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("stats", flag.ContinueOnError)
	fs.SetOutput(stderr)
	prefix, runDir := commonFlags(fs)
	uplink := fs.String("uplink", "", "a or b (default both)")
	asJSON := fs.Bool("json", false, "JSON: {\"a\": reply, \"b\": reply}")
	if err := fs.Parse(args); err != nil {
		return err
	}
	rd, err := resolveRunDir(*prefix, *runDir)
	if err != nil {
		return err
	}
	uplinks := []topo.Uplink{topo.A, topo.B}
	if *uplink != "" {
		u, err := topo.ParseUplink(*uplink)
		if err != nil {
			return err
		}
		uplinks = []topo.Uplink{u}
	}
	all := map[string]linkemu.Reply{}
	for _, u := range uplinks {
		r, err := linkemu.Client{Path: topo.ControlSocket(rd, u)}.Do(ctx, "get")
		if err != nil {
			return err
		}
		all[u.String()] = r
		if !*asJSON {
			for _, s := range []struct {
				dir string
				st  *linkemu.State
			}{{"up", r.Up}, {"down", r.Down}} {
				x := s.st.Stats
				fmt.Fprintf(stdout, "%s %-4s %s\n       rx %d frames %d bytes, tx %d frames %d bytes, dropped: loss %d queue %d blackhole %d oversize %d error %d, inside %d frames\n",
					u, s.dir, s.st.Params, x.RxFrames, x.RxBytes, x.TxFrames, x.TxBytes,
					x.DropLoss, x.DropQueue, x.DropBlackhole, x.DropOversize, x.DropError, x.QueuedFrames)
			}
		}
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(all)
	}
	return nil
}

func balance(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("balance", flag.ContinueOnError)
	fs.SetOutput(stderr)
	prefix, _ := commonFlags(fs)
	mode := fs.String("mode", "anycast", "anycast (an ECMP route to the VIP via every member) or hash-dnat (nftables jhash DNAT to the members)")
	members := fs.String("members", "", "the members to balance over, e.g. 1,3 (default: all)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *prefix == "" {
		return errors.New("--prefix is required")
	}
	b, err := topo.ParseBalancer(*mode)
	if err != nil {
		return err
	}
	var ms []int
	if *members != "" {
		for _, f := range strings.Split(*members, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil {
				return fmt.Errorf("--members %q: want member numbers, e.g. 1,3", *members)
			}
			ms = append(ms, n)
		}
	}
	return topo.BalancePrefix(*prefix, b, ms...)
}

func down(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("down", flag.ContinueOnError)
	fs.SetOutput(stderr)
	prefix, runDir := commonFlags(fs)
	all := fs.Bool("all", false, "delete every topology with an automatic prefix (mv + 4 hex digits), running tests' too")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *all {
		prefixes, err := topo.DownAll()
		for _, p := range prefixes {
			fmt.Fprintln(stdout, "removed", p)
		}
		return err
	}
	if *prefix == "" {
		return errors.New("--prefix or --all is required")
	}
	err := topo.Down(*prefix)
	if *runDir != "" {
		err = errors.Join(err, os.RemoveAll(*runDir))
	}
	return err
}
