//go:build linux

package udprelay

import (
	"bytes"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

func TestWindow(t *testing.T) {
	var w window
	for _, tt := range []struct {
		c    uint64
		want bool
	}{
		{0, true}, {0, false}, {1, true}, {5, true}, {3, true}, {3, false}, {5, false},
		{4000, true}, {4000 - windowSize + 1, true}, {4000 - windowSize, false}, {3, false},
		{4001, true}, {3999, true}, {3999, false}, {100000, true}, {4001, false}, {99999, true},
	} {
		if got := w.accept(tt.c); got != tt.want {
			t.Errorf("accept(%d) = %v, want %v", tt.c, got, tt.want)
		}
	}
}

// sharedPort stands for the concentrator's UDP port: what the probe
// responder does not take goes to the Sessions.
type sharedPort struct {
	conn *net.UDPConn
	ss   *Sessions
	wg   sync.WaitGroup
	mu   sync.Mutex
	last []byte // the latest packet, for the replay test
}

func newSharedPort(t *testing.T) *sharedPort {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	p := &sharedPort{conn: c}
	p.ss = &Sessions{Send: func(b []byte, dst netip.AddrPort, _ netip.Addr) error {
		_, err := c.WriteToUDPAddrPort(b, dst)
		return err
	}}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		buf := make([]byte, 65536)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			p.mu.Lock()
			p.last = append(p.last[:0], buf[:n]...)
			p.mu.Unlock()
			p.ss.HandlePacket(buf[:n], from, netip.Addr{})
		}
	}()
	t.Cleanup(func() { c.Close(); p.wg.Wait() })
	return p
}

func (p *sharedPort) addr() netip.AddrPort {
	return netip.MustParseAddrPort(p.conn.LocalAddr().String())
}

// TestUplinksTransport: with the uplinks transport, once the stream has
// opened the session, datagrams go both ways as packets on the paths, not
// in the stream; duplicated ones (two paths) reach the app once; a
// replayed packet is dropped.
func TestUplinksTransport(t *testing.T) {
	_, echo := echoServer(t)
	port := newSharedPort(t)
	conc := newConcentrator(t, ServerConfig{Sessions: port.ss})
	a := newApps()
	var pmu sync.Mutex
	paths := []Path{{Name: "a", Addr: netip.MustParseAddr("127.0.0.1"), RTT: time.Millisecond}, {Name: "b", Addr: netip.MustParseAddr("127.0.0.2"), RTT: 2 * time.Millisecond}}
	c := newClient(t, ClientConfig{Dial: conc.dial, Write: a.write, Transport: TransportUplinks, Server: port.addr(), DuplicateBelow: 100,
		Paths: func() []Path { pmu.Lock(); defer pmu.Unlock(); return append([]Path(nil), paths...) }})
	// The first datagram opens the stream, and goes in it.
	c.HandleUDP(app1, echo, []byte("first"))
	a.next(t)
	deadline := time.Now().Add(5 * time.Second)
	for c.sess.Load() == nil && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // the paths' sockets, and a keepalive
	for i := range 50 {
		p := bytes.Repeat([]byte{byte(i)}, 200) // over DuplicateBelow: one path
		c.HandleUDP(app1, echo, p)
		d := a.next(t)
		if !bytes.HasSuffix(d.payload, p) {
			t.Fatalf("datagram %d came back as %q", i, d.payload)
		}
	}
	st := c.Stats()
	if st.PathOut < 50 || st.PathIn < 50 {
		t.Fatalf("stats %+v: the datagrams did not use the paths", st)
	}
	// Small ones go on both paths, and come back once each.
	for i := range 20 {
		c.HandleUDP(app1, echo, []byte{'d', byte(i)})
	}
	got := map[string]int{}
	for range 20 {
		d := a.next(t)
		got[string(d.payload[len(d.payload)-2:])]++
	}
	select {
	case d := <-a.ch:
		t.Errorf("a duplicate reached the app: %q", d.payload)
	case <-time.After(300 * time.Millisecond):
	}
	if len(got) != 20 {
		t.Errorf("%d distinct small datagrams came back, want 20", len(got))
	}
	if n := port.ss.received.Load(); n < uint64(st.PathOut)+20 {
		t.Errorf("the concentrator accepted %d packets; the client sent %d on one path and 20 on two", n, st.PathOut)
	}
	// A replayed packet is rejected.
	port.mu.Lock()
	replay := append([]byte(nil), port.last...)
	port.mu.Unlock()
	before := port.ss.rejected.Load()
	cl, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(port.addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	cl.Write(replay)
	time.Sleep(100 * time.Millisecond)
	if port.ss.rejected.Load() != before+1 {
		t.Errorf("the replayed packet was not rejected (%d rejections before, %d after)", before, port.ss.rejected.Load())
	}
	// With no live path the stream carries them again.
	pmu.Lock()
	paths = nil
	pmu.Unlock()
	time.Sleep(300 * time.Millisecond)
	out := c.Stats().PathOut
	c.HandleUDP(app1, echo, []byte("no path"))
	if d := a.next(t); !bytes.HasSuffix(d.payload, []byte("no path")) {
		t.Errorf("got %q", d.payload)
	}
	if c.Stats().PathOut != out {
		t.Error("sent on a path that is gone")
	}
}
