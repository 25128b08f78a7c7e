package e2e

// Security properties of the concentrator across real namespaces, with the
// real binary (SECURITY.md §6, tests 2, 3, 5 and 10): unauthenticated
// peers get nothing and cause no dial, a recorded first message cannot be
// replayed into a second dial, and the destination policy refuses host-
// scoped and private destinations before any SYN leaves the concentrator.
// tunnel/server_test.go checks the same properties in-process; here the
// concentrator is `mpvpn server` and the SYNs are counted by nftables.

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/blake2s"

	"github.com/mpvpn/mpvpn/test/netns/topo"
	"github.com/mpvpn/mpvpn/tunnel"
)

// concListen is where newEnv's server listens.
var concListen = netip.AddrPortFrom(topo.ConcAddr, 7100)

// synCounters installs, in the concentrator's namespace, nftables counters
// of the TCP connections the concentrator opens: "syn_all" counts every SYN it
// sends (a SYN, not a SYN-ACK: only its own dials), "syn_inet" those to the
// internet host's network.
type synCounters struct {
	tp *topo.Topology
	ns string
}

const nftTable = "mpvpnsec"

func newSYNCounters(t *testing.T, e *env) *synCounters {
	t.Helper()
	return newSYNCountersIn(t, e.tp, e.tp.Conc)
}

// newSYNCountersIn installs the counters in namespace ns (a fleet's
// member).
func newSYNCountersIn(t *testing.T, tp *topo.Topology, ns string) *synCounters {
	t.Helper()
	rules := fmt.Sprintf(`table inet %[1]s {
	counter syn_all {}
	counter syn_inet {}
	chain out {
		type filter hook output priority 0; policy accept;
		tcp flags & (syn | ack) == syn counter name "syn_all"
		ip daddr %[2]s tcp flags & (syn | ack) == syn counter name "syn_inet"
	}
}
`, nftTable, topo.DestNet)
	cmd := tp.Cmd(ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v\n%s", err, out)
	}
	return &synCounters{tp: tp, ns: ns}
}

var packetsRE = regexp.MustCompile(`packets (\d+)`)

func (s *synCounters) get(t *testing.T, name string) int {
	t.Helper()
	out := s.tp.Output(s.ns, "nft", "list", "counter", "inet", nftTable, name)
	m := packetsRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("nft counter %s: no packet count in %q", name, out)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// keys reads the keys newEnv generated.
func (e *env) keys(t *testing.T) (client tunnel.PrivateKey, server tunnel.PublicKey) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(e.dir, "client.key"))
	if err != nil {
		t.Fatal(err)
	}
	if client, err = tunnel.ParsePrivateKey(string(b)); err != nil {
		t.Fatal(err)
	}
	if server, err = tunnel.ParsePublicKey(e.serverPub); err != nil {
		t.Fatal(err)
	}
	return client, server
}

func newTunnelClient(t *testing.T, server netip.AddrPort, key tunnel.PrivateKey, serverKey tunnel.PublicKey, timeout time.Duration) *tunnel.Client {
	t.Helper()
	c, err := tunnel.NewClient(tunnel.ClientConfig{Server: server, ServerKey: serverKey, Key: key, HandshakeTimeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// dialTunnel runs the in-process tunnel client inside namespace ns: its
// socket to the concentrator is created there.
func dialTunnel(tp *topo.Topology, ns string, c *tunnel.Client, dst netip.AddrPort) (*tunnel.Conn, error) {
	var conn *tunnel.Conn
	err := tp.Do(ns, func() error {
		var err error
		conn, err = c.DialTCP(context.Background(), dst)
		return err
	})
	return conn, err
}

// originalGet fetches index.html from the internet host through cl, from
// the client namespace: the flow whose handshake a test records.
func originalGet(t *testing.T, tp *topo.Topology, cl *tunnel.Client) {
	t.Helper()
	conn, err := dialTunnel(tp, tp.Client, cl, netip.AddrPortFrom(topo.DestAddr, 80))
	if err != nil {
		t.Fatalf("the original flow: %v", err)
	}
	resp, err := httpGet(conn, topo.DestAddr.String(), "/index.html")
	conn.Close()
	if err != nil || !strings.Contains(resp, "hello from the internet") {
		t.Fatalf("the original flow: GET returned %q, %v", resp, err)
	}
}

// httpGet sends a minimal HTTP/1.0 GET over c and returns the response.
func httpGet(c net.Conn, host, path string) (string, error) {
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n", path, host); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	return string(b), err
}

// recorder is a TCP relay inside a namespace that records what the client
// sends before the first byte of the answer: exactly msg1, since a tunnel
// client sends nothing more until it has the verdict. With upstream
// invalid it forwards nothing and closes once the client gives up.
type recorder struct {
	ln       net.Listener
	upstream netip.AddrPort
	ns       string
	wg       sync.WaitGroup
	mu       sync.Mutex
	first    []byte // client → server bytes before any answer
	all      []byte // client → server bytes, the first allMax of them
	done     chan struct{}
}

func newRecorder(t *testing.T, tp *topo.Topology, ns string, upstream netip.AddrPort) *recorder {
	t.Helper()
	r := &recorder{ln: tp.Listen(ns, "tcp", "127.0.0.1:0"), upstream: upstream, ns: ns, done: make(chan struct{})}
	r.wg.Add(1)
	go r.serveOne()
	t.Cleanup(func() { r.ln.Close(); r.wg.Wait() })
	return r
}

func (r *recorder) addr() netip.AddrPort {
	return r.ln.Addr().(*net.TCPAddr).AddrPort()
}

// serveOne relays the first connection only.
func (r *recorder) serveOne() {
	defer r.wg.Done()
	defer close(r.done)
	c, err := r.ln.Accept()
	if err != nil {
		return
	}
	defer c.Close()
	var answered atomic.Bool
	record := func(b []byte) {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.all = append(r.all, b[:min(len(b), allMax-len(r.all))]...)
		if !answered.Load() {
			r.first = append(r.first, b...)
		}
	}
	if !r.upstream.IsValid() {
		buf := make([]byte, 4096)
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		for {
			n, err := c.Read(buf)
			record(buf[:n])
			if err != nil {
				return
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	up, err := topo.Dial(ctx, r.ns, nil, "tcp", r.upstream.String())
	cancel()
	if err != nil {
		return
	}
	defer up.Close()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 32<<10)
		for {
			n, err := up.Read(buf)
			if n > 0 {
				answered.Store(true)
				if _, werr := c.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		c.(*net.TCPConn).CloseWrite()
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			record(buf[:n])
			if _, werr := up.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	up.(*net.TCPConn).CloseWrite()
	wg.Wait()
}

// allMax is how much of what the client sent a recorder keeps: a msg1
// and a request frame.
const allMax = 148 + 38

// recordedAll is what the client sent, up to allMax bytes, once the
// relayed connection has ended: msg1 and what followed the answer.
func (r *recorder) recordedAll(t *testing.T) []byte {
	t.Helper()
	r.recorded(t)
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]byte(nil), r.all...)
}

func (r *recorder) recorded(t *testing.T) []byte {
	t.Helper()
	select {
	case <-r.done:
	case <-time.After(30 * time.Second):
		t.Fatal("recorder: the relayed connection did not end")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]byte(nil), r.first...)
}

// mac1 recomputes msg1's mac1 (tunnel/wire.go: keyed BLAKE2s-128 over the
// Noise part, keyed by BLAKE2s-256("mpvpn v1 mac1" || server public key)),
// so the test can send a message that passes mac1 and fails Noise.
func mac1(server tunnel.PublicKey, noisePart []byte) []byte {
	h, _ := blake2s.New256(nil)
	h.Write([]byte("mpvpn v1 mac1"))
	h.Write(server[:])
	key := h.Sum(nil)
	m, _ := blake2s.New128(key)
	m.Write(noisePart)
	return m.Sum(nil)
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// probeResult is what one unauthenticated connection saw.
type probeResult struct {
	name    string
	n       int64 // bytes read back
	err     error // how the read ended
	elapsed time.Duration
}

// probe connects from ns to the concentrator, runs send, and reads until
// the server closes; elapsed is measured from the end of connect.
func probe(tp *topo.Topology, ns string, mptcp bool, send func(net.Conn)) probeResult {
	d := &net.Dialer{}
	d.SetMultipathTCP(mptcp)
	var (
		c     net.Conn
		start time.Time
	)
	// The clock starts inside the namespace switch: leaving the
	// namespace again can take a while, and the server's deadline runs
	// from its accept.
	err := tp.Do(ns, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var err error
		c, err = d.DialContext(ctx, "tcp", concListen.String())
		start = time.Now()
		return err
	})
	if err != nil {
		return probeResult{err: fmt.Errorf("connect: %w", err)}
	}
	defer c.Close()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); send(c) }()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	n, err := io.Copy(io.Discard, c)
	elapsed := time.Since(start)
	c.Close() // unblocks a sender still writing
	wg.Wait()
	return probeResult{n: n, err: err, elapsed: elapsed}
}

func sendBytes(b []byte) func(net.Conn) {
	return func(c net.Conn) {
		if len(b) > 0 {
			c.Write(b)
		}
	}
}

// TestSecurityUnauthenticatedProbes: garbage of every length around
// msg1's size, a msg1 with a valid mac1 but a broken handshake, and a
// well-formed msg1 from a key the server does not list, over TCP and
// MPTCP: no byte comes back, every connection is reset at the configured
// handshake deadline (measured from connect, within ±deadline/4) whatever
// was sent, and the concentrator opens no connection. The same garbage
// over UDP to the port gets no datagram back. The real client still works
// afterwards.
func TestSecurityUnauthenticatedProbes(t *testing.T) {
	const deadline = 2 * time.Second
	e := newEnv(t, options{topo: topo.Options{NoEmu: true}, serverArgs: []string{"--handshake-timeout", deadline.String()}})
	syns := newSYNCounters(t, e)
	_, serverPub := e.keys(t)

	// A well-formed msg1 from a stranger's key, as the product's client
	// makes it: captured by a recorder that forwards nothing.
	strangerKey, err := tunnel.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	rec := newRecorder(t, e.tp, e.tp.Client, netip.AddrPort{})
	stranger := newTunnelClient(t, rec.addr(), strangerKey, serverPub, 500*time.Millisecond)
	if _, err := dialTunnel(e.tp, e.tp.Client, stranger, netip.AddrPortFrom(topo.DestAddr, 80)); err == nil {
		t.Fatal("a dial to a recorder that never answers succeeded")
	}
	foreign := rec.recorded(t)
	size := len(foreign)
	if size < 64 {
		t.Fatalf("captured msg1 is %d bytes; expected a full first message", size)
	}
	t.Logf("msg1 is %d bytes", size)
	// The same message with one bit of the Noise part flipped and mac1
	// recomputed: passes the cheap check, fails the handshake.
	badNoise := append([]byte(nil), foreign...)
	badNoise[40] ^= 1
	copy(badNoise[size-16:], mac1(serverPub, badNoise[:size-16]))

	type probeCase struct {
		name string
		send func(net.Conn)
	}
	var cases []probeCase
	for _, n := range []int{0, 1, 31, 32, 64, size - 1, size, size + 1, 200, 1500, 65535} {
		cases = append(cases, probeCase{fmt.Sprintf("%d random bytes", n), sendBytes(randomBytes(n))})
	}
	cases = append(cases,
		probeCase{"msg1 from an unknown key", sendBytes(foreign)},
		probeCase{"msg1 from an unknown key, then 1000 bytes", sendBytes(append(append([]byte(nil), foreign...), randomBytes(1000)...))},
		probeCase{"valid mac1, broken handshake", sendBytes(badNoise)},
		probeCase{"half a msg1, then FIN", func(c net.Conn) { c.Write(foreign[:size/2]); c.(*net.TCPConn).CloseWrite() }},
		// Trickled bytes do not move the deadline. The trickle stops
		// well before it: a write racing the RST would take the
		// socket's ECONNRESET and leave the reader a plain EOF (Linux
		// reports a socket error once), so a real reset would look
		// like a FIN here. An idle-timer server would reset at
		// 1.5 s + deadline, outside the window.
		probeCase{"a byte every 100 ms for 1.5 s", func(c net.Conn) {
			for i := 0; i < 15; i++ {
				if _, err := c.Write([]byte{byte(i)}); err != nil {
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		}},
	)

	// All probes at once, then one subtest each for the verdict.
	results := make([]probeResult, 2*len(cases))
	var wg sync.WaitGroup
	for i, pc := range cases {
		for j, mptcp := range []bool{false, true} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := probe(e.tp, e.tp.Client, mptcp, pc.send)
				r.name = pc.name + map[bool]string{false: " (TCP)", true: " (MPTCP)"}[mptcp]
				results[2*i+j] = r
			}()
		}
	}
	wg.Wait()

	lo, hi := time.Hour, time.Duration(0)
	for _, r := range results {
		t.Run(r.name, func(t *testing.T) {
			if r.n != 0 {
				t.Errorf("got %d bytes back, want 0", r.n)
			}
			if !errors.Is(r.err, syscall.ECONNRESET) {
				t.Errorf("connection ended with %v, want a reset (as every rejected connection)", r.err)
			}
			if r.elapsed < deadline-deadline/4 || r.elapsed > deadline+deadline/4 {
				t.Errorf("closed %v after connect, want %v ± %v (the configured handshake deadline)", r.elapsed, deadline, deadline/4)
			}
		})
		lo, hi = min(lo, r.elapsed), max(hi, r.elapsed)
	}
	t.Logf("%d probes closed between %v and %v after connect (spread %v)", len(results), lo, hi, hi-lo)

	if n := syns.get(t, "syn_all"); n != 0 {
		t.Errorf("the concentrator sent %d SYNs during the probes, want 0", n)
	}
	// Every probe was seen and rejected by the server (none shed unread).
	if got := strings.Count(e.server.Log(), "handshake rejected"); got != len(results) {
		t.Errorf("the server logged %d rejected handshakes, want %d (one per probe)", got, len(results))
	}
	if got := strings.Count(e.server.Log(), `reason="unknown peer"`); got != 4 {
		t.Errorf("the server logged %d handshakes from an unknown peer, want 4", got)
	}

	// The server also reads datagrams on its port (uplink liveness
	// probes, package probe): unauthenticated ones get no answer either.
	t.Run("udp", func(t *testing.T) {
		var payloads [][]byte
		for _, n := range []int{0, 1, 31, 32, 64, 128, size, 1200} {
			payloads = append(payloads, randomBytes(n))
		}
		payloads = append(payloads, foreign, badNoise)
		err := e.tp.Do(e.tp.Client, func() error {
			c, err := net.Dial("udp", concListen.String())
			if err != nil {
				return err
			}
			defer c.Close()
			for _, p := range payloads {
				c.Write(p)
			}
			c.SetReadDeadline(time.Now().Add(time.Second))
			buf := make([]byte, 65536)
			for {
				n, err := c.Read(buf)
				if errors.Is(err, os.ErrDeadlineExceeded) {
					return nil
				}
				if err != nil {
					// An ICMP port unreachable from the kernel (no
					// responder) is not an answer from mpvpn.
					t.Logf("udp read: %v", err)
					continue
				}
				t.Errorf("got a %d-byte datagram back from %s", n, concListen)
			}
		})
		if err != nil {
			t.Fatal(err)
		}
	})

	// The real client is unaffected, and the counter sees a real dial.
	code, out := e.curl(t, "-m", "20", destURL("index.html"))
	if code != 0 || out != "hello from the internet\n" {
		t.Fatalf("after the probes: curl exit %d, body %q; want 0 and the served body", code, out)
	}
	if n := syns.get(t, "syn_inet"); n < 1 {
		t.Errorf("the SYN counter shows %d dials after a working curl; it does not count what it should", n)
	}
}

// TestReplayFirstMessage: a legitimate client's msg1, recorded by a relay
// on the path, replayed 10 000 times on new connections (TCP and MPTCP, 50
// at a time): the concentrator dials the destination exactly once (the
// original), no replay gets a byte back, and the server rejects every
// replay as such.
func TestReplayFirstMessage(t *testing.T) {
	const (
		deadline    = time.Second
		replays     = 10000
		concurrency = 50
		// window is how long a replay waits for an answer before its
		// client closes. An accepted flow is answered as soon as the
		// concentrator's dial (one local hop) completes; the SYN
		// counter and the server's log are the authoritative checks.
		window = 100 * time.Millisecond
	)
	e := newEnv(t, options{topo: topo.Options{NoEmu: true}, noClient: true, serverArgs: []string{"--handshake-timeout", deadline.String()}})
	syns := newSYNCounters(t, e)
	clientKey, serverPub := e.keys(t)

	rec := newRecorder(t, e.tp, e.tp.Client, concListen)
	originalGet(t, e.tp, newTunnelClient(t, rec.addr(), clientKey, serverPub, 10*time.Second))
	msg1 := rec.recorded(t)
	t.Logf("recorded a %d-byte msg1", len(msg1))
	if n := syns.get(t, "syn_inet"); n != 1 {
		t.Fatalf("the original flow made %d dials, want 1", n)
	}

	var (
		next               atomic.Int64
		answered, failures atomic.Int64
		attempts, lateN    atomic.Int64
		errMu              sync.Mutex
		errs               []error // the first few failures
		wg                 sync.WaitGroup
	)
	fail := func(err error) {
		failures.Add(1)
		errMu.Lock()
		if len(errs) < 5 {
			errs = append(errs, err)
		}
		errMu.Unlock()
	}
	start := time.Now()
	// replay sends msg1 on a new connection (from the namespace of the
	// calling thread) and checks what comes back. With waitClose it reads until the
	// server closes; otherwise for window only, then closes with a FIN
	// (the server has msg1 in its buffer, still reads it, and resets the
	// connection at its deadline). It reports late when the write left
	// more than half the deadline after connect, which only a starved
	// test process does: the server may have timed the connection out
	// before msg1 arrived, so the caller sends that replay again.
	replay := func(i int64, waitClose bool) (late bool) {
		attempts.Add(1)
		d := &net.Dialer{}
		d.SetMultipathTCP(i%2 == 1)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := d.DialContext(ctx, "tcp", concListen.String())
		connected := time.Now()
		cancel()
		if err != nil {
			fail(fmt.Errorf("replay %d: connect: %w", i, err))
			return false
		}
		defer c.Close()
		_, werr := c.Write(msg1)
		if time.Since(connected) > deadline/2 {
			lateN.Add(1)
			return true
		}
		if werr != nil {
			fail(fmt.Errorf("replay %d: write: %w", i, werr))
			return false
		}
		wait := window
		if waitClose {
			wait = deadline + 10*time.Second
		}
		c.SetReadDeadline(time.Now().Add(wait))
		n, err := io.Copy(io.Discard, c)
		elapsed := time.Since(connected)
		switch {
		case n != 0:
			answered.Add(1)
		case errors.Is(err, os.ErrDeadlineExceeded) && !waitClose:
			// Silent for the whole window.
		case errors.Is(err, syscall.ECONNRESET) && elapsed >= deadline-deadline/4:
			// The reset at the server's fixed deadline.
		default:
			fail(fmt.Errorf("replay %d: ended with %v %v after connect; want silence, then a reset at the %v deadline", i, err, elapsed, deadline))
		}
		return false
	}
	// Each worker runs on a thread inside the client namespace, so its
	// sockets are created there without a namespace switch per dial.
	for w := 0; w < concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := e.tp.Do(e.tp.Client, func() error {
				for {
					i := next.Add(1) - 1
					if i >= replays {
						return nil
					}
					// The first batch waits for the server's close:
					// the same silence and reset as any probe.
					for try := 0; replay(i, i < concurrency); try++ {
						if try == 5 {
							fail(fmt.Errorf("replay %d: the test process was too slow to send it in time, 6 times", i))
							break
						}
					}
				}
			})
			if err != nil {
				fail(err)
			}
		}()
	}
	wg.Wait()
	took := time.Since(start)
	t.Logf("%d replays in %v", replays, took)
	// Let the server reach the deadline of the last ones and log them.
	time.Sleep(deadline + 500*time.Millisecond)

	if n := answered.Load(); n != 0 {
		t.Errorf("%d replays got bytes back, want 0", n)
	}
	if n := failures.Load(); n != 0 {
		t.Errorf("%d replays did not end as a rejected handshake should; first: %v", n, errors.Join(errs...))
	}
	if n := syns.get(t, "syn_inet"); n != 1 {
		t.Errorf("the concentrator dialled the destination %d times, want exactly 1 (the original flow)", n)
	}
	if n := syns.get(t, "syn_all"); n != 1 {
		t.Errorf("the concentrator sent %d SYNs in all, want 1", n)
	}
	log := e.server.Log()
	replayed := strings.Count(log, `reason="replayed msg1"`)
	stale := strings.Count(log, `reason="timestamp out of window"`)
	rejected := strings.Count(log, "handshake rejected")
	t.Logf("server: %d rejected as replayed, %d as out of the timestamp window, %d rejected in all; client: %d connections, %d of them sent late and repeated",
		replayed, stale, rejected, attempts.Load(), lateN.Load())
	// Every connection was rejected; every replay sent in time as a
	// replay (or, past the 30 s window, as stale). A late one may also
	// have been timed out before its msg1 arrived.
	if int64(rejected) != attempts.Load() || replayed+stale < replays || int64(rejected-replayed-stale) > lateN.Load() {
		t.Errorf("the server rejected %d handshakes (%d as replays, %d as stale), want all %d connections rejected, all %d replays as replays or stale",
			rejected, replayed, stale, attempts.Load(), replays)
	}
	if replayed == 0 {
		t.Errorf("no replay was caught by the replay cache")
	}
}

// TestDestinationPolicy: every destination in the default deny table gets
// the verdict "not allowed" and the concentrator sends no SYN at all;
// through the app path (TUN) such a destination is a fast "connection
// refused" (curl exit 7). A public destination is allowed. With
// --allow-private, private destinations the concentrator can reach (in
// the internet namespace, on its own loopback, on its own address) are
// allowed, while its listener and cloud metadata stay refused.
func TestDestinationPolicy(t *testing.T) {
	e := newEnv(t, options{
		topo: topo.Options{NoEmu: true},
		// (The client itself refuses to route link-local, loopback and
		// multicast destinations into the TUN.)
		clientArgs: []string{"--route", "10.0.0.1/32", "--route", "100.100.100.200/32"},
	})
	syns := newSYNCounters(t, e)
	clientKey, serverPub := e.keys(t)
	cl := newTunnelClient(t, concListen, clientKey, serverPub, 10*time.Second)

	denied := []string{
		"127.0.0.1:80", "127.0.0.1:7100", "127.1.2.3:22",
		"0.0.0.0:80", "0.0.0.0:7100",
		"10.0.0.1:80", "172.16.0.1:80", "192.168.1.1:80", "100.64.0.1:80",
		"169.254.169.254:80", "169.254.170.2:80", "100.100.100.200:80",
		"224.0.0.1:80", "255.255.255.255:80", "240.0.0.1:80",
		// The concentrator's own addresses: the listener's and its
		// interfaces'.
		"203.0.113.1:80", "203.0.113.1:7100", "198.18.3.1:80", "198.18.1.2:22",
		"[::1]:80", "[::1]:7100", "[::]:80",
		"[fd00:ec2::254]:80", "[::ffff:127.0.0.1]:80", "[::ffff:169.254.169.254]:80",
		"[64:ff9b::a9fe:a9fe]:80", "[64:ff9b::7f00:1]:80", "[2002:7f00:1::]:80", "[::127.0.0.1]:80",
		"[fc00::1]:80", "[fe80::1]:80", "[ff02::1]:80",
		// Cloud metadata in public and link-local space, IETF protocol
		// assignments, benchmarking, site-local, the 6to4 relay anycast.
		"168.63.129.16:80", "169.254.0.23:80", "192.0.0.1:80", "192.0.0.170:80",
		"198.18.0.1:80", "[fec0::1]:80", "192.88.99.1:80",
		// IPv4-translated, local-use NAT64 (the /64 reading is 10.0.0.1),
		// Teredo, NAT64 of the own address, IPv6 outside 2000::/3.
		"[::ffff:0:7f00:1]:80", "[::ffff:0:a9fe:a9fe]:80", "[64:ff9b:1:101:a:0:101:101]:80",
		"[2001:0:4136:e378:8000:63bf:3fff:fdd2]:80", "[64:ff9b::cb00:7101]:80", "[100::1]:80",
	}
	checkDenied(t, e, cl, syns, denied)
	if n := syns.get(t, "syn_all"); n != 0 {
		t.Fatalf("the concentrator sent %d SYNs for denied destinations, want 0", n)
	}

	// The app path: a denied destination routed into the TUN is a
	// connection refused (RST), neither a hang nor connect-then-EOF.
	for _, url := range []string{"http://10.0.0.1/", "http://100.100.100.200/latest/meta-data/"} {
		start := time.Now()
		code, out := e.curl(t, "-v", "-m", "15", url)
		if code != 7 || !strings.Contains(strings.ToLower(out), "refused") || strings.Contains(out, "Connected to") {
			t.Errorf("curl %s: exit %d after %v, want 7 (connection refused):\n%s", url, code, time.Since(start), out)
		}
		t.Logf("curl %s: exit %d after %v", url, code, time.Since(start).Round(time.Millisecond))
	}
	if n := syns.get(t, "syn_all"); n != 0 {
		t.Errorf("the concentrator sent %d SYNs for denied app flows, want 0", n)
	}

	// Positive control: a public destination is allowed, and counted.
	conn, err := dialTunnel(e.tp, e.tp.Client, cl, netip.AddrPortFrom(topo.DestAddr, 80))
	if err != nil {
		t.Fatalf("public destination: %v", err)
	}
	resp, err := httpGet(conn, topo.DestAddr.String(), "/index.html")
	conn.Close()
	if err != nil || !strings.Contains(resp, "hello from the internet") {
		t.Errorf("public destination: GET returned %q, %v", resp, err)
	}
	if n := syns.get(t, "syn_inet"); n != 1 {
		t.Errorf("public destination: %d SYNs counted, want 1", n)
	}

	t.Run("allow-private", func(t *testing.T) {
		e := newEnv(t, options{
			topo:       topo.Options{NoEmu: true},
			serverArgs: []string{"--allow-private"},
			clientArgs: []string{"--route", "100.100.100.200/32", "--route", "10.99.0.0/24"},
		})
		syns := newSYNCounters(t, e)
		clientKey, serverPub := e.keys(t)
		cl := newTunnelClient(t, concListen, clientKey, serverPub, 10*time.Second)

		// A private network on the internet host, routed from the
		// concentrator; a listener on the concentrator's loopback and
		// one on its own interface address.
		private := netip.MustParseAddrPort("10.99.0.1:8080")
		e.tp.Exec(e.tp.Inet, "ip", "addr", "add", private.Addr().String()+"/32", "dev", "lo")
		e.tp.Exec(e.tp.Conc, "ip", "route", "add", "10.99.0.0/24", "via", "198.18.3.2")
		serveHTTP(t, e.tp.Listen(e.tp.Inet, "tcp", private.String()), "private ok\n")
		loop := netip.MustParseAddrPort("127.0.0.1:8081")
		serveHTTP(t, e.tp.Listen(e.tp.Conc, "tcp", loop.String()), "loopback ok\n")
		own := netip.MustParseAddrPort("198.18.3.1:8082")
		serveHTTP(t, e.tp.Listen(e.tp.Conc, "tcp", own.String()), "own address ok\n")

		for _, tc := range []struct {
			dst  netip.AddrPort
			body string
		}{{private, "private ok\n"}, {loop, "loopback ok\n"}, {own, "own address ok\n"}} {
			before := syns.get(t, "syn_all")
			conn, err := dialTunnel(e.tp, e.tp.Client, cl, tc.dst)
			if err != nil {
				t.Errorf("%s with --allow-private: %v", tc.dst, err)
				continue
			}
			resp, err := httpGet(conn, tc.dst.String(), "/")
			conn.Close()
			if err != nil || !strings.HasSuffix(resp, "\r\n\r\n"+tc.body) {
				t.Errorf("%s: GET returned %q, %v", tc.dst, resp, err)
			}
			if d := syns.get(t, "syn_all") - before; d != 1 {
				t.Errorf("%s: %d SYNs, want 1", tc.dst, d)
			}
		}

		checkDenied(t, e, cl, syns, []string{
			"203.0.113.1:7100", "127.0.0.1:7100", "[::1]:7100", "198.18.3.1:7100", "198.18.1.2:7100",
			"0.0.0.0:7100", "0.0.0.0:8081", "[::]:8081",
			"169.254.169.254:80", "169.254.170.2:80", "[fd00:ec2::254]:80", "100.100.100.200:80",
			"[::ffff:169.254.169.254]:80", "[64:ff9b::a9fe:a9fe]:80",
			"224.0.0.1:80", "255.255.255.255:80",
			// The listener through the IPv4 an IPv6 address embeds.
			"[64:ff9b::7f00:1]:7100", "[::ffff:0:7f00:1]:7100", "[2002:7f00:1::]:7100",
			"[64:ff9b::cb00:7101]:7100", "[64:ff9b::c612:301]:7100",
			// Metadata and ranges that --allow-private does not lift.
			"168.63.129.16:80", "169.254.0.23:80", "[::ffff:0:a9fe:a9fe]:80",
			"192.0.0.1:80", "[2001:0:4136:e378:8000:63bf:3fff:fdd2]:80", "[100::1]:80",
		})

		// And through the app path.
		code, out := e.curl(t, "-m", "15", "http://"+private.String()+"/")
		if code != 0 || out != "private ok\n" {
			t.Errorf("curl %s with --allow-private: exit %d, %q", private, code, out)
		}
		code, out = e.curl(t, "-v", "-m", "15", "http://100.100.100.200/latest/meta-data/")
		if code != 7 || strings.Contains(out, "Connected to") {
			t.Errorf("curl metadata with --allow-private: exit %d, want 7:\n%s", code, out)
		}
		// 3 in-process dials and the curl above.
		if n := syns.get(t, "syn_all"); n != 4 {
			t.Errorf("the concentrator sent %d SYNs, want 4 (the allowed flows only)", n)
		}
	})

	// --deny refuses a prefix even with --allow-private, in its IPv4 and
	// embedded forms, with no SYN, while the rest of the network stays
	// reachable. The public destination stands in for what an operator
	// would deny: the address a 1:1 NAT gives the host.
	t.Run("deny", func(t *testing.T) {
		e := newEnv(t, options{
			topo:       topo.Options{NoEmu: true},
			noClient:   true,
			serverArgs: []string{"--allow-private", "--deny", netip.PrefixFrom(topo.DestAddr, 32).String()},
		})
		syns := newSYNCounters(t, e)
		clientKey, serverPub := e.keys(t)
		cl := newTunnelClient(t, concListen, clientKey, serverPub, 10*time.Second)

		checkDenied(t, e, cl, syns, []string{
			"198.51.100.10:80", "198.51.100.10:443", "[::ffff:198.51.100.10]:80",
			"[::ffff:0:c633:640a]:80", "[64:ff9b::c633:640a]:80", "[2002:c633:640a::1]:80",
		})
		if n := syns.get(t, "syn_all"); n != 0 {
			t.Fatalf("the concentrator sent %d SYNs for denied destinations, want 0", n)
		}

		// Positive control: a neighbour of the denied address is reached.
		other := netip.MustParseAddrPort("198.51.100.11:8080")
		e.tp.Exec(e.tp.Inet, "ip", "addr", "add", other.Addr().String()+"/32", "dev", "lo")
		serveHTTP(t, e.tp.Listen(e.tp.Inet, "tcp", other.String()), "not denied\n")
		conn, err := dialTunnel(e.tp, e.tp.Client, cl, other)
		if err != nil {
			t.Fatalf("%s: %v", other, err)
		}
		resp, err := httpGet(conn, other.String(), "/")
		conn.Close()
		if err != nil || !strings.HasSuffix(resp, "\r\n\r\nnot denied\n") {
			t.Errorf("%s: GET returned %q, %v", other, resp, err)
		}
		if n := syns.get(t, "syn_inet"); n != 1 {
			t.Errorf("%s: %d SYNs counted, want 1", other, n)
		}
	})
}

// checkDenied dials each destination through the tunnel and expects the
// verdict "not allowed", with no SYN from the concentrator.
func checkDenied(t *testing.T, e *env, cl *tunnel.Client, syns *synCounters, dsts []string) {
	t.Helper()
	for _, s := range dsts {
		dst := netip.MustParseAddrPort(s)
		before := syns.get(t, "syn_all")
		start := time.Now()
		conn, err := dialTunnel(e.tp, e.tp.Client, cl, dst)
		elapsed := time.Since(start)
		if err == nil {
			conn.Close()
			t.Errorf("%s: connected, want refused by policy", dst)
			continue
		}
		var ve *tunnel.VerdictError
		if !errors.As(err, &ve) || ve.Verdict != tunnel.NotAllowed || !errors.Is(err, syscall.EACCES) {
			t.Errorf("%s: %v after %v, want the verdict %q", dst, err, elapsed, tunnel.NotAllowed)
		}
		if d := syns.get(t, "syn_all") - before; d != 0 {
			t.Errorf("%s: the concentrator sent %d SYNs, want 0", dst, d)
		}
	}
}

// serveHTTP answers every request on ln with body until the test ends.
func serveHTTP(t *testing.T, ln net.Listener, body string) {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.Copy(w, bytes.NewReader([]byte(body)))
	})}
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); <-done })
}
