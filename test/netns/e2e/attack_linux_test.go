package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/test/netns/topo"
	"github.com/mpvpn/mpvpn/tunnel"
)

// floodSources are the attacker's addresses, on the internet host's
// loopback: 64 of them, routed to and from the concentrator like the
// destination network they sit in.
const (
	floodFirst   = "198.51.100.100"
	floodSources = 64
)

// handshakeStatus is the part of `mpvpn status --json` of the concentrator
// the flood tests read.
type handshakeStatus struct {
	Handshakes struct {
		Accepted uint64 `json:"accepted"`
		HalfOpen int64  `json:"half_open"`
		Evicted  uint64 `json:"evicted"`
	} `json:"handshakes"`
}

func (e *env) handshakes(t *testing.T) handshakeStatus {
	t.Helper()
	out, err := exec.Command(bin.mpvpn, "status", "--json", "--socket", e.serverSocket()).Output()
	if err != nil {
		t.Fatalf("mpvpn status --json of the concentrator: %v", err)
	}
	var st handshakeStatus
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("status JSON: %v\n%s", err, out)
	}
	return st
}

// newFlowsResult is what the newflows tool prints.
type newFlowsResult struct {
	Tried     int      `json:"tried"`
	OK        int      `json:"ok"`
	Failed    int      `json:"failed"`
	Errors    []string `json:"errors"`
	FirstByte struct {
		P50Ms float64 `json:"p50_ms"`
		P90Ms float64 `json:"p90_ms"`
	} `json:"first_byte"`
}

// newFlows opens n new flows through the client's TUN, as an app would,
// and returns how they went.
func (e *env) newFlows(t *testing.T, n int) newFlowsResult {
	t.Helper()
	out, err := e.tp.Cmd(e.tp.Client, bin.newflows, "-url", destURL("/index.html"), "-n", strconv.Itoa(n), "-parallel", "2", "-timeout", "15s").Output()
	if err != nil {
		t.Fatalf("newflows: %v\n%s", err, out)
	}
	var r newFlowsResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("newflows output: %v\n%s", err, out)
	}
	return r
}

// vmRSS is a process's resident memory in KiB.
func vmRSS(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("read the concentrator's memory: %v", err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	t.Fatal("no VmRSS in /proc/PID/status")
	return 0
}

// TestHandshakeFlood (issue 8, item 1): silent and garbage connections
// from 64 source addresses, more of them in all than the concentrator's
// whole half-open table, kept open and replaced as fast as the server
// evicts them. The real client, opening new flows through its TUN
// meanwhile, gets at least 95 % of them; the concentrator's half-open
// table and memory stay bounded, and its status shows the evictions.
//
// Until issue 8 a newcomer over the cap was refused, so four addresses
// reconnecting ~820 times a second locked every client out; with the
// default caps this flood could hold 64×80 > 4096 slots.
func TestHandshakeFlood(t *testing.T) {
	const (
		perSource = 80 // 64×80 = 5120 connections held: more than the table (4096)
		flows     = 200
		rssLimit  = 256 << 10 // KiB; the table holds 4096 goroutines and sockets at most
	)
	for _, tc := range []struct {
		name       string
		serverArgs []string
		table      int
	}{
		// The per-address cap alone keeps 64 addresses from filling
		// the table: each gets 32 slots, and its own oldest is evicted.
		{"default limits", nil, 4096},
		// A table smaller than what the flood holds: the oldest of
		// all is evicted, and a real client, half-open for well under
		// a round trip, is not among them.
		{"table full", []string{"--max-half-open", "1024"}, 1024},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, options{topo: topo.Options{NoEmu: true}, serverArgs: tc.serverArgs})
			addFloodSources(t, e)
			base := e.newFlows(t, flows)
			t.Logf("without a flood: %d/%d flows, first byte p50 %.1f ms, p90 %.1f ms", base.OK, base.Tried, base.FirstByte.P50Ms, base.FirstByte.P90Ms)
			if base.OK != flows {
				t.Fatalf("without a flood only %d of %d flows opened: %v", base.OK, flows, base.Errors)
			}

			before := e.handshakes(t).Handshakes.Accepted
			flood := e.tp.Start(e.tp.Inet, "hsflood", bin.hsflood,
				"-target", netip.AddrPortFrom(topo.ConcAddr, 7100).String(),
				"-src", floodFirst, "-sources", strconv.Itoa(floodSources), "-conns", strconv.Itoa(perSource),
				"-mode", "mixed", "-rate", "3000", "-duration", "40s")
			// Wait until the flood holds what it can and has sent more
			// connections than the whole table.
			want := int64(min(tc.table, floodSources*32)) * 9 / 10
			deadline := time.Now().Add(30 * time.Second)
			var st handshakeStatus
			for st = e.handshakes(t); st.Handshakes.HalfOpen < want || st.Handshakes.Accepted-before <= uint64(tc.table); st = e.handshakes(t) {
				if time.Now().After(deadline) {
					t.Fatalf("the flood never filled the table: %d half-open (want %d), %d accepted (want more than %d)",
						st.Handshakes.HalfOpen, want, st.Handshakes.Accepted-before, tc.table)
				}
				time.Sleep(200 * time.Millisecond)
			}
			t.Logf("flood under way: %d half-open, %d evicted", st.Handshakes.HalfOpen, st.Handshakes.Evicted)

			var maxHalf int64
			var maxRSS int
			stopSampling := make(chan struct{})
			var sampled sync.WaitGroup
			sampled.Add(1)
			go func() {
				defer sampled.Done()
				for {
					select {
					case <-stopSampling:
						return
					case <-time.After(250 * time.Millisecond):
					}
					out, err := exec.Command(bin.mpvpn, "status", "--json", "--socket", e.serverSocket()).Output()
					var s handshakeStatus
					if err == nil && json.Unmarshal(out, &s) == nil {
						maxHalf = max(maxHalf, s.Handshakes.HalfOpen)
					}
					if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", e.server.Pid())); err == nil {
						for _, l := range strings.Split(string(b), "\n") {
							if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
								n, _ := strconv.Atoi(f[1])
								maxRSS = max(maxRSS, n)
							}
						}
					}
				}
			}()
			during := e.newFlows(t, flows)
			close(stopSampling)
			sampled.Wait()
			after := e.handshakes(t)
			flood.Signal(syscall.SIGINT)
			if err := flood.Wait(20 * time.Second); err != nil {
				t.Fatalf("hsflood: %v\n%s", err, flood.Log())
			}
			var fr struct {
				Opened       int64   `json:"opened"`
				Closed       int64   `json:"closed_by_server"`
				HeldMedianMs float64 `json:"held_median_ms"`
				MaxOpen      int64   `json:"max_open"`
			}
			if err := json.Unmarshal([]byte(lastLine(flood.Log())), &fr); err != nil {
				t.Fatalf("hsflood output: %v\n%s", err, flood.Log())
			}
			t.Logf("during the flood: %d/%d flows, first byte p50 %.1f ms, p90 %.1f ms; errors %v", during.OK, during.Tried, during.FirstByte.P50Ms, during.FirstByte.P90Ms, during.Errors)
			t.Logf("flood: %d connections opened, %d at most at once, %d closed by the server (held %.0f ms median); server: %d half-open at most, %d evicted, %d MiB RSS at most",
				fr.Opened, fr.MaxOpen, fr.Closed, fr.HeldMedianMs, maxHalf, after.Handshakes.Evicted, maxRSS>>10)

			if during.OK*100 < during.Tried*95 {
				t.Errorf("during the flood the real client opened %d of %d new flows, want ≥ 95 %%: %v", during.OK, during.Tried, during.Errors)
			}
			// More in total than the whole table. (At once it holds
			// what the server lets it: with the default limits, 32 per
			// address, since its own oldest are evicted.)
			if fr.Opened <= int64(tc.table) {
				t.Errorf("the flood opened %d connections; the test needs more than the table's %d", fr.Opened, tc.table)
			}
			if after.Handshakes.Evicted == 0 {
				t.Error("the concentrator evicted nothing: the flood did not press on its limits")
			}
			if maxHalf > int64(tc.table) {
				t.Errorf("%d connections half-open at once, over the table's %d", maxHalf, tc.table)
			}
			if maxRSS > rssLimit {
				t.Errorf("the concentrator's memory reached %d MiB during the flood, want ≤ %d", maxRSS>>10, rssLimit>>10)
			}
		})
	}
}

func addFloodSources(t *testing.T, e *env) {
	t.Helper()
	var b strings.Builder
	a := netip.MustParseAddr(floodFirst)
	for range floodSources {
		fmt.Fprintf(&b, "address add %s/32 dev lo\n", a)
		a = a.Next()
	}
	cmd := e.tp.Cmd(e.tp.Inet, "ip", "-batch", "-")
	cmd.Stdin = strings.NewReader(b.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("add the flood's addresses: %v\n%s", err, out)
	}
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// TestReplayAfterRestart (issue 8, item 2): first messages recorded
// before the concentrator restarts, one stamped by the host's clock and
// one as far ahead of the concentrator's clock as it accepts, are each
// accepted once before the restart and never after it, however soon
// after the restart they are replayed. The real client, whose apps' flows
// stamp in the concentrator's clock learned from its probes, gets new
// flows through at once after the restart.
func TestReplayAfterRestart(t *testing.T) {
	const replays = 50
	// The replays come a hundred at a time from one address: room for
	// them all in its share of the half-open table, so that none is
	// evicted (TestHandshakeFlood is about that) and each meets the
	// replay checks.
	e := newEnv(t, options{topo: topo.Options{NoEmu: true}, serverArgs: []string{"--handshake-timeout", "1s", "--max-half-open-per-addr", "1024"}})
	syns := newSYNCounters(t, e)
	clientKey, serverPub := e.keys(t)
	dst := netip.AddrPortFrom(topo.DestAddr, 80)

	var recorded [][]byte
	for _, ahead := range []time.Duration{0, 900 * time.Millisecond} {
		rec := newRecorder(t, e.tp, e.tp.Client, concListen)
		c, err := tunnel.NewClient(tunnel.ClientConfig{Server: rec.addr(), ServerKey: serverPub, Key: clientKey, HandshakeTimeout: 10 * time.Second,
			Now: func() time.Time { return time.Now().Add(ahead) }})
		if err != nil {
			t.Fatal(err)
		}
		conn, err := dialTunnel(e.tp, e.tp.Client, c, dst)
		if err != nil {
			t.Fatalf("the original flow stamped %v ahead: %v", ahead, err)
		}
		resp, err := httpGet(conn, topo.DestAddr.String(), "/index.html")
		conn.Close()
		if err != nil || !strings.Contains(resp, "hello from the internet") {
			t.Fatalf("the original flow stamped %v ahead: GET returned %q, %v", ahead, resp, err)
		}
		recorded = append(recorded, rec.recorded(t))
	}
	if n := syns.get(t, "syn_inet"); n != 2 {
		t.Fatalf("the original flows made %d dials, want 2", n)
	}

	// The restart: stop, and start again on the same keys and port.
	if err := e.server.Stop(); err != nil {
		t.Logf("server exited with %v", err)
	}
	e.server = e.tp.Start(e.tp.Conc, "server", e.srvArgs...)
	e.server.WaitListen("0.0.0.0:7100")
	restarted := time.Now()

	// Replays at once, while the restarted server's horizon has not
	// passed (the worst case: a stamp a second ahead would still be
	// "fresh" then, were it not for the horizon), and again after it;
	// meanwhile the real client's app opens a flow (the positive
	// control: its prober learns the new clock and horizon).
	var (
		mu                     sync.Mutex
		answered, fails        int
		wg                     sync.WaitGroup
		curlCode               int
		curlOut                string
		curlTook, curlAfterRst time.Duration
	)
	replayAll := func() {
		for range replays {
			for _, m := range recorded {
				wg.Add(1)
				go func() {
					defer wg.Done()
					n, err := replayOnce(e, m, 5*time.Second)
					mu.Lock()
					defer mu.Unlock()
					switch {
					case n != 0:
						answered++
					case err != nil:
						fails++
						t.Logf("replay: %v", err)
					}
				}()
			}
		}
	}
	replayAll()
	wg.Add(1)
	go func() {
		defer wg.Done()
		start := time.Now()
		curlCode, curlOut = e.curl(t, "-m", "15", destURL("/index.html"))
		curlTook, curlAfterRst = time.Since(start), time.Since(restarted)
	}()
	wg.Wait()
	time.Sleep(time.Until(restarted.Add(serverHorizon + 100*time.Millisecond)))
	replayAll()
	wg.Wait()
	if answered != 0 {
		t.Errorf("%d replays after the restart got bytes back, want 0", answered)
	}
	if fails != 0 {
		t.Errorf("%d replays did not end in silence and a reset", fails)
	}
	time.Sleep(1500 * time.Millisecond) // every replay has reached its deadline and been logged
	// Every replay, and the real client's own handshakes stamped before
	// it learned the new horizon (its pool refilling after the restart):
	// those the log cannot tell apart from the replays by their source.
	if n := strings.Count(e.server.Log(), `reason="timestamp out of window"`); n < 2*2*replays {
		t.Errorf("the restarted server refused %d handshakes by their timestamp, want at least the %d replays", n, 2*2*replays)
	} else {
		t.Logf("the restarted server refused %d handshakes by their timestamp: the %d replays and %d of the client's own", n, 2*2*replays, n-2*2*replays)
	}
	if curlCode != 0 || curlOut != "hello from the internet\n" {
		t.Fatalf("curl through the client after the restart: exit %d, %q\n%s", curlCode, curlOut, e.client.Log())
	}
	t.Logf("the app's first flow after the restart took %v, done %v after the restart", curlTook.Round(time.Millisecond), curlAfterRst.Round(time.Millisecond))
	if n := syns.get(t, "syn_inet"); n != 3 {
		t.Errorf("%d dials in all, want 3 (the two originals and the app's flow): a recorded first message was accepted again", n)
	}
}

// replayOnce sends m on a new connection from the client namespace and
// waits for the server's answer: bytes (n > 0), or the reset at its
// deadline (err nil), or something else (err).
func replayOnce(e *env, m []byte, wait time.Duration) (n int64, err error) {
	err = e.tp.Do(e.tp.Client, func() error {
		c, err := net.DialTimeout("tcp", concListen.String(), 5*time.Second)
		if err != nil {
			return fmt.Errorf("connect: %w", err)
		}
		defer c.Close()
		if _, err := c.Write(m); err != nil {
			return fmt.Errorf("write: %w", err)
		}
		c.SetReadDeadline(time.Now().Add(wait))
		n, err = io.Copy(io.Discard, c)
		if n == 0 && errors.Is(err, syscall.ECONNRESET) {
			return nil
		}
		return fmt.Errorf("read: %d bytes, %w", n, err)
	})
	return n, err
}
