//go:build linux

package probe

import (
	"testing"
	"time"
)

// BenchmarkResponder measures the handler's cost per datagram, for a
// request it answers and for each kind it refuses.
func BenchmarkResponder(b *testing.B) {
	tr := newTestResponder(b, ResponderConfig{ClientRate: 1e9, ClientBurst: 1e9, GlobalRate: 1e9})
	now := tr.clock.t
	badMAC := tr.client.request(now, 2)
	badMAC[30] ^= 1
	replayed := tr.client.request(now, 1)
	tr.handle(replayed)
	refused := []struct {
		name string
		pkt  []byte
	}{
		{"replayed", replayed},
		{"badMAC", badMAC},
		{"unknownID", newTestClient(b, mustKey(b), tr.r.peers[0].pub).request(now, 3)},
		{"stale", tr.client.request(now.Add(time.Minute), 4)},
		{"malformed", make([]byte, 10)},
	}
	var out [ReplySize]byte

	b.Run("accepted", func(b *testing.B) {
		// Counters must be fresh: a batch, and the window reset
		// between batches (512 bytes zeroed per 4096 requests).
		const batch = 4096
		pkts := make([][]byte, batch)
		for i := range pkts {
			pkts[i] = tr.client.request(now, uint64(1000+i))
		}
		p := tr.r.peers[0]
		b.ReportAllocs()
		i := batch // reset first: an earlier run (-count) used these counters
		for b.Loop() {
			if i == batch {
				p.win = window{}
				i = 0
			}
			if tr.r.handle(pkts[i], out[:]) == nil {
				b.Fatal("no reply")
			}
			i++
		}
	})
	for _, rc := range refused {
		b.Run(rc.name, func(b *testing.B) {
			// "accepted" leaves the window where its last batch
			// ended, which may be reset below counter 1: record the
			// replayed request again, so that it is a replay.
			tr.r.handle(rc.pkt, out[:])
			b.ReportAllocs()
			for b.Loop() {
				if tr.r.handle(rc.pkt, out[:]) != nil {
					b.Fatal("reply")
				}
			}
		})
	}
}

// BenchmarkServerNow measures what each new flow pays for the server's
// clock, with a full window of samples.
func BenchmarkServerNow(b *testing.B) {
	// Ten paths' replies of the last 10 s.
	start := time.Now().Add(-clockWindow)
	p := &Prober{clock: serverClock{base: start}}
	for i := range 1000 {
		at := start.Add(time.Duration(i) * 10 * time.Millisecond)
		p.clock.add(at.UnixNano()-int64(i%7), 0, at)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := p.ServerNow(); !ok {
			b.Fatal("no estimate")
		}
	}
}
