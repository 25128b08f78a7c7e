//go:build linux

package probe

import (
	"testing"
	"time"
)

func TestKeysAgree(t *testing.T) {
	server, client, other := mustKey(t), mustKey(t), mustKey(t)
	c, err := deriveKeys(client, server.Public(), client.Public(), server.Public())
	if err != nil {
		t.Fatal(err)
	}
	s, err := deriveKeys(server, client.Public(), client.Public(), server.Public())
	if err != nil {
		t.Fatal(err)
	}
	if c != s {
		t.Fatal("client and server derived different keys")
	}
	o, err := deriveKeys(other, server.Public(), other.Public(), server.Public())
	if err != nil {
		t.Fatal(err)
	}
	all := [][32]byte{c.k, c.reqMAC, c.reqEnc, c.repMAC, c.repEnc, o.k, o.reqMAC, o.reqEnc, o.repMAC, o.repEnc}
	for i := range all {
		for j := range i {
			if all[i] == all[j] {
				t.Fatalf("keys %d and %d are equal: each client, and each use, needs its own", j, i)
			}
		}
	}
	if clientID(&c.k, 1) == clientID(&c.k, 2) {
		t.Fatal("id does not change with the epoch")
	}
	// A low-order point (here 0) is refused.
	if _, err := deriveKeys(client, [32]byte{}, client.Public(), [32]byte{}); err == nil {
		t.Fatal("all-zero public key accepted")
	}
}

func TestWindow(t *testing.T) {
	const base = 1 << 40
	tests := []struct {
		counter uint64
		want    bool
	}{
		{base, true},
		{base, false},
		{base + 1, true},
		{base - 1, true}, // late but within the window
		{base - 1, false},
		{base + 3, true},
		{base + 2, true},
		{base + 2, false},
		{base + windowSize, true},
		{base + 4, true},  // late by almost the whole window
		{base - 2, false}, // behind the window
		{base + windowSize + 64*windowBlocks*3, true}, // far jump clears everything
		{base + windowSize, false},
		{base + windowSize + 64*windowBlocks*3 - windowSize, true},
		{base + windowSize + 64*windowBlocks*3 - windowSize - 1, false},
		{base + windowSize + 64*windowBlocks*3 - 1, true},
	}
	var w window
	for i, tt := range tests {
		if got := w.accept(tt.counter); got != tt.want {
			t.Fatalf("step %d: accept(base%+d) = %v, want %v", i, int64(tt.counter-base), got, tt.want)
		}
	}
}

func TestWindowSweep(t *testing.T) {
	// Every counter of a window, in reverse, then all again.
	var w window
	const top = 100_000
	for c := uint64(top); c > top-windowSize; c-- {
		if !w.accept(c) {
			t.Fatalf("first time %d refused", c)
		}
	}
	for c := uint64(top); c > top-windowSize; c-- {
		if w.accept(c) {
			t.Fatalf("replay of %d accepted", c)
		}
	}
}

// A request and a reply open to what was sealed, under the client's keys
// only.
func TestReplyRoundTrip(t *testing.T) {
	server, client := mustKey(t), mustKey(t)
	c := newTestClient(t, client, server.Public())
	o := newTestClient(t, mustKey(t), server.Public())

	req := request{id: 0x0102030405060708, ts: 1_800_000_000_123_456_789, counter: 1_799_999_000_000_000_042}
	b := putRequest(make([]byte, RequestSize), c.req, req)
	if id, ok := requestID(b); !ok || id != req.id {
		t.Fatalf("requestID = %#x, %v", id, ok)
	}
	if got, ok := openRequest(b, c.req); !ok || got != req {
		t.Fatalf("openRequest = %+v, %v, want %+v", got, ok, req)
	}
	if _, ok := openRequest(b, o.req); ok {
		t.Fatal("request opened under another client's key")
	}

	rep := reply{counter: 7, server: 987654321, horizon: 123456789}
	rb := c.reply(rep.counter, rep.server, rep.horizon)
	if got, ok := parseReply(rb, c.rep); !ok || got != rep {
		t.Fatalf("parseReply = %+v, %v, want %+v", got, ok, rep)
	}
	if _, ok := parseReply(rb, o.rep); ok {
		t.Fatal("reply accepted under another client's key")
	}
	long := append(append([]byte(nil), rb...), 0)
	for _, b := range [][]byte{nil, rb[:ReplySize-1], long} {
		if _, ok := parseReply(b, c.rep); ok {
			t.Errorf("reply of %d bytes accepted", len(b))
		}
	}
}

// Any flipped bit makes a datagram unauthentic, whichever field it hits.
func TestTamper(t *testing.T) {
	server, client := mustKey(t), mustKey(t)
	c := newTestClient(t, client, server.Public())
	req := c.request(time.Unix(1_800_000_000, 0), 1000)
	rep := c.reply(1000, 1_800_000_000_000_000_001, 1_799_999_000_000_000_000)
	tests := []struct {
		name  string
		pkt   []byte
		valid func([]byte) bool
	}{
		{"request", req, func(b []byte) bool { _, ok := openRequest(b, c.req); return ok }},
		{"reply", rep, func(b []byte) bool { _, ok := parseReply(b, c.rep); return ok }},
	}
	for _, tt := range tests {
		if !tt.valid(tt.pkt) {
			t.Fatalf("%s: the untampered datagram is refused", tt.name)
		}
		for bit := range 8 * len(tt.pkt) {
			b := append([]byte(nil), tt.pkt...)
			b[bit/8] ^= 1 << (bit % 8)
			if tt.valid(b) {
				t.Errorf("%s with bit %d flipped accepted", tt.name, bit)
			}
		}
	}
}

// Requests and replies are both 40 bytes with no type byte: only their
// keys keep one from being taken for the other.
func TestKeySeparation(t *testing.T) {
	server, client := mustKey(t), mustKey(t)
	c := newTestClient(t, client, server.Public())
	now := time.Unix(1_800_000_000, 0).UnixNano()
	req := request{id: clientID(&c.keys.k, epochOf(now)), ts: now, counter: 5}

	// The same plaintext, sealed with the other direction's keys.
	asReply := putRequest(make([]byte, RequestSize), c.rep, req)
	if _, ok := openRequest(asReply, c.req); ok {
		t.Error("a request sealed with the reply keys opens as a request")
	}
	rep := reply{counter: 5, server: now, horizon: 0}
	asRequest := putReply(make([]byte, ReplySize), c.req, rep)
	if _, ok := parseReply(asRequest, c.rep); ok {
		t.Error("a reply sealed with the request keys opens as a reply")
	}
	// Genuine datagrams, the wrong way round.
	if _, ok := parseReply(putRequest(make([]byte, RequestSize), c.req, req), c.rep); ok {
		t.Error("a request accepted as a reply")
	}
	if _, ok := openRequest(c.reply(5, now, 0), c.req); ok {
		t.Error("a reply accepted as a request")
	}
}

// What an observer without the keys sees of one client's probes, here
// over several epochs, must not link them: no byte and no 8-byte window
// is the same in all of them, consecutive requests (whose counters and
// timestamps differ by little, and whose v1 encodings shared 15 bytes)
// share no 8 bytes at any offset except, within one epoch, the id; and
// every epoch has its own id. The bounds are loose enough for random
// data: a chance match of 8 bytes is 2^-64 per pair of offsets.
func TestUnlinkable(t *testing.T) {
	tr := newTestResponder(t, ResponderConfig{Horizon: func() time.Time { return time.Unix(1_799_999_990, 0) }})
	start := tr.clock.t
	counter := uint64(start.UnixNano()) // as a Prober's
	const epochs, perEpoch = 8, 4
	type capture struct {
		epoch    int
		req, rep []byte
	}
	var caps []capture
	for e := range epochs {
		for i := range perEpoch {
			// A probe every 100 ms, an epoch (and a bit) apart.
			tr.clock.t = start.Add(time.Duration(e)*(1<<epochShift+time.Second) + time.Duration(i)*100*time.Millisecond)
			counter++
			req := tr.client.request(tr.clock.t, counter)
			rep := tr.handle(req)
			if rep == nil {
				t.Fatalf("epoch %d, probe %d: no reply", e, i)
			}
			caps = append(caps, capture{e, req, rep})
		}
	}

	// No byte position holds one value in every datagram of a kind.
	for _, kind := range []string{"request", "reply"} {
		for pos := range RequestSize {
			vals := map[byte]bool{}
			for _, c := range caps {
				b := c.req
				if kind == "reply" {
					b = c.rep
				}
				vals[b[pos]] = true
			}
			if len(vals) == 1 {
				t.Errorf("byte %d is the same in every %s", pos, kind)
			}
		}
	}

	ids := map[string]int{}
	for i, a := range caps {
		id := string(a.req[:idSize])
		if e, seen := ids[id]; seen && e != a.epoch {
			t.Errorf("epochs %d and %d share the id %x", e, a.epoch, id)
		}
		ids[id] = a.epoch
		for _, b := range caps[i+1:] {
			// Within an epoch the id is the same by design; the rest
			// must not be.
			ra, rb := a.req, b.req
			if a.epoch == b.epoch {
				ra, rb = ra[idSize:], rb[idSize:]
			}
			for _, pair := range [][2][]byte{{ra, rb}, {a.rep, b.rep}, {a.req, b.rep}, {a.rep, b.req}} {
				if w, ok := commonWindow(pair[0], pair[1], 8); ok {
					t.Errorf("captures (epoch %d) and (epoch %d) share the 8 bytes %x", a.epoch, b.epoch, w)
				}
			}
		}
	}
	if len(ids) != epochs {
		t.Errorf("%d ids over %d epochs", len(ids), epochs)
	}
}

// commonWindow returns an n-byte string that occurs in both a and b, at
// any offsets.
func commonWindow(a, b []byte, n int) ([]byte, bool) {
	seen := map[string]bool{}
	for i := 0; i+n <= len(a); i++ {
		seen[string(a[i:i+n])] = true
	}
	for i := 0; i+n <= len(b); i++ {
		if seen[string(b[i:i+n])] {
			return b[i : i+n], true
		}
	}
	return nil, false
}
