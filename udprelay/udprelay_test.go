//go:build linux

package udprelay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// echoServer answers every datagram on loopback with "from <sender>|"
// followed by the datagram, so that a test learns the address the
// concentrator's socket sent from.
func echoServer(t *testing.T) (*net.UDPConn, netip.AddrPort) {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 70000)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			c.WriteToUDPAddrPort(append([]byte("from "+from.String()+"|"), buf[:n]...), from)
		}
	}()
	t.Cleanup(func() { c.Close(); <-done })
	return c, netip.MustParseAddrPort(c.LocalAddr().String())
}

// concentrator serves ServeStream on loopback TCP, one stream per
// connection, as the concentrator serves the datagram service.
type concentrator struct {
	ln    net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns []net.Conn
	n     Counters
}

func newConcentrator(t *testing.T, cfg ServerConfig) *concentrator {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &concentrator{ln: ln}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			c.mu.Lock()
			c.conns = append(c.conns, conn)
			c.mu.Unlock()
			c.wg.Add(1)
			go func() {
				defer c.wg.Done()
				defer conn.Close()
				cfg := cfg
				cfg.Counters = &c.n
				ServeStream(context.Background(), conn, cfg)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); c.drop(); c.wg.Wait() })
	return c
}

func (c *concentrator) drop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, conn := range c.conns {
		conn.Close()
	}
	c.conns = nil
}

func (c *concentrator) dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", c.ln.Addr().String())
}

// delivered is a datagram the relay wrote back to an application.
type delivered struct {
	src, dst netip.AddrPort
	payload  []byte
}

type apps struct {
	ch      chan delivered
	refused chan [2]netip.AddrPort
}

func newApps() *apps {
	return &apps{ch: make(chan delivered, 20000), refused: make(chan [2]netip.AddrPort, 16)}
}

func (a *apps) write(src, dst netip.AddrPort, p []byte) error {
	a.ch <- delivered{src, dst, append([]byte(nil), p...)}
	return nil
}

func (a *apps) refuse(app, dst netip.AddrPort) { a.refused <- [2]netip.AddrPort{app, dst} }

func (a *apps) next(t *testing.T) delivered {
	t.Helper()
	select {
	case d := <-a.ch:
		return d
	case <-time.After(10 * time.Second):
		t.Fatal("no datagram came back")
	}
	return delivered{}
}

func newClient(t *testing.T, cfg ClientConfig) *Client {
	t.Helper()
	c, err := NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

var (
	app1 = netip.MustParseAddrPort("10.77.77.1:40001")
	app2 = netip.MustParseAddrPort("10.77.77.1:40002")
)

// TestEcho: datagrams of every size from 0 to 9000 bytes, from two
// application sockets, come back intact with their boundaries, from the
// echo server's address, to the socket that sent them; each application
// socket has one source port at the concentrator.
func TestEcho(t *testing.T) {
	_, echo := echoServer(t)
	conc := newConcentrator(t, ServerConfig{})
	a := newApps()
	c := newClient(t, ClientConfig{Dial: conc.dial, Write: a.write})
	rng := rand.New(rand.NewPCG(1, 2))
	const n, window = 2000, 10
	sent := map[string]netip.AddrPort{}
	mapped := map[netip.AddrPort]string{}
	// In windows of 10: loopback UDP loses what overflows a socket's
	// buffer, and this is about the relay, not about that.
	for w := 0; w < n; w += window {
		for i := w; i < w+window; i++ {
			app := app1
			if i%2 == 1 {
				app = app2
			}
			p := make([]byte, max(6, rng.IntN(9001)))
			for j := range p {
				p[j] = byte(rng.Uint32())
			}
			copy(p, fmt.Sprintf("%06d", i))
			sent[string(p)] = app
			if !c.HandleUDP(app, echo, p) {
				t.Fatal("datagram not taken")
			}
		}
		for range window {
			d := a.next(t)
			i := bytes.IndexByte(d.payload, '|')
			if i < 0 {
				t.Fatalf("not an echo: %q", d.payload)
			}
			from, p := string(d.payload[5:i]), d.payload[i+1:]
			app, ok := sent[string(p)]
			if !ok {
				t.Fatalf("a datagram came back changed (%d bytes)", len(p))
			}
			delete(sent, string(p))
			if d.dst != app || d.src != echo {
				t.Errorf("came back from %s to %s, want from %s to %s", d.src, d.dst, echo, app)
			}
			if prev, ok := mapped[app]; ok && prev != from {
				t.Errorf("%s was mapped to %s and %s", app, prev, from)
			}
			mapped[app] = from
		}
	}
	if len(mapped) != 2 || mapped[app1] == mapped[app2] {
		t.Errorf("mappings %v, want one port each", mapped)
	}
	// The counters follow the writes the test has just seen (the
	// server's Down after its send returned: the datagram can reach the
	// test first).
	for i := 0; i < 100 && (c.Stats().Down != n || conc.n.Stats().Down != n); i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if st := c.Stats(); st.Up != n || st.Down != n || st.Dropped != 0 || st.Dials != 1 || st.Flows != 2 {
		t.Errorf("client stats %+v", st)
	}
	if st := conc.n.Stats(); st.Up != n || st.Down != n || st.Streams != 1 || st.Flows != 2 || st.ActiveFlows != 2 || st.Dropped != 0 {
		t.Errorf("server stats %+v", st)
	}
}

// TestEndpointIndependent: an application's flow keeps its port at the
// concentrator whatever it sends to, and a datagram to that port from an
// address and port it never sent to reaches it.
func TestEndpointIndependent(t *testing.T) {
	_, echoA := echoServer(t)
	_, echoB := echoServer(t)
	conc := newConcentrator(t, ServerConfig{})
	a := newApps()
	c := newClient(t, ClientConfig{Dial: conc.dial, Write: a.write})
	from := func(d delivered) string {
		i := bytes.IndexByte(d.payload, '|')
		return string(d.payload[5:i])
	}
	c.HandleUDP(app1, echoA, []byte("to A"))
	fa := from(a.next(t))
	c.HandleUDP(app1, echoB, []byte("to B"))
	if fb := from(a.next(t)); fb != fa {
		t.Errorf("the flow is %s towards A and %s towards B: not endpoint-independent", fa, fb)
	}
	stranger, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer stranger.Close()
	if _, err := stranger.WriteToUDPAddrPort([]byte("unsolicited"), netip.MustParseAddrPort(fa)); err != nil {
		t.Fatal(err)
	}
	d := a.next(t)
	if string(d.payload) != "unsolicited" || d.dst != app1 || d.src.String() != stranger.LocalAddr().String() {
		t.Errorf("got %q from %s to %s, want the stranger's datagram to %s", d.payload, d.src, d.dst, app1)
	}
}

// TestPolicy: a destination the policy refuses gets nothing sent and
// the application is told; a sender it refuses is dropped.
func TestPolicy(t *testing.T) {
	_, echo := echoServer(t)
	denied := netip.MustParseAddrPort("127.0.0.1:9")
	stranger, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer stranger.Close()
	deniedSender := netip.MustParseAddrPort(stranger.LocalAddr().String())
	conc := newConcentrator(t, ServerConfig{Check: func(ap netip.AddrPort) error {
		if ap == denied || ap == deniedSender {
			return errors.New("not allowed")
		}
		return nil
	}})
	a := newApps()
	c := newClient(t, ClientConfig{Dial: conc.dial, Write: a.write, Refused: a.refuse})
	c.HandleUDP(app1, denied, []byte("x"))
	select {
	case r := <-a.refused:
		if r != [2]netip.AddrPort{app1, denied} {
			t.Errorf("refused %v", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the refusal never came")
	}
	c.HandleUDP(app1, echo, []byte("learn the mapping"))
	d := a.next(t)
	mapped := netip.MustParseAddrPort(string(d.payload[5:bytes.IndexByte(d.payload, '|')]))
	stranger.WriteToUDPAddrPort([]byte("from a refused sender"), mapped)
	c.HandleUDP(app1, echo, []byte("after it"))
	d = a.next(t)
	if !bytes.HasSuffix(d.payload, []byte("|after it")) {
		t.Errorf("a datagram from a refused sender came through: %q", d.payload)
	}
	for i := 0; i < 100 && c.Stats().Down != 2; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if st := c.Stats(); st.Refused != 1 || st.Down != 2 {
		t.Errorf("client stats %+v", st)
	}
}

// TestIdle: a flow idle past its timeout is forgotten on both ends: its
// socket is closed, and the next datagram gets a new flow and port.
func TestIdle(t *testing.T) {
	_, echo := echoServer(t)
	conc := newConcentrator(t, ServerConfig{IdleTimeout: 200 * time.Millisecond})
	a := newApps()
	c := newClient(t, ClientConfig{Dial: conc.dial, Write: a.write, IdleTimeout: 200 * time.Millisecond})
	c.HandleUDP(app1, echo, []byte("1"))
	first := a.next(t)
	deadline := time.Now().Add(5 * time.Second)
	for c.Stats().Flows != 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := c.Stats().Flows; n != 0 {
		t.Fatalf("%d flows after the idle timeout", n)
	}
	time.Sleep(200 * time.Millisecond) // the server's sweep too
	c.HandleUDP(app1, echo, []byte("2"))
	second := a.next(t)
	p1 := first.payload[:bytes.IndexByte(first.payload, '|')]
	p2 := second.payload[:bytes.IndexByte(second.payload, '|')]
	if bytes.Equal(p1, p2) {
		t.Errorf("the same mapping (%s) after the idle timeout", p1)
	}
}

// TestBounded: with no stream (a dial that hangs), the queue fills to its
// bound and the rest is dropped; Close does not wait for the dial.
func TestBounded(t *testing.T) {
	hang := func(ctx context.Context) (net.Conn, error) { <-ctx.Done(); return nil, ctx.Err() }
	a := newApps()
	c, err := NewClient(ClientConfig{Dial: hang, Write: a.write, QueueBytes: 10 * (headerSize + 100)})
	if err != nil {
		t.Fatal(err)
	}
	for range 100 {
		c.HandleUDP(app1, netip.MustParseAddrPort("192.0.2.1:5000"), make([]byte, 100))
	}
	if st := c.Stats(); st.Up != 10 || st.Dropped != 90 {
		t.Errorf("stats %+v, want 10 queued and 90 dropped", st)
	}
	start := time.Now()
	c.Close()
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Close took %v", d)
	}
	if c.HandleUDP(app1, netip.MustParseAddrPort("192.0.2.1:5000"), nil) {
		t.Error("taken after Close")
	}
}

// TestReconnect: a stream that dies is replaced when the next datagram
// comes, and the flows carry on.
func TestReconnect(t *testing.T) {
	_, echo := echoServer(t)
	conc := newConcentrator(t, ServerConfig{})
	a := newApps()
	c := newClient(t, ClientConfig{Dial: conc.dial, Write: a.write})
	c.HandleUDP(app1, echo, []byte("before"))
	a.next(t)
	conc.drop()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.HandleUDP(app1, echo, []byte("after"))
		select {
		case d := <-a.ch:
			if !bytes.HasSuffix(d.payload, []byte("|after")) {
				t.Fatalf("got %q", d.payload)
			}
			if st := c.Stats(); st.Dials != 2 {
				t.Errorf("dials %d, want 2", st.Dials)
			}
			return
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("no datagram through a new stream")
		}
	}
}

func TestWire(t *testing.T) {
	for _, tt := range []struct {
		addr string
		p    []byte
	}{{"192.0.2.1:53", nil}, {"[2001:db8::1]:443", []byte("x")}, {"[::ffff:192.0.2.1]:1", make([]byte, 65000)}} {
		ap := netip.MustParseAddrPort(tt.addr)
		b, err := appendMsg(nil, kindData, 7, ap, tt.p)
		if err != nil {
			t.Fatal(err)
		}
		m, err := readMsg(bytes.NewReader(b), make([]byte, 2+maxMessage))
		want := netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		if err != nil || m.kind != kindData || m.flow != 7 || m.addr != want || !bytes.Equal(m.payload, tt.p) {
			t.Errorf("%s: %+v %v", tt.addr, m, err)
		}
	}
	if _, err := appendMsg(nil, kindData, 1, netip.MustParseAddrPort("192.0.2.1:1"), make([]byte, 65512)); err == nil {
		t.Error("an oversize payload encoded")
	}
	good, _ := appendMsg(nil, kindData, 1, netip.MustParseAddrPort("192.0.2.1:1"), []byte("p"))
	for name, mut := range map[string]func([]byte) []byte{
		"short length": func(b []byte) []byte { b[1] = 3; return b },
		"kind 9":       func(b []byte) []byte { b[2] = 9; return b },
		"family 5":     func(b []byte) []byte { b[7] = 5; return b },
		"v4 padding":   func(b []byte) []byte { b[20] = 1; return b },
		"truncated":    func(b []byte) []byte { return b[:len(b)-1] },
		"mapped v6": func(b []byte) []byte {
			b[7] = 6
			copy(b[8:24], netip.MustParseAddr("::ffff:1.2.3.4").AsSlice())
			return b
		},
	} {
		b := mut(append([]byte(nil), good...))
		if _, err := readMsg(bytes.NewReader(b), make([]byte, 2+maxMessage)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
