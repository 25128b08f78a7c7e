package topo

import (
	"context"
	"encoding/json"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/mpvpn/mpvpn/test/netns/linkemu"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// acceptFrom accepts one connection on ln and returns the peer's address.
func acceptFrom(t *testing.T, ln net.Listener) <-chan netip.AddrPort {
	t.Helper()
	ch := make(chan netip.AddrPort, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(ch)
			return
		}
		ch <- c.RemoteAddr().(*net.TCPAddr).AddrPort()
		c.Close()
	}()
	return ch
}

func TestUplinksReachConcentrator(t *testing.T) {
	tp := New(t, Options{})
	ln := tp.Listen(tp.Conc, "tcp4", netip.AddrPortFrom(tp.ConcAddr, 9000).String())

	// The client's routes, as two DHCP clients leave them.
	out := tp.Output(tp.Client, "ip", "-4", "route", "show", "default")
	for _, want := range []string{"default via 192.0.2.1 dev wan0 metric 100", "default via 100.64.0.1 dev wan1 metric 200"} {
		if !strings.Contains(out, want) {
			t.Errorf("client default routes:\n%s\nmissing %q", out, want)
		}
	}

	tests := []struct {
		name       string
		uplink     Uplink
		wantSource netip.Addr
	}{
		{"routed ISP A keeps the client's address", A, netip.MustParseAddr("192.0.2.2")},
		{"CGNAT ISP B masquerades", B, netip.MustParseAddr("198.18.2.1")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tp.Uplinks[tt.uplink].Public; got != tt.wantSource {
				t.Errorf("Uplinks[%s].Public = %s, want %s", tt.uplink, got, tt.wantSource)
			}
			if r := tp.PingUplink(tt.uplink, tp.ConcAddr, PingOptions{Count: 3}); r.Received == 0 {
				t.Errorf("ping %s over %s: %v", tp.ConcAddr, tt.uplink, r)
			}
			_, txBefore := tp.IfaceBytes(tp.Client, tp.Uplinks[tt.uplink].Iface)
			accepted := acceptFrom(t, ln)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, err := tp.DialUplink(ctx, tt.uplink, "tcp4", ln.Addr().String())
			if err != nil {
				t.Fatalf("dial over %s: %v", tt.uplink, err)
			}
			c.Close()
			select {
			case src := <-accepted:
				if src.Addr() != tt.wantSource {
					t.Errorf("concentrator saw %s, want %s", src.Addr(), tt.wantSource)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("concentrator accepted nothing")
			}
			if _, tx := tp.IfaceBytes(tp.Client, tp.Uplinks[tt.uplink].Iface); tx <= txBefore {
				t.Errorf("%s sent nothing (tx bytes %d → %d)", tp.Uplinks[tt.uplink].Iface, txBefore, tx)
			}
		})
	}
}

func TestBCP38DropsSpoofedSources(t *testing.T) {
	tp := New(t, Options{})
	tests := []struct {
		name  string
		out   Uplink // interface the packets leave by
		src   Uplink // whose address they carry
		drops Uplink // ISP that must count them
	}{
		{"ISP B's address out of wan0", A, B, A},
		{"ISP A's address out of wan1", B, A, B},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := [2]uint64{tp.BCP38Drops(A), tp.BCP38Drops(B)}
			r := tp.Ping(tp.Client, tp.ConcAddr, PingOptions{
				Iface: tp.Uplinks[tt.out].Iface, Src: tp.Uplinks[tt.src].Addr,
				Count: 3, Interval: 20 * time.Millisecond, Timeout: 500 * time.Millisecond,
			})
			if r.Sent != 3 || r.Received != 0 {
				t.Errorf("spoofed ping: %v; want 3 sent, none answered", r)
			}
			after := [2]uint64{tp.BCP38Drops(A), tp.BCP38Drops(B)}
			if got := after[tt.drops] - before[tt.drops]; got != 3 {
				t.Errorf("ISP %s BCP38 counter rose by %d, want 3", tt.drops, got)
			}
			if other := 1 - tt.drops; after[other] != before[other] {
				t.Errorf("ISP %s BCP38 counter moved: %d → %d", Uplink(other), before[other], after[other])
			}
		})
	}
	// Legitimate traffic is not counted.
	before := [2]uint64{tp.BCP38Drops(A), tp.BCP38Drops(B)}
	for _, u := range []Uplink{A, B} {
		if r := tp.PingUplink(u, tp.ConcAddr, PingOptions{Count: 2, Interval: 20 * time.Millisecond}); r.Received == 0 {
			t.Errorf("ping over %s: %v", u, r)
		}
	}
	if after := [2]uint64{tp.BCP38Drops(A), tp.BCP38Drops(B)}; after != before {
		t.Errorf("BCP38 counters moved on legitimate traffic: %v → %v", before, after)
	}
}

func TestConcentratorDoesNotForward(t *testing.T) {
	tp := New(t, Options{})
	dest := netip.AddrPortFrom(tp.DestAddr, 9001).String()
	ln := tp.Listen(tp.Inet, "tcp4", dest)

	// The client cannot get past the concentrator, on either uplink.
	for _, u := range []Uplink{A, B} {
		if r := tp.PingUplink(u, tp.DestAddr, PingOptions{Count: 2, Interval: 20 * time.Millisecond, Timeout: 300 * time.Millisecond}); r.Received != 0 {
			t.Errorf("client reached %s over %s: %v", tp.DestAddr, u, r)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		c, err := tp.DialUplink(ctx, u, "tcp4", dest)
		cancel()
		if err == nil {
			c.Close()
			t.Errorf("client connected to %s over %s", dest, u)
		}
	}

	// The concentrator itself reaches it, and is seen as 203.0.113.1.
	if r := tp.Ping(tp.Conc, tp.DestAddr, PingOptions{Count: 2, Interval: 20 * time.Millisecond}); r.Received == 0 {
		t.Errorf("concentrator → %s: %v", tp.DestAddr, r)
	}
	accepted := acceptFrom(t, ln)
	c, err := Dial(context.Background(), tp.Conc, &net.Dialer{Timeout: 5 * time.Second}, "tcp4", dest)
	if err != nil {
		t.Fatalf("concentrator → %s: %v", dest, err)
	}
	c.Close()
	select {
	case src := <-accepted:
		if src.Addr() != tp.ConcAddr {
			t.Errorf("internet host saw %s, want %s", src.Addr(), tp.ConcAddr)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("internet host accepted nothing")
	}
}

// iperf runs one iperf3 test from the client over uplink u to an iperf3
// server in the concentrator and returns the received rate in Mbit/s.
func iperf(t *testing.T, tp *Topology, u Uplink, reverse bool, secs int) float64 {
	t.Helper()
	port := 5201 + int(u)
	if reverse {
		port += 10
	}
	addr := netip.AddrPortFrom(tp.ConcAddr, uint16(port))
	srv := tp.Start(tp.Conc, "iperf3-server-"+strconv.Itoa(port), "iperf3", "-s", "-1", "-B", tp.ConcAddr.String(), "-p", strconv.Itoa(port))
	srv.WaitListen(addr.String())
	args := []string{"iperf3", "-c", tp.ConcAddr.String(), "-p", strconv.Itoa(port), "-B", tp.Uplinks[u].Addr.String(),
		"--bind-dev", tp.Uplinks[u].Iface, "-t", strconv.Itoa(secs), "-J"}
	if reverse {
		args = append(args, "-R")
	}
	out := tp.Output(tp.Client, args...)
	bps, err := IperfRate(out)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	srv.Wait(5 * time.Second)
	return bps / 1e6
}

func TestLinkRate(t *testing.T) {
	Require(t, "iperf3")
	// A sanity check of the emulator, not a timing test: TCP over a 20
	// Mbit/s link should get 50-110% of it (Ethernet and IP headers are
	// counted in the rate, slow start eats into a short run).
	tp := New(t, Options{
		A: Symmetric(linkemu.Params{Rate: 20e6, Delay: 5 * time.Millisecond}),
		B: Link{Up: linkemu.Params{Rate: 8e6}, Down: linkemu.Params{Rate: 30e6}},
	})
	tests := []struct {
		uplink  Uplink
		reverse bool
		mbit    float64
	}{
		{A, false, 20},
		{A, true, 20},
		{B, false, 8},
		{B, true, 30},
	}
	for _, tt := range tests {
		dir := "up"
		if tt.reverse {
			dir = "down"
		}
		t.Run(tt.uplink.String()+"-"+dir, func(t *testing.T) {
			got := iperf(t, tp, tt.uplink, tt.reverse, 3)
			t.Logf("uplink %s %s: %.1f Mbit/s through a %.0f Mbit/s link", tt.uplink, dir, got, tt.mbit)
			if got < 0.5*tt.mbit || got > 1.1*tt.mbit {
				t.Errorf("%.1f Mbit/s, want %.0f-%.0f", got, 0.5*tt.mbit, 1.1*tt.mbit)
			}
		})
	}
	for _, u := range []Uplink{A, B} {
		up, down := tp.LinkStatus(u)
		if up.Stats.DropOversize+down.Stats.DropOversize != 0 {
			t.Errorf("link %s saw oversize frames (an offload left on): up %+v down %+v", u, up.Stats, down.Stats)
		}
	}
	// Changed at run time.
	tp.SetLink(A, linkemu.Both, linkemu.Params{Rate: 5e6})
	if got := iperf(t, tp, A, false, 2); got < 2.5 || got > 5.5 {
		t.Errorf("after SetLink to 5 Mbit/s: %.1f Mbit/s", got)
	}
}

func TestLinkDelayAndJitter(t *testing.T) {
	tp := New(t, Options{
		A: Symmetric(linkemu.Params{Delay: 15 * time.Millisecond}),
		B: Link{Up: linkemu.Params{Delay: 5 * time.Millisecond, Jitter: 10 * time.Millisecond}, Down: linkemu.Params{Delay: 20 * time.Millisecond}},
	})
	tests := []struct {
		uplink   Uplink
		min, max time.Duration // RTT bounds
	}{
		{A, 30 * time.Millisecond, 30*time.Millisecond + 15*time.Millisecond},
		{B, 25 * time.Millisecond, 25*time.Millisecond + 10*time.Millisecond + 15*time.Millisecond},
	}
	for _, tt := range tests {
		r := tp.PingUplink(tt.uplink, tp.ConcAddr, PingOptions{Count: 10, Interval: 30 * time.Millisecond})
		t.Logf("uplink %s: %v", tt.uplink, r)
		if r.Received < 9 {
			t.Errorf("uplink %s: %v", tt.uplink, r)
			continue
		}
		if r.Min() < tt.min || r.Max() > tt.max {
			t.Errorf("uplink %s: rtt %v-%v, want within %v-%v", tt.uplink, r.Min(), r.Max(), tt.min, tt.max)
		}
	}
	// Changed at run time, one direction only.
	tp.UpdateLink(A, linkemu.Up, "delay=40ms")
	r := tp.PingUplink(A, tp.ConcAddr, PingOptions{Count: 3, Interval: 20 * time.Millisecond})
	if r.Received == 0 || r.Min() < 55*time.Millisecond {
		t.Errorf("after delay=40ms up: %v, want rtt ≥ 55ms", r)
	}
}

func TestLinkLoss(t *testing.T) {
	tp := New(t, Options{Seed: 42})
	tp.SetLink(B, linkemu.Both, linkemu.Params{Loss: 0.3})
	// An echo and its reply both survive with probability 0.49.
	r := tp.PingUplink(B, tp.ConcAddr, PingOptions{Count: 200, Interval: 2 * time.Millisecond, Timeout: 300 * time.Millisecond})
	frac := float64(r.Received) / float64(r.Sent)
	t.Logf("30%% loss each way: %v (%.2f answered)", r, frac)
	if frac < 0.3 || frac > 0.7 {
		t.Errorf("%.2f of pings answered, want about 0.49", frac)
	}
	up, down := tp.LinkStatus(B)
	if up.Stats.DropLoss == 0 || down.Stats.DropLoss == 0 {
		t.Errorf("no loss counted: up %+v down %+v", up.Stats, down.Stats)
	}
}

// operState returns the client interface's operational state and flags.
func operState(t *testing.T, tp *Topology, ifname string) (string, []string) {
	t.Helper()
	var links []struct {
		OperState string   `json:"operstate"`
		Flags     []string `json:"flags"`
	}
	out := tp.Output(tp.Client, "ip", "-j", "link", "show", "dev", ifname)
	if err := json.Unmarshal([]byte(out), &links); err != nil || len(links) != 1 {
		t.Fatalf("ip link show %s: %v %q", ifname, err, out)
	}
	return links[0].OperState, links[0].Flags
}

func TestBlackhole(t *testing.T) {
	tp := New(t, Options{A: Symmetric(linkemu.Params{Delay: 2 * time.Millisecond})})
	ping := func() PingResult {
		return tp.PingUplink(A, tp.ConcAddr, PingOptions{Count: 3, Interval: 20 * time.Millisecond, Timeout: 300 * time.Millisecond})
	}
	if r := ping(); r.Received == 0 {
		t.Fatalf("before: %v", r)
	}

	tp.Blackhole(A, true)
	rx0, tx0 := tp.IfaceBytes(tp.Client, "wan0")
	if r := ping(); r.Received != 0 {
		t.Errorf("blackholed link answered: %v", r)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	if c, err := tp.DialUplink(ctx, A, "tcp4", netip.AddrPortFrom(tp.ConcAddr, 9).String()); err == nil {
		c.Close()
		t.Error("TCP connected through a blackhole")
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Errorf("TCP through a blackhole failed with %v; want a timeout", err)
	}
	cancel()
	rx1, tx1 := tp.IfaceBytes(tp.Client, "wan0")
	if tx1 <= tx0 || rx1 != rx0 {
		t.Errorf("wan0 bytes rx %d→%d tx %d→%d; want tx rising, nothing received", rx0, rx1, tx0, tx1)
	}
	state, flags := operState(t, tp, "wan0")
	if state != "UP" || !strings.Contains(strings.Join(flags, ","), "LOWER_UP") {
		t.Errorf("wan0 %s %v during blackhole; want UP with carrier", state, flags)
	}
	if r := tp.PingUplink(B, tp.ConcAddr, PingOptions{Count: 1}); r.Received == 0 {
		t.Errorf("uplink b suffered from a's blackhole: %v", r)
	}
	up, down := tp.LinkStatus(A)
	if up.Stats.DropBlackhole == 0 || !up.Params.Blackhole || !down.Params.Blackhole || up.Params.Delay != 2*time.Millisecond {
		t.Errorf("link status up %+v down %+v", up, down)
	}

	tp.Blackhole(A, false)
	if r := ping(); r.Received == 0 {
		t.Errorf("after the blackhole: %v", r)
	}
}

func TestLinkDownAndUp(t *testing.T) {
	tp := New(t, Options{})
	tp.LinkDown(A)
	out := tp.Output(tp.Client, "ip", "-4", "route", "show", "default")
	if strings.Contains(out, "wan0") || !strings.Contains(out, "wan1") {
		t.Errorf("default routes with wan0 down:\n%s", out)
	}
	if state, _ := operState(t, tp, "wan0"); state != "DOWN" {
		t.Errorf("wan0 %s, want DOWN", state)
	}
	if r := tp.PingUplink(A, tp.ConcAddr, PingOptions{Count: 1, Timeout: 200 * time.Millisecond}); r.Received != 0 {
		t.Errorf("ping over a downed link: %v", r)
	}
	if r := tp.PingUplink(B, tp.ConcAddr, PingOptions{Count: 1}); r.Received == 0 {
		t.Errorf("uplink b with a down: %v", r)
	}

	tp.LinkUp(A)
	out = tp.Output(tp.Client, "ip", "-4", "route", "show", "default")
	if !strings.Contains(out, "default via 192.0.2.1 dev wan0 metric 100") {
		t.Errorf("default routes after LinkUp:\n%s", out)
	}
	if r := tp.PingUplink(A, tp.ConcAddr, PingOptions{Count: 3, Interval: 50 * time.Millisecond}); r.Received == 0 {
		t.Errorf("ping after LinkUp: %v", r)
	}
}

func TestAddressLossAndRenumbering(t *testing.T) {
	tp := New(t, Options{})
	ln := tp.Listen(tp.Conc, "tcp4", netip.AddrPortFrom(tp.ConcAddr, 9002).String())
	source := func(u Uplink) netip.Addr {
		t.Helper()
		accepted := acceptFrom(t, ln)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := tp.DialUplink(ctx, u, "tcp4", ln.Addr().String())
		if err != nil {
			t.Fatalf("dial over %s: %v", u, err)
		}
		c.Close()
		return (<-accepted).Addr()
	}

	tp.RemoveAddr(A)
	if out := tp.Output(tp.Client, "ip", "-4", "addr", "show", "dev", "wan0"); strings.Contains(out, "192.0.2.2") {
		t.Errorf("address still there:\n%s", out)
	}
	if out := tp.Output(tp.Client, "ip", "-4", "route", "show", "default"); strings.Contains(out, "wan0") {
		t.Errorf("default route via wan0 survived the address:\n%s", out)
	}
	tp.RestoreAddr(A)
	if got := source(A); got != netip.MustParseAddr("192.0.2.2") {
		t.Errorf("after RestoreAddr the concentrator saw %s", got)
	}

	tp.Renumber(A, netip.MustParseAddr("192.0.2.3"))
	if got := source(A); got != netip.MustParseAddr("192.0.2.3") || tp.Uplinks[A].Public != got {
		t.Errorf("renumbered A: concentrator saw %s, Public %s", got, tp.Uplinks[A].Public)
	}
	tp.Renumber(B, netip.MustParseAddr("100.64.0.3"))
	if got := source(B); got != netip.MustParseAddr("198.18.2.1") {
		t.Errorf("renumbered B: concentrator saw %s, want the NAT address", got)
	}
	if tp.BCP38Drops(A)+tp.BCP38Drops(B) != 0 {
		t.Error("new addresses tripped BCP 38")
	}
}

func TestNoEmu(t *testing.T) {
	tp := New(t, Options{NoEmu: true})
	if tp.WireA != "" || tp.WireB != "" {
		t.Errorf("wire namespaces %q %q with NoEmu", tp.WireA, tp.WireB)
	}
	if got := len(tp.Namespaces()); got != 5 {
		t.Errorf("%d namespaces, want 5: %v", got, tp.Namespaces())
	}
	for _, u := range []Uplink{A, B} {
		if r := tp.PingUplink(u, tp.ConcAddr, PingOptions{Count: 2, Interval: 20 * time.Millisecond}); r.Received == 0 {
			t.Errorf("uplink %s: %v", u, r)
		}
	}
}

// fakeTB lets a test watch New's cleanup of a test that failed.
type fakeTB struct {
	testing.TB
	mu       sync.Mutex
	cleanups []func()
	failed   bool
	logs     []string
}

func (f *fakeTB) Helper()               {}
func (f *fakeTB) Cleanup(fn func())     { f.mu.Lock(); f.cleanups = append(f.cleanups, fn); f.mu.Unlock() }
func (f *fakeTB) Failed() bool          { f.mu.Lock(); defer f.mu.Unlock(); return f.failed }
func (f *fakeTB) Errorf(string, ...any) { f.mu.Lock(); f.failed = true; f.mu.Unlock() }
func (f *fakeTB) Logf(format string, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.logs = append(f.logs, strings.TrimSpace(strings.ReplaceAll(format, "%", "")))
	for _, a := range args {
		if s, ok := a.(string); ok {
			f.logs = append(f.logs, s)
		}
	}
}

func (f *fakeTB) runCleanups() {
	for i := len(f.cleanups) - 1; i >= 0; i-- {
		f.cleanups[i]()
	}
}

func TestTeardownAfterFailure(t *testing.T) {
	fake := &fakeTB{TB: t}
	tp := New(fake, Options{})
	prefix := tp.Prefix
	if left, _ := Leftovers(prefix); len(left) != 7 {
		t.Fatalf("namespaces after New: %v", left)
	}
	p := tp.Start(tp.Conc, "talker", "sh", "-c", "echo hello from the concentrator; exec sleep 600")
	stray := exec.Command("ip", "netns", "exec", tp.Inet, "sleep", "600") // not through Start
	if err := stray.Start(); err != nil {
		t.Fatal(err)
	}
	strayDone := make(chan struct{})
	go func() { stray.Wait(); close(strayDone) }()
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(p.Log(), "hello") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}

	fake.Errorf("the test failed")
	fake.runCleanups()

	if left, err := Leftovers(prefix); err != nil || len(left) != 0 {
		t.Errorf("left after cleanup: %v %v", left, err)
	}
	if done, _ := p.Exited(); !done {
		t.Error("started process still running")
	}
	select {
	case <-strayDone:
	case <-time.After(5 * time.Second):
		t.Error("process started behind the harness's back still running")
	}
	if logs := strings.Join(fake.logs, "\n"); !strings.Contains(logs, "hello from the concentrator") || !strings.Contains(logs, "talker") {
		t.Errorf("failed test's cleanup did not show the process log:\n%s", logs)
	}
	if err := tp.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestCLI(t *testing.T) {
	Require(t, "go")
	bin := filepath.Join(t.TempDir(), "mpvpn-topo")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/mpvpn/mpvpn/test/netns/cmd/mpvpn-topo").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	prefix := NewPrefix()
	t.Cleanup(func() { Down(prefix) })
	cli := func(args ...string) string {
		t.Helper()
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("mpvpn-topo %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}

	env := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(cli("up", "--prefix", prefix, "--rate-a", "20mbit", "--delay-a", "10ms", "--down-b", "delay=3ms")), "\n") {
		k, v, ok := strings.Cut(l, "=")
		if !ok {
			t.Fatalf("up printed %q", l)
		}
		env[k] = v
	}
	if env["PREFIX"] != prefix || env["NS_CLI"] != prefix+"-cli" || env["CONC_ADDR"] != "203.0.113.1" || env["WAN1_PUBLIC"] != "198.18.2.1" {
		t.Errorf("up printed %v", env)
	}
	pid, err := os.ReadFile(filepath.Join(env["RUN_DIR"], "la.pid"))
	if err != nil {
		t.Fatal(err)
	}

	ping := func(u Uplink) PingResult {
		r, err := Ping(env["NS_CLI"], ConcAddr, PingOptions{Iface: "wan" + strconv.Itoa(int(u)), Count: 3, Interval: 20 * time.Millisecond, Timeout: 300 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	if r := ping(A); r.Received == 0 || r.Min() < 20*time.Millisecond {
		t.Errorf("uplink a after up: %v; want rtt ≥ 20ms", r)
	}
	if r := ping(B); r.Received == 0 || r.Min() < 3*time.Millisecond || r.Min() > 15*time.Millisecond {
		t.Errorf("uplink b after up: %v; want rtt ≥ 3ms", r)
	}

	cli("link", "--prefix", prefix, "--uplink", "a", "--blackhole", "on")
	if r := ping(A); r.Received != 0 {
		t.Errorf("uplink a blackholed: %v", r)
	}
	cli("link", "--prefix", prefix, "--uplink", "a", "--blackhole", "off")
	out := cli("link", "--prefix", prefix, "--uplink", "a", "--dir", "up", "--delay", "30ms")
	if !strings.Contains(out, "a up   rate=20mbit delay=30ms") || !strings.Contains(out, "a down rate=20mbit delay=10ms") {
		t.Errorf("link printed:\n%s", out)
	}
	if r := ping(A); r.Received == 0 || r.Min() < 40*time.Millisecond {
		t.Errorf("uplink a after link: %v; want rtt ≥ 40ms", r)
	}
	if out := cli("stats", "--prefix", prefix); !regexp.MustCompile(`a up .*\n.*blackhole [1-9]`).MatchString(out) {
		t.Errorf("stats:\n%s", out)
	}
	if _, err := exec.Command(bin, "link", "--prefix", prefix, "--uplink", "a", "--rate", "3mbps").CombinedOutput(); err == nil {
		t.Error("link accepted an ambiguous rate")
	}

	cli("down", "--prefix", prefix)
	if left, _ := Leftovers(prefix); len(left) != 0 {
		t.Errorf("left after down: %v", left)
	}
	if n, _ := strconv.Atoi(strings.TrimSpace(string(pid))); n > 0 && alive(n) {
		t.Errorf("linkemu daemon %d still running", n)
	}
	if _, err := os.Stat(env["RUN_DIR"]); err == nil {
		t.Errorf("run dir %s left", env["RUN_DIR"])
	}
	cli("down", "--prefix", prefix) // idempotent
}

// A fleet: connections to the VIP from both uplinks of both clients
// reach all three members, through ECMP anycast and through the hash
// DNAT, and keep coming once a member is taken out, never to it; each
// member's own address reaches that member whatever the balancer.
func TestFleetBalancers(t *testing.T) {
	tp := New(t, Options{Fleet: 3, SecondClient: true, NoEmu: true})
	if len(tp.Members) != 3 || tp.Client2 == "" {
		t.Fatalf("members %v, second client %q", tp.Members, tp.Client2)
	}
	if got := len(tp.Namespaces()); got != 9 {
		t.Errorf("%d namespaces, want 9: %v", got, tp.Namespaces())
	}
	type hit struct {
		member int
		src    netip.AddrPort
	}
	hits := make(chan hit, 8)
	for i, m := range tp.Members {
		ln := tp.Listen(m.NS, "tcp4", "0.0.0.0:9000")
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return // closed by tp.Listen's cleanup
				}
				hits <- hit{i + 1, c.RemoteAddr().(*net.TCPAddr).AddrPort()}
				c.Close()
			}
		}()
	}
	// which connects from client namespace ns over uplink ul to addr and
	// says which member accepted, and from what source.
	which := func(ns string, ul UplinkInfo, addr netip.Addr) (member int, src netip.AddrPort) {
		t.Helper()
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: ul.Addr.AsSlice()}, Control: BindToDevice(ul.Iface), Timeout: 3 * time.Second}
		c, err := Dial(context.Background(), ns, d, "tcp4", netip.AddrPortFrom(addr, 9000).String())
		if err != nil {
			t.Fatalf("%s %s → %s: %v", ns, ul.Iface, addr, err)
		}
		defer c.Close()
		select {
		case h := <-hits:
			return h.member, h.src
		case <-time.After(3 * time.Second):
			t.Fatalf("%s %s → %s: connected, but no member accepted", ns, ul.Iface, addr)
			return 0, netip.AddrPort{}
		}
	}
	clients := []struct {
		ns      string
		uplinks [2]UplinkInfo
	}{{tp.Client, tp.Uplinks}, {tp.Client2, tp.Uplinks2}}
	for _, b := range []Balancer{Anycast, HashDNAT} {
		for _, members := range [][]int{nil, {1, 3}} {
			if err := tp.Balance(b, members...); err != nil {
				t.Fatal(err)
			}
			seen := map[int]int{}
			for _, c := range clients {
				for _, ul := range c.uplinks {
					for range 12 {
						m, src := which(c.ns, ul, ConcAddr)
						seen[m]++
						if src.Addr() != ul.Public {
							t.Errorf("%s: %s %s reached member %d from %s, want %s", b, c.ns, ul.Iface, m, src.Addr(), ul.Public)
						}
					}
				}
			}
			want := []int{1, 2, 3}
			if members != nil {
				want = members
			}
			for m := 1; m <= 3; m++ {
				if in := slices.Contains(want, m); in != (seen[m] > 0) {
					t.Errorf("%s over members %v: member %d got %d of 48 connections", b, want, m, seen[m])
				}
			}
			for i, mb := range tp.Members {
				if m, _ := which(tp.Client, tp.Uplinks[A], mb.Addr); m != i+1 {
					t.Errorf("%s: member %d's own address %s reached member %d", b, i+1, mb.Addr, m)
				}
			}
		}
	}
}
