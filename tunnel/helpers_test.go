//go:build linux

package tunnel

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/internal/netnstest"

	"github.com/flynn/noise"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// cannotRun fails in CI (CI=true) and skips elsewhere.
func cannotRun(t testing.TB, format string, args ...any) {
	t.Helper()
	netnstest.CannotRun(t, format, args...)
}

func requireMPTCP(t testing.TB) {
	t.Helper()
	b, err := os.ReadFile("/proc/sys/net/mptcp/enabled")
	if err != nil {
		cannotRun(t, "the kernel has no MPTCP: %v", err)
	}
	if string(bytes.TrimSpace(b)) != "1" {
		cannotRun(t, "net.mptcp.enabled is %q", bytes.TrimSpace(b))
	}
}

func mustKey(t testing.TB) PrivateKey {
	t.Helper()
	k, err := GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// testLogger sends the package's logs to t.Log, so a failing test shows
// what the code said.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// pair is a configured server and a client it accepts, without sockets.
type pair struct {
	srv       *Server
	cli       *Client
	serverKey PrivateKey
	clientKey PrivateKey
}

func newPair(t testing.TB, scfg ServerConfig, ccfg ClientConfig) pair {
	t.Helper()
	sk, ck := mustKey(t), mustKey(t)
	scfg.Key = sk
	scfg.Peers = append(scfg.Peers, ck.Public())
	srv, err := NewServer(scfg)
	if err != nil {
		t.Fatal(err)
	}
	// As if the server had been up for a while: its horizon (start +
	// FutureSkew) would otherwise refuse a client on this host's clock
	// for the first second. Tests of the horizon set it themselves.
	srv.horizon = srv.start.Add(-time.Hour)
	if !ccfg.Server.IsValid() {
		ccfg.Server = netip.MustParseAddrPort("127.0.0.1:9")
	}
	if ccfg.Key.IsZero() {
		ccfg.Key = ck
	}
	if ccfg.ServerKey.IsZero() {
		ccfg.ServerKey = sk.Public()
	}
	cli, err := NewClient(ccfg)
	if err != nil {
		t.Fatal(err)
	}
	return pair{srv: srv, cli: cli, serverKey: sk, clientKey: ck}
}

var testDst = netip.MustParseAddrPort("198.51.100.10:443")

// checkedMsg1 makes the client's msg1 for testDst and has the server
// accept it: the client's handshake state and the server's pending flow.
func (p pair) checkedMsg1(t testing.TB) (*noise.HandshakeState, *pendingFlow) {
	t.Helper()
	hs, m1, err := p.cli.msg1(testDst)
	if err != nil {
		t.Fatal(err)
	}
	pf, why := p.srv.checkMsg1(m1)
	if pf == nil {
		t.Fatalf("msg1 rejected: %s", why)
	}
	return hs, pf
}

// handshake runs the real handshake code with no network in between and
// returns the transport keys: client send/recv, server send/recv.
func (p pair) handshake(t testing.TB) (cs, cr, ss, sr *noise.CipherState) {
	t.Helper()
	hs, pf := p.checkedMsg1(t)
	var payload [msg2PayloadSize]byte
	putMsg2Payload(payload[:], Connected, pf.cipher)
	m2, cs1, cs2, err := pf.hs.WriteMessage(nil, payload[:])
	if err != nil {
		t.Fatal(err)
	}
	v, keys, err := readMsg2(hs, m2, p.cli.offerAES)
	if err != nil || v != Connected {
		t.Fatalf("msg2: %v %v", v, err)
	}
	srv := newTransportKeys(pf.cipher, cs2, cs1)
	return keys.send, keys.recv, srv.send, srv.recv
}

// connPair returns two Conns over net.Pipe, keyed by a real handshake.
func connPair(t testing.TB) (cli, srv *Conn) {
	t.Helper()
	p := newPair(t, ServerConfig{}, ClientConfig{})
	cs, cr, ss, sr := p.handshake(t)
	a, b := net.Pipe()
	cli = newConn(a, cs, cr, false, nil)
	srv = newConn(b, ss, sr, false, nil)
	t.Cleanup(func() { cli.Close(); srv.Close() })
	return cli, srv
}

// fakeConn is a net.Conn over a reader and a writer that records Close.
type fakeConn struct {
	r      io.Reader
	w      io.Writer
	closed atomic.Bool
}

func (f *fakeConn) Read(p []byte) (int, error) {
	if f.closed.Load() {
		return 0, net.ErrClosed
	}
	if f.r == nil {
		return 0, io.EOF
	}
	return f.r.Read(p)
}

func (f *fakeConn) Write(p []byte) (int, error) {
	if f.closed.Load() {
		return 0, net.ErrClosed
	}
	if f.w == nil {
		return len(p), nil
	}
	return f.w.Write(p)
}

func (f *fakeConn) Close() error                     { f.closed.Store(true); return nil }
func (f *fakeConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (f *fakeConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (f *fakeConn) SetDeadline(time.Time) error      { return nil }
func (f *fakeConn) SetReadDeadline(time.Time) error  { return nil }
func (f *fakeConn) SetWriteDeadline(time.Time) error { return nil }

// pipeListener is a net.Listener whose connections are net.Pipe pairs.
type pipeListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

func (l *pipeListener) Dial() (net.Conn, error) {
	a, b := net.Pipe()
	select {
	case l.conns <- b:
		return a, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

// serve runs srv.Serve on ln until the test ends.
func serve(t testing.TB, srv *Server, ln net.Listener, handle func(context.Context, *Flow)) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln, handle) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after cancel")
		}
	})
}

// listenMPTCP opens the package's listener on loopback.
func listenMPTCP(t testing.TB, fastOpen bool) net.Listener {
	t.Helper()
	requireMPTCP(t)
	ln, err := Listen(context.Background(), "127.0.0.1:0", fastOpen)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func lnAddr(ln net.Listener) netip.AddrPort {
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// echoAccept accepts every flow and echoes it, half-closing when the
// client does.
func echoAccept(_ context.Context, f *Flow) {
	c, err := f.Accept()
	if err != nil {
		return
	}
	defer c.Close()
	if _, err := io.Copy(c, c); err != nil {
		return
	}
	c.CloseWrite()
	io.Copy(io.Discard, c)
}

func isClosedErr(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, io.ErrClosedPipe)
}
