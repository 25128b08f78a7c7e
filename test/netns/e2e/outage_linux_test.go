package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/test/netns/linkemu"
	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// outageNet is issue 4's network: A and B at 20 Mbit/s each, B behind
// CGNAT.
func outageNet() topo.Options {
	return topo.Options{
		A: topo.Symmetric(linkemu.Params{Rate: 20e6, Delay: 10e6}),
		B: topo.Symmetric(linkemu.Params{Rate: 20e6, Delay: 25e6}),
	}
}

// outage is one way uplink A stops working, and how it comes back.
type outage struct {
	name      string
	cut, heal func(t *testing.T, tp *topo.Topology)
}

func outages() []outage {
	return []outage{
		{"link down then up",
			func(t *testing.T, tp *topo.Topology) { tp.LinkDown(topo.A) },
			func(t *testing.T, tp *topo.Topology) { tp.LinkUp(topo.A) }},
		{"ISP drops everything, carrier up",
			func(t *testing.T, tp *topo.Topology) { tp.Blackhole(topo.A, true) },
			func(t *testing.T, tp *topo.Topology) { tp.Blackhole(topo.A, false) }},
		{"address removed, the same one back",
			func(t *testing.T, tp *topo.Topology) { tp.RemoveAddr(topo.A) },
			func(t *testing.T, tp *topo.Topology) { tp.RestoreAddr(topo.A) }},
		{"address removed, a new one",
			func(t *testing.T, tp *topo.Topology) { tp.RemoveAddr(topo.A) },
			func(t *testing.T, tp *topo.Topology) {
				// RestoreAddr then Renumber: a new lease on the same
				// link, the old address gone.
				tp.RestoreAddr(topo.A)
				ul := tp.Uplinks[topo.A]
				tp.Renumber(topo.A, ul.Addr.Next().Next().Next())
			}},
	}
}

// The README's outage targets (scripts/bench_outage.sh measures them):
// the app stalls less than 0.5 s, and A carries a fair share of the flow
// again less than 1 s after it returns. The test allows a margin over
// them, for a loaded machine; a regression to what kernel MPTCP alone does
// (stalls of 0.7-1.5 s, A never used again) still fails.
const (
	maxStall    = time.Second
	maxRecovery = 1500 * time.Millisecond
)

// For each kind of outage of uplink A during a download through mpvpn: the
// flow survives intact (curl exit 0, same SHA-256: no reset, no lost
// byte), the app never waits maxStall or more for a byte, and once A is
// back it carries a fair share of the same flow within maxRecovery.
//
// A stall over maxStall is judged on a second outage, in a second
// download, before it fails the test: what B re-sends for A can meet a
// full queue on B, and now and then (once so far in CI, on a loaded
// 2-core machine: 1.3 s, from 0.43 s after the cut, where 0.4-0.6 s from
// 0.05-0.1 s is usual) the kernel then needs a retransmission timeout on
// B, which is B's loss recovery, not mpvpn's. A regression stalls both; everything else
// must hold in every download.
func TestOutageDuringDownload(t *testing.T) {
	for _, o := range outages() {
		t.Run(o.name, func(t *testing.T) {
			e := newEnv(t, options{topo: outageNet()})
			const size = 48 << 20 // ~10 s at the 40 Mbit/s the two make
			sum := e.randomFile(t, "big", size)
			for try := 1; ; try++ {
				m := downloadThroughOutage(t, e, o, size, sum)
				if t.Failed() {
					return
				}
				if m.stall < maxStall {
					return
				}
				if try == 2 {
					t.Errorf("the app received nothing for %v (from %v after the cut), want less than %v, in the second outage as in the first",
						m.stall.Round(time.Millisecond), m.stallAt.Round(10*time.Millisecond), maxStall)
					return
				}
				t.Logf("the app received nothing for %v (from %v after the cut), not less than %v: one more outage, to tell a slow moment from a regression",
					m.stall.Round(time.Millisecond), m.stallAt.Round(10*time.Millisecond), maxStall)
			}
		})
	}
}

// downloadThroughOutage downloads the file "big" (size bytes, SHA-256 sum)
// while uplink A goes through outage o, checks everything but the stall,
// and returns what it measured.
func downloadThroughOutage(t *testing.T, e *env, o outage, size int64, sum string) flowMeasure {
	t.Helper()
	out := filepath.Join(t.TempDir(), "big")
	dl := e.tp.Start(e.tp.Client, "curl", "curl", "-sS", "-m", "120", "-o", out, destURL("big"))

	waitSize(t, dl, out, size/5)
	mon := watchFlow(t, e, dl, out)
	defer mon.stop()
	o.cut(t, e.tp)
	time.Sleep(3 * time.Second)
	// The flow goes on over B alone.
	n0 := fileSize(out)
	time.Sleep(time.Second)
	if fileSize(out) <= n0 {
		t.Errorf("no progress during the outage of A (%d bytes)", n0)
	}
	o.heal(t, e.tp)
	mon.healed()
	// A carries bytes of the same (only) flow again: a fair share at
	// 20 Mbit/s is ~2.5 MB in 2 s.
	before := e.uplinkBytes()
	time.Sleep(2 * time.Second)
	after := e.uplinkBytes()
	if fileSize(out) >= size {
		t.Fatal("the download ended before A's return could be checked; make the file larger")
	}
	if got := after.rx[0] - before.rx[0]; got < 512<<10 {
		t.Errorf("A received only %d bytes in the 2 s after it came back", got)
	} else {
		t.Logf("A received %d bytes in the 2 s after it came back (B %d)", got, after.rx[1]-before.rx[1])
	}

	if err := dl.Wait(2 * time.Minute); err != nil {
		t.Fatalf("curl: %v\n%s\nclient log:\n%s", err, dl.Log(), tail(e.client.Log(), 40))
	}
	if got := fileSum(t, out); got != sum {
		t.Fatalf("sha256 %s, want %s", got, sum)
	}
	if strings.Contains(e.client.Log(), "plain TCP") {
		t.Errorf("the flow fell back to plain TCP")
	}
	m := mon.stop()
	_, bDown := e.tp.LinkStatus(topo.B)
	t.Logf("longest stall %v (from %v after the cut); A carried a fair share again %v after it came back; %d samples, longest gap between them %v; B's downlink has dropped %d frames at its queue so far",
		m.stall.Round(time.Millisecond), m.stallAt.Round(10*time.Millisecond), m.recovery.Round(time.Millisecond), m.samples, m.maxGap.Round(time.Millisecond), bDown.Stats.DropQueue)
	switch {
	case !m.recovered:
		t.Errorf("A never carried a fair share of the flow again (the download ended %v after A came back)", m.ended.Round(10*time.Millisecond))
	case m.recovery >= maxRecovery:
		t.Errorf("A carried a fair share of the flow again %v after it came back, want less than %v", m.recovery.Round(time.Millisecond), maxRecovery)
	}
	return m
}

// waitSize waits until the file at path has at least n bytes.
func waitSize(t *testing.T, p *topo.Proc, path string, n int64) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for fileSize(path) < n {
		select {
		case <-p.Done():
			t.Fatalf("%s ended early: %s", p.Name, p.Log())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d bytes after a minute", path, fileSize(path))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// A fair share of the flow for A: at least 200 kB within 200 ms, i.e.
// 8 Mbit/s, 40 % of A's 20 (scripts/bench_outage.sh's criterion).
const (
	fairBytes  = 200_000
	fairWindow = 200 * time.Millisecond
)

// flowWatch samples, every 5 ms from the cut until the download ends, the
// size of the file curl writes and uplink A's received bytes, and
// measures:
//
//   - stall: the longest time the file did not grow (the app received
//     nothing), from the first sample to curl's exit, not beyond: the time
//     after the download is not a stall;
//   - recovery: from healed (the heal done: A has its link, address and
//     route back) to the first sample at which A had received a fair share
//     (fairBytes within fairWindow) since A came back.
//
// The samples cost no process (a stat and a read of /proc/net/dev opened
// in the client namespace), so the test's own polling stays at ~5 ms even
// on a loaded machine; the longest gap between samples is reported. Should
// a gap exceed fairWindow, the fair share is judged over the gap instead
// (the same rate over a longer window), so a late sample makes the
// recovery later by at most the gap, never lost.
type flowWatch struct {
	done     chan struct{}
	stopped  chan struct{}
	healedAt atomic.Int64
	once     sync.Once
	m        flowMeasure // valid once stopped is closed
}

// flowMeasure is what a flowWatch measured.
type flowMeasure struct {
	stall     time.Duration
	stallAt   time.Duration // when the longest stall began, after the watch started (just before the cut)
	recovered bool
	recovery  time.Duration
	ended     time.Duration // from healed to the end of the sampling (0: not healed)
	samples   int
	maxGap    time.Duration
}

func watchFlow(t *testing.T, e *env, dl *topo.Proc, path string) *flowWatch {
	t.Helper()
	w := &flowWatch{done: make(chan struct{}), stopped: make(chan struct{})}
	iface := e.tp.Uplinks[topo.A].Iface
	nd := e.openNetDev(t, e.tp.Client)
	if _, err := nd.read(iface); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(w.stopped)
		m := &w.m
		type sample struct {
			at time.Time
			rx uint64
		}
		var win []sample // A's samples since the heal: fairWindow's, and one before
		start := time.Now()
		last, lastGrow, prev := fileSize(path), start, start
		check := func(now time.Time) {
			m.samples++
			m.maxGap = max(m.maxGap, now.Sub(prev))
			prev = now
			if n := fileSize(path); n != last {
				last, lastGrow = n, now
			} else if d := now.Sub(lastGrow); d > m.stall {
				m.stall, m.stallAt = d, lastGrow.Sub(start)
			}
			h := w.healedAt.Load()
			if h == 0 {
				return
			}
			healed := time.Unix(0, h)
			m.ended = now.Sub(healed)
			if m.recovered {
				return
			}
			c, err := nd.read(iface)
			if err != nil {
				return
			}
			win = append(win, sample{now, c.rxBytes})
			for len(win) > 2 && now.Sub(win[1].at) > fairWindow {
				win = win[1:]
			}
			// From the oldest sample within the window; from the one
			// before it if there is none (a gap in the sampling), with
			// the threshold scaled to the longer time.
			base := win[0]
			if len(win) > 2 && now.Sub(base.at) > fairWindow {
				base = win[1]
			}
			need := float64(fairBytes)
			if d := now.Sub(base.at); d > fairWindow {
				need *= float64(d) / float64(fairWindow)
			}
			if len(win) > 1 && float64(c.rxBytes-base.rx) >= need {
				m.recovered, m.recovery = true, now.Sub(healed)
			}
		}
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-w.done:
				return
			case <-dl.Done():
				check(time.Now())
				return
			case <-tick.C:
				// The time of the reading, not of the tick: a late
				// wake-up must not date the sample early.
				check(time.Now())
			}
		}
	}()
	return w
}

func (w *flowWatch) healed() { w.healedAt.Store(time.Now().UnixNano()) }

// stop ends the sampling (idempotent) and returns what it measured.
func (w *flowWatch) stop() flowMeasure {
	w.once.Do(func() { close(w.done) })
	<-w.stopped
	return w.m
}

// Every uplink down: a flow waits for one to come back (here 3 s: it
// survives intact), but only up to --all-down-timeout; then it is reset,
// the app gets an error rather than a hang, and new flows work once the
// uplinks return.
func TestAllUplinksDown(t *testing.T) {
	const allDown = 6 * time.Second
	e := newEnv(t, options{topo: outageNet(), clientArgs: []string{"--all-down-timeout", allDown.String()}})
	const size = 32 << 20
	sum := e.randomFile(t, "big", size)
	both := func(on bool) {
		for _, u := range []topo.Uplink{topo.A, topo.B} {
			e.tp.Blackhole(u, on)
		}
	}

	t.Run("back in time", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "big")
		dl := e.tp.Start(e.tp.Client, "curl", "curl", "-sS", "-m", "120", "-o", out, destURL("big"))
		waitSize(t, dl, out, size/5)
		both(true)
		time.Sleep(3 * time.Second)
		both(false)
		if err := dl.Wait(2 * time.Minute); err != nil {
			t.Fatalf("curl: %v\n%s", err, dl.Log())
		}
		if got := fileSum(t, out); got != sum {
			t.Fatalf("sha256 %s, want %s", got, sum)
		}
	})

	t.Run("down too long", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "big")
		dl := e.tp.Start(e.tp.Client, "curl", "curl", "-sS", "-m", "120", "-o", out, destURL("big"))
		waitSize(t, dl, out, size/5)
		backs := strings.Count(e.client.Log(), "an uplink is back") // "back in time" logged one
		both(true)
		cut := time.Now()
		err := dl.Wait(time.Minute)
		waited := time.Since(cut)
		both(false)
		if err == nil {
			t.Fatal("curl succeeded with every uplink dark")
		}
		msg := strings.TrimSpace(dl.Log())
		t.Logf("curl: %v: %s, %v after the cut (--all-down-timeout %v)", err, msg, waited.Round(10*time.Millisecond), allDown)
		if !strings.Contains(e.client.Log(), "flows reset") {
			t.Errorf("the client did not reset the flows:\n%s", tail(e.client.Log(), 20))
		}
		// The probes call both uplinks dead ~0.3 s after the cut, and
		// the client's watchdog looks once a second: the reset is due
		// 6.3-7.3 s after the cut. Sooner, the flow did not wait as
		// long as --all-down-timeout promises; more than 2 s after it
		// is late (a hang would be the minute of dl.Wait).
		if waited < allDown || waited > allDown+2*time.Second {
			t.Errorf("curl ended %v after every uplink went dark, want between --all-down-timeout (%v) and 2 s after it", waited.Round(10*time.Millisecond), allDown)
		}
		// What the app sees: a reset, curl exit 56 ("Recv failure:
		// Connection reset by peer"). Not 18 ("transfer closed with N
		// bytes remaining"), a FIN, which an app without a length of
		// its own would take for the end of a complete reply; not 28
		// (curl's own timeout: a hang); not 0.
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("curl: %v", err)
		}
		if code := ee.ExitCode(); code != 56 {
			t.Errorf("curl exit %d (%s), want 56 (connection reset)", code, msg)
		}
		if n := fileSize(out); n >= size {
			t.Errorf("curl wrote all %d bytes, yet failed", n)
		}
		// A new flow works once the uplinks are back (give the probes
		// a moment to see them).
		deadline := time.Now().Add(10 * time.Second)
		for strings.Count(e.client.Log(), "an uplink is back") <= backs {
			if time.Now().After(deadline) {
				t.Fatalf("the client did not log \"an uplink is back\" within 10 s of the uplinks' return:\n%s", tail(e.client.Log(), 20))
			}
			time.Sleep(50 * time.Millisecond)
		}
		out2 := filepath.Join(t.TempDir(), "again")
		if code, msg := e.curl(t, "-m", "60", "-o", out2, destURL("big")); code != 0 {
			t.Fatalf("curl after the outage: exit %d: %s", code, msg)
		}
		if got := fileSum(t, out2); got != sum {
			t.Fatalf("sha256 %s, want %s", got, sum)
		}
	})
}

// A flapping uplink (down and up every 0.5 s for 10 s) during a download:
// the flow stays intact, the path manager's netlink changes stay bounded
// (damping holds the uplink back after a few flaps), and A carries the flow
// again once it is quiet.
func TestFlappingUplink(t *testing.T) {
	e := newEnv(t, options{topo: outageNet()})
	const size = 64 << 20
	sum := e.randomFile(t, "big", size)
	out := filepath.Join(t.TempDir(), "big")
	dl := e.tp.Start(e.tp.Client, "curl", "curl", "-sS", "-m", "180", "-o", out, destURL("big"))
	waitSize(t, dl, out, size/10)
	before, _ := e.status(t, "--socket", e.clientSocket())
	changes := func() uint64 {
		var st struct {
			N uint64 `json:"netlink_changes"`
		}
		out, err := exec.Command(bin.mpvpn, "status", "--json", "--socket", e.clientSocket()).Output()
		if err != nil || json.Unmarshal(out, &st) != nil {
			t.Fatalf("mpvpn status: %v", err)
		}
		return st.N
	}
	base := changes()
	for range 10 {
		e.tp.LinkDown(topo.A)
		time.Sleep(500 * time.Millisecond)
		e.tp.LinkUp(topo.A)
		time.Sleep(500 * time.Millisecond)
	}
	spent := changes() - base
	t.Logf("10 flaps: %d netlink changes (before: %d uplinks)", spent, len(before.Uplinks))
	// One withdraw and restore of an uplink is about fourteen changes
	// (endpoint, its marked rule and its unmarked fallback rule, three
	// routes, each way); without damping ten flaps would be ~140. Damped,
	// three to four of the ten cost that (66 measured, 2026-12-01).
	if spent > 72 {
		t.Errorf("10 flaps cost %d netlink changes", spent)
	}
	if err := dl.Wait(3 * time.Minute); err != nil {
		t.Fatalf("curl: %v\n%s", err, dl.Log())
	}
	if got := fileSum(t, out); got != sum {
		t.Fatalf("sha256 %s, want %s", got, sum)
	}
	// Quiet now: A comes back on its own.
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, raw := e.status(t, "--socket", e.clientSocket())
		if st.Uplinks[0].State == "up" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("A never came back after the flapping:\n%s", raw)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// netDev reads one namespace's interface counters from /proc/net/dev
// through a file opened inside it: the file keeps the namespace it was
// opened in, and a read from offset 0 regenerates it, so a reading costs
// no process (unlike `ip -s link`) and can be taken every few
// milliseconds (flowWatch does; TestStatusAndMetrics reads packets as
// well as bytes). Not for concurrent use.
type netDev struct {
	f   *os.File
	buf []byte
}

// ifaceCounters are one interface's counters: bytes are whole frames,
// Ethernet header included.
type ifaceCounters struct {
	rxBytes, rxPackets, txBytes, txPackets uint64
}

// bytes and packets are the rx (dir 0) or tx (dir 1) counters.
func (c ifaceCounters) bytes(dir int) uint64 {
	if dir == 0 {
		return c.rxBytes
	}
	return c.txBytes
}

func (c ifaceCounters) packets(dir int) uint64 {
	if dir == 0 {
		return c.rxPackets
	}
	return c.txPackets
}

// openNetDev opens ns's /proc/net/dev; the test closes it when it ends.
func (e *env) openNetDev(t *testing.T, ns string) *netDev {
	t.Helper()
	var f *os.File
	if err := e.tp.Do(ns, func() error {
		var err error
		f, err = os.Open("/proc/thread-self/net/dev")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &netDev{f: f, buf: make([]byte, 64<<10)}
}

// read returns iface's counters now.
func (d *netDev) read(iface string) (ifaceCounters, error) {
	n, err := d.f.ReadAt(d.buf, 0)
	if err != nil && err != io.EOF {
		return ifaceCounters{}, err
	}
	// "  wan0: rx bytes packets errs drop fifo frame compressed multicast tx bytes packets ..."
	for line := range strings.Lines(string(d.buf[:n])) {
		name, rest, ok := strings.Cut(line, ":")
		if !ok || strings.TrimSpace(name) != iface {
			continue
		}
		f := strings.Fields(rest)
		if len(f) < 10 {
			break
		}
		var v [4]uint64
		for i, j := range []int{0, 1, 8, 9} {
			if v[i], err = strconv.ParseUint(f[j], 10, 64); err != nil {
				return ifaceCounters{}, fmt.Errorf("/proc/net/dev %s: %w", iface, err)
			}
		}
		return ifaceCounters{v[0], v[1], v[2], v[3]}, nil
	}
	return ifaceCounters{}, fmt.Errorf("no %s in /proc/net/dev", iface)
}
