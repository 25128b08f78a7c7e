//go:build linux

package e2e

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// ecmpPaths and ecmpRate: ISP A reaches the concentrator over four
// equal-cost paths of 20 Mbit/s each, hashed on the 5-tuple both ways.
const (
	ecmpPaths = 4
	ecmpRate  = "20mbit"
)

// One flow through mpvpn over four equal-cost paths, from one uplink:
// with --subflows 8 (one subflow to the concentrator's port and one to
// each of the seven it announces, --ports) both directions spread over at
// least three of the paths and move at least 1.3 times what one plain TCP
// connection gets over one path: clearly more than one path. That is not
// yet the 2.5 times of issue 12 (see the README: in runs of 2026-12-03 an
// upload got 2.0-3.9 times, a download 1.0-2.6 and kernel MPTCP alone on
// the same paths 0.8-3.9); with --subflows 1 about once as much either
// way, on one path. Each run is a fresh client, a fresh
// pooled connection and so fresh source ports: where the kernel's hash
// puts eight subflows on fewer than three paths, 2.5 cannot be reached,
// and the test says so and tries another connection (at most twice);
// that happens to about one connection in forty.
func TestECMPSubflows(t *testing.T) {
	for _, tc := range []struct {
		subflows int
		min, max float64 // of one path's goodput
	}{
		{1, 0.6, 1.3},
		{8, 1.3, float64(ecmpPaths) + 0.2},
	} {
		t.Run(fmt.Sprintf("subflows %d", tc.subflows), func(t *testing.T) {
			for attempt := 1; ; attempt++ {
				spread, ok := ecmpRun(t, tc.subflows, tc.min, tc.max)
				if ok || t.Failed() {
					return
				}
				if attempt == 3 {
					t.Fatalf("after %d connections the subflows still sat on fewer than 3 of %d paths (%v)", attempt, ecmpPaths, spread)
				}
				t.Logf("connection %d: the hash put the subflows on %v paths: another connection", attempt, spread)
			}
		})
	}
}

// ecmpRun measures one path with plain TCP, then one flow through mpvpn
// with n subflows, up and down, and checks the ratios and how many paths
// carried a tenth of the bytes or more (spread, per direction): one with
// n = 1, at least 3 with more. ok is false (and nothing failed) when n > 1
// and the subflows sat on fewer than 3 paths: the hash's luck, not
// mpvpn's.
func ecmpRun(t *testing.T, n int, min, max float64) (spread [2]int, ok bool) {
	e := newEnv(t, options{
		topo:       topo.Options{ECMP: ecmpPaths, ECMPRate: ecmpRate},
		listen:     netip.AddrPortFrom(topo.ConcAddr, 7100).String(),
		serverArgs: []string{"--ports", "7101-7107"},
		uplinks:    []string{"wan0"},
		clientArgs: []string{"--subflows", strconv.Itoa(n)},
	})
	defer e.tp.Close()
	dst := e.tp.Start(e.tp.Inet, "iperf3", "iperf3", "-s", "-B", topo.DestAddr.String(), "-p", "5201")
	dst.WaitListen(netip.AddrPortFrom(topo.DestAddr, 5201).String())
	conc := e.tp.Start(e.tp.Conc, "iperf3-conc", "iperf3", "-s", "-B", topo.ConcAddr.String(), "-p", "5202")
	conc.WaitListen(netip.AddrPortFrom(topo.ConcAddr, 5202).String())

	// One plain TCP connection over wan0 takes one path.
	one := iperfRate(t, e, topo.ConcAddr, 5202, "-B", e.tp.Uplinks[topo.A].Addr.String())
	t.Logf("one path, plain TCP: %.1f Mbit/s", one/1e6)
	ok = true
	for i, dir := range []string{"up", "down"} {
		var args []string
		if dir == "down" {
			args = append(args, "-R")
		}
		before := e.ecmpBytes(t)
		got := iperfRate(t, e, topo.DestAddr, 5201, args...)
		after := e.ecmpBytes(t)
		var total uint64
		d := make([]uint64, ecmpPaths)
		for p := range d {
			// The concentrator's side: rx carries an upload, tx a download.
			d[p] = after[i][p] - before[i][p]
			total += d[p]
		}
		for _, b := range d {
			if total > 0 && float64(b) > 0.1*float64(total) {
				spread[i]++
			}
		}
		ratio := got / one
		t.Logf("%s through mpvpn with --subflows %d: %.1f Mbit/s, %.2f× one path; bytes per path %v", dir, n, got/1e6, ratio, d)
		switch {
		case n == 1 && spread[i] != 1:
			t.Errorf("%s: one subflow, but %d paths carried a tenth of the bytes or more", dir, spread[i])
		case n > 1 && spread[i] < 3:
			ok = false
		case ratio > max:
			t.Errorf("%s: %.2f× one path, more than %.1f×: the paths are not the limit they should be", dir, ratio, max)
		case ratio >= min:
		default:
			t.Errorf("%s: %.2f× one path, want at least %.1f× (the flow used %d of %d paths)", dir, ratio, min, spread[i], ecmpPaths)
		}
	}
	if n > 1 && ok {
		// Every one of the flow's subflows, and no more, reached the
		// concentrator: a subflow to each announced port.
		if s := e.serverSubflowPorts(t); len(s) != n {
			t.Errorf("the concentrator's subflows for the pooled connections reach ports %v, want %d ports", s, n)
		}
	}
	return spread, ok
}

// iperfRate runs one iperf3 connection from the client for 5 s and
// returns the receiver's rate in bit/s.
func iperfRate(t *testing.T, e *env, addr netip.Addr, port int, extra ...string) float64 {
	t.Helper()
	args := append([]string{"iperf3", "-c", addr.String(), "-p", strconv.Itoa(port), "-t", "5", "-J"}, extra...)
	out, err := e.tp.Run(e.tp.Client, args...)
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	bps, err := topo.IperfRate(out)
	if err != nil || bps == 0 {
		t.Fatalf("%s: rate %v, %v\n%s", strings.Join(args, " "), bps, err, out)
	}
	return bps
}

// ecmpBytes is what each ECMP path's concentrator end has received [0]
// and sent [1] so far.
func (e *env) ecmpBytes(t *testing.T) [2][]uint64 {
	t.Helper()
	var b [2][]uint64
	for p := range ecmpPaths {
		dev := "ispa"
		if p > 0 {
			dev += strconv.Itoa(p)
		}
		for i, stat := range []string{"rx_bytes", "tx_bytes"} {
			s := strings.TrimSpace(e.tp.Output(e.tp.Conc, "cat", "/sys/class/net/"+dev+"/statistics/"+stat))
			v, err := strconv.ParseUint(s, 10, 64)
			if err != nil {
				t.Fatalf("%s %s: %q", dev, stat, s)
			}
			b[i] = append(b[i], v)
		}
	}
	return b
}

// serverSubflowPorts lists the concentrator's local ports of its
// established TCP subflows from the client's uplink.
func (e *env) serverSubflowPorts(t *testing.T) []string {
	t.Helper()
	out := e.tp.Output(e.tp.Conc, "ss", "-Htn", "state", "established", "src", topo.ConcAddr.String())
	seen := map[string]bool{}
	var ports []string
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || !strings.HasPrefix(f[3], e.tp.Uplinks[topo.A].Public.String()+":") {
			continue
		}
		_, port, _ := strings.Cut(f[2], topo.ConcAddr.String()+":")
		if port >= "7100" && port <= "7107" && !seen[port] {
			seen[port] = true
			ports = append(ports, port)
		}
	}
	return ports
}
