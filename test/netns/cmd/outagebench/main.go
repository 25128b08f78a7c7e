//go:build linux

// Command outagebench measures issue 4's outage figures: for each way uplink
// A can fail during a download over A+B, the longest time the application
// received nothing (stall) and how long after A's return A carried a fair
// share of the flow again (recovery), through mpvpn and with kernel MPTCP
// alone on the same links.
//
//	outagebench --topo-bin mpvpn-topo --mpvpn-bin mpvpn --mode all --outage all --runs 3 --out results.jsonl
//
// Every run builds a fresh topology (package topo; A 20 Mbit/s 10 ms one-way,
// B 20 Mbit/s 25 ms one-way behind CGNAT, link emulators run as `mpvpn-topo
// linkemu` daemons), and deletes it afterwards, also on failure, SIGINT or
// SIGTERM.
//
// Modes:
//
//   - mpvpn: `mpvpn server` in the concentrator, `mpvpn client --uplink wan0
//     --uplink wan1 --route 198.51.100.0/24` in the client, an HTTP server
//     (net/http, in this process) on the internet host 198.51.100.10:80, and
//     a plain TCP download from the client namespace through the tunnel.
//   - kernel: no mpvpn. pathmgr.Start (without Run) sets up the client's
//     per-uplink tables, rules and MPTCP endpoints once; the concentrator's
//     MPTCP limits are raised to 8/8 as mpvpn server does; an MPTCP HTTP
//     server on 203.0.113.1:8080 in the concentrator; an MPTCP download bound
//     to wan0's address. Nothing follows the outage: this is what the kernel
//     does on its own.
//
// Timeline of a run: the download starts; once a fifth of the file has
// arrived, A is cut (one of the four outages of
// test/netns/e2e/outage_linux_test.go), --outage-for later (default 5 s;
// issue 4 measured 20 s) it is healed, and the download runs to its end.
// Every 5 ms a sampler reads the bytes the application has received (a
// counter in this process) and A's rx counter (wan0 in /proc/net/dev of the
// client namespace):
//
//   - stall: the longest interval with no new application bytes, from the
//     cut to the end of the download;
//   - recovery: from the heal until A received ≥ 200 kB within 200 ms
//     (8 Mbit/s, 40 % of A's rate); -1 ("never") if that did not happen
//     within --recovery-cap (20 s) or before the download ended.
//
// The received bytes are checked against the file's SHA-256 (intact). One
// JSON line per run goes to stdout and, with --out, is appended to a file;
// its "series" is the run every 50 ms (the application's bytes, A's and B's
// rx bytes, the cut and the heal), which scripts/plots.py draws as the
// outage's timeline.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mpvpn/mpvpn/pathmgr"
	"github.com/mpvpn/mpvpn/test/netns/internal/netns"
	"github.com/mpvpn/mpvpn/test/netns/linkemu"
	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// outage is one way uplink A stops working and how it comes back, exactly as
// outages() in test/netns/e2e/outage_linux_test.go.
type outage struct {
	key, name string
	cut, heal func(tp *topo.Topology)
}

var outages = []outage{
	{"link-down", "link down then up",
		func(tp *topo.Topology) { tp.LinkDown(topo.A) },
		func(tp *topo.Topology) { tp.LinkUp(topo.A) }},
	{"blackhole", "ISP drops everything, carrier up",
		func(tp *topo.Topology) { tp.Blackhole(topo.A, true) },
		func(tp *topo.Topology) { tp.Blackhole(topo.A, false) }},
	{"addr-same", "address removed, the same one back",
		func(tp *topo.Topology) { tp.RemoveAddr(topo.A) },
		func(tp *topo.Topology) { tp.RestoreAddr(topo.A) }},
	{"addr-new", "address removed, a new one",
		func(tp *topo.Topology) { tp.RemoveAddr(topo.A) },
		func(tp *topo.Topology) {
			// RestoreAddr then Renumber: a new lease on the same link,
			// the old address gone.
			tp.RestoreAddr(topo.A)
			ul := tp.Uplinks[topo.A]
			tp.Renumber(topo.A, ul.Addr.Next().Next().Next())
		}},
}

var modes = []string{"mpvpn", "kernel"}

// config is the command line.
type config struct {
	modes       []string
	outages     []outage
	runs        int
	out         string
	topoBin     string
	mpvpnBin    string
	size        int
	outageFor   time.Duration
	recoveryCap time.Duration
	keep        bool
}

// result is one run, one JSON line.
type result struct {
	Mode       string  `json:"mode"`
	Outage     string  `json:"outage"`
	Run        int     `json:"run"`
	StallMS    float64 `json:"stall_ms"`
	RecoveryMS float64 `json:"recovery_ms"` // -1: never
	Intact     bool    `json:"intact"`
	Mbps       float64 `json:"mbps"` // the whole download
	// OutageMbps is the application's rate while A was out (B alone).
	OutageMbps float64 `json:"outage_mbps"`
	// ARxAfterHeal is what A received in the 2 s after the heal.
	ARxAfterHeal uint64  `json:"a_rx_2s_after_heal"`
	OutageS      float64 `json:"outage_s"`
	Bytes        int64   `json:"bytes"`
	// MPTCP: the download's transport was MPTCP (kernel) / mpvpn's tunnel
	// flow was (mpvpn: no "plain TCP" warning in the client's log).
	MPTCP bool   `json:"mptcp"`
	Note  string `json:"note,omitempty"`
	Error string `json:"error,omitempty"`
	Desc  string `json:"outage_desc"`
	// Series is the run over time, for the outage timelines
	// (scripts/bench_outage.sh plots them).
	Series *series `json:"series,omitempty"`
}

// series samples a run every StepS seconds from the download's start:
// the bytes the application had received and each uplink interface's rx
// bytes, cumulative. CutS and HealS are when A was cut and healed.
type series struct {
	StepS float64  `json:"step_s"`
	CutS  float64  `json:"cut_s"`
	HealS float64  `json:"heal_s"`
	App   []int64  `json:"app"`
	A     []uint64 `json:"a"`
	B     []uint64 `json:"b"`
}

// seriesStep is the timelines' resolution: fine enough to show a stall
// of a few hundred milliseconds, coarse enough to stay small.
const seriesStep = 50 * time.Millisecond

// record samples dl and the two rx counters into a series until done is
// closed, then sends it.
func record(dl *download, rxA, rxB *rxCounter, done <-chan struct{}) <-chan *series {
	out := make(chan *series, 1)
	go func() {
		s := &series{StepS: seriesStep.Seconds()}
		tick := time.NewTicker(seriesStep)
		defer tick.Stop()
		for {
			a, _ := rxA.read()
			b, _ := rxB.read()
			s.App, s.A, s.B = append(s.App, dl.n.Load()), append(s.A, a), append(s.B, b)
			select {
			case <-done:
				out <- s
				return
			case <-tick.C:
			}
		}
	}()
	return out
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "outagebench:", err)
		os.Exit(2)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sigs
		logf("%v: stopping, tearing down", s)
		cancel()
		current.stopping.Store(true)
		// Tear down here: the run may be blocked anywhere. Later
		// additions to the cleaner run at once.
		current.closeAll()
		os.Exit(130)
	}()
	os.Exit(runAll(ctx, cfg))
}

func parseFlags(args []string) (*config, error) {
	fs := flag.NewFlagSet("outagebench", flag.ContinueOnError)
	mode := fs.String("mode", "all", "mpvpn, kernel or all")
	out := fs.String("outage", "all", "link-down, blackhole, addr-same, addr-new (or the long names of outage_linux_test.go), a comma-separated list, or all")
	runs := fs.Int("runs", 3, "runs of every (mode, outage) pair")
	outFile := fs.String("out", "", "append the JSON lines to this file too")
	topoBin := fs.String("topo-bin", "", "mpvpn-topo binary (its linkemu command runs the link emulators; required)")
	mpvpnBin := fs.String("mpvpn-bin", "", "mpvpn binary (required for mode mpvpn)")
	size := fs.Int("size", 96<<20, "bytes to download (must outlast the outage and the recovery)")
	outageFor := fs.Duration("outage-for", 5*time.Second, "how long A stays out")
	recoveryCap := fs.Duration("recovery-cap", 20*time.Second, "give up waiting for A's recovery this long after the heal")
	keep := fs.Bool("keep", false, "keep each run's directory (process and link emulator logs)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	cfg := &config{runs: *runs, out: *outFile, topoBin: *topoBin, mpvpnBin: *mpvpnBin, size: *size,
		outageFor: *outageFor, recoveryCap: *recoveryCap, keep: *keep}
	switch *mode {
	case "all":
		cfg.modes = modes
	case "mpvpn", "kernel":
		cfg.modes = []string{*mode}
	default:
		return nil, fmt.Errorf("--mode %q: want mpvpn, kernel or all", *mode)
	}
	if *out == "all" {
		cfg.outages = outages
	} else {
		for _, name := range strings.Split(*out, ",") {
			name = strings.TrimSpace(name)
			found := false
			for _, o := range outages {
				if name == o.key || name == o.name {
					cfg.outages = append(cfg.outages, o)
					found = true
				}
			}
			if !found {
				return nil, fmt.Errorf("--outage %q: want link-down, blackhole, addr-same, addr-new or all", name)
			}
		}
	}
	if cfg.runs < 1 {
		return nil, errors.New("--runs must be at least 1")
	}
	if cfg.size < 1<<20 {
		return nil, errors.New("--size must be at least 1 MiB")
	}
	if cfg.topoBin == "" {
		return nil, errors.New("--topo-bin is required")
	}
	var err error
	if cfg.topoBin, err = filepath.Abs(cfg.topoBin); err != nil {
		return nil, err
	}
	for _, m := range cfg.modes {
		if m == "mpvpn" {
			if cfg.mpvpnBin == "" {
				return nil, errors.New("--mpvpn-bin is required for mode mpvpn")
			}
			if cfg.mpvpnBin, err = filepath.Abs(cfg.mpvpnBin); err != nil {
				return nil, err
			}
		}
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("must run as root (it builds network namespaces)")
	}
	return cfg, nil
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%s] outagebench: %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// runAll runs every run of every (outage, mode) pair, interleaved so that
// noise from other load on the machine spreads over both modes.
func runAll(ctx context.Context, cfg *config) int {
	data := make([]byte, cfg.size)
	rand.NewChaCha8([32]byte{'o', 'u', 't', 'a', 'g', 'e'}).Read(data)
	sum := sha256.Sum256(data)
	var outf *os.File
	if cfg.out != "" {
		var err error
		if outf, err = os.OpenFile(cfg.out, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644); err != nil {
			logf("%v", err)
			return 1
		}
		defer outf.Close()
	}
	code := 0
	for run := 1; run <= cfg.runs; run++ {
		for _, o := range cfg.outages {
			for _, mode := range cfg.modes {
				if ctx.Err() != nil {
					return 130
				}
				logf("run %d/%d: %s, %s", run, cfg.runs, mode, o.key)
				start := time.Now()
				r := runOne(ctx, cfg, mode, o, data, sum)
				r.Run = run
				if r.Error != "" {
					code = 1
					logf("run %d %s %s: error: %s", run, mode, o.key, r.Error)
				}
				b, _ := json.Marshal(r)
				fmt.Println(string(b))
				if outf != nil {
					outf.Write(append(b, '\n'))
				}
				logf("run %d %s %s: stall %.0f ms, recovery %.0f ms, intact %v, %.1f Mbit/s (took %v)",
					run, mode, o.key, r.StallMS, r.RecoveryMS, r.Intact, r.Mbps, time.Since(start).Round(time.Second))
			}
		}
	}
	return code
}

// cleaner runs a run's teardown steps, last added first, once; the signal
// handler may run them concurrently with the run itself.
type cleaner struct {
	mu     sync.Mutex
	fns    []func()
	closed bool
	// stopping: a signal came; the cleaner stays closed, so whatever a
	// run still sets up is torn down as soon as it is added.
	stopping atomic.Bool
}

// current is the running run's cleaner.
var current = &cleaner{}

func (c *cleaner) add(fn func()) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		fn()
		return
	}
	c.fns = append(c.fns, fn)
	c.mu.Unlock()
}

func (c *cleaner) closeAll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	for i := len(c.fns) - 1; i >= 0; i-- {
		c.fns[i]()
	}
	c.fns = nil
}

// reset starts a fresh cleaner for the next run.
func (c *cleaner) reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.fns, c.closed = nil, c.stopping.Load()
}

// runOne builds a topology, measures one (mode, outage) pair and tears
// everything down. topo's methods panic on failure with a Topology from
// Build; that becomes the run's error.
func runOne(ctx context.Context, cfg *config, mode string, o outage, data []byte, sum [32]byte) (r result) {
	r = result{Mode: mode, Outage: o.key, Desc: o.name, RecoveryMS: -1}
	current.reset()
	defer current.closeAll()
	defer func() {
		if p := recover(); p != nil {
			r.Error = fmt.Sprint(p)
		}
	}()
	if err := measure(ctx, cfg, mode, o, data, sum, &r); err != nil {
		r.Error = err.Error()
	}
	return r
}

// env is what a run set up.
type env struct {
	tp     *topo.Topology
	dir    string
	client *topo.Proc // mpvpn mode
	dial   func(ctx context.Context) (net.Conn, error)
	url    string
}

func measure(ctx context.Context, cfg *config, mode string, o outage, data []byte, sum [32]byte, r *result) error {
	dir, err := os.MkdirTemp("", "ob")
	if err != nil {
		return err
	}
	current.add(func() {
		if cfg.keep {
			logf("run directory kept: %s", dir)
			return
		}
		os.RemoveAll(dir)
	})
	prefix := topo.NewPrefix()
	// Registered before Build: a signal during Build still removes the
	// namespaces made so far (and whatever runs in them).
	current.add(func() {
		if err := topo.Down(prefix); err != nil {
			logf("down %s: %v", prefix, err)
		}
	})
	runDir := filepath.Join(dir, "run")
	tp, err := topo.Build(topo.Options{
		Prefix:     prefix,
		RunDir:     runDir,
		A:          topo.Symmetric(linkemu.Params{Rate: 20e6, Delay: 10e6}),
		B:          topo.Symmetric(linkemu.Params{Rate: 20e6, Delay: 25e6}),
		LinkemuCmd: []string{cfg.topoBin, "linkemu"},
	})
	if err != nil {
		return err
	}
	current.add(func() {
		if err := tp.Close(); err != nil {
			logf("%v", err)
		}
	})
	if ctx.Err() != nil {
		return ctx.Err()
	}
	e := &env{tp: tp, dir: dir}
	switch mode {
	case "mpvpn":
		err = e.setupMpvpn(ctx, cfg, data)
	case "kernel":
		err = e.setupKernel(ctx, data)
	}
	if err != nil {
		return err
	}
	rxA, err := openRx(tp.Client, tp.Uplinks[topo.A].Iface)
	if err != nil {
		return err
	}
	current.add(func() { rxA.Close() })
	rxB, err := openRx(tp.Client, tp.Uplinks[topo.B].Iface)
	if err != nil {
		return err
	}
	current.add(func() { rxB.Close() })

	// The download.
	dctx, dcancel := context.WithTimeout(ctx, 3*time.Minute)
	current.add(dcancel)
	dl := startDownload(dctx, e, int64(len(data)))
	current.add(func() { dcancel(); <-dl.done })
	t0 := time.Now()
	stopRec := make(chan struct{})
	var stopOnce sync.Once
	endRec := func() { stopOnce.Do(func() { close(stopRec) }) }
	rec := record(dl, rxA, rxB, stopRec)
	current.add(endRec)

	// A fifth of the file first.
	deadline := time.Now().Add(time.Minute)
	for dl.n.Load() < int64(len(data)/5) {
		select {
		case <-dl.done:
			return fmt.Errorf("download ended after %d bytes before the outage: %v", dl.n.Load(), dl.err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("only %d bytes after a minute, before the outage", dl.n.Load())
		}
	}
	mon := startMonitor(dl, rxA, cfg.recoveryCap)
	o.cut(tp)
	cutAt := time.Now()
	nCut := dl.n.Load()
	select {
	case <-time.After(cfg.outageFor):
	case <-ctx.Done():
		return ctx.Err()
	}
	o.heal(tp)
	healedAt := time.Now()
	nHeal := dl.n.Load()
	mon.healed(healedAt)
	r.OutageS = healedAt.Sub(cutAt).Seconds()
	r.OutageMbps = float64(nHeal-nCut) * 8 / healedAt.Sub(cutAt).Seconds() / 1e6
	a0, _ := rxA.read()
	select {
	case <-time.After(2 * time.Second):
		a1, _ := rxA.read()
		r.ARxAfterHeal = a1 - a0
	case <-dl.done:
	case <-ctx.Done():
		return ctx.Err()
	}

	select {
	case <-dl.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	stall, recovery, note := mon.stop()
	endRec()
	r.Series = <-rec
	r.Series.CutS, r.Series.HealS = cutAt.Sub(t0).Seconds(), healedAt.Sub(t0).Seconds()
	r.StallMS = ms(stall)
	if recovery >= 0 {
		r.RecoveryMS = ms(recovery)
	}
	r.Note = note
	r.Bytes = dl.n.Load()
	r.Intact = dl.err == nil && r.Bytes == int64(len(data)) && dl.sum == sum
	if d := dl.end.Sub(dl.start); d > 0 {
		r.Mbps = float64(r.Bytes) * 8 / d.Seconds() / 1e6
	}
	switch mode {
	case "kernel":
		r.MPTCP = dl.mptcp
	case "mpvpn":
		r.MPTCP = !strings.Contains(e.client.Log(), "plain TCP")
	}
	if dl.err != nil {
		return fmt.Errorf("download: %v after %d bytes%s", dl.err, r.Bytes, e.clientTail())
	}
	if !r.Intact {
		r.Note = strings.TrimPrefix(r.Note+"; ", "; ") + "received bytes differ from the file"
	}
	return nil
}

func (e *env) clientTail() string {
	if e.client == nil {
		return ""
	}
	s := e.client.Log()
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return "\nclient log (tail):\n" + strings.Join(lines, "\n")
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// serve runs an HTTP server on ln that answers every GET with data.
func serve(ln net.Listener, data []byte) {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		w.WriteHeader(http.StatusOK)
		if r.Method != http.MethodHead {
			w.Write(data)
		}
	})}
	go srv.Serve(ln)
	current.add(func() { srv.Close(); ln.Close() })
}

// listen opens a TCP listener inside ns, MPTCP or not.
func listen(ns, addr string, mptcp bool) (net.Listener, error) {
	var ln net.Listener
	err := netns.Do(ns, func() error {
		var lc net.ListenConfig
		lc.SetMultipathTCP(mptcp)
		var err error
		ln, err = lc.Listen(context.Background(), "tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen %s in %s: %w", addr, ns, err)
	}
	return ln, nil
}

func (e *env) setupMpvpn(ctx context.Context, cfg *config, data []byte) error {
	tp := e.tp
	ln, err := listen(tp.Inet, netip.AddrPortFrom(topo.DestAddr, 80).String(), false)
	if err != nil {
		return err
	}
	serve(ln, data)
	e.url = "http://" + netip.AddrPortFrom(topo.DestAddr, 80).String() + "/big"

	serverKey, clientKey := filepath.Join(e.dir, "server.key"), filepath.Join(e.dir, "client.key")
	var pubs [2]string
	for i, k := range []string{serverKey, clientKey} {
		key, err := exec.Command(cfg.mpvpnBin, "keygen").Output()
		if err != nil {
			return fmt.Errorf("mpvpn keygen: %w", err)
		}
		if err := os.WriteFile(k, key, 0o600); err != nil {
			return err
		}
		cmd := exec.Command(cfg.mpvpnBin, "pubkey")
		cmd.Stdin = bytes.NewReader(key)
		pub, err := cmd.Output()
		if err != nil {
			return fmt.Errorf("mpvpn pubkey: %w", err)
		}
		pubs[i] = strings.TrimSpace(string(pub))
	}
	server := tp.Start(tp.Conc, "server", cfg.mpvpnBin, "server", "--listen", "0.0.0.0:7100",
		"--key", serverKey, "--peer", pubs[1], "--control", filepath.Join(e.dir, "s.sock"))
	server.WaitListen("0.0.0.0:7100")
	e.client = tp.Start(tp.Client, "client", cfg.mpvpnBin, "client",
		"--server", netip.AddrPortFrom(topo.ConcAddr, 7100).String(), "--server-key", pubs[0], "--key", clientKey,
		"--uplink", "wan0", "--uplink", "wan1", "--route", topo.DestNet.String(),
		"--control", filepath.Join(e.dir, "c.sock"), "--journal", filepath.Join(e.dir, "c.journal"))
	if err := waitLog(ctx, e.client, "client up", 30*time.Second); err != nil {
		return err
	}
	e.dial = func(ctx context.Context) (net.Conn, error) {
		d := &net.Dialer{}
		d.SetMultipathTCP(false) // the app speaks plain TCP; mpvpn carries it
		return topo.Dial(ctx, tp.Client, d, "tcp", netip.AddrPortFrom(topo.DestAddr, 80).String())
	}
	return nil
}

func waitLog(ctx context.Context, p *topo.Proc, s string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if strings.Contains(p.Log(), s) {
			return nil
		}
		select {
		case <-p.Done():
			return fmt.Errorf("%s exited before logging %q:\n%s", p.Name, s, p.Log())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("%s did not log %q within %v:\n%s", p.Name, s, timeout, p.Log())
}

func (e *env) setupKernel(ctx context.Context, data []byte) error {
	tp := e.tp
	// The concentrator's side, as mpvpn server sets it.
	if err := netns.Do(tp.Conc, func() error {
		_, err := pathmgr.RaiseLimits(8, 8)
		return err
	}); err != nil {
		return fmt.Errorf("concentrator MPTCP limits: %w", err)
	}
	addr := netip.AddrPortFrom(topo.ConcAddr, 8080).String()
	ln, err := listen(tp.Conc, addr, true)
	if err != nil {
		return err
	}
	serve(ln, data)
	e.url = "http://" + addr + "/big"

	// The client's endpoints, tables and rules, set up once: pathmgr.Start
	// binds to the calling thread's namespace, and netns.Do runs it on a
	// locked thread inside the client's.
	var m *pathmgr.Manager
	if err := netns.Do(tp.Client, func() error {
		var err error
		m, err = pathmgr.Start(ctx, pathmgr.Config{Uplinks: []pathmgr.UplinkConfig{{Name: "wan0"}, {Name: "wan1"}}})
		return err
	}); err != nil {
		return err
	}
	current.add(func() { m.Close() })
	src := tp.Uplinks[topo.A].Addr
	e.dial = func(ctx context.Context) (net.Conn, error) {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
		d.SetMultipathTCP(true)
		return topo.Dial(ctx, tp.Client, d, "tcp", addr)
	}
	return nil
}

// download is the application: one HTTP GET, its bytes counted and hashed.
type download struct {
	n          atomic.Int64
	done       chan struct{}
	err        error // valid once done is closed
	sum        [32]byte
	start, end time.Time
	mptcp      bool
}

func startDownload(ctx context.Context, e *env, size int64) *download {
	dl := &download{done: make(chan struct{})}
	go func() {
		defer close(dl.done)
		var conn net.Conn
		tr := &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				c, err := e.dial(ctx)
				conn = c
				return c, err
			},
			DisableCompression: true,
			DisableKeepAlives:  true,
		}
		defer tr.CloseIdleConnections()
		dl.start = time.Now()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, e.url, nil)
		if err != nil {
			dl.err = err
			return
		}
		resp, err := tr.RoundTrip(req)
		if err != nil {
			dl.err = err
			return
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			dl.err = fmt.Errorf("HTTP %s", resp.Status)
			return
		}
		h := sha256.New()
		buf := make([]byte, 256<<10)
		for {
			n, err := resp.Body.Read(buf)
			if n > 0 {
				h.Write(buf[:n])
				dl.n.Add(int64(n))
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				dl.err = err
				break
			}
		}
		dl.end = time.Now()
		copy(dl.sum[:], h.Sum(nil))
		if tc, ok := conn.(*net.TCPConn); ok {
			dl.mptcp, _ = tc.MultipathTCP()
		}
		if dl.err == nil && dl.n.Load() != size {
			dl.err = fmt.Errorf("%d bytes, want %d", dl.n.Load(), size)
		}
	}()
	return dl
}

// rxCounter reads an interface's rx bytes from /proc/net/dev of a
// namespace, through a file opened inside it (a seq_file keeps the network
// namespace it was opened in, and a read from offset 0 regenerates it).
type rxCounter struct {
	mu    sync.Mutex // the monitor and measure both read
	f     *os.File
	iface string
	buf   []byte
}

func openRx(ns, iface string) (*rxCounter, error) {
	var f *os.File
	err := netns.Do(ns, func() error {
		var err error
		f, err = os.Open("/proc/thread-self/net/dev")
		return err
	})
	if err != nil {
		return nil, err
	}
	c := &rxCounter{f: f, iface: iface, buf: make([]byte, 64<<10)}
	if _, err := c.read(); err != nil {
		f.Close()
		return nil, err
	}
	return c, nil
}

func (c *rxCounter) read() (uint64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n, err := c.f.ReadAt(c.buf, 0)
	if err != nil && err != io.EOF {
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(c.buf[:n]))
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(name) != c.iface {
			continue
		}
		f := strings.Fields(rest)
		if len(f) < 1 {
			break
		}
		return strconv.ParseUint(f[0], 10, 64)
	}
	return 0, fmt.Errorf("no %s in /proc/net/dev", c.iface)
}

func (c *rxCounter) Close() error { return c.f.Close() }

// monitor samples the download and A's rx counter every 5 ms (see the
// package comment for what it measures).
type monitor struct {
	healedAt atomic.Int64
	quit     chan struct{}
	stopped  chan struct{}
	once     sync.Once

	stall    time.Duration
	recovery time.Duration // -1: not (yet)
	note     string
}

func startMonitor(dl *download, rx *rxCounter, capAfterHeal time.Duration) *monitor {
	m := &monitor{quit: make(chan struct{}), stopped: make(chan struct{}), recovery: -1}
	go func() {
		defer close(m.stopped)
		type sample struct {
			at time.Time
			rx uint64
		}
		var win []sample
		last, lastGrow := dl.n.Load(), time.Now()
		recovering := true
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		check := func(now time.Time) {
			if n := dl.n.Load(); n != last {
				last, lastGrow = n, now
			} else if d := now.Sub(lastGrow); d > m.stall {
				m.stall = d
			}
			h := m.healedAt.Load()
			if h == 0 || !recovering {
				return
			}
			healed := time.Unix(0, h)
			if now.Sub(healed) > capAfterHeal {
				recovering = false
				m.note = fmt.Sprintf("A did not carry a fair share within %v of the heal", capAfterHeal)
				win = nil
				return
			}
			v, err := rx.read()
			if err != nil {
				return
			}
			win = append(win, sample{now, v})
			for len(win) > 1 && now.Sub(win[0].at) > 200*time.Millisecond {
				win = win[1:]
			}
			if v-win[0].rx >= 200_000 {
				m.recovery = now.Sub(healed)
				recovering = false
			}
		}
		for {
			select {
			case <-m.quit:
				return
			case <-dl.done:
				check(time.Now())
				if h := m.healedAt.Load(); recovering && h != 0 {
					m.note = fmt.Sprintf("the download ended %.1f s after the heal, before A carried a fair share",
						time.Since(time.Unix(0, h)).Seconds())
				}
				return
			case now := <-tick.C:
				check(now)
			}
		}
	}()
	return m
}

func (m *monitor) healed(at time.Time) { m.healedAt.Store(at.UnixNano()) }

func (m *monitor) stop() (stall, recovery time.Duration, note string) {
	m.once.Do(func() { close(m.quit) })
	<-m.stopped
	return m.stall, m.recovery, m.note
}
