//go:build linux

package dnsrelay

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/net/dns/dnsmessage"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// query builds an A query for name with id, and an EDNS(0) record
// announcing edns bytes when edns > 0.
func query(t testing.TB, id uint16, name string, edns int) []byte {
	t.Helper()
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
	b.EnableCompression()
	must(t, b.StartQuestions())
	must(t, b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}))
	if edns > 0 {
		must(t, b.StartAdditionals())
		var rh dnsmessage.ResourceHeader
		must(t, rh.SetEDNS0(edns, dnsmessage.RCodeSuccess, false))
		must(t, b.OPTResource(rh, dnsmessage.OPTResource{}))
	}
	m, err := b.Finish()
	must(t, err)
	return m
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// answers of the fake upstream: "big." has 60 A records (over 512 bytes),
// "a<n>." has one, 192.0.2.<n>.
func answer(q []byte, overUDP bool) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil {
		return nil
	}
	qq, err := p.Question()
	if err != nil {
		return nil
	}
	h.Response, h.RecursionAvailable = true, true
	name := qq.Name.String()
	n := 1
	if name == "big." {
		n = 60
	}
	if overUDP && len(q) < 40 && n > 20 { // no EDNS: would not fit 512
		h.Truncated = true
		n = 0
	}
	b := dnsmessage.NewBuilder(nil, h)
	b.StartQuestions()
	b.Question(qq)
	b.StartAnswers()
	for i := range n {
		b.AResource(dnsmessage.ResourceHeader{Name: qq.Name, Class: dnsmessage.ClassINET, TTL: 60}, dnsmessage.AResource{A: [4]byte{192, 0, 2, byte(i + len(name))}})
	}
	m, _ := b.Finish()
	return m
}

// fakeUpstream is a DNS server on loopback, UDP and TCP on one port.
// Queries for "slow." are never answered; the first UDP datagram of a
// query for "lossy." is dropped.
type fakeUpstream struct {
	addr    netip.AddrPort
	udp     net.PacketConn
	tcp     net.Listener
	wg      sync.WaitGroup
	udpSeen atomic.Int64
	tcpSeen atomic.Int64
	lossy   sync.Map
}

func newFakeUpstream(t *testing.T) *fakeUpstream {
	t.Helper()
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	u, err := net.ListenPacket("udp", tl.Addr().String())
	must(t, err)
	f := &fakeUpstream{addr: netip.MustParseAddrPort(tl.Addr().String()), udp: u, tcp: tl}
	f.wg.Add(2)
	go func() {
		defer f.wg.Done()
		buf := make([]byte, MaxMessage)
		for {
			n, from, err := u.ReadFrom(buf)
			if err != nil {
				return
			}
			f.udpSeen.Add(1)
			q := buf[:n]
			if strings.Contains(string(q), "slow") {
				continue
			}
			if strings.Contains(string(q), "lossy") {
				if _, seen := f.lossy.LoadOrStore(id(q), true); !seen {
					continue
				}
			}
			u.WriteTo(answer(q, true), from)
		}
	}()
	go func() {
		defer f.wg.Done()
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				defer c.Close()
				buf := make([]byte, MaxMessage)
				for {
					q, err := readMsg(c, buf)
					if err != nil {
						return
					}
					f.tcpSeen.Add(1)
					writeMsg(c, answer(q, false))
				}
			}()
		}
	}()
	t.Cleanup(func() { u.Close(); tl.Close(); f.wg.Wait() })
	return f
}

// concentrator serves ServeStream on loopback TCP, as the concentrator
// serves its resolver service on a tunnel flow.
type concentrator struct {
	ln    net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns []net.Conn
}

func newConcentrator(t *testing.T, up *Upstream) *concentrator {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
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
				ServeStream(context.Background(), conn, up, 0, nil)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); c.dropAll(); c.wg.Wait() })
	return c
}

// dropAll closes every stream, as a concentrator restart would.
func (c *concentrator) dropAll() {
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

func newForwarder(t *testing.T, cfg ForwarderConfig) *Forwarder {
	t.Helper()
	f, err := NewForwarder(cfg)
	must(t, err)
	t.Cleanup(func() { f.Close() })
	return f
}

func parse(t testing.TB, m []byte) (dnsmessage.Header, []dnsmessage.Resource) {
	t.Helper()
	var msg dnsmessage.Message
	if err := msg.Unpack(m); err != nil {
		t.Fatalf("unparsable answer: %v", err)
	}
	return msg.Header, msg.Answers
}

// TestExchange: answers come back with the application's own IDs, also
// when many applications use the same ID at once, over one stream.
func TestExchange(t *testing.T) {
	up := newFakeUpstream(t)
	c := newConcentrator(t, &Upstream{Addr: up.addr})
	f := newForwarder(t, ForwarderConfig{Dial: c.dial})
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name := "a" + strings.Repeat("x", i%60) + "." + strings.Repeat("y", i/60) + "z."
			q := query(t, 7, name, 0) // the same ID for all of them
			resp, err := f.Exchange(context.Background(), q)
			if err != nil {
				errs <- err
				return
			}
			var msg dnsmessage.Message
			if err := msg.Unpack(resp); err != nil || msg.ID != 7 || len(msg.Questions) != 1 || msg.Questions[0].Name.String() != name || len(msg.Answers) != 1 {
				errs <- errors.New("wrong answer for " + name)
				return
			}
			if a := msg.Answers[0].Body.(*dnsmessage.AResource).A; a[3] != byte(len(name)) {
				errs <- errors.New("another query's answer for " + name)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if st := f.Stats(); st.Dials != 1 {
		t.Errorf("%d streams dialled for 64 queries, want 1", st.Dials)
	}
}

// TestUDPAnswers: over UDP an answer is cut to the application's size
// (TC set, so it retries over TCP) unless its EDNS(0) size allows it;
// over TCP it comes whole (the concentrator retried its upstream over
// TCP when the UDP answer was truncated).
func TestUDPAnswers(t *testing.T) {
	up := newFakeUpstream(t)
	c := newConcentrator(t, &Upstream{Addr: up.addr})
	type reply struct {
		src, dst netip.AddrPort
		m        []byte
	}
	replies := make(chan reply, 4)
	f := newForwarder(t, ForwarderConfig{Dial: c.dial, UDP: func(src, dst netip.AddrPort, m []byte) error {
		replies <- reply{src, dst, m}
		return nil
	}})
	app := netip.MustParseAddrPort("10.77.77.1:40000")
	res := netip.MustParseAddrPort("10.77.77.53:53")
	for _, tt := range []struct {
		name      string
		edns      int
		wantTC    bool
		wantCount int
	}{
		{"a.", 0, false, 1},
		{"big.", 0, true, 0},
		{"big.", 4096, false, 60},
	} {
		if !f.HandleUDP(app, res, query(t, 99, tt.name, tt.edns)) {
			t.Fatal("query not taken")
		}
		select {
		case r := <-replies:
			h, ans := parse(t, r.m)
			if r.src != res || r.dst != app {
				t.Errorf("%s: answer from %s to %s", tt.name, r.src, r.dst)
			}
			if h.ID != 99 || h.Truncated != tt.wantTC || len(ans) != tt.wantCount {
				t.Errorf("%s edns %d: id %d tc %v, %d answers; want tc %v, %d", tt.name, tt.edns, h.ID, h.Truncated, len(ans), tt.wantTC, tt.wantCount)
			}
			if len(r.m) > max(512, tt.edns) {
				t.Errorf("%s: %d bytes over UDP", tt.name, len(r.m))
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: no answer", tt.name)
		}
	}
	if up.tcpSeen.Load() == 0 {
		t.Error("the concentrator never retried its upstream over TCP")
	}
	if f.HandleUDP(app, res, answer(query(t, 1, "a.", 0), true)) {
		t.Error("a response taken as a query")
	}
}

// TestServeStreamApp: an application's DNS over TCP gets whole answers,
// pipelined.
func TestServeStreamApp(t *testing.T) {
	up := newFakeUpstream(t)
	c := newConcentrator(t, &Upstream{Addr: up.addr})
	f := newForwarder(t, ForwarderConfig{Dial: c.dial})
	app, mine := net.Pipe()
	done := make(chan struct{})
	go func() { defer close(done); f.ServeStream(mine) }()
	go func() {
		writeMsg(app, query(t, 1, "big.", 0))
		writeMsg(app, query(t, 2, "a.", 0))
	}()
	buf := make([]byte, MaxMessage)
	got := map[uint16]int{}
	app.SetReadDeadline(time.Now().Add(10 * time.Second))
	for range 2 {
		m, err := readMsg(app, buf)
		if err != nil {
			t.Fatal(err)
		}
		h, ans := parse(t, m)
		got[h.ID] = len(ans)
	}
	if got[1] != 60 || got[2] != 1 {
		t.Errorf("answers by ID: %v, want 1:60 2:1", got)
	}
	app.Close()
	<-done
}

// TestFailures: an upstream that does not answer gives SERVFAIL in time;
// a lost UDP datagram upstream is sent again; a stream that dies (a
// concentrator restart) is replaced without the query failing.
func TestFailures(t *testing.T) {
	up := newFakeUpstream(t)
	c := newConcentrator(t, &Upstream{Addr: up.addr, Timeout: 3 * time.Second})
	f := newForwarder(t, ForwarderConfig{Dial: c.dial, Timeout: 4 * time.Second})

	q := query(t, 5, "slow.", 0)
	resp := f.answer(q)
	if h, _ := parse(t, resp); h.RCode != dnsmessage.RCodeServerFailure || h.ID != 5 || !h.Response {
		t.Errorf("slow upstream: %+v, want SERVFAIL", h)
	}

	resp, err := f.Exchange(context.Background(), query(t, 6, "lossy.", 0))
	if err != nil {
		t.Fatalf("lossy: %v", err)
	}
	if h, ans := parse(t, resp); h.RCode != dnsmessage.RCodeSuccess || len(ans) != 1 {
		t.Errorf("lossy upstream: %+v", h)
	}

	c.dropAll()
	resp, err = f.Exchange(context.Background(), query(t, 8, "a.", 0))
	if err != nil {
		t.Fatalf("after the stream died: %v", err)
	}
	if h, _ := parse(t, resp); h.ID != 8 {
		t.Errorf("after the stream died: id %d", h.ID)
	}
	if st := f.Stats(); st.Dials != 2 {
		t.Errorf("dials %d, want 2 (one new stream)", st.Dials)
	}
}

// TestBounded: beyond MaxInFlight, UDP queries are dropped, not queued;
// Close ends everything.
func TestBounded(t *testing.T) {
	up := newFakeUpstream(t)
	c := newConcentrator(t, &Upstream{Addr: up.addr})
	var sent atomic.Int64
	f := newForwarder(t, ForwarderConfig{Dial: c.dial, MaxInFlight: 4, UDP: func(_, _ netip.AddrPort, _ []byte) error {
		sent.Add(1)
		return nil
	}})
	app := netip.MustParseAddrPort("10.77.77.1:40000")
	res := netip.MustParseAddrPort("10.77.77.53:53")
	for i := range 10 {
		f.HandleUDP(app, res, query(t, uint16(i), "slow.", 0))
	}
	if st := f.Stats(); st.Dropped != 6 || st.Queries != 10 {
		t.Errorf("stats %+v, want 6 of 10 dropped", st)
	}
	f.Close()
	if st := f.Stats(); st.Failed != 4 {
		t.Errorf("stats after Close %+v, want the 4 waiting failed", st)
	}
	if _, err := f.Exchange(context.Background(), query(t, 1, "a.", 0)); !errors.Is(err, ErrClosed) {
		t.Errorf("after Close: %v", err)
	}
	if sent.Load() != 0 {
		t.Errorf("%d answers sent for queries that got none", sent.Load())
	}
}

// TestDialFails: no tunnel, a quick SERVFAIL.
func TestDialFails(t *testing.T) {
	f := newForwarder(t, ForwarderConfig{Dial: func(context.Context) (net.Conn, error) {
		return nil, errors.New("tunnel down")
	}})
	resp := f.answer(query(t, 3, "a.", 0))
	if h, _ := parse(t, resp); h.RCode != dnsmessage.RCodeServerFailure {
		t.Errorf("%+v, want SERVFAIL", h)
	}
}

func TestMessages(t *testing.T) {
	for _, tt := range []struct {
		edns, want int
	}{{0, 512}, {100, 512}, {1232, 1232}, {4096, 4096}} {
		if got := udpSize(query(t, 1, "a.", tt.edns)); got != tt.want {
			t.Errorf("udpSize(edns %d) = %d, want %d", tt.edns, got, tt.want)
		}
	}
	for _, bad := range [][]byte{nil, {1, 2, 3}, make([]byte, 11)} {
		if servfail(bad) != nil || udpSize(bad) != 512 {
			t.Errorf("%v: answered", bad)
		}
	}
	sf := servfail(query(t, 42, "a.", 0))
	h, _ := parse(t, sf)
	if h.ID != 42 || !h.Response || h.RCode != dnsmessage.RCodeServerFailure || !h.RecursionDesired {
		t.Errorf("servfail header %+v", h)
	}
	if got, err := UpstreamFromResolvConf(writeFile(t, "# x\nsearch example\nnameserver fe80::1%eth0\nnameserver 192.0.2.53\n")); err != nil || got != netip.AddrPortFrom(netip.MustParseAddr("fe80::1%eth0"), 53) {
		t.Errorf("resolv.conf: %v %v", got, err)
	}
	if _, err := UpstreamFromResolvConf(writeFile(t, "search example\n")); err == nil {
		t.Error("a resolv.conf without nameserver accepted")
	}
}

func writeFile(t *testing.T, s string) string {
	t.Helper()
	p := t.TempDir() + "/resolv.conf"
	must(t, os.WriteFile(p, []byte(s), 0o644))
	return p
}
