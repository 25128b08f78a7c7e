// Package e2e runs the real mpvpn binaries on the emulated network of
// package topo: a client with two uplinks (one behind CGNAT, both ISPs
// enforcing BCP 38), the concentrator, and an "internet" host with real
// servers (python3's HTTP server, iperf3, flowcheck). Every test builds its
// own namespaces and topo deletes them, also when the test fails.
package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/mpvpn/mpvpn/internal/netnstest"

	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// bin holds the binaries under test, built once by TestMain.
var bin struct {
	mpvpn, flowcheck, hsflood, newflows, idleflows string
}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "mpvpn-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin.mpvpn = filepath.Join(dir, "mpvpn")
	bin.flowcheck = filepath.Join(dir, "flowcheck")
	bin.hsflood = filepath.Join(dir, "hsflood")
	bin.newflows = filepath.Join(dir, "newflows")
	bin.idleflows = filepath.Join(dir, "bench-idleflows")
	for out, pkg := range map[string]string{
		bin.mpvpn:     "github.com/mpvpn/mpvpn/cmd/mpvpn",
		bin.flowcheck: "github.com/mpvpn/mpvpn/test/netns/cmd/flowcheck",
		bin.hsflood:   "github.com/mpvpn/mpvpn/test/netns/cmd/hsflood",
		bin.newflows:  "github.com/mpvpn/mpvpn/test/netns/cmd/newflows",
		bin.idleflows: "github.com/mpvpn/mpvpn/test/netns/cmd/bench-idleflows",
	} {
		cmd := exec.Command("go", "build", "-o", out, pkg)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "building", pkg, ":", err)
			os.RemoveAll(dir)
			os.Exit(1)
		}
	}
	// goleak's check ends in os.Exit, so no defer of TestMain's would run:
	// the binaries are removed in its Cleanup, after the check.
	goleak.VerifyTestMain(m, goleak.Cleanup(func(code int) {
		os.RemoveAll(dir)
		os.Exit(code)
	}))
}

// needRoot fails (under CI) or skips a test that cannot build namespaces.
func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	netnstest.CannotRun(t, "needs root to build network namespaces")
}

// env is one topology with an mpvpn server and client running on it.
type env struct {
	tp        *topo.Topology
	dir       string // keys, served files
	serverPub string
	clientPub string
	server    *topo.Proc
	srvArgs   []string // how server was started, for a restart
	client    *topo.Proc
	www       string // directory served on DestAddr:80
	http      *topo.Proc
	uplinks   []string // see options.uplinks
	sockDir   string   // short: a unix socket path has at most 107 bytes
	// clientWrap is put before the client's command line (a shell that
	// mounts cgroup2 first); noRoute leaves out startClient's --route
	// DestNet (for --route-all and rule-only clients).
	clientWrap []string
	noRoute    bool
	// serverAddr is the concentrator's address the client dials (zero:
	// topo.ConcAddr:7100).
	serverAddr netip.AddrPort
}

// options for newEnv.
type options struct {
	topo       topo.Options
	serverArgs []string
	clientArgs []string
	noClient   bool // start only the server
	// listen is the server's --listen ("": 0.0.0.0:7100).
	listen string
	// uplinks are the client's --uplink values; nil: wan0 and wan1,
	// empty (non-nil): none, so the client discovers them.
	uplinks []string
}

// newEnv builds the topology and starts the concentrator, the HTTP server
// on the internet host and the client.
func newEnv(t *testing.T, o options) *env {
	t.Helper()
	needRoot(t)
	e := &env{tp: topo.New(t, o.topo), dir: t.TempDir()}
	var err error
	if e.sockDir, err = os.MkdirTemp("", "mv"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(e.sockDir) })
	serverKey := filepath.Join(e.dir, "server.key")
	clientKey := filepath.Join(e.dir, "client.key")
	e.keygen(t, serverKey)
	e.keygen(t, clientKey)
	e.serverPub = e.pubkey(t, serverKey)
	e.clientPub = e.pubkey(t, clientKey)

	e.www = filepath.Join(e.dir, "www")
	if err := os.MkdirAll(e.www, 0o755); err != nil {
		t.Fatal(err)
	}
	e.writeFile(t, "index.html", []byte("hello from the internet\n"))
	e.http = e.tp.Start(e.tp.Inet, "http", "python3", "-c", httpServer, e.www, topo.DestAddr.String(), "80")
	e.http.WaitListen(netip.AddrPortFrom(topo.DestAddr, 80).String())

	// Status sockets in the test's own directory: tests never meet each
	// other's (or a real mpvpn's) in /run/mpvpn.
	listen := o.listen
	if listen == "" {
		listen = "0.0.0.0:7100"
	}
	args := append([]string{bin.mpvpn, "server", "--listen", listen, "--key", serverKey, "--peer", e.clientPub, "--log-level", "debug",
		"--control", e.serverSocket(), "--dns-upstream", netip.AddrPortFrom(topo.DestAddr, 53).String()}, o.serverArgs...)
	e.srvArgs = args
	e.server = e.tp.Start(e.tp.Conc, "server", args...)
	e.server.WaitListen(listen)
	e.waitHorizon()
	if !o.noClient {
		e.uplinks = o.uplinks
		e.startClient(t, clientKey, o.clientArgs...)
	}
	return e
}

// serverHorizon is how long after its start the concentrator refuses
// every handshake stamp, its own clock included (tunnel.ServerConfig
// FutureSkew), so that nothing recorded before a restart is accepted after
// it. The mpvpn client learns the horizon from its probe replies; the
// tests' in-process tunnel clients stamp with this host's clock, so they
// must not dial before it has passed.
const serverHorizon = time.Second

// waitHorizon returns once the horizon of the server that has just
// started listening has passed (it was set before the listener opened).
func (e *env) waitHorizon() {
	time.Sleep(serverHorizon + 50*time.Millisecond)
}

func (e *env) keygen(t *testing.T, path string) {
	t.Helper()
	out, err := exec.Command(bin.mpvpn, "keygen").Output()
	if err != nil {
		t.Fatalf("mpvpn keygen: %v", err)
	}
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
}

func (e *env) pubkey(t *testing.T, path string) string {
	t.Helper()
	cmd := exec.Command(bin.mpvpn, "pubkey")
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd.Stdin = f
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("mpvpn pubkey: %v", err)
	}
	return strings.TrimSpace(string(out))
}

// startClient runs `mpvpn client` on both uplinks with the documentation
// network routed into it (unless e.noRoute), through e.clientWrap if set,
// and waits until its routes are in place.
func (e *env) startClient(t *testing.T, key string, extra ...string) {
	t.Helper()
	server := e.serverAddr
	if !server.IsValid() {
		server = netip.AddrPortFrom(topo.ConcAddr, 7100)
	}
	args := append(append([]string(nil), e.clientWrap...), bin.mpvpn, "client",
		"--server", server.String(),
		"--server-key", e.serverPub, "--key", key,
		"--log-level", "debug", "--control", e.clientSocket(), "--journal", e.clientJournal(),
		"--cgroup", e.cgroupName())
	if !e.noRoute {
		args = append(args, "--route", topo.DestNet.String())
	}
	uplinks := e.uplinks
	if uplinks == nil {
		uplinks = []string{"wan0", "wan1"}
	}
	for _, u := range uplinks {
		args = append(args, "--uplink", u)
	}
	args = append(args, extra...)
	e.client = e.tp.Start(e.tp.Client, "client", args...)
	e.waitLog(t, e.client, "client up", 15*time.Second)
}

func (e *env) clientSocket() string { return filepath.Join(e.sockDir, "client.sock") }

// cgroupName is the client's top-level cgroup for `mpvpn exec`: the
// cgroup tree is the host's, not the namespace's, so each test has its own
// (removed by the client when it stops).
func (e *env) cgroupName() string { return "mpvpn-test-" + e.tp.Prefix }

// clientJournal is the client's host-state journal, in the test's own
// directory like its socket (never /run/mpvpn on the host).
func (e *env) clientJournal() string { return filepath.Join(e.sockDir, "client.journal") }
func (e *env) serverSocket() string  { return filepath.Join(e.sockDir, "server.sock") }

// waitLog waits for a line containing s in p's log.
func (e *env) waitLog(t *testing.T, p *topo.Proc, s string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if strings.Contains(p.Log(), s) {
			return
		}
		select {
		case <-p.Done():
			t.Fatalf("%s exited before logging %q:\n%s", p.Name, s, p.Log())
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatalf("%s did not log %q within %v:\n%s", p.Name, s, timeout, p.Log())
}

// writeFile puts a file on the HTTP server and returns its SHA-256.
func (e *env) writeFile(t *testing.T, name string, data []byte) string {
	t.Helper()
	if err := os.WriteFile(filepath.Join(e.www, name), data, 0o644); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}

// randomFile writes size pseudo-random bytes (a fixed seed per name: the
// test is repeatable, the data still incompressible).
func (e *env) randomFile(t *testing.T, name string, size int) string {
	t.Helper()
	b := make([]byte, size)
	seed := sha256.Sum256([]byte(name))
	for off := 0; off < size; off += len(seed) {
		seed = sha256.Sum256(seed[:])
		copy(b[off:], seed[:])
	}
	return e.writeFile(t, name, b)
}

// curl runs curl in the client namespace and returns its exit code and
// output (stdout then stderr). -sS: quiet, errors shown.
func (e *env) curl(t *testing.T, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", e.tp.Client, "curl", "-sS"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err == nil {
		return 0, string(out)
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), string(out)
	}
	t.Fatalf("curl %v: %v", args, err)
	return -1, ""
}

// download fetches name from the web server through the tunnel with curl,
// fails the test unless it arrives whole with SHA-256 sum, and returns the
// uplinks' counters around the transfer. maxTime is curl's -m.
func (e *env) download(t *testing.T, name, sum, maxTime string) (before, after uplinkBytes) {
	t.Helper()
	out := filepath.Join(t.TempDir(), name)
	before = e.uplinkBytes()
	code, msg := e.curl(t, "-m", maxTime, "-o", out, destURL(name))
	after = e.uplinkBytes()
	if code != 0 {
		t.Fatalf("curl exit %d: %s", code, msg)
	}
	if got := fileSum(t, out); got != sum {
		t.Fatalf("downloaded %s: sha256 %s, want %s", name, got, sum)
	}
	return before, after
}

// uplinkBytes is what each client uplink has received and sent so far.
type uplinkBytes struct{ rx, tx [2]uint64 }

func (e *env) uplinkBytes() uplinkBytes {
	var b uplinkBytes
	for i, u := range []topo.Uplink{topo.A, topo.B} {
		b.rx[i], b.tx[i] = e.tp.IfaceBytes(e.tp.Client, e.tp.Uplinks[u].Iface)
	}
	return b
}

// shares returns each uplink's fraction of the bytes moved in one direction
// between two readings.
func shares(before, after [2]uint64) (total uint64, share [2]float64) {
	var d [2]uint64
	for i := range d {
		d[i] = after[i] - before[i]
		total += d[i]
	}
	if total == 0 {
		return 0, share
	}
	for i := range d {
		share[i] = float64(d[i]) / float64(total)
	}
	return total, share
}

// httpServer is python3's http.server with two additions the tests need:
// it binds one address (argv[2]:argv[3]) and answers a POST with the
// SHA-256 of the request body, so uploads are checked end to end. Every
// request is logged with the peer's address, which is how the tests see
// the source address the destination sees.
const httpServer = `
import hashlib, http.server, os, sys
os.chdir(sys.argv[1])
class H(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        h = hashlib.sha256()
        while n > 0:
            b = self.rfile.read(min(n, 1 << 20))
            if not b:
                break
            h.update(b)
            n -= len(b)
        body = (h.hexdigest() + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer.allow_reuse_address = True
# A burst of new flows must not overflow the listen backlog (5 by default).
http.server.ThreadingHTTPServer.request_queue_size = 1024
s = http.server.ThreadingHTTPServer((sys.argv[2], int(sys.argv[3])), H)
print("serving", flush=True)
s.serve_forever()
`
