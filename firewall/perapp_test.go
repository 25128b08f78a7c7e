//go:build linux

package firewall

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/cgroup"
	"github.com/mpvpn/mpvpn/internal/netnstest"

	"golang.org/x/sys/unix"
)

// Uids of the per-app test: nobody has them, and the helper processes run
// as them. D has no rule.
const (
	uidA = 61001 // tunnel
	uidB = 61002 // direct
	uidC = 61003 // block
	uidD = 61004 // no rule
)

// testTree is an mpvpn cgroup subtree of the test's own under the host's
// cgroup2 mount, <mount>/mpvpn-test-<random>/{tunnel,direct,block},
// removed when the test ends, failed or not (processes left in it are
// killed through its own cgroup.kill). Nothing else there is touched.
func testTree(t *testing.T) cgroup.Tree {
	t.Helper()
	m, err := cgroup.Mount()
	if err != nil {
		netnstest.CannotRun(t, "no cgroup2 hierarchy: %v", err)
	}
	b := make([]byte, 6)
	rand.Read(b)
	tree := cgroup.Tree{Mount: m, Name: "mpvpn-test-" + hex.EncodeToString(b)}
	t.Cleanup(func() {
		root := tree.Root()
		if _, err := os.Stat(root); errors.Is(err, fs.ErrNotExist) {
			return
		}
		os.WriteFile(filepath.Join(root, "cgroup.kill"), []byte("1"), 0)
		var dirs []string
		filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		slices.SortFunc(dirs, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
		for _, d := range dirs {
			var err error
			for range 100 { // killed processes take a moment to leave
				if err = unix.Rmdir(d); err == nil || errors.Is(err, unix.ENOENT) {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			if err != nil && !errors.Is(err, unix.ENOENT) {
				t.Errorf("remove test cgroup %s: %v", d, err)
			}
		}
	})
	if _, err := tree.Setup(); err != nil {
		netnstest.CannotRun(t, "cannot create cgroups: %v", err)
	}
	return tree
}

// routeAll emulates what the routing package does in route-all mode, the
// marks included: Direct follows main, Tunnel and every unmarked packet
// look up table 7200 (default dev mpvpn0); Own follows main.
func routeAll(t *testing.T) {
	t.Helper()
	routeVia(t, "0.0.0.0/0", "mpvpn0", 7200)
	routeVia(t, "::/0", "mpvpn0", 7200)
	markRule(t, 7190, false, direct, unix.RT_TABLE_MAIN)
	markRule(t, 7191, false, tunnel, 7200)
	markRule(t, 7200, true, own, 7200)
}

// split emulates split routing: only Tunnel-marked packets look up table
// 7200; the rest follows main.
func split(t *testing.T) {
	t.Helper()
	routeVia(t, "0.0.0.0/0", "mpvpn0", 7200)
	routeVia(t, "::/0", "mpvpn0", 7200)
	markRule(t, 7190, false, direct, unix.RT_TABLE_MAIN)
	markRule(t, 7191, false, tunnel, 7200)
}

type family struct {
	name                string
	public, wan, tunnel netip.Addr
	udpErr              string // what a connected UDP socket reads after a reject
}

var families = []family{
	{"IPv4", public4, wanAddr4, tunAddr4, "EHOSTUNREACH"},
	{"IPv6", public6, wanAddr6, tunAddr6, "EACCES"},
}

// TestPerApp applies uid A = tunnel, B = direct, C = block, cgroup X =
// direct and cgroup Y = block in route-all mode, and watches where each
// app's connection goes: A's into the TUN, B's and X's out of the uplink
// with the uplink's address, C's and Y's nowhere, refused at once; an app
// with no rule follows route-all into the TUN, and mpvpn's own (Own-marked)
// socket leaves by the uplink, untouched.
func TestPerApp(t *testing.T) {
	tree := testTree(t)
	netnstest.Run(t, func() {
		topology(t)
		tun(t, "mpvpn0")
		routeAll(t)
		bin := helperBinary(t)
		rules := []Rule{
			{UID(uidA), Tunnel},
			{UID(uidB), Direct},
			{UID(uidC), Block},
			{Cgroup(tree.Path(cgroup.KindDirect)), Direct},
			{Cgroup(tree.Path(cgroup.KindBlock)), Block},
		}
		f, err := Apply(Config{Mark: own, Rules: rules, CgroupMount: tree.Mount})
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		t.Logf("ruleset:\n%s", nft(t, "list", "table", "inet", PerAppTable))

		// No t.Run: a subtest runs on another goroutine, outside the
		// namespace.
		for _, fam := range families {
			func() {
				tcp := probe{Net: "tcp"}
				wan, tn := startCapture(t, "wan0"), startCapture(t, "mpvpn0")
				type want struct {
					via      string     // "wan0", "mpvpn0" or "" (nowhere)
					src      netip.Addr // source address leaving
					state    string
					rejected bool
				}
				for i, c := range []struct {
					who string
					run func(probe) probeResult
					want
				}{
					{"uid A (tunnel)", func(p probe) probeResult { return runProbeAs(t, bin, uidA, p) }, want{via: "mpvpn0", src: fam.tunnel, state: "pending"}},
					{"uid B (direct)", func(p probe) probeResult { return runProbeAs(t, bin, uidB, p) }, want{via: "wan0", src: fam.wan, state: "pending"}},
					{"uid C (block)", func(p probe) probeResult { return runProbeAs(t, bin, uidC, p) }, want{state: "refused", rejected: true}},
					{"uid D (no rule)", func(p probe) probeResult { return runProbeAs(t, bin, uidD, p) }, want{via: "mpvpn0", src: fam.tunnel, state: "pending"}},
					{"cgroup direct (mpvpn exec --direct)", func(p probe) probeResult { return runProbeExec(t, bin, tree, cgroup.KindDirect, p) }, want{via: "wan0", src: fam.wan, state: "pending"}},
					{"cgroup block (mpvpn exec --block)", func(p probe) probeResult { return runProbeExec(t, bin, tree, cgroup.KindBlock, p) }, want{state: "refused", rejected: true}},
					{"mpvpn's own socket (Own mark)", func(p probe) probeResult { p.Mark = own; return p.run() }, want{via: "wan0", src: fam.wan, state: "pending"}},
				} {
					port := uint16(1000 + i) // a port of this case's own
					c.who = fam.name + ", " + c.who
					p := tcp
					p.Dst = netip.AddrPortFrom(fam.public, port)
					r := c.run(p)
					if r.State != c.state {
						t.Errorf("%s: connect %s: %+v, want %s", c.who, p.Dst, r, c.state)
					}
					if c.rejected && r.Elapsed > time.Second {
						t.Errorf("%s: the reject took %v; it must be at once", c.who, r.Elapsed)
					}
					onWan, onTun := wan.to(fam.public, port), tn.to(fam.public, port)
					switch c.via {
					case "wan0":
						if len(onWan) == 0 || len(onTun) != 0 {
							t.Errorf("%s: want its SYN on wan0 only; wan0 %v, mpvpn0 %v", c.who, onWan, onTun)
						}
						for _, pk := range onWan {
							if pk.Src != c.src {
								t.Errorf("%s: left wan0 from %s, want %s", c.who, pk.Src, c.src)
							}
						}
					case "mpvpn0":
						if len(onTun) == 0 || len(onWan) != 0 {
							t.Errorf("%s: want its SYN in the TUN only; mpvpn0 %v, wan0 %v", c.who, onTun, onWan)
						}
					default:
						if len(onWan)+len(onTun) != 0 {
							t.Errorf("%s: blocked, but packets left: wan0 %v, mpvpn0 %v", c.who, onWan, onTun)
						}
					}
				}
				// UDP from a blocked app: the send fails at once, and the
				// ICMP error follows.
				r := runProbeAs(t, bin, uidC, probe{Net: "udp", Dst: netip.AddrPortFrom(fam.public, 9)})
				if r.State != "error" || r.Errno != "EPERM" || r.RecvErrno != fam.udpErr || r.Elapsed > time.Second {
					t.Errorf("%s: blocked UDP: %+v, want send EPERM, then %s on receive, at once", fam.name, r, fam.udpErr)
				}
				if got := wan.to(fam.public, 9); len(got) != 0 {
					t.Errorf("%s: blocked UDP left wan0: %v", fam.name, got)
				}
			}()
		}
		got := counters(t, PerAppTable)
		for _, comment := range []string{"rule 1: uid 61001 tunnel", "rule 2: uid 61002 direct", "rule 3: uid 61003 block",
			"rule 4: cgroup " + tree.Path(cgroup.KindDirect) + " direct", "rule 5: cgroup " + tree.Path(cgroup.KindBlock) + " block",
			"direct, with a source that is not the uplink's: the uplink's address"} {
			if got[comment] == 0 {
				t.Errorf("rule %q never matched; counters %v", comment, got)
			}
		}
	})
}

// TestPerAppReroutes shows that the route chain's mark re-routes: in split
// mode the main table sends everything out of wan0, and only the Tunnel
// mark set by the rule for uid A takes A's packets into the TUN (with the
// source address chosen before, the uplink's).
func TestPerAppReroutes(t *testing.T) {
	netnstest.Run(t, func() {
		topology(t)
		tun(t, "mpvpn0")
		split(t)
		bin := helperBinary(t)
		f, err := Apply(Config{Mark: own, Rules: []Rule{{UID(uidA), Tunnel}}})
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for _, fam := range families {
			wan, tn := startCapture(t, "wan0"), startCapture(t, "mpvpn0")
			p := probe{Net: "tcp", Dst: netip.AddrPortFrom(fam.public, 81)}
			runProbeAs(t, bin, uidA, p)
			if in := tn.to(fam.public, 81); len(in) == 0 || len(wan.to(fam.public, 81)) != 0 {
				t.Errorf("%s: uid A (tunnel) was not re-routed into the TUN: mpvpn0 %v, wan0 %v", fam.name, in, wan.to(fam.public, 81))
			} else if in[0].Src != fam.wan {
				t.Errorf("%s: re-routed from %s, want the source chosen before the mark (%s)", fam.name, in[0].Src, fam.wan)
			}
			p.Dst = netip.AddrPortFrom(fam.public, 82)
			runProbeAs(t, bin, uidD, p)
			if len(wan.to(fam.public, 82)) == 0 || len(tn.to(fam.public, 82)) != 0 {
				t.Errorf("%s: uid D (no rule) did not follow main out of wan0", fam.name)
			}
		}
	})
}
