//go:build linux

package probe

import (
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/mpvpn/mpvpn/tunnel"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func mustKey(t testing.TB) tunnel.PrivateKey {
	t.Helper()
	k, err := tunnel.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// testClient builds requests as a Prober would, and opens replies, for
// the handler tests. req and rep are both directions' keys: a test may use
// either end's.
type testClient struct {
	keys     keys
	req, rep *siv
}

func newTestClient(t testing.TB, priv tunnel.PrivateKey, server tunnel.PublicKey) *testClient {
	t.Helper()
	ks, err := deriveKeys(priv, server, priv.Public(), server)
	if err != nil {
		t.Fatal(err)
	}
	return &testClient{keys: ks, req: newRequestSIV(&ks), rep: newReplySIV(&ks)}
}

func (c *testClient) request(ts time.Time, counter uint64) []byte {
	wall := ts.UnixNano()
	return putRequest(make([]byte, RequestSize), c.req, request{id: clientID(&c.keys.k, epochOf(wall)), ts: wall, counter: counter})
}

// reply is what the server would answer to counter.
func (c *testClient) reply(counter uint64, server, horizon int64) []byte {
	return putReply(make([]byte, ReplySize), c.rep, reply{counter: counter, server: server, horizon: horizon})
}

// fixedClock is a settable clock for a Responder.
type fixedClock struct{ t time.Time }

func (c *fixedClock) now() time.Time { return c.t }

// testResponder is a Responder with one known client and a fixed clock.
type testResponder struct {
	r      *Responder
	client *testClient
	clock  *fixedClock
}

func newTestResponder(t testing.TB, cfg ResponderConfig) *testResponder {
	t.Helper()
	server := mustKey(t)
	client := mustKey(t)
	clock := &fixedClock{t: time.Unix(1_800_000_000, 0)}
	cfg.Key = server
	cfg.Peers = append(cfg.Peers, client.Public())
	cfg.Now = clock.now
	r, err := NewResponder(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &testResponder{r: r, client: newTestClient(t, client, server.Public()), clock: clock}
}

func (tr *testResponder) handle(pkt []byte) []byte {
	var out [ReplySize]byte
	b := tr.r.handle(pkt, out[:])
	if b == nil {
		return nil
	}
	return append([]byte(nil), b...)
}

// validRequest reports whether b is a request that c authenticates, as an
// independent check of the responder.
func (c *testClient) validRequest(b []byte) bool {
	if _, ok := requestID(b); !ok {
		return false
	}
	req, ok := openRequest(b, c.req)
	if !ok || req.id != clientID(&c.keys.k, epochOf(req.ts)) {
		return false
	}
	want := putRequest(make([]byte, RequestSize), c.req, req)
	return string(want) == string(b)
}
