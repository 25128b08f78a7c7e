//go:build linux

package probe

import (
	"github.com/mpvpn/mpvpn/tunnel"

	"testing"
	"time"
)

func TestResponderHandle(t *testing.T) {
	tr := newTestResponder(t, ResponderConfig{})
	now := tr.clock.t
	c := tr.client
	stranger := newTestClient(t, mustKey(t), tr.r.peers[0].pub) // any key the server does not know

	valid := c.request(now, 1000)
	flipped := c.request(now, 1001)
	flipped[RequestSize-1] ^= 1
	e := epochOf(now.UnixNano())
	// Authentic, but with the id of an epoch the server does not
	// answer now (e-2), or of one it does (e-1) but that is not the
	// timestamp's.
	idOf := func(epoch uint64, counter uint64) []byte {
		return putRequest(make([]byte, RequestSize), c.req, request{id: clientID(&c.keys.k, epoch), ts: now.UnixNano(), counter: counter})
	}
	reflected := c.reply(1003, now.UnixNano(), 0)
	// A reply's keys, but a request's id: refused by its tag.
	replyKeys := putRequest(make([]byte, RequestSize), c.rep, request{id: clientID(&c.keys.k, e), ts: now.UnixNano(), counter: 1005})

	tests := []struct {
		name  string
		pkt   []byte
		reply bool
		stat  func(ResponderStats) uint64
	}{
		{"valid", valid, true, func(s ResponderStats) uint64 { return s.Replies }},
		{"replayed", valid, false, func(s ResponderStats) uint64 { return s.Replayed }},
		{"next counter", c.request(now, 1004), true, func(s ResponderStats) uint64 { return s.Replies }},
		{"late counter", c.request(now, 999), true, func(s ResponderStats) uint64 { return s.Replies }},
		{"bad MAC", flipped, false, func(s ResponderStats) uint64 { return s.BadMAC }},
		{"stranger", stranger.request(now, 5000), false, func(s ResponderStats) uint64 { return s.UnknownID }},
		{"id of an epoch not answered now", idOf(e-2, 1002), false, func(s ResponderStats) uint64 { return s.UnknownID }},
		{"id of another epoch than the timestamp's", idOf(e-1, 1006), false, func(s ResponderStats) uint64 { return s.Stale }},
		{"id of the timestamp's epoch", idOf(e, 1007), true, func(s ResponderStats) uint64 { return s.Replies }},
		{"61s old", c.request(now.Add(-61*time.Second), 2000), false, func(s ResponderStats) uint64 { return s.Stale }},
		{"61s ahead", c.request(now.Add(61*time.Second), 2001), false, func(s ResponderStats) uint64 { return s.Stale }},
		{"59s old", c.request(now.Add(-59*time.Second), 2002), true, func(s ResponderStats) uint64 { return s.Replies }},
		{"59s ahead", c.request(now.Add(59*time.Second), 2003), true, func(s ResponderStats) uint64 { return s.Replies }},
		{"reply reflected", reflected, false, func(s ResponderStats) uint64 { return s.UnknownID }},
		{"sealed with the reply keys", replyKeys, false, func(s ResponderStats) uint64 { return s.BadMAC }},
		{"truncated", valid[:RequestSize-1], false, func(s ResponderStats) uint64 { return s.Malformed }},
		{"padded", append(c.request(now, 3000), 0), false, func(s ResponderStats) uint64 { return s.Malformed }},
		{"empty", nil, false, func(s ResponderStats) uint64 { return s.Malformed }},
		{"zeros", make([]byte, RequestSize), false, func(s ResponderStats) uint64 { return s.UnknownID }},
		{"v1 size", make([]byte, 41), false, func(s ResponderStats) uint64 { return s.Malformed }},
	}
	for _, tt := range tests {
		before := tt.stat(tr.r.Stats())
		got := tr.handle(tt.pkt)
		if (got != nil) != tt.reply {
			t.Errorf("%s: reply %v, want %v", tt.name, got != nil, tt.reply)
			continue
		}
		if after := tt.stat(tr.r.Stats()); after != before+1 {
			t.Errorf("%s: counter went %d → %d, want +1", tt.name, before, after)
		}
		if got == nil {
			continue
		}
		if len(got) > len(tt.pkt) {
			t.Errorf("%s: reply of %d bytes to a request of %d", tt.name, len(got), len(tt.pkt))
		}
		rep, ok := parseReply(got, c.rep)
		req, _ := openRequest(tt.pkt, c.req)
		if !ok || rep != (reply{counter: req.counter, server: now.UnixNano()}) {
			t.Errorf("%s: reply %+v (ok %v) does not answer %+v", tt.name, rep, ok, req)
		}
	}
	s := tr.r.Stats()
	if sum := s.Replies + s.Malformed + s.Stale + s.UnknownID + s.BadMAC + s.Replayed + s.ClientLimit + s.GlobalLimit; sum != s.Requests {
		t.Errorf("stats %+v: outcomes add up to %d, not the %d requests", s, sum, s.Requests)
	}
}

// A request with any bit flipped is refused, as unknown if the bit is in
// the id, as unauthentic if not, and moves nothing: the request itself is
// answered afterwards.
func TestResponderTamper(t *testing.T) {
	tr := newTestResponder(t, ResponderConfig{ClientRate: 1e9, ClientBurst: 1e9, GlobalRate: 1e9})
	req := tr.client.request(tr.clock.t, 1000)
	for bit := range 8 * RequestSize {
		b := append([]byte(nil), req...)
		b[bit/8] ^= 1 << (bit % 8)
		before := tr.r.Stats()
		if tr.handle(b) != nil {
			t.Fatalf("bit %d flipped: answered", bit)
		}
		after := tr.r.Stats()
		got, want := after.BadMAC-before.BadMAC, uint64(1)
		if bit < 8*idSize {
			got = after.UnknownID - before.UnknownID
		}
		if got != want {
			t.Errorf("bit %d flipped: stats went %+v → %+v", bit, before, after)
		}
	}
	if tr.handle(req) == nil {
		t.Fatal("the untampered request is refused after the tampered ones")
	}
}

// A reply carries the horizon, or 0 when there is none.
func TestResponderHorizon(t *testing.T) {
	h := time.Unix(1_799_999_000, 42)
	tests := []struct {
		name    string
		horizon func() time.Time
		want    int64
	}{
		{"none", nil, 0},
		{"zero", func() time.Time { return time.Time{} }, 0},
		{"set", func() time.Time { return h }, h.UnixNano()},
	}
	for _, tt := range tests {
		tr := newTestResponder(t, ResponderConfig{Horizon: tt.horizon})
		b := tr.handle(tr.client.request(tr.clock.t, 1))
		rep, ok := parseReply(b, tr.client.rep)
		if !ok || rep.horizon != tt.want || rep.server != tr.clock.t.UnixNano() || rep.counter != 1 {
			t.Errorf("%s: reply %+v (ok %v), want horizon %d", tt.name, rep, ok, tt.want)
		}
	}
}

// The id changes every epoch; a client whose clock is just across an
// epoch boundary from the server's is still answered.
func TestResponderEpochBoundary(t *testing.T) {
	tr := newTestResponder(t, ResponderConfig{})
	e := epochOf(tr.clock.t.UnixNano())
	boundary := time.Unix(0, int64((e+1)<<epochShift))
	for i, d := range []time.Duration{-time.Second, 0, time.Second, 20 * time.Second} {
		tr.clock.t = boundary.Add(-10 * time.Second)
		if tr.handle(tr.client.request(boundary.Add(d), uint64(100+i))) == nil {
			t.Errorf("server 10s before the epoch boundary, client %v after it: no reply", d)
		}
		tr.clock.t = boundary.Add(10 * time.Second)
		if tr.handle(tr.client.request(boundary.Add(-d), uint64(200+i))) == nil {
			t.Errorf("server 10s after the epoch boundary, client %v before it: no reply", d)
		}
	}
}

func TestResponderRateBound(t *testing.T) {
	tests := []struct {
		name  string
		cfg   ResponderConfig
		burst int // replies at one instant
		rate  int // per second after that
	}{
		{"client default", ResponderConfig{}, DefaultClientBurst, DefaultClientRate},
		{"global", ResponderConfig{GlobalRate: 200, ClientRate: 10000, ClientBurst: 1000}, 20, 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr := newTestResponder(t, tt.cfg)
			count := func(from uint64) int {
				n := 0
				for i := range uint64(1000) {
					if tr.handle(tr.client.request(tr.clock.t, from+i)) != nil {
						n++
					}
				}
				return n
			}
			if n := count(1_000_000); n != tt.burst {
				t.Errorf("1000 requests at once: %d replies, want %d", n, tt.burst)
			}
			tr.clock.t = tr.clock.t.Add(100 * time.Millisecond)
			if n := count(2_000_000); n != tt.rate/10 {
				t.Errorf("1000 requests 100ms later: %d replies, want %d", n, tt.rate/10)
			}
			s := tr.r.Stats()
			if s.ClientLimit+s.GlobalLimit != 2000-s.Replies {
				t.Errorf("stats %+v: limited %d, want %d", s, s.ClientLimit+s.GlobalLimit, 2000-s.Replies)
			}
		})
	}
}

func TestNewResponderErrors(t *testing.T) {
	k, p := mustKey(t), mustKey(t).Public()
	tests := []struct {
		name string
		cfg  ResponderConfig
	}{
		{"no key", ResponderConfig{Peers: nil}},
		{"duplicate peer", ResponderConfig{Key: k, Peers: []tunnel.PublicKey{p, p}}},
		{"low-order peer", ResponderConfig{Key: k, Peers: []tunnel.PublicKey{{}}}},
		{"negative rate", ResponderConfig{Key: k, ClientRate: -1}},
	}
	for _, tt := range tests {
		if _, err := NewResponder(tt.cfg); err == nil {
			t.Errorf("%s: no error", tt.name)
		}
	}
}

func TestResponderHandleAllocs(t *testing.T) {
	horizon := time.Unix(1_799_999_000, 0)
	tr := newTestResponder(t, ResponderConfig{ClientRate: 1e9, ClientBurst: 1e9, GlobalRate: 1e9, Horizon: func() time.Time { return horizon }})
	now := tr.clock.t
	pkts := map[string][]byte{
		"accepted":   nil,
		"replayed":   tr.client.request(now, 1),
		"bad MAC":    tr.client.request(now, 2),
		"unknown id": newTestClient(t, mustKey(t), tr.r.peers[0].pub).request(now, 3),
		"stale":      tr.client.request(now.Add(MaxSkew+time.Second), 4),
		"malformed":  make([]byte, 10),
	}
	pkts["bad MAC"][30] ^= 1
	tr.handle(pkts["replayed"])
	var out [ReplySize]byte
	for name, pkt := range pkts {
		c := uint64(10)
		var valid [][]byte
		if pkt == nil {
			for range 200 {
				valid = append(valid, tr.client.request(now, c))
				c++
			}
		}
		i := 0
		allocs := testing.AllocsPerRun(100, func() {
			p := pkt
			if p == nil {
				p = valid[i]
				i++
			}
			b := tr.r.handle(p, out[:])
			if (b != nil) != (name == "accepted") {
				t.Fatalf("%s: reply %v", name, b != nil)
			}
		})
		if allocs != 0 {
			t.Errorf("%s: %v allocations per request, want 0", name, allocs)
		}
	}
}
