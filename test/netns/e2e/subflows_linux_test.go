package e2e

import (
	"context"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/mptcpinfo"
	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// mptcpinfo on a real two-uplink MPTCP connection, with the client's path
// manager (mpvpn's) in charge: one subflow per uplink, each from its
// uplink's address, their byte counters covering what was sent, and both
// ends listing the same paths. This is how mpvpn attributes bytes, RTT and
// subflows to uplinks.
func TestSubflowStats(t *testing.T) {
	e := newEnv(t, options{topo: outageNet()})
	ln := e.tp.Listen(e.tp.Conc, "tcp4", netip.AddrPortFrom(topo.ConcAddr, 7300).String())
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	d := &net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: e.tp.Uplinks[topo.A].Addr.AsSlice()}}
	d.SetMultipathTCP(true)
	c, err := topo.Dial(context.Background(), e.tp.Client, d, "tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, ok := <-accepted
	if !ok {
		t.Fatal("accept failed")
	}
	defer s.Close()

	const n = 4 << 20
	errc := make(chan error, 1)
	go func() {
		if _, err := io.CopyN(io.Discard, s, n); err != nil {
			errc <- err
			return
		}
		_, err := s.Write(make([]byte, n))
		errc <- err
	}()
	if _, err := c.Write(make([]byte, n)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(io.Discard, c, n); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}

	get := func(conn net.Conn) mptcpinfo.Info {
		info, err := mptcpinfo.GetConn(conn.(*net.TCPConn))
		if err != nil {
			t.Fatal(err)
		}
		return info
	}
	var ci, si mptcpinfo.Info
	deadline := time.Now().Add(10 * time.Second)
	for {
		ci, si = get(c), get(s)
		var acked, rcvd uint64
		for _, sf := range ci.Subflows {
			acked += sf.BytesAcked
		}
		for _, sf := range si.Subflows {
			rcvd += sf.BytesReceived
		}
		if len(ci.Subflows) >= 2 && acked >= n && rcvd >= n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("client %+v\nserver %+v", ci, si)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if ci.Fallback || si.Fallback {
		t.Fatal("fell back to plain TCP")
	}
	locals := map[netip.Addr]bool{}
	for _, sf := range ci.Subflows {
		t.Logf("client subflow %d %v -> %v rtt %v acked %d received %d", sf.ID, sf.Local, sf.Remote, sf.RTT, sf.BytesAcked, sf.BytesReceived)
		locals[sf.Local.Addr()] = true
		if sf.RTT <= 0 {
			t.Errorf("subflow %d: RTT %v", sf.ID, sf.RTT)
		}
	}
	for _, u := range []topo.Uplink{topo.A, topo.B} {
		if a := e.tp.Uplinks[u].Addr; !locals[a] {
			t.Errorf("no subflow from uplink %s's address %s", u, a)
		}
	}
	if ci.BytesReceived < n || si.BytesReceived < n {
		t.Errorf("MPTCP-level received: client %d, server %d, want >= %d", ci.BytesReceived, si.BytesReceived, n)
	}
	if len(si.Subflows) != len(ci.Subflows) {
		t.Errorf("the server sees %d subflows, the client %d", len(si.Subflows), len(ci.Subflows))
	}
}
