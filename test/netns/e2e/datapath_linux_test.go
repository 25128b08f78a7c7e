package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/test/netns/linkemu"
	"github.com/mpvpn/mpvpn/test/netns/topo"
)

func destURL(path string) string {
	return fmt.Sprintf("http://%s/%s", topo.DestAddr, path)
}

// An HTTP GET through the tunnel returns the right body, and the
// destination sees the concentrator's address as the source.
func TestHTTPGet(t *testing.T) {
	e := newEnv(t, options{topo: topo.Options{NoEmu: true}})
	code, out := e.curl(t, "-m", "20", destURL("index.html"))
	if code != 0 || out != "hello from the internet\n" {
		t.Fatalf("curl exit %d, body %q; want 0 and the served body", code, out)
	}
	log := e.http.Log()
	if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(topo.ConcAddr.String()) + ` - - .*"GET /index.html HTTP/1.1" 200`).MatchString(log) {
		t.Errorf("the destination did not see the concentrator (%s) as the source:\n%s", topo.ConcAddr, log)
	}
	for _, u := range e.tp.Uplinks {
		if strings.Contains(log, u.Addr.String()) || strings.Contains(log, u.Public.String()) {
			t.Errorf("the destination saw a client address (%s / %s):\n%s", u.Addr, u.Public, log)
		}
	}
}

// shaped is the emulated network: A 40 Mbit/s with a 20 ms round
// trip, B 20 Mbit/s with 50 ms, B behind CGNAT.
func shaped() topo.Options {
	return topo.Options{
		A: topo.Symmetric(linkemu.Params{Rate: 40e6, Delay: 10e6}),
		B: topo.Symmetric(linkemu.Params{Rate: 20e6, Delay: 25e6}),
	}
}

// minShare is the least fraction of a flow's bytes each uplink must carry
// for "both uplinks carry a substantial share": B's fair share of the
// 60 Mbit/s is a third; a scheduler that only tops up with B would sit far
// below a quarter.
const minShare = 0.2

// One plain-TCP flow in the app, both directions: both uplinks carry a
// substantial share, the bytes arrive intact, with B behind NAT.
func TestOneFlowUsesBothUplinks(t *testing.T) {
	e := newEnv(t, options{topo: shaped()})
	if !e.tp.Uplinks[topo.B].NAT {
		t.Fatal("uplink B is expected to sit behind NAT in this topology")
	}
	check := func(t *testing.T, what string, before, after [2]uint64, wantTotal uint64) {
		t.Helper()
		total, share := shares(before, after)
		t.Logf("%s: %d bytes on the uplinks, wan0 %.0f%%, wan1 %.0f%%", what, total, 100*share[0], 100*share[1])
		if total < wantTotal {
			t.Errorf("%s: only %d bytes crossed the uplinks, want at least %d", what, total, wantTotal)
		}
		for i, s := range share {
			if s < minShare {
				t.Errorf("%s: wan%d carried %.0f%% of the bytes, want at least %.0f%%", what, i, 100*s, 100*minShare)
			}
		}
	}

	t.Run("http download", func(t *testing.T) {
		const size = 24 << 20
		before, after := e.download(t, "big", e.randomFile(t, "big", size), "90")
		check(t, "download (rx)", before.rx, after.rx, size)
	})

	t.Run("http upload", func(t *testing.T) {
		const size = 16 << 20
		src := filepath.Join(t.TempDir(), "up")
		data := make([]byte, size)
		for i := range data {
			data[i] = byte(i*7 + i>>11)
		}
		if err := os.WriteFile(src, data, 0o644); err != nil {
			t.Fatal(err)
		}
		before := e.uplinkBytes()
		code, msg := e.curl(t, "-m", "90", "--data-binary", "@"+src, "-H", "Content-Type: application/octet-stream", destURL("upload"))
		after := e.uplinkBytes()
		if code != 0 {
			t.Fatalf("curl exit %d: %s", code, msg)
		}
		if got, want := strings.TrimSpace(msg), fileSum(t, src); got != want {
			t.Fatalf("the server got sha256 %s, want %s", got, want)
		}
		check(t, "upload (tx)", before.tx, after.tx, size)
	})

	// Every subflow left through the uplink that owns its source address:
	// neither ISP dropped a packet with a foreign source (BCP 38).
	defer func() {
		for _, u := range []topo.Uplink{topo.A, topo.B} {
			if n := e.tp.BCP38Drops(u); n != 0 {
				t.Errorf("ISP %s dropped %d packets with a source address not its own", u, n)
			}
		}
	}()

	iperf := e.tp.Start(e.tp.Inet, "iperf3", "iperf3", "-s", "-B", topo.DestAddr.String(), "-p", "5201")
	iperf.WaitListen(netip.AddrPortFrom(topo.DestAddr, 5201).String())
	for _, tc := range []struct {
		name    string
		reverse bool
	}{{"iperf3 upload", false}, {"iperf3 download", true}} {
		t.Run(tc.name, func(t *testing.T) {
			args := []string{"iperf3", "-c", topo.DestAddr.String(), "-p", "5201", "-t", "5", "-P", "1"}
			if tc.reverse {
				args = append(args, "-R")
			}
			before := e.uplinkBytes()
			out, err := e.tp.Run(e.tp.Client, args...)
			after := e.uplinkBytes()
			if err != nil {
				t.Fatalf("iperf3: %v\n%s", err, out)
			}
			if !strings.Contains(out, "iperf Done.") {
				t.Fatalf("iperf3 did not finish:\n%s", out)
			}
			// At the 60 Mbit/s the two uplinks sum to, 5 s is ~37 MB;
			// a third of that proves the flow was not stuck.
			if tc.reverse {
				check(t, tc.name+" (rx)", before.rx, after.rx, 12<<20)
			} else {
				check(t, tc.name+" (tx)", before.tx, after.tx, 12<<20)
			}
			if m := regexp.MustCompile(`(?m)^\[\s*\d+\]\s+0\.00-\S+\s+sec\s+\S+ \S+\s+(\S+ \S+)\s+(\d+)?\s*sender`).FindStringSubmatch(out); m != nil {
				t.Logf("%s: %s (sender)", tc.name, m[1])
			}
		})
	}
}

// 200 concurrent flows, 1 MiB each way, every byte checked (flowcheck:
// SHA-256 of the upload, the echoed download compared byte for byte).
func TestConcurrentFlows(t *testing.T) {
	e := newEnv(t, options{topo: topo.Options{NoEmu: true}})
	srv := e.tp.Start(e.tp.Inet, "flowcheck-serve", bin.flowcheck, "serve", "-listen", netip.AddrPortFrom(topo.DestAddr, 9000).String())
	srv.WaitListen(netip.AddrPortFrom(topo.DestAddr, 9000).String())
	out, err := e.tp.Run(e.tp.Client, bin.flowcheck, "run", "-addr", netip.AddrPortFrom(topo.DestAddr, 9000).String(), "-flows", "200", "-size", "1MiB", "-timeout", "3m")
	if err != nil {
		t.Fatalf("flowcheck: %v\n%s\nclient log tail:\n%s", err, out, tail(e.client.Log(), 30))
	}
	if !strings.Contains(out, "flows=200 intact=200 failed=0 ") {
		t.Fatalf("flowcheck did not report every flow intact:\n%s", out)
	}
	t.Log(strings.TrimSpace(out))
	if strings.Contains(e.client.Log(), "plain TCP") {
		t.Errorf("some flows fell back to plain TCP (single path):\n%s", tail(e.client.Log(), 20))
	}
}

// Half-close: the app shuts down writing and still reads the whole reply.
// flowcheck's server answers only after it has read the client's EOF, so
// the whole 8 MiB reply travels after the app's FIN.
func TestHalfClose(t *testing.T) {
	e := newEnv(t, options{topo: topo.Options{NoEmu: true}})
	srv := e.tp.Start(e.tp.Inet, "flowcheck-serve", bin.flowcheck, "serve", "-listen", netip.AddrPortFrom(topo.DestAddr, 9000).String())
	srv.WaitListen(netip.AddrPortFrom(topo.DestAddr, 9000).String())
	out, err := e.tp.Run(e.tp.Client, bin.flowcheck, "run", "-addr", netip.AddrPortFrom(topo.DestAddr, 9000).String(), "-flows", "1", "-size", "8MiB", "-timeout", "1m")
	if err != nil || !strings.Contains(out, "flows=1 intact=1 failed=0 ") {
		t.Fatalf("flowcheck: %v\n%s", err, out)
	}
}

// A destination port with no listener: the app gets connection refused
// (curl exit 7) at once, not connect-then-EOF. A destination that never
// answers is never reported as connected either, and the app hears so
// when the concentrator's dial gives up (--dial-timeout), not later.
func TestRefusedAndUnanswered(t *testing.T) {
	const dialTimeout = 2 * time.Second
	e := newEnv(t, options{topo: topo.Options{NoEmu: true}, serverArgs: []string{"--dial-timeout", dialTimeout.String()}})

	start := time.Now()
	code, out := e.curl(t, "-v", "-m", "20", fmt.Sprintf("http://%s:81/", topo.DestAddr))
	took := time.Since(start)
	t.Logf("closed port: curl exit %d after %v", code, took.Round(time.Millisecond))
	if code != 7 {
		t.Errorf("closed port: curl exit %d, want 7 (connection refused):\n%s", code, out)
	}
	if !strings.Contains(strings.ToLower(out), "refused") {
		t.Errorf("closed port: curl did not report a refused connection:\n%s", out)
	}
	if strings.Contains(out, "Connected to") {
		t.Errorf("closed port: the app saw a connection:\n%s", out)
	}
	// A refusal is one round trip through the tunnel (no shaping here),
	// not a dial that waited for its timeout.
	if took >= dialTimeout {
		t.Errorf("closed port: refused after %v, no sooner than the dial timeout (%v)", took.Round(time.Millisecond), dialTimeout)
	}

	// 198.51.100.99 is routed to the internet host, which drops it: the
	// concentrator's dial times out, and the app must hear so: curl exit
	// 7 (couldn't connect; the client answers the app's SYN with an ICMP
	// host unreachable), no sooner than the dial timeout (nothing else
	// may answer for the destination) and no later than 2 s after it.
	// curl's own -m 20 would be exit 28.
	start = time.Now()
	code, out = e.curl(t, "-v", "-m", "20", "http://198.51.100.99/")
	took = time.Since(start)
	t.Logf("unanswered destination: curl exit %d after %v (--dial-timeout %v): %s", code, took.Round(time.Millisecond), dialTimeout, tail(out, 1))
	if code != 7 || strings.Contains(out, "Connected to") {
		t.Errorf("unanswered destination: curl exit %d, want 7 (could not connect), and the app must not see a connection:\n%s", code, out)
	}
	if took < dialTimeout || took > dialTimeout+2*time.Second {
		t.Errorf("unanswered destination: the app heard after %v, want between the dial timeout (%v) and 2 s after it", took.Round(time.Millisecond), dialTimeout)
	}
}

func fileSum(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func tail(s string, lines int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}
