//go:build linux

package firewall

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	"github.com/mpvpn/mpvpn/cgroup"
	"github.com/mpvpn/mpvpn/internal/netnstest"

	vnl "github.com/vishvananda/netlink"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

// helperEnv makes the test binary a helper process: "probe" runs one probe
// (described by PROBE, JSON) and prints its result as JSON; "exec" moves
// itself into an mpvpn cgroup with cgroup.Tree.Exec and execs itself as a
// "probe", as `mpvpn exec` would; "apply" applies a Config (FIREWALL, JSON)
// in its network namespace, says "ready", and waits to be killed.
const helperEnv = "MPVPN_FIREWALL_TEST_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		goleak.VerifyTestMain(m)
	case "probe":
		var p probe
		if err := json.Unmarshal([]byte(os.Getenv("PROBE")), &p); err != nil {
			fmt.Fprintln(os.Stderr, "bad PROBE:", err)
			os.Exit(2)
		}
		json.NewEncoder(os.Stdout).Encode(p.run())
		os.Exit(0)
	case "exec":
		tree := cgroup.Tree{Mount: os.Getenv("TREE_MOUNT"), Name: os.Getenv("TREE_NAME")}
		os.Setenv(helperEnv, "probe")
		self, _ := os.Executable()
		err := tree.Exec(cgroup.Kind(os.Getenv("TREE_KIND")), []string{self})
		fmt.Fprintln(os.Stderr, "exec:", err)
		os.Exit(3)
	case "apply":
		var hc helperConfig
		if err := json.Unmarshal([]byte(os.Getenv("FIREWALL")), &hc); err != nil {
			fmt.Fprintln(os.Stderr, "bad FIREWALL:", err)
			os.Exit(2)
		}
		if _, err := Apply(hc.config()); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println("ready")
		select {} // until SIGKILL: no Close, as in a crash
	default:
		fmt.Fprintln(os.Stderr, "unknown helper", os.Getenv(helperEnv))
		os.Exit(2)
	}
}

// helperConfig is a Config a helper process can be handed in JSON.
type helperConfig struct {
	Mark     uint32
	UIDs     map[string]string // uid → action
	TUN      string
	AllowLAN bool
	LAN      []netip.Prefix
}

func (h helperConfig) config() Config {
	cfg := Config{Mark: h.Mark}
	for uid, a := range h.UIDs {
		n, _ := strconv.ParseUint(uid, 10, 32)
		act, _ := ParseAction(a)
		cfg.Rules = append(cfg.Rules, Rule{UID(uint32(n)), act})
	}
	if h.TUN != "" {
		cfg.KillSwitch = &KillSwitch{TUN: h.TUN, AllowLAN: h.AllowLAN, LAN: h.LAN}
	}
	return cfg
}

const (
	own    = DefaultMark
	direct = DefaultMark + 1
	tunnel = DefaultMark + 2
)

// Addresses: the uplink's, its gateway, the LAN's, and "public" ones that
// nothing in the namespace answers (documentation ranges).
var (
	wanAddr4  = netip.MustParseAddr("192.0.2.2")
	wanAddr6  = netip.MustParseAddr("2001:db8:1::2")
	lanAddr4  = netip.MustParseAddr("192.168.50.2")
	lanPeer4  = netip.MustParseAddr("192.168.50.9")
	lanAddr6  = netip.MustParseAddr("fd00:50::2")
	lanPeer6  = netip.MustParseAddr("fd00:50::9")
	tunAddr4  = netip.MustParseAddr("10.77.77.1")
	tunAddr6  = netip.MustParseAddr("fd00:77::1")
	public4   = netip.MustParseAddr("198.51.100.7")
	public6   = netip.MustParseAddr("2001:db8:ffff::7")
	lanPrefix = []netip.Prefix{netip.MustParsePrefix("192.168.50.0/24"), netip.MustParsePrefix("fd00:50::/64")}
)

// topology builds, in the current network namespace, an uplink wan0
// (192.0.2.2/24, 2001:db8:1::2/64, default routes via .1 and ::1, as DHCP
// and RA leave them) and a LAN interface lan0 (192.168.50.2/24,
// fd00:50::2/64). Both are veths whose peers (wan0p, lan0p) swallow what
// arrives; ARP is off on them so that a packet leaves at once, with no
// neighbour to resolve, as on a point-to-point uplink.
func topology(t *testing.T) {
	t.Helper()
	for _, l := range []struct {
		name  string
		addrs []string
	}{
		{"wan0", []string{"192.0.2.2/24", "2001:db8:1::2/64"}},
		{"lan0", []string{"192.168.50.2/24", "fd00:50::2/64"}},
	} {
		veth := &vnl.Veth{LinkAttrs: vnl.LinkAttrs{Name: l.name}, PeerName: l.name + "p"}
		if err := vnl.LinkAdd(veth); err != nil {
			t.Fatalf("add veth %s: %v", l.name, err)
		}
		link, err := vnl.LinkByName(l.name)
		if err != nil {
			t.Fatal(err)
		}
		// NOARP also skips DAD, so IPv6 addresses are usable at once.
		if err := vnl.LinkSetARPOff(link); err != nil {
			t.Fatal(err)
		}
		for _, a := range l.addrs {
			addr, _ := vnl.ParseAddr(a)
			addr.Flags = unix.IFA_F_NODAD
			if err := vnl.AddrAdd(link, addr); err != nil {
				t.Fatalf("add %s to %s: %v", a, l.name, err)
			}
		}
		for _, n := range []string{l.name + "p", l.name} {
			ln, _ := vnl.LinkByName(n)
			if err := vnl.LinkSetUp(ln); err != nil {
				t.Fatal(err)
			}
		}
	}
	wan0, _ := vnl.LinkByName("wan0")
	for _, gw := range []string{"192.0.2.1", "2001:db8:1::1"} {
		ip := net.ParseIP(gw)
		dst := &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
		if ip.To4() == nil {
			dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
		}
		if err := vnl.RouteAdd(&vnl.Route{LinkIndex: wan0.Attrs().Index, Dst: dst, Gw: ip}); err != nil {
			t.Fatalf("default via %s: %v", gw, err)
		}
	}
}

// tun creates a real TUN named name, up, with 10.77.77.1 and fd00:77::1.
// Closing it (close) removes the device with its routes, as a crash of the
// process holding it does.
func tun(t *testing.T, name string) (close func()) {
	t.Helper()
	tt := &vnl.Tuntap{LinkAttrs: vnl.LinkAttrs{Name: name}, Mode: vnl.TUNTAP_MODE_TUN, Flags: vnl.TUNTAP_NO_PI, Queues: 1, NonPersist: true}
	if err := vnl.LinkAdd(tt); err != nil {
		netnstest.CannotRun(t, "cannot create a TUN: %v", err)
	}
	closed := false
	close = func() {
		if closed {
			return
		}
		closed = true
		for _, f := range tt.Fds {
			f.Close()
		}
		// The device goes once its last file is closed.
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			if _, err := vnl.LinkByName(name); err != nil {
				return
			}
		}
		t.Errorf("TUN %s still exists after its files were closed", name)
	}
	t.Cleanup(close)
	link, err := vnl.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := vnl.LinkSetUp(link); err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"10.77.77.1/32", "fd00:77::1/128"} {
		addr, _ := vnl.ParseAddr(a)
		addr.Flags = unix.IFA_F_NODAD
		if err := vnl.AddrAdd(link, addr); err != nil {
			t.Fatalf("add %s to %s: %v", a, name, err)
		}
	}
	return close
}

// routeVia adds `dst dev link [table table]`.
func routeVia(t *testing.T, dst string, link string, table int) {
	t.Helper()
	l, err := vnl.LinkByName(link)
	if err != nil {
		t.Fatal(err)
	}
	_, n, err := net.ParseCIDR(dst)
	if err != nil {
		t.Fatal(err)
	}
	r := &vnl.Route{LinkIndex: l.Attrs().Index, Dst: n, Table: table, Scope: vnl.SCOPE_LINK}
	if n.IP.To4() == nil {
		r.Scope = vnl.SCOPE_UNIVERSE
	}
	if err := vnl.RouteAdd(r); err != nil {
		t.Fatalf("route %s dev %s table %d: %v", dst, link, table, err)
	}
}

// markRule adds `[not] fwmark mark lookup table` at prio, both families.
func markRule(t *testing.T, prio int, invert bool, mark uint32, table int) {
	t.Helper()
	for _, fam := range []int{vnl.FAMILY_V4, vnl.FAMILY_V6} {
		r := vnl.NewRule()
		r.Family = fam
		r.Priority = prio
		r.Mark = mark
		mask := ^uint32(0)
		r.Mask = &mask
		r.Invert = invert
		r.Table = table
		if err := vnl.RuleAdd(r); err != nil {
			t.Fatalf("rule %d: %v", prio, err)
		}
	}
}

// --- probes ---

// probe is one connection attempt, run in this process (on the calling
// thread, so in its network namespace) or in a helper.
type probe struct {
	Net     string // "tcp" or "udp"
	Dst     netip.AddrPort
	Mark    uint32 // SO_MARK, 0 for none
	SrcPort uint16 // bind to this port (DHCP)
	Src     netip.Addr
	Device  string // SO_BINDTODEVICE
	Timeout time.Duration
}

type probeResult struct {
	// TCP: "connected", "refused", "pending" (no answer before Timeout:
	// the SYN left and nobody answered) or "error". UDP: "sent" or "error"
	// (the send failed).
	State string
	Errno string // of connect, or of send
	// UDP only: the error a receive reported after the send (the ICMP
	// error a reject sends back), "" for none before Timeout.
	RecvErrno string
	Elapsed   time.Duration
}

func errnoName(err error) string {
	var en unix.Errno
	if errors.As(err, &en) {
		return unix.ErrnoName(en)
	}
	if err != nil {
		return err.Error()
	}
	return ""
}

func (p probe) run() probeResult {
	if p.Timeout == 0 {
		p.Timeout = 300 * time.Millisecond
	}
	start := time.Now()
	r := p.do()
	r.Elapsed = time.Since(start)
	return r
}

func (p probe) do() probeResult {
	fam := unix.AF_INET
	if p.Dst.Addr().Is6() {
		fam = unix.AF_INET6
	}
	typ := unix.SOCK_STREAM
	if p.Net == "udp" {
		typ = unix.SOCK_DGRAM
	}
	fd, err := unix.Socket(fam, typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return probeResult{State: "error", Errno: "socket: " + errnoName(err)}
	}
	defer unix.Close(fd)
	if p.Mark != 0 {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, int(p.Mark)); err != nil {
			return probeResult{State: "error", Errno: "SO_MARK: " + errnoName(err)}
		}
	}
	if p.Device != "" {
		if err := unix.BindToDevice(fd, p.Device); err != nil {
			return probeResult{State: "error", Errno: "SO_BINDTODEVICE: " + errnoName(err)}
		}
	}
	if p.Net == "udp" {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_BROADCAST, 1)
	}
	if p.SrcPort != 0 || p.Src.IsValid() {
		src := p.Src
		if !src.IsValid() {
			src = netip.IPv4Unspecified()
			if fam == unix.AF_INET6 {
				src = netip.IPv6Unspecified()
			}
		}
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		if err := unix.Bind(fd, sockaddr(netip.AddrPortFrom(src, p.SrcPort), p.Device)); err != nil {
			return probeResult{State: "error", Errno: "bind: " + errnoName(err)}
		}
	}
	err = unix.Connect(fd, sockaddr(p.Dst, p.Device))
	if p.Net == "udp" {
		if err != nil {
			return probeResult{State: "error", Errno: "connect: " + errnoName(err)}
		}
		r := probeResult{State: "sent"}
		if _, err := unix.Write(fd, []byte("mpvpn probe")); err != nil {
			r = probeResult{State: "error", Errno: errnoName(err)}
		}
		// A reject's ICMP error arrives after the failed send, and a
		// connected socket reports it on its next receive.
		if readable(fd, p.Timeout) {
			_, err := unix.Read(fd, make([]byte, 64))
			r.RecvErrno = errnoName(err)
		}
		return r
	}
	switch {
	case err == nil:
		return probeResult{State: "connected"}
	case errors.Is(err, unix.EINPROGRESS):
	case errors.Is(err, unix.ECONNREFUSED):
		return probeResult{State: "refused", Errno: errnoName(err)}
	default:
		return probeResult{State: "error", Errno: errnoName(err)}
	}
	n, err := pollEINTR(fd, unix.POLLOUT, p.Timeout)
	if err != nil {
		return probeResult{State: "error", Errno: "poll: " + errnoName(err)}
	}
	if n == 0 {
		return probeResult{State: "pending"}
	}
	soerr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	if err != nil {
		return probeResult{State: "error", Errno: "SO_ERROR: " + errnoName(err)}
	}
	switch unix.Errno(soerr) {
	case 0:
		return probeResult{State: "connected"}
	case unix.ECONNREFUSED:
		return probeResult{State: "refused", Errno: "ECONNREFUSED"}
	}
	return probeResult{State: "error", Errno: unix.ErrnoName(unix.Errno(soerr))}
}

func readable(fd int, timeout time.Duration) bool {
	n, _ := pollEINTR(fd, unix.POLLIN, timeout)
	return n > 0
}

// pollEINTR polls fd for events until timeout, again after a signal
// (the Go runtime's preemption signals interrupt a raw poll(2) with EINTR).
func pollEINTR(fd int, events int16, timeout time.Duration) (int, error) {
	end := time.Now().Add(timeout)
	for {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: events}}
		n, err := unix.Poll(pfd, max(int(time.Until(end).Milliseconds()), 0))
		if err == unix.EINTR && time.Now().Before(end) {
			continue
		}
		return n, err
	}
}

func sockaddr(ap netip.AddrPort, dev string) unix.Sockaddr {
	if ap.Addr().Is4() {
		return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	}
	sa := &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
	if ap.Addr().IsLinkLocalUnicast() || ap.Addr().IsLinkLocalMulticast() {
		if l, err := net.InterfaceByName(dev); err == nil {
			sa.ZoneId = uint32(l.Index)
		}
	}
	return sa
}

// helperBinary is a copy of the test binary that any uid may run: go test
// builds it in a directory only root can enter.
func helperBinary(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for d := dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	src, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	bin := filepath.Join(dir, "helper")
	dst, err := os.OpenFile(bin, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	return bin
}

// runProbeAs runs p in a helper process with uid (and gid) uid, started
// from the calling thread, so in its network namespace.
func runProbeAs(t *testing.T, bin string, uid uint32, p probe) probeResult {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), helperEnv+"=probe", "PROBE="+mustJSON(p))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	return runHelper(t, cmd)
}

// runProbeExec runs p in a helper process that first moves itself into
// the cgroup of kind k of tree, as `mpvpn exec --<kind>` would.
func runProbeExec(t *testing.T, bin string, tree cgroup.Tree, k cgroup.Kind, p probe) probeResult {
	t.Helper()
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), helperEnv+"=exec", "PROBE="+mustJSON(p),
		"TREE_MOUNT="+tree.Mount, "TREE_NAME="+tree.Name, "TREE_KIND="+string(k))
	return runHelper(t, cmd)
}

func runHelper(t *testing.T, cmd *exec.Cmd) probeResult {
	t.Helper()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helper: %v: %s", err, stderr.Bytes())
	}
	var r probeResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("helper printed %q: %v", out, err)
	}
	return r
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return string(b)
}

// --- capture ---

// packet is what a capture saw leave an interface.
type packet struct {
	Src, Dst     netip.Addr
	Proto        uint8
	Sport, Dport uint16
	ICMPType     uint8
	HopLimit     uint8
}

func (p packet) String() string {
	return fmt.Sprintf("%s:%d > %s:%d proto %d type %d hlim %d", p.Src, p.Sport, p.Dst, p.Dport, p.Proto, p.ICMPType, p.HopLimit)
}

// capture records the IP packets sent out of one interface, from an
// AF_PACKET socket: it sees what the driver is handed, after every
// netfilter hook, so it is a witness independent of the rules under test.
type capture struct {
	fd   int
	mu   sync.Mutex
	pkts []packet
	stop chan struct{}
	done chan struct{}
}

func startCapture(t *testing.T, ifname string) *capture {
	t.Helper()
	l, err := vnl.LinkByName(ifname)
	if err != nil {
		t.Fatal(err)
	}
	proto := int(htons(unix.ETH_P_ALL))
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		t.Fatalf("AF_PACKET socket: %v", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: l.Attrs().Index}); err != nil {
		unix.Close(fd)
		t.Fatalf("bind AF_PACKET to %s: %v", ifname, err)
	}
	tv := unix.NsecToTimeval((20 * time.Millisecond).Nanoseconds())
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	c := &capture{fd: fd, stop: make(chan struct{}), done: make(chan struct{})}
	go c.loop()
	t.Cleanup(c.close)
	return c
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (c *capture) loop() {
	defer close(c.done)
	buf := make([]byte, 65536)
	for {
		select {
		case <-c.stop:
			return
		default:
		}
		n, from, err := unix.Recvfrom(c.fd, buf, 0)
		if err != nil {
			continue
		}
		ll, ok := from.(*unix.SockaddrLinklayer)
		if !ok || ll.Pkttype != unix.PACKET_OUTGOING {
			continue
		}
		if p, ok := parsePacket(buf[:n]); ok {
			c.mu.Lock()
			c.pkts = append(c.pkts, p)
			c.mu.Unlock()
		}
	}
}

func (c *capture) close() {
	select {
	case <-c.stop:
		return
	default:
	}
	close(c.stop)
	<-c.done
	unix.Close(c.fd)
}

// packets returns what was seen so far, after a moment for the last
// packets to reach the socket.
func (c *capture) packets() []packet {
	time.Sleep(50 * time.Millisecond)
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]packet(nil), c.pkts...)
}

// to returns the packets to dst (any port when dport is 0).
func (c *capture) to(dst netip.Addr, dport uint16) []packet {
	var out []packet
	for _, p := range c.packets() {
		if p.Dst == dst && (dport == 0 || p.Dport == dport) {
			out = append(out, p)
		}
	}
	return out
}

func parsePacket(b []byte) (packet, bool) {
	var p packet
	var l4 []byte
	switch {
	case len(b) >= 20 && b[0]>>4 == 4:
		ihl := int(b[0]&0xf) * 4
		if len(b) < ihl {
			return p, false
		}
		p.Src, _ = netip.AddrFromSlice(b[12:16])
		p.Dst, _ = netip.AddrFromSlice(b[16:20])
		p.Proto = b[9]
		p.HopLimit = b[8]
		l4 = b[ihl:]
	case len(b) >= 40 && b[0]>>4 == 6:
		p.Src, _ = netip.AddrFromSlice(b[8:24])
		p.Dst, _ = netip.AddrFromSlice(b[24:40])
		p.HopLimit = b[7]
		next, rest := b[6], b[40:]
		// Skip hop-by-hop options (MLD carries a router alert).
		for next == 0 && len(rest) >= 8 {
			hl := (int(rest[1]) + 1) * 8
			if len(rest) < hl {
				return p, false
			}
			next, rest = rest[0], rest[hl:]
		}
		p.Proto = next
		l4 = rest
	default:
		return p, false
	}
	switch p.Proto {
	case unix.IPPROTO_TCP, unix.IPPROTO_UDP:
		if len(l4) >= 4 {
			p.Sport = binary.BigEndian.Uint16(l4[0:2])
			p.Dport = binary.BigEndian.Uint16(l4[2:4])
		}
	case unix.IPPROTO_ICMP, unix.IPPROTO_ICMPV6:
		if len(l4) >= 1 {
			p.ICMPType = l4[0]
		}
	}
	return p, true
}

// --- nftables, seen from outside ---

// nft runs the nft command in the calling thread's network namespace.
func nft(t *testing.T, args ...string) string {
	t.Helper()
	if _, err := exec.LookPath("nft"); err != nil {
		netnstest.CannotRun(t, "the tests inspect rules with nft, which is not installed: %v", err)
	}
	out, err := exec.Command("nft", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("nft %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// ruleset is `nft -s list ruleset` (no counter values).
func ruleset(t *testing.T) string {
	t.Helper()
	return nft(t, "-s", "list", "ruleset")
}

// counters maps each commented rule of a table to its counter's packets.
func counters(t *testing.T, tableName string) map[string]uint64 {
	t.Helper()
	var doc struct {
		Nftables []struct {
			Rule *struct {
				Comment string            `json:"comment"`
				Expr    []json.RawMessage `json:"expr"`
			} `json:"rule"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(nft(t, "-j", "list", "table", "inet", tableName)), &doc); err != nil {
		t.Fatal(err)
	}
	out := map[string]uint64{}
	for _, e := range doc.Nftables {
		if e.Rule == nil {
			continue
		}
		for _, x := range e.Rule.Expr {
			var c struct {
				Counter *struct{ Packets uint64 } `json:"counter"`
			}
			if json.Unmarshal(x, &c) == nil && c.Counter != nil {
				out[e.Rule.Comment] += c.Counter.Packets
			}
		}
	}
	return out
}

// generation is the nftables ruleset generation of the calling thread's
// namespace: the kernel adds one for every committed transaction.
func generation(t *testing.T) uint32 {
	t.Helper()
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msgs, err := c.Execute(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETGEN), Flags: netlink.Request},
		Data:   []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, 0},
	})
	if err != nil || len(msgs) != 1 || len(msgs[0].Data) < 4 {
		t.Fatalf("NFT_MSG_GETGEN: %v (%d messages)", err, len(msgs))
	}
	ad, err := netlink.NewAttributeDecoder(msgs[0].Data[4:])
	if err != nil {
		t.Fatal(err)
	}
	ad.ByteOrder = binary.BigEndian
	for ad.Next() {
		if ad.Type() == unix.NFTA_GEN_ID {
			return ad.Uint32()
		}
	}
	t.Fatalf("no NFTA_GEN_ID in %x", msgs[0].Data)
	return 0
}
