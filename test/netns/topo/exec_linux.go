package topo

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mpvpn/mpvpn/test/netns/internal/netns"
)

// Cmd returns a command that runs args inside namespace ns (`ip netns exec`,
// which execs, so the command's PID is the process's).
func (tp *Topology) Cmd(ns string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
}

// Run runs args inside ns and returns stdout; the error includes stderr.
// Use it for commands expected to fail.
func (tp *Topology) Run(ns string, args ...string) (string, error) {
	return run(tp.Cmd(ns, args...), nil)
}

// Exec runs args inside ns and fails the test if the command fails.
func (tp *Topology) Exec(ns string, args ...string) {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	if _, err := tp.Run(ns, args...); err != nil {
		tp.fatalf("%v", err)
	}
}

// Output runs args inside ns and returns stdout, failing the test if the
// command fails.
func (tp *Topology) Output(ns string, args ...string) string {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	out, err := tp.Run(ns, args...)
	if err != nil {
		tp.fatalf("%v", err)
	}
	return out
}

// Proc is a background process started with Start.
type Proc struct {
	Name    string
	NS      string
	Cmd     *exec.Cmd
	LogPath string // stdout and stderr

	tp   *Topology
	done chan struct{}
	err  error // valid once done is closed
}

// Start runs args in the background inside ns, output to <RunDir>/<name>.log.
// The process gets its own process group; Close (or Stop) kills that group
// by id, and a failing test shows the log. It also dies if the test binary
// does (PR_SET_PDEATHSIG).
func (tp *Topology) Start(ns, name string, args ...string) *Proc {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	p, err := tp.start(ns, name, args...)
	if err != nil {
		tp.fatalf("start %s: %v", name, err)
	}
	return p
}

func (tp *Topology) start(ns, name string, args ...string) (*Proc, error) {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	if tp.closed {
		return nil, errors.New("topology closed")
	}
	logPath := filepath.Join(tp.RunDir, name+".log")
	for i := 2; ; i++ {
		if _, err := os.Stat(logPath); errors.Is(err, os.ErrNotExist) {
			break
		}
		logPath = filepath.Join(tp.RunDir, name+"-"+strconv.Itoa(i)+".log")
	}
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := tp.Cmd(ns, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Pdeathsig fires when the thread that forked exits; Go only ends
	// threads of goroutines that exit while locked, which the harness's
	// netns.Do avoids unless it cannot switch a thread back.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &Proc{Name: name, NS: ns, Cmd: cmd, LogPath: logPath, tp: tp, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	tp.procs = append(tp.procs, p)
	tp.log.Info("started", "name", name, "ns", ns, "pid", cmd.Process.Pid, "args", strings.Join(args, " "))
	return p, nil
}

// Pid is the process id.
func (p *Proc) Pid() int { return p.Cmd.Process.Pid }

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited, and how.
func (p *Proc) Exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

// Signal sends sig to the process group.
func (p *Proc) Signal(sig syscall.Signal) error {
	return syscall.Kill(-p.Pid(), sig)
}

// Wait waits up to timeout for the process to exit by itself.
func (p *Proc) Wait(timeout time.Duration) error {
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		return fmt.Errorf("%s: still running after %v", p.Name, timeout)
	}
}

// Stop sends SIGTERM to the process group, and SIGKILL if it has not exited
// after 5 s. It returns how the process ended.
func (p *Proc) Stop() error {
	select {
	case <-p.done:
		return p.err
	default:
	}
	p.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.Signal(syscall.SIGKILL)
		<-p.done
	}
	return p.err
}

// Log returns everything the process wrote so far.
func (p *Proc) Log() string {
	b, _ := os.ReadFile(p.LogPath)
	return string(b)
}

func (p *Proc) logTail(max int) string {
	s := p.Log()
	if len(s) > max {
		s = "[...]\n" + s[len(s)-max:]
	}
	return s
}

func (p *Proc) exitStatus() string {
	if done, err := p.Exited(); !done {
		return "running"
	} else if err != nil {
		return err.Error()
	}
	return "exited 0"
}

// WaitListen waits until something in p's namespace listens on addrport
// (TCP), failing the test at once if p exits first and after timeout.
func (p *Proc) WaitListen(addrport string) {
	if p.tp.tb != nil {
		p.tp.tb.Helper()
	}
	if err := waitListen(p.NS, addrport, listenWait, p.done); err != nil {
		p.tp.fatalf("%s: %v\n--- log ---\n%s", p.Name, err, p.logTail(16<<10))
	}
}

// WaitListen waits until something in ns listens on addrport (TCP), for up
// to listenWait, polling `ss -ltn` (a dial would be a connection the server sees).
func (tp *Topology) WaitListen(ns, addrport string) {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	if err := waitListen(ns, addrport, listenWait, nil); err != nil {
		tp.fatalf("%v", err)
	}
}

func waitListen(ns, addrport string, timeout time.Duration, exited <-chan struct{}) error {
	want, err := netip.ParseAddrPort(addrport)
	if err != nil {
		return fmt.Errorf("wait listen: %w", err)
	}
	deadline := time.Now().Add(timeout)
	for {
		out, err := run(exec.Command("ip", "netns", "exec", ns, "ss", "-Hltn"), nil)
		if err != nil {
			return err
		}
		if listening(out, want) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nothing listens on %s in %s after %v", addrport, ns, timeout)
		}
		select {
		case <-exited:
			return fmt.Errorf("exited before listening on %s", addrport)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// listening reports whether `ss -Hltn` output has a listener that accepts
// connections to want (its address or a wildcard).
func listening(ssOut string, want netip.AddrPort) bool {
	sc := bufio.NewScanner(strings.NewReader(ssOut))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 {
			continue
		}
		local := f[3]
		i := strings.LastIndexByte(local, ':')
		if i < 0 || local[i+1:] != strconv.Itoa(int(want.Port())) {
			continue
		}
		host := strings.Trim(local[:i], "[]")
		if j := strings.IndexByte(host, '%'); j >= 0 { // 0.0.0.0%lo
			host = host[:j]
		}
		switch host {
		case "*", "0.0.0.0", "::":
			return true
		}
		if a, err := netip.ParseAddr(host); err == nil && a.Unmap() == want.Addr().Unmap() {
			return true
		}
	}
	return false
}

// Do runs fn on a thread inside namespace ns; sockets fn creates stay
// there. See Listen and Dial for the common cases.
func (tp *Topology) Do(ns string, fn func() error) error {
	return netns.Do(ns, fn)
}

// Listen opens a listener inside ns (in this process, so the test can
// Accept and look at RemoteAddr), failing the test on error. It is closed
// when the test ends. Go ≥ 1.24 listens with MPTCP by default; plain TCP
// clients fall back transparently.
func (tp *Topology) Listen(ns, network, address string) net.Listener {
	if tp.tb != nil {
		tp.tb.Helper()
	}
	ln, err := Listen(ns, network, address)
	if err != nil {
		tp.fatalf("%v", err)
	}
	if tp.tb != nil {
		tp.tb.Cleanup(func() { ln.Close() })
	}
	return ln
}

// Listen opens a listener inside ns.
func Listen(ns, network, address string) (net.Listener, error) {
	var ln net.Listener
	err := netns.Do(ns, func() error {
		var err error
		ln, err = net.Listen(network, address)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen %s %s in %s: %w", network, address, ns, err)
	}
	return ln, nil
}

// Dial connects from inside ns with d (nil = defaults); the socket is
// created in ns, the rest of the dial runs as usual.
func Dial(ctx context.Context, ns string, d *net.Dialer, network, address string) (net.Conn, error) {
	if d == nil {
		d = &net.Dialer{}
	}
	var c net.Conn
	err := netns.Do(ns, func() error {
		var err error
		c, err = d.DialContext(ctx, network, address)
		return err
	})
	return c, err
}

// DialUplink connects from the client to address over uplink u: the socket
// is bound to u's address and interface (SO_BINDTODEVICE), as an MPTCP
// subflow on that uplink would be.
func (tp *Topology) DialUplink(ctx context.Context, u Uplink, network, address string) (net.Conn, error) {
	ul := tp.Uplinks[u]
	d := &net.Dialer{
		LocalAddr: &net.TCPAddr{IP: ul.Addr.AsSlice()},
		Control:   BindToDevice(ul.Iface),
	}
	if strings.HasPrefix(network, "udp") {
		d.LocalAddr = &net.UDPAddr{IP: ul.Addr.AsSlice()}
	}
	return Dial(ctx, tp.Client, d, network, address)
}

// BindToDevice is a net.Dialer/ListenConfig Control function that pins the
// socket to an interface (SO_BINDTODEVICE).
func BindToDevice(ifname string) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE, ifname)
		})
		return errors.Join(err, serr)
	}
}

// listenWait bounds WaitListen. Generous: python3 starting its HTTP server
// on a loaded 2-core machine was seen to take more than 15 s.
const listenWait = 45 * time.Second

// IperfRate is the receiver's rate in bit/s of an `iperf3 -J` run's
// output; an error when the output is not iperf3's JSON or reports an
// error of its own.
func IperfRate(out string) (float64, error) {
	var r struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return 0, fmt.Errorf("iperf3 output: %w", err)
	}
	if r.Error != "" {
		return 0, fmt.Errorf("iperf3: %s", r.Error)
	}
	return r.End.SumReceived.BitsPerSecond, nil
}
