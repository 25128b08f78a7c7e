//go:build linux

package probe

import (
	"bytes"
	"context"
	"net"
	"testing"
	"time"
)

// FuzzResponder feeds arbitrary datagrams to the request handler. It must
// never panic, and answer only a request that the test's own client
// authenticates, with a reply no larger than it.
func FuzzResponder(f *testing.F) {
	tr := newTestResponder(f, ResponderConfig{ClientRate: 1e9, ClientBurst: 1e9, GlobalRate: 1e9})
	now := tr.clock.t
	valid := tr.client.request(now, 1)
	f.Add(valid)
	f.Add(tr.client.request(now.Add(-time.Minute), 2))
	f.Add(tr.client.reply(3, now.UnixNano(), 0))
	f.Add(putRequest(make([]byte, RequestSize), tr.client.rep, request{id: clientID(&tr.client.keys.k, epochOf(now.UnixNano())), ts: now.UnixNano(), counter: 4}))
	f.Add(valid[:RequestSize-1])
	f.Add(make([]byte, 41)) // a v1 request's size
	f.Add([]byte{})
	var out [ReplySize]byte
	f.Fuzz(func(t *testing.T, pkt []byte) {
		b := tr.r.handle(pkt, out[:])
		if b == nil {
			return
		}
		if !tr.client.validRequest(pkt) {
			t.Fatalf("replied to %x, which is not a valid request", pkt)
		}
		if len(b) > len(pkt) {
			t.Fatalf("reply of %d bytes to %d", len(b), len(pkt))
		}
		rep, ok := parseReply(b, tr.client.rep)
		if !ok {
			t.Fatalf("reply %x does not authenticate", b)
		}
		if req, _ := openRequest(pkt, tr.client.req); rep.counter != req.counter || rep.server != now.UnixNano() {
			t.Fatalf("reply %+v does not answer %+v", rep, req)
		}
	})
}

// FuzzProberReply feeds arbitrary datagrams to the client's reply parser:
// it must never panic, and accept only what the server's encoder would
// have produced under the client's key.
func FuzzProberReply(f *testing.F) {
	server, client := mustKey(f), mustKey(f)
	c := newTestClient(f, client, server.Public())
	f.Add(c.reply(1, 3, 0))
	f.Add(c.reply(1, 3, 2))
	f.Add(c.request(time.Unix(1_800_000_000, 0), 4))
	f.Add(putReply(make([]byte, ReplySize), c.req, reply{counter: 5, server: 6})) // sealed with the request keys
	f.Add([]byte{0x02})
	f.Add(make([]byte, ReplySize))
	f.Fuzz(func(t *testing.T, b []byte) {
		rep, ok := parseReply(b, c.rep)
		if !ok {
			return
		}
		again := c.reply(rep.counter, rep.server, rep.horizon)
		if !bytes.Equal(again, b) {
			t.Fatalf("accepted %x, which re-encodes as %x", b, again)
		}
	})
}

// hidden hides the *net.UDPConn behind a PacketConn, so Serve takes its
// generic path.
type hidden struct{ net.PacketConn }

// Over a real socket: one reply per request, none to the same bytes again,
// none larger than the request; on both of Serve's paths.
func TestServeReplay(t *testing.T) {
	for _, generic := range []bool{false, true} {
		tr := newTestResponder(t, ResponderConfig{})
		tr.r.now = time.Now
		pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		var spc net.PacketConn = pc
		if generic {
			spc = hidden{pc}
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- tr.r.Serve(ctx, spc) }()

		c, err := net.Dial("udp4", pc.LocalAddr().String())
		if err != nil {
			t.Fatal(err)
		}
		req := tr.client.request(time.Now(), 42)
		buf := make([]byte, 1500)
		for i, want := range []bool{true, false} {
			c.Write(req)
			c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			n, err := c.Read(buf)
			if got := err == nil; got != want {
				t.Errorf("generic %v, send %d: reply %v (%v), want %v", generic, i, got, err, want)
			}
			if err == nil && n > len(req) {
				t.Errorf("reply of %d bytes to %d", n, len(req))
			}
		}
		c.Close()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		pc.Close()
		if s := tr.r.Stats(); s.Replies != 1 || s.Replayed != 1 {
			t.Errorf("stats %+v", s)
		}
	}
}
