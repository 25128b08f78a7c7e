//go:build linux

package tunnel

import (
	"context"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// recorder relays one connection at a time to upstream and keeps what the
// client sent first: msg1, and the request frame when one follows.
type recorder struct {
	ln       net.Listener
	upstream string
	mu       sync.Mutex
	sent     [][]byte // per connection, the client's first bytes
	wg       sync.WaitGroup
}

func newRecorder(t *testing.T, upstream string) *recorder {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &recorder{ln: ln, upstream: upstream}
	r.wg.Add(1)
	go r.run()
	t.Cleanup(func() { ln.Close(); r.wg.Wait() })
	return r
}

func (r *recorder) run() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			defer c.Close()
			up, err := net.Dial("tcp", r.upstream)
			if err != nil {
				return
			}
			defer up.Close()
			var got []byte
			done := make(chan struct{})
			go func() {
				io.Copy(c, up)
				c.(*net.TCPConn).CloseWrite()
				close(done)
			}()
			buf := make([]byte, 4096)
			for {
				n, err := c.Read(buf)
				if n > 0 && len(got) < msg1Size+requestFrameSize {
					got = append(got, buf[:min(n, msg1Size+requestFrameSize-len(got))]...)
				}
				if n > 0 {
					up.Write(buf[:n])
				}
				if err != nil {
					break
				}
			}
			up.(*net.TCPConn).CloseWrite()
			<-done
			r.mu.Lock()
			r.sent = append(r.sent, got)
			r.mu.Unlock()
		}()
	}
}

// A flow that finds no pooled connection sends its destination only in
// a request frame, after the handshake (forward-secret keys), unless
// EarlyDestination: then in msg1. Replayed to other concentrators with
// the same keys but their own replay caches (the members of a fleet), the
// first dials nothing anywhere; the second is dialled by each member once.
func TestFleetReplay(t *testing.T) {
	for _, tc := range []struct {
		name  string
		early bool
	}{
		{"forward secret (default)", false},
		{"early destination", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln := listenMPTCP(t, false)
			p := newPair(t, ServerConfig{}, ClientConfig{PoolSize: -1, EarlyDestination: tc.early})
			var pooled atomic.Int64
			var handled atomic.Int64
			serve(t, p.srv, ln, func(ctx context.Context, f *Flow) {
				handled.Add(1)
				if f.pooled {
					pooled.Add(1)
				}
				echoAccept(ctx, f)
			})
			rec := newRecorder(t, ln.Addr().String())
			cli, err := NewClient(ClientConfig{Server: lnAddr(rec.ln), Key: p.clientKey, ServerKey: p.serverKey.Public(),
				PoolSize: -1, EarlyDestination: tc.early})
			if err != nil {
				t.Fatal(err)
			}
			c, err := cli.DialTCP(context.Background(), testDst)
			if err != nil {
				t.Fatal(err)
			}
			msg := []byte("through the first member")
			if _, err := c.Write(msg); err != nil {
				t.Fatal(err)
			}
			back := make([]byte, len(msg))
			if _, err := io.ReadFull(c, back); err != nil || string(back) != string(msg) {
				t.Fatalf("echo %q, %v", back, err)
			}
			c.Close()
			if handled.Load() != 1 {
				t.Fatalf("the first member handled %d flows, want 1", handled.Load())
			}
			if got, want := pooled.Load() == 1, !tc.early; got != want {
				t.Fatalf("the destination came in a request frame: %v, want %v", got, want)
			}
			var sent []byte
			waitFor(t, "the recorder to see the connection end", func() bool {
				rec.mu.Lock()
				defer rec.mu.Unlock()
				if len(rec.sent) == 1 {
					sent = rec.sent[0]
				}
				return sent != nil
			})
			if len(sent) < msg1Size {
				t.Fatalf("recorded %d bytes, want msg1 (%d) at least", len(sent), msg1Size)
			}

			// The other members: same key, same peers, their own caches.
			for i := range 2 {
				member, err := NewServer(ServerConfig{Key: p.serverKey, Peers: []PublicKey{p.clientKey.Public()}})
				if err != nil {
					t.Fatal(err)
				}
				member.horizon = member.start.Add(-time.Hour)
				mln := listenMPTCP(t, false)
				var dials atomic.Int64
				serve(t, member, mln, func(ctx context.Context, f *Flow) { dials.Add(1); f.Refuse(Refused) })
				rc, err := net.Dial("tcp", mln.Addr().String())
				if err != nil {
					t.Fatal(err)
				}
				rc.Write(sent)
				rc.SetReadDeadline(time.Now().Add(3 * time.Second))
				io.Copy(io.Discard, rc)
				rc.Close()
				switch {
				case !tc.early && dials.Load() != 0:
					t.Errorf("member %d: the replay reached the handler %d times: it would have dialled", i+2, dials.Load())
				case tc.early && dials.Load() != 1:
					// What the default prevents: a msg1 naming its
					// destination is dialled by every member that
					// has not seen it.
					t.Errorf("member %d: the replay of a msg1 with its destination reached the handler %d times, want 1 (the check cannot see what it should)", i+2, dials.Load())
				}
			}
		})
	}
}

// Flows that find no pooled connection, many at once: each authenticates
// as a pool connection would, but as a flow being opened, so more of them
// than the concentrator's cap on pooled connections all connect.
func TestFreshFlowsBeyondPoolCap(t *testing.T) {
	ln := listenMPTCP(t, false)
	p := newPair(t, ServerConfig{MaxPooledPerPeer: 2}, ClientConfig{Server: lnAddr(ln), PoolSize: -1})
	serve(t, p.srv, ln, echoAccept)
	const flows = 20
	type result struct {
		c   *Conn
		err error
	}
	results := make(chan result, flows)
	for range flows {
		go func() {
			c, err := p.cli.DialTCP(context.Background(), testDst)
			results <- result{c, err}
		}()
	}
	for range flows {
		r := <-results
		if r.err != nil {
			t.Errorf("flow: %v", r.err)
			continue
		}
		defer r.c.Close()
	}
	st := p.srv.Stats()
	if st.PoolLimited != 0 || st.Flows != flows {
		t.Errorf("server: %d flows, %d answered Limited for the pool cap; want %d and 0", st.Flows, st.PoolLimited, flows)
	}
}
