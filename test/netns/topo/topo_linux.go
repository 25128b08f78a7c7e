package topo

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/mpvpn/mpvpn/test/netns/linkemu"
)

// Well-known addresses of the topology.
var (
	// ConcAddr is the concentrator's public address (lo of P-conc); the
	// mpvpn server listens here.
	ConcAddr = netip.MustParseAddr("203.0.113.1")
	// DestAddr is the internet host behind the concentrator (lo of P-inet).
	DestAddr = netip.MustParseAddr("198.51.100.10")
	// DestNet is routed from P-conc to P-inet.
	DestNet = netip.MustParsePrefix("198.51.100.0/24")
)

// Uplink names one of the client's two uplinks.
type Uplink int

const (
	// A is wan0 through P-la to ISP A: public, routed addresses.
	A Uplink = iota
	// B is wan1 through P-lb to ISP B: carrier-grade NAT.
	B
)

func (u Uplink) String() string {
	switch u {
	case A:
		return "a"
	case B:
		return "b"
	}
	return fmt.Sprintf("uplink(%d)", int(u))
}

// ParseUplink parses "a"/"b" (also "0"/"1", "wan0"/"wan1").
func ParseUplink(s string) (Uplink, error) {
	switch strings.ToLower(s) {
	case "a", "0", "wan0", "ispa":
		return A, nil
	case "b", "1", "wan1", "ispb":
		return B, nil
	}
	return 0, fmt.Errorf("topo: uplink %q: want a or b", s)
}

// UplinkInfo describes one uplink as the client and the concentrator see
// it.
type UplinkInfo struct {
	Iface   string       // in P-cli: "wan0" / "wan1"
	Addr    netip.Addr   // the client's address: 192.0.2.2 / 100.64.0.2
	Prefix  netip.Prefix // Addr with its mask: 192.0.2.2/24
	Gateway netip.Addr   // the ISP: 192.0.2.1 / 100.64.0.1
	Metric  int          // of the client's default route: 100 / 200
	// Public is the source address the concentrator sees for traffic on this
	// uplink: 192.0.2.2 (routed) / 198.18.2.1 (ISP B's NAT).
	Public netip.Addr
	NAT    bool
	ISP    string // namespace of the ISP
	Wire   string // namespace of the emulated link ("" with NoEmu)
	// ConcSide is the concentrator's address toward this ISP.
	ConcSide netip.Addr
}

// Link holds the initial emulated-link parameters of one uplink. Delay is
// one-way: a 20 ms RTT uplink is Delay 10ms in each direction.
type Link struct {
	Up   linkemu.Params // client → ISP
	Down linkemu.Params // ISP → client
}

// Symmetric returns a Link with p in both directions.
func Symmetric(p linkemu.Params) Link { return Link{Up: p, Down: p} }

// Options configure a topology; the zero value is a valid default (two
// perfect, unshaped emulated links).
type Options struct {
	// Prefix of every namespace name; "" = "mv" + 4 random hex digits.
	Prefix string
	// A and B are the initial link parameters per uplink.
	A, B Link
	// NoEmu joins the client directly to the ISPs with veth pairs: no
	// P-la/P-lb, no shaping, nothing to blackhole; for throughput benchmarks.
	NoEmu bool
	// RunDir holds process logs and control sockets; "" = t.TempDir() with
	// New, /run/mpvpn-test/<prefix> with Build.
	RunDir string
	// LinkemuCmd runs each link emulator as a daemon: the command and its
	// leading arguments (e.g. {"/usr/local/bin/linkemu"} or
	// {os.Args[0], "linkemu"}); linkemu's own flags are appended. Empty runs
	// the emulators inside this process (what tests want: nothing to build,
	// nothing left behind if the test binary dies).
	LinkemuCmd []string
	// ECMP, when 2 or more, joins ISP A and the concentrator by that
	// many parallel links with equal-cost routes over them both ways and
	// L4 hashing (fib_multipath_hash_policy=1), as a data centre's fabric
	// or two sites' parallel paths do: a TCP connection stays on one, by
	// its 5-tuple. Path 0 is the usual bb–ispa link; path i is bb<i> (ISP
	// A, 198.18.(100+i).1) – ispa<i> (concentrator, .2).
	ECMP int
	// ECMPRate shapes each ECMP path, both ways, with tbf (a tc rate
	// such as "20mbit"); "" leaves them unshaped.
	ECMPRate string
	// CongestionControl, if set, is every namespace's TCP congestion
	// control (net.ipv4.tcp_congestion_control; what
	// tcp_allowed_congestion_control lets a namespace pick: reno, and
	// bbr where the host has it); "": the host's default.
	CongestionControl string
	// Fleet, when 2 or more (up to MaxFleet), puts that many
	// concentrators behind ConcAddr as a VIP; the concentrator's namespace
	// is then a router, the edge, and the members are Topology.Members
	// (see Member and Balance).
	Fleet int
	// SecondClient adds a second client namespace on both ISPs
	// (Topology.Client2, Uplinks2), joined to them directly.
	SecondClient bool
	// Seed for the emulators' loss and jitter; 0 = random.
	Seed   uint64
	Logger *slog.Logger
}

// Topology is a built test network. Its exported fields are read-only.
type Topology struct {
	Prefix string
	// Namespace names.
	Client, WireA, WireB, ISPA, ISPB, Conc, Inet string
	// Uplinks[A] is wan0, Uplinks[B] is wan1.
	Uplinks [2]UplinkInfo
	// Client2 and Uplinks2 are the second client (Options.SecondClient).
	Client2  string
	Uplinks2 [2]UplinkInfo
	// Members are the concentrators of a fleet (Options.Fleet); Conc
	// then routes between them and the ISPs.
	Members []Member
	// ConcAddr and DestAddr repeat the package variables for convenience.
	ConcAddr, DestAddr netip.Addr
	RunDir             string
	NoEmu              bool

	tb   testing.TB // nil for Build
	log  *slog.Logger
	opts Options

	mu      sync.Mutex
	created []string // namespaces this topology added, in order
	procs   []*Proc
	emus    [2]emulator
	closed  bool
}

// roles of the namespaces, in creation order.
const (
	roleClient = "cli"
	roleWireA  = "la"
	roleWireB  = "lb"
	roleISPA   = "ispa"
	roleISPB   = "ispb"
	roleConc   = "conc"
	roleInet   = "inet"
)

var allRoles = []string{roleClient, roleWireA, roleWireB, roleISPA, roleISPB, roleConc, roleInet}

// prefixRE keeps names short enough for /run/netns and free of the "-" that
// separates prefix and role.
var prefixRE = regexp.MustCompile(`^[A-Za-z0-9_]{1,16}$`)

// autoPrefixRE matches the prefixes NewPrefix makes; DownAll removes those.
var autoPrefixRE = regexp.MustCompile(`^(mv[0-9a-f]{4})-(cli|cli2|la|lb|ispa|ispb|conc|inet|c[1-8])$`)

// NewPrefix returns "mv" + 4 random hex digits.
func NewPrefix() string {
	var b [2]byte
	rand.Read(b[:])
	return "mv" + hex.EncodeToString(b[:])
}

// DefaultRunDir is where Build (and so mpvpn-topo) keeps logs, pid files
// and control sockets of prefix.
func DefaultRunDir(prefix string) string { return filepath.Join("/run/mpvpn-test", prefix) }

// ControlSocket is the control socket of uplink u's link emulator under
// runDir.
func ControlSocket(runDir string, u Uplink) string {
	return filepath.Join(runDir, "l"+u.String()+".sock")
}

// Require fails (CI=true) or skips the test when the harness cannot run:
// not root, or a tool missing.
func Require(tb testing.TB, tools ...string) {
	tb.Helper()
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root")
	}
	for _, tool := range append([]string{"ip", "nft", "ethtool", "ss"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if len(missing) == 0 {
		return
	}
	msg := "network-namespace test needs " + strings.Join(missing, ", ")
	if os.Getenv("CI") == "true" {
		tb.Fatal(msg + " (CI=true: failing, not skipping)")
	}
	tb.Skip(msg)
}

// New builds a topology for a test and deletes it when the test ends,
// passed or failed (t.Cleanup). On failure it logs the output of every
// process started with Start and the emulators' counters.
func New(tb testing.TB, opts Options) *Topology {
	tb.Helper()
	Require(tb)
	if opts.RunDir == "" {
		// Before Cleanup is registered: TempDir's removal then runs after
		// Close, which still reads the logs.
		opts.RunDir = tb.TempDir()
	}
	tp, err := build(tb, opts)
	if err != nil {
		tb.Fatalf("topo: %v", err)
	}
	tb.Cleanup(func() {
		if err := tp.Close(); err != nil {
			tb.Errorf("topo: %v", err)
		}
	})
	return tp
}

// Build builds a topology outside a test (mpvpn-topo). The caller owns it:
// Close deletes it; so does Down(prefix) from another process.
func Build(opts Options) (*Topology, error) {
	return build(nil, opts)
}

// Namespaces returns the names of the topology's namespaces.
func (tp *Topology) Namespaces() []string {
	var ns []string
	for _, n := range []string{tp.Client, tp.Client2, tp.WireA, tp.WireB, tp.ISPA, tp.ISPB, tp.Conc, tp.Inet} {
		if n != "" {
			ns = append(ns, n)
		}
	}
	for _, m := range tp.Members {
		ns = append(ns, m.NS)
	}
	return ns
}

// Env describes the topology as shell KEY=value lines (mpvpn-topo up).
func (tp *Topology) Env() []string {
	a, b := tp.Uplinks[A], tp.Uplinks[B]
	kv := [][2]string{
		{"PREFIX", tp.Prefix},
		{"NS_CLI", tp.Client}, {"NS_LA", tp.WireA}, {"NS_LB", tp.WireB},
		{"NS_ISPA", tp.ISPA}, {"NS_ISPB", tp.ISPB}, {"NS_CONC", tp.Conc}, {"NS_INET", tp.Inet},
		{"CONC_ADDR", tp.ConcAddr.String()}, {"DEST_ADDR", tp.DestAddr.String()}, {"DEST_NET", DestNet.String()},
		{"WAN0", a.Iface}, {"WAN0_ADDR", a.Addr.String()}, {"WAN0_GW", a.Gateway.String()}, {"WAN0_PUBLIC", a.Public.String()},
		{"WAN1", b.Iface}, {"WAN1_ADDR", b.Addr.String()}, {"WAN1_GW", b.Gateway.String()}, {"WAN1_PUBLIC", b.Public.String()},
		{"RUN_DIR", tp.RunDir},
	}
	if tp.Client2 != "" {
		a2, b2 := tp.Uplinks2[A], tp.Uplinks2[B]
		kv = append(kv, [2]string{"NS_CLI2", tp.Client2},
			[2]string{"CLI2_WAN0_ADDR", a2.Addr.String()}, [2]string{"CLI2_WAN1_ADDR", b2.Addr.String()})
	}
	for i, m := range tp.Members {
		n := strconv.Itoa(i + 1)
		kv = append(kv, [2]string{"NS_C" + n, m.NS}, [2]string{"C" + n + "_ADDR", m.Addr.String()})
	}
	if !tp.NoEmu {
		kv = append(kv, [2]string{"CTL_A", ControlSocket(tp.RunDir, A)}, [2]string{"CTL_B", ControlSocket(tp.RunDir, B)})
	}
	out := make([]string, len(kv))
	for i, p := range kv {
		out[i] = p[0] + "=" + shellQuote(p[1])
	}
	return out
}

func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./:") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// fatalf fails the test, or panics for a Topology from Build: the methods
// that use it (Exec, Output, Start, SetLink...) are for tests.
func (tp *Topology) fatalf(format string, args ...any) {
	if tp.tb != nil {
		tp.tb.Helper()
		tp.tb.Fatalf(format, args...)
	}
	panic(fmt.Sprintf(format, args...))
}

// Close stops every process started with Start, the link emulators and
// whatever else still runs inside the namespaces, then deletes the
// namespaces. It is idempotent.
func (tp *Topology) Close() error {
	tp.mu.Lock()
	if tp.closed {
		tp.mu.Unlock()
		return nil
	}
	tp.closed = true
	procs := tp.procs
	emus := tp.emus
	tp.mu.Unlock()

	failed := tp.tb != nil && tp.tb.Failed()
	var errs []error
	for i := len(procs) - 1; i >= 0; i-- {
		procs[i].Stop()
	}
	for u, e := range emus {
		if e == nil {
			continue
		}
		if failed {
			if up, down, err := e.status(); err == nil {
				tp.tb.Logf("link %s: up %s\n  %+v\nlink %s: down %s\n  %+v", Uplink(u), up.Params, up.Stats, Uplink(u), down.Params, down.Stats)
			}
		}
		if err := e.close(); err != nil {
			errs = append(errs, fmt.Errorf("link emulator %s: %w", Uplink(u), err))
		}
	}
	if failed {
		for _, p := range procs {
			tp.tb.Logf("--- %s (%s, %s) ---\n%s", p.Name, p.NS, p.exitStatus(), p.logTail(64<<10))
		}
	}
	tp.mu.Lock()
	created := tp.created
	tp.mu.Unlock()
	if err := deleteNamespaces(created); err != nil {
		errs = append(errs, err)
	}
	if left, err := Leftovers(tp.Prefix); err != nil || len(left) > 0 {
		errs = append(errs, fmt.Errorf("namespaces left after close: %v %v", left, err))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("topo %s: close: %w", tp.Prefix, err)
	}
	return nil
}
