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
	if o.k == c.k || o.mac == c.mac || c.k == c.mac {
		t.Fatal("keys of different clients, or K and Kmac, are equal")
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

func TestBucket(t *testing.T) {
	b := newBucket(100, 50)
	now := time.Unix(1000, 0).UnixNano()
	n := 0
	for range 1000 {
		if b.take(now) {
			n++
		}
	}
	if n != 50 {
		t.Fatalf("burst: %d tokens, want 50", n)
	}
	now += int64(100 * time.Millisecond)
	n = 0
	for range 1000 {
		if b.take(now) {
			n++
		}
	}
	if n != 10 {
		t.Fatalf("after 100ms: %d tokens, want 10", n)
	}
	now += int64(time.Hour)
	n = 0
	for range 1000 {
		if b.take(now) {
			n++
		}
	}
	if n != 50 {
		t.Fatalf("after an hour: %d tokens, want the burst, 50", n)
	}
	// A clock that steps back gives nothing extra.
	now -= int64(time.Hour)
	if b.take(now) {
		t.Fatal("token after the clock stepped back")
	}
}

func TestReplyRoundTrip(t *testing.T) {
	server, client := mustKey(t), mustKey(t)
	c := newTestClient(t, client, server.Public())
	req := request{counter: 7, ts: 123456789}
	var scratch [macSize]byte
	b := putReply(make([]byte, ReplySize), c.mac, req, 987654321, &scratch)
	got, ok := parseReply(b, c.mac)
	if !ok || got != (reply{counter: 7, ts: 123456789, server: 987654321}) {
		t.Fatalf("parseReply = %+v, %v", got, ok)
	}
	b[0] = typeRequest
	if _, ok := parseReply(b, c.mac); ok {
		t.Fatal("reply with request type accepted")
	}
	o := newTestClient(t, mustKey(t), server.Public())
	b[0] = typeReply
	if _, ok := parseReply(b, o.mac); ok {
		t.Fatal("reply accepted under another client's key")
	}
}
