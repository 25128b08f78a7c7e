//go:build linux

package tunnel

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/flynn/noise"
)

// TestConnHalfClose: data both ways at once, then each side half-closes in
// turn and the other direction keeps working.
func TestConnHalfClose(t *testing.T) {
	for _, size := range []int{1, 1000, writeFramePayload, writeFramePayload + 1, maxPlaintext + 1, 3<<20 + 7} {
		t.Run(byteCount(size), func(t *testing.T) {
			cli, srv := connPair(t)
			up, down := randBytes(t, size), randBytes(t, size)
			var wg sync.WaitGroup
			var gotUp []byte
			var upErr error
			wg.Add(1)
			go func() {
				defer wg.Done()
				gotUp, upErr = io.ReadAll(srv) // ends at the client's EOF frame
			}()
			if _, err := cli.Write(up); err != nil {
				t.Fatal(err)
			}
			if err := cli.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			if _, err := cli.Write([]byte("x")); !errors.Is(err, ErrWriteAfterCloseWrite) {
				t.Fatalf("Write after CloseWrite: %v", err)
			}
			wg.Wait()
			if upErr != nil || !bytes.Equal(gotUp, up) {
				t.Fatalf("server read %d bytes, err %v; want %d", len(gotUp), upErr, len(up))
			}
			// Server → client still flows after the client's half-close.
			wg.Add(1)
			var gotDown []byte
			var downErr error
			go func() {
				defer wg.Done()
				gotDown, downErr = io.ReadAll(cli)
			}()
			if _, err := srv.Write(down); err != nil {
				t.Fatal(err)
			}
			if err := srv.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			wg.Wait()
			if downErr != nil || !bytes.Equal(gotDown, down) {
				t.Fatalf("client read %d bytes, err %v; want %d", len(gotDown), downErr, len(down))
			}
			// EOF is sticky.
			if n, err := cli.Read(make([]byte, 10)); n != 0 || err != io.EOF {
				t.Fatalf("Read after EOF: %d %v", n, err)
			}
		})
	}
}

// TestConnCopy: io.Copy both ways at once through WriterTo/ReaderFrom.
func TestConnCopy(t *testing.T) {
	cli, srv := connPair(t)
	up, down := randBytes(t, 5<<20), randBytes(t, 3<<20)
	var wg sync.WaitGroup
	var gotUp, gotDown bytes.Buffer
	var errs [4]error
	wg.Add(4)
	go func() { defer wg.Done(); _, errs[0] = cli.ReadFrom(bytes.NewReader(up)); cli.CloseWrite() }()
	go func() { defer wg.Done(); _, errs[1] = srv.ReadFrom(bytes.NewReader(down)); srv.CloseWrite() }()
	go func() { defer wg.Done(); _, errs[2] = srv.WriteTo(&gotUp) }()
	go func() { defer wg.Done(); _, errs[3] = cli.WriteTo(&gotDown) }()
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("copy %d: %v", i, err)
		}
	}
	if !bytes.Equal(gotUp.Bytes(), up) || !bytes.Equal(gotDown.Bytes(), down) {
		t.Fatalf("got %d/%d bytes, want %d/%d", gotUp.Len(), gotDown.Len(), len(up), len(down))
	}
}

// frames splits a recorded stream into whole frames (header included).
func frames(t testing.TB, stream []byte) [][]byte {
	t.Helper()
	var out [][]byte
	for len(stream) > 0 {
		n := frameHeaderSize + int(binary.BigEndian.Uint16(stream))
		out = append(out, stream[:n:n])
		stream = stream[n:]
	}
	return out
}

// recordStream writes chunks (one frame each) and the end-of-stream frame
// through a Conn and returns the bytes it put on the wire, with the keys
// the receiving side needs (for ChaCha20-Poly1305, the cipherSuite's:
// the tests of framing make their receiver from the key).
func recordStream(t testing.TB, chunks ...[]byte) (stream []byte, recvKey [32]byte) {
	t.Helper()
	p := newPair(t, ServerConfig{}, ClientConfig{Cipher: CipherChaCha})
	cs, _, _, sr := p.handshake(t)
	var wire bytes.Buffer
	c := newConn(&fakeConn{w: &wire}, cs, nil, false, nil)
	c.frameCap = maxPlaintext // one frame per chunk, up to the largest
	for _, ch := range chunks {
		if _, err := c.Write(ch); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	return wire.Bytes(), sr.UnsafeKey()
}

// readMode is how a test drains a Conn: small Reads, big Reads, WriteTo.
type readMode struct {
	name string
	read func(c *Conn) ([]byte, error)
}

var readModes = []readMode{
	{"Read7", func(c *Conn) ([]byte, error) { return readAllWith(c, 7) }},
	{"Read64K", func(c *Conn) ([]byte, error) { return readAllWith(c, 64<<10) }},
	{"WriteTo", func(c *Conn) ([]byte, error) {
		var b bytes.Buffer
		_, err := c.WriteTo(&b)
		if err == nil {
			err = io.EOF
		}
		return b.Bytes(), err
	}},
}

func readAllWith(c *Conn, size int) ([]byte, error) {
	var out []byte
	buf := make([]byte, size)
	for {
		n, err := c.Read(buf)
		out = append(out, buf[:n]...)
		if err != nil {
			return out, err
		}
	}
}

// TestConnTamper: every way of altering the stream on the wire ends the
// flow with an error, closes it, and delivers only the frames before the
// alteration, never a byte of the altered one.
func TestConnTamper(t *testing.T) {
	chunks := [][]byte{[]byte("frame zero."), bytes.Repeat([]byte("one "), 300), []byte("frame two, the last")}
	stream, key := recordStream(t, chunks...)
	fr := frames(t, stream)
	if len(fr) != 4 {
		t.Fatalf("%d frames, want 3 + end of stream", len(fr))
	}
	join := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	flip := func(f []byte, i int) []byte {
		g := bytes.Clone(f)
		g[i] ^= 0x01
		return g
	}
	fake := make([]byte, frameHeaderSize+40)
	binary.BigEndian.PutUint16(fake, 40)
	rand.Read(fake[2:])
	after := bytes.Clone(fr[1])

	tests := []struct {
		name    string
		wire    []byte
		good    int // chunks delivered before the failure
		wantErr error
	}{
		{"intact", stream, 3, io.EOF},
		{"flip ciphertext bit", join(fr[0], flip(fr[1], 10), fr[2], fr[3]), 1, ErrTampered},
		{"flip tag bit", join(fr[0], flip(fr[1], len(fr[1])-1), fr[2], fr[3]), 1, ErrTampered},
		{"flip length bit", join(fr[0], flip(fr[1], 1), fr[2], fr[3]), 1, nil},
		{"truncate mid frame", join(fr[0], fr[1][:100]), 1, ErrTruncated},
		{"truncate mid header", join(fr[0], fr[1][:1]), 1, ErrTruncated},
		{"truncate at frame boundary", join(fr[0], fr[1]), 2, ErrTruncated},
		{"drop end of stream", join(fr[0], fr[1], fr[2]), 3, ErrTruncated},
		{"duplicate frame", join(fr[0], fr[1], fr[1], fr[2], fr[3]), 2, ErrTampered},
		{"reorder frames", join(fr[0], fr[2], fr[1], fr[3]), 1, ErrTampered},
		{"drop frame", join(fr[0], fr[2], fr[3]), 1, ErrTampered},
		{"inject frame", join(fr[0], fake, fr[1], fr[2], fr[3]), 1, ErrTampered},
		{"frame after end of stream", join(fr[0], fr[1], fr[2], fr[3], after), 3, ErrBadFrame},
		{"length 0", join(fr[0], []byte{0, 0}, fr[1]), 1, ErrBadFrame},
		{"length 15", join(fr[0], []byte{0, 15}, make([]byte, 15)), 1, ErrBadFrame},
		{"largest length of garbage", join(fr[0], maxLen(0), make([]byte, maxCiphertext)), 1, ErrTampered},
		{"largest length then end", join(fr[0], maxLen(0), make([]byte, 100)), 1, ErrTruncated},
		// Refused on the header alone: nothing after it is read.
		{"length one over the largest", join(fr[0], maxLen(1), make([]byte, maxCiphertext+1)), 1, ErrBadFrame},
		{"length 65535", join(fr[0], []byte{0xff, 0xff}, make([]byte, 65535)), 1, ErrBadFrame},
		{"empty stream", nil, 0, ErrTruncated},
	}
	for _, tt := range tests {
		for _, mode := range readModes {
			t.Run(tt.name+"/"+mode.name, func(t *testing.T) {
				recv := noise.UnsafeNewCipherState(cipherSuite, key, 0)
				raw := &fakeConn{r: bytes.NewReader(tt.wire)}
				c := newConn(raw, nil, recv, false, nil)
				got, err := mode.read(c)
				want := bytes.Join(chunks[:tt.good], nil)
				if !bytes.Equal(got, want) {
					t.Fatalf("delivered %d bytes %q…, want exactly the %d bytes of the first %d frames", len(got), head(got), len(want), tt.good)
				}
				switch {
				case tt.wantErr == io.EOF:
					if err != io.EOF {
						t.Fatalf("err = %v, want io.EOF", err)
					}
					return
				case err == nil || err == io.EOF:
					t.Fatalf("err = %v, want a failure", err)
				case tt.wantErr != nil && !errors.Is(err, tt.wantErr):
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				if !raw.closed.Load() {
					t.Fatal("the connection was not closed after a bad frame")
				}
				// The failure is sticky: nothing more comes out.
				if n, err2 := c.Read(make([]byte, 100)); n != 0 || err2 == nil || err2 == io.EOF {
					t.Fatalf("Read after failure: %d, %v", n, err2)
				}
			})
		}
	}
}

// maxLen is a frame header announcing the largest ciphertext plus extra.
func maxLen(extra int) []byte { return binary.BigEndian.AppendUint16(nil, uint16(maxCiphertext+extra)) }

func head(b []byte) []byte {
	if len(b) > 20 {
		return b[:20]
	}
	return b
}

// TestConnFrameAcrossBufferEnd: frames laid out so that a header, then a
// body, straddles the end of the read buffer (a case the fuzzer found
// hanging: a read into an empty slice returns 0, nil).
func TestConnFrameAcrossBufferEnd(t *testing.T) {
	for _, first := range []int{
		maxPlaintext - 1, // frames 1+2 end one byte short of the buffer's end: split header
		maxPlaintext - 2, // two bytes short: header fits, body does not
		maxPlaintext,     // ends exactly at the buffer's end
	} {
		chunks := [][]byte{randBytes(t, maxPlaintext), randBytes(t, first), []byte("third"), randBytes(t, 1000)}
		stream, key := recordStream(t, chunks...)
		want := bytes.Join(chunks, nil)
		for _, mode := range readModes {
			c := newConn(&fakeConn{r: bytes.NewReader(stream)}, nil, noise.UnsafeNewCipherState(cipherSuite, key, 0), false, nil)
			done := make(chan struct{})
			var got []byte
			var err error
			go func() { defer close(done); got, err = mode.read(c) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatalf("%s, second frame %d: hung", mode.name, first)
			}
			if err != io.EOF || !bytes.Equal(got, want) {
				t.Fatalf("%s, second frame %d: %d bytes, %v", mode.name, first, len(got), err)
			}
		}
	}
}

// TestConnFrameSizes: a large Write goes out in frames of 32 KiB on the
// wire, a small one in one frame, an empty one in none.
func TestConnFrameSizes(t *testing.T) {
	p := newPair(t, ServerConfig{}, ClientConfig{})
	cs, _, _, _ := p.handshake(t)
	var wire bytes.Buffer
	c := newConn(&fakeConn{w: &wire}, cs, nil, false, nil)
	for _, n := range []int{0, 5, 100_000} {
		wire.Reset()
		if k, err := c.Write(make([]byte, n)); k != n || err != nil {
			t.Fatalf("Write(%d) = %d, %v", n, k, err)
		}
		var sizes []int
		for _, f := range frames(t, wire.Bytes()) {
			sizes = append(sizes, len(f)-frameHeaderSize-tagSize)
		}
		want := map[int][]int{0: nil, 5: {5}, 100_000: {maxPlaintext, maxPlaintext, maxPlaintext, 100_000 - 3*maxPlaintext}}[n]
		if !slices.Equal(sizes, want) {
			t.Fatalf("Write(%d): frames of %v, want %v", n, sizes, want)
		}
	}
}

// TestConnLengthCheckedFirst: a length under the tag size fails as soon as
// the header is read, before anything after it is read or allocated.
func TestConnLengthCheckedFirst(t *testing.T) {
	for _, n := range []uint16{0, 1, 15} {
		r := &strictReader{data: binary.BigEndian.AppendUint16(nil, n)}
		c := newConn(&fakeConn{r: r}, nil, nil, false, nil)
		if _, err := c.Read(make([]byte, 10)); !errors.Is(err, ErrBadFrame) {
			t.Fatalf("length %d: err = %v, want ErrBadFrame", n, err)
		}
		if r.overread {
			t.Fatalf("length %d: read past the header", n)
		}
	}
}

// strictReader serves data, then records any further read.
type strictReader struct {
	data     []byte
	overread bool
}

func (r *strictReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		r.overread = true
		return 0, io.EOF
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

// TestConnNoAllocPerFrame: reading and writing a frame costs no heap
// allocation of ours in steady state (flynn/noise v1.1.0 itself allocates
// its 12-byte nonce per Encrypt/Decrypt: one allocation per frame), and
// what a peer sends never sizes one.
func TestConnNoAllocPerFrame(t *testing.T) {
	if testing.Short() {
		cannotRun(t, "allocation counts need a full run, not -short")
	}
	p := newPair(t, ServerConfig{}, ClientConfig{})
	cs, _, _, sr := p.handshake(t)
	payload := randBytes(t, 16<<10)
	var wire bytes.Buffer
	w := newConn(&fakeConn{w: &wire}, cs, nil, false, nil)
	const frames = 200
	for range frames {
		w.Write(payload)
	}
	r := newConn(&fakeConn{r: bytes.NewReader(wire.Bytes())}, nil, sr, false, nil)
	buf := make([]byte, 64<<10)
	r.Read(buf) // warm the pool
	allocs := testing.AllocsPerRun(frames-10, func() {
		if _, err := r.Read(buf); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 1.1 {
		t.Errorf("Read: %.2f allocations per frame, want 1 (the nonce inside flynn/noise)", allocs)
	}
	w2 := newConn(&fakeConn{}, cs, nil, false, nil)
	allocs = testing.AllocsPerRun(100, func() { w2.Write(payload) })
	if allocs > 1.1 {
		t.Errorf("Write: %.2f allocations per frame, want 1 (the nonce inside flynn/noise)", allocs)
	}

	// A hostile peer announcing maximal frames of garbage costs at most
	// the one fixed-size pooled buffer per connection.
	garbage := append(maxLen(0), make([]byte, maxCiphertext)...)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	const conns = 20
	for range conns {
		c := newConn(&fakeConn{r: bytes.NewReader(garbage)}, nil, noise.UnsafeNewCipherState(cipherSuite, [32]byte{}, 0), false, nil)
		if _, err := c.Read(buf); !errors.Is(err, ErrTampered) {
			t.Fatalf("garbage frame: %v", err)
		}
	}
	runtime.ReadMemStats(&after)
	if per := (after.TotalAlloc - before.TotalAlloc) / conns; per > readBufSize+16<<10 {
		t.Errorf("%d bytes allocated per hostile connection, want ≤ one read buffer (%d)", per, readBufSize)
	}
}

// TestConnNonceExhaustion: the last nonce is used, the next Write fails
// with ErrMaxNonce and closes the flow; the receiver refuses likewise.
func TestConnNonceExhaustion(t *testing.T) {
	p := newPair(t, ServerConfig{}, ClientConfig{})
	cs, _, _, sr := p.handshake(t)
	cs.SetNonce(noise.MaxNonce)
	sr.SetNonce(noise.MaxNonce)
	var wire bytes.Buffer
	wraw := &fakeConn{w: &wire}
	w := newConn(wraw, cs, nil, false, nil)
	if _, err := w.Write([]byte("last")); err != nil {
		t.Fatalf("write with the last nonce: %v", err)
	}
	if _, err := w.Write([]byte("one too many")); !errors.Is(err, noise.ErrMaxNonce) {
		t.Fatalf("write past the last nonce: %v, want ErrMaxNonce", err)
	}
	if !wraw.closed.Load() {
		t.Fatal("sender not closed after nonce exhaustion")
	}
	if err := w.CloseWrite(); err == nil {
		t.Fatal("CloseWrite after nonce exhaustion succeeded")
	}

	rraw := &fakeConn{r: io.MultiReader(bytes.NewReader(wire.Bytes()), bytes.NewReader(wire.Bytes()))}
	r := newConn(rraw, nil, sr, false, nil)
	buf := make([]byte, 100)
	if n, err := r.Read(buf); err != nil || string(buf[:n]) != "last" {
		t.Fatalf("read with the last nonce: %q %v", buf[:n], err)
	}
	if n, err := r.Read(buf); n != 0 || !errors.Is(err, noise.ErrMaxNonce) {
		t.Fatalf("read past the last nonce: %d %v, want ErrMaxNonce", n, err)
	}
	if !rraw.closed.Load() {
		t.Fatal("receiver not closed after nonce exhaustion")
	}
}

// TestConnDeadline: a read deadline in the middle of a frame is not fatal;
// the next Read resumes the same frame. A write deadline that sent
// nothing leaves the stream usable.
func TestConnDeadline(t *testing.T) {
	msg := randBytes(t, 50000)
	stream, key := recordStream(t, msg)
	for _, cut := range []int{1, 2, 3, 1000, len(stream) - 17} {
		r := &scriptedReader{steps: []step{
			{data: stream[:cut]},
			{err: os.ErrDeadlineExceeded},
			{data: stream[cut:]},
		}}
		c := newConn(&fakeConn{r: r}, nil, noise.UnsafeNewCipherState(cipherSuite, key, 0), false, nil)
		var got []byte
		buf := make([]byte, 64<<10)
		timeouts := 0
		for {
			n, err := c.Read(buf)
			got = append(got, buf[:n]...)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				timeouts++
				continue
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("cut %d: %v", cut, err)
			}
		}
		if timeouts != 1 || !bytes.Equal(got, msg) {
			t.Fatalf("cut %d: %d timeouts, %d bytes; want 1 and %d", cut, timeouts, len(got), len(msg))
		}
	}

	// Write deadline with nobody reading: net.Pipe writes nothing, the
	// nonce is taken back, and the next frame still decrypts.
	cli, srv := connPair(t)
	cli.SetWriteDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := cli.Write([]byte("lost")); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write with nobody reading: %v", err)
	}
	cli.SetWriteDeadline(time.Time{})
	done := make(chan error, 1)
	go func() { _, err := cli.Write([]byte("kept")); done <- err }()
	buf := make([]byte, 10)
	n, err := srv.Read(buf)
	if err != nil || string(buf[:n]) != "kept" {
		t.Fatalf("after a write deadline: %q %v", buf[:n], err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// scriptedReader returns each step's data or error in turn, then EOF.
type scriptedReader struct{ steps []step }

type step struct {
	data []byte
	err  error
}

func (r *scriptedReader) Read(p []byte) (int, error) {
	for len(r.steps) > 0 {
		s := &r.steps[0]
		if s.err != nil {
			err := s.err
			r.steps = r.steps[1:]
			return 0, err
		}
		if len(s.data) == 0 {
			r.steps = r.steps[1:]
			continue
		}
		n := copy(p, s.data)
		s.data = s.data[n:]
		return n, nil
	}
	return 0, io.EOF
}

// TestConnCloseUnblocks: Close wakes a blocked Read, which reports the
// close rather than EOF.
func TestConnCloseUnblocks(t *testing.T) {
	cli, _ := connPair(t)
	done := make(chan error, 1)
	go func() {
		_, err := cli.Read(make([]byte, 10))
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	cli.Close()
	select {
	case err := <-done:
		if err == nil || err == io.EOF {
			t.Fatalf("Read after Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Read still blocked after Close")
	}
}

func randBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func byteCount(n int) string { return strconv.Itoa(n) + "B" }
