//go:build linux

package tunnel

import (
	"bytes"
	"context"
	"io"
	"net"
	"strconv"
	"testing"
)

// BenchmarkConnThroughput: one flow, client → concentrator over loopback,
// the server draining with WriteTo (io.Copy to io.Discard). Bytes are
// counted once the server has read them all. "tcp" is the same over a
// plain TCP listener, to show what MPTCP itself costs on one path.
func BenchmarkConnThroughput(b *testing.B) {
	for _, tr := range []struct {
		name   string
		listen func(testing.TB) net.Listener
	}{
		{"mptcp", func(t testing.TB) net.Listener { return listenMPTCP(t, false) }},
		{"tcp", plainTCPListener},
	} {
		for _, size := range []int{16 << 10, 64 << 10, 1 << 20} {
			b.Run(tr.name+"/write="+strconv.Itoa(size>>10)+"KiB", func(b *testing.B) {
				benchThroughput(b, tr.listen(b), size, false)
			})
		}
		b.Run(tr.name+"/ReadFrom", func(b *testing.B) {
			benchThroughput(b, tr.listen(b), 1<<20, true)
		})
	}
}

func benchThroughput(b *testing.B, ln net.Listener, size int, readFrom bool) {
	p := newPair(b, ServerConfig{}, ClientConfig{Server: lnAddr(ln)})
	got := make(chan int64, 1)
	serve(b, p.srv, ln, func(_ context.Context, f *Flow) {
		c, err := f.Accept()
		if err != nil {
			got <- -1
			return
		}
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		got <- n
	})
	c, err := p.cli.DialTCP(context.Background(), testDst)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, size)
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	if readFrom {
		if _, err := c.ReadFrom(&repeatReader{buf: buf, n: b.N}); err != nil {
			b.Fatal(err)
		}
	} else {
		for range b.N {
			if _, err := c.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
	}
	c.CloseWrite()
	if n := <-got; n != int64(b.N)*int64(size) {
		b.Fatalf("server read %d bytes, want %d", n, b.N*size)
	}
}

// repeatReader yields buf n times, in reads of whatever size asked.
type repeatReader struct {
	buf []byte
	n   int
	off int
}

func (r *repeatReader) Read(p []byte) (int, error) {
	if r.n == 0 {
		return 0, io.EOF
	}
	k := copy(p, r.buf[r.off:])
	r.off += k
	if r.off == len(r.buf) {
		r.off = 0
		r.n--
	}
	return k, nil
}

// BenchmarkFrame: sealing and opening alone (no sockets), the CPU
// ceiling of one flow, for each transport cipher.
func BenchmarkFrame(b *testing.B) {
	for _, c := range []CipherPolicy{CipherChaCha, CipherAES} {
		for _, size := range []int{1400, 16 << 10, writeFramePayload, maxPlaintext} {
			b.Run(c.String()+"/"+strconv.Itoa(size), func(b *testing.B) {
				benchFrame(b, c, size)
			})
		}
	}
}

func benchFrame(b *testing.B, c CipherPolicy, size int) {
	p := newPair(b, ServerConfig{Cipher: c}, ClientConfig{Cipher: c})
	cs, _, _, sr := p.handshake(b)
	var wire bytes.Buffer
	w := newConn(&fakeConn{w: &wire}, cs, nil, false, nil)
	w.frameCap = maxPlaintext // one frame of exactly size
	src := make([]byte, size)
	w.Write(src)
	frame := bytes.Clone(wire.Bytes())
	r := newConn(&fakeConn{r: &loopReader{b: frame}}, nil, sr, false, nil)
	out := make([]byte, 64<<10)
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	seal := make([]byte, 0, maxFrameSize)
	for range b.N {
		// Seal at the sender's next nonce; open the frame
		// recorded at nonce 0 (the receiver's nonce is reset
		// to match: the cost is the same).
		cs.Encrypt(seal, nil, src)
		sr.SetNonce(0)
		if _, err := r.Read(out); err != nil {
			b.Fatal(err)
		}
	}
}

// loopReader yields b over and over.
type loopReader struct {
	b   []byte
	off int
}

func (l *loopReader) Read(p []byte) (int, error) {
	n := copy(p, l.b[l.off:])
	l.off = (l.off + n) % len(l.b)
	return n, nil
}
