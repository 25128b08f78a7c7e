//go:build linux

package tunnel

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/flynn/noise"
	"golang.org/x/sys/unix"
)

// readySource is a reader that says whether it holds more bytes, as the
// netstack's conns do.
type readySource struct{ *bytes.Reader }

func (r readySource) Readable() bool { return r.Len() > 0 }

// countingWriter records the size of every Write.
type countingWriter struct {
	bytes.Buffer
	writes []int
}

func (w *countingWriter) Write(p []byte) (int, error) {
	w.writes = append(w.writes, len(p))
	return w.Buffer.Write(p)
}

func TestReadFromBatches(t *testing.T) {
	const fc = 1000 // frameCap
	frame := frameHeaderSize + fc + tagSize
	tests := []struct {
		name     string
		size     int
		readable bool
		want     []int // write sizes, the end-of-stream frame not included
	}{
		{"one short frame", 300, true, []int{frameHeaderSize + 300 + tagSize}},
		{"exactly one frame", fc, true, []int{frame}},
		{"three frames, one write", 2*fc + 500, true, []int{3*frame - fc + 500}},
		{"a full batch, then the rest", 5*fc + 500, true, []int{4 * frame, 2*frame - fc + 500}},
		{"no Readable: a write per frame", 2*fc + 500, false, []int{frame, frame, frameHeaderSize + 500 + tagSize}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, wire, sr := sealingConn(t)
			c.frameCap = fc
			data := bytes.Repeat([]byte("0123456789abcdef"), tt.size/16+1)[:tt.size]
			var src io.Reader = readySource{bytes.NewReader(data)}
			if !tt.readable {
				src = bytes.NewReader(data)
			}
			n, err := c.ReadFrom(src)
			if err != nil || n != int64(tt.size) {
				t.Fatalf("ReadFrom = %d, %v; want %d, nil", n, err, tt.size)
			}
			if !equalInts(wire.writes, tt.want) {
				t.Errorf("writes %v, want %v", wire.writes, tt.want)
			}
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			r := newConn(&fakeConn{r: bytes.NewReader(wire.Bytes())}, nil, sr, false, nil)
			got, err := io.ReadAll(r)
			if err != nil {
				t.Fatalf("reading the stream back: %v", err)
			}
			if !bytes.Equal(got, data) {
				t.Errorf("read back %d bytes, not the %d sent", len(got), len(data))
			}
		})
	}
}

// A source error after full frames: the frames read before it are sent,
// then the error is returned.
func TestReadFromBatchThenError(t *testing.T) {
	c, wire, sr := sealingConn(t)
	c.frameCap = 1000
	boom := errors.New("boom")
	data := bytes.Repeat([]byte{7}, 2000)
	src := readySource{bytes.NewReader(data)}
	n, err := c.ReadFrom(&failAtEnd{readySource: src, err: boom})
	if !errors.Is(err, boom) || n != 2000 {
		t.Fatalf("ReadFrom = %d, %v; want 2000, boom", n, err)
	}
	if len(wire.writes) != 1 {
		t.Errorf("writes %v, want the two frames in one", wire.writes)
	}
	c.CloseWrite()
	got, _ := io.ReadAll(newConn(&fakeConn{r: bytes.NewReader(wire.Bytes())}, nil, sr, false, nil))
	if !bytes.Equal(got, data) {
		t.Errorf("read back %d bytes, want %d", len(got), len(data))
	}
}

// failAtEnd returns err instead of io.EOF, and stays Readable, as a
// reset conn is.
type failAtEnd struct {
	readySource
	err error
}

func (f *failAtEnd) Read(p []byte) (int, error) {
	n, err := f.readySource.Read(p)
	if err == io.EOF {
		return n, f.err
	}
	return n, err
}

func (f *failAtEnd) Readable() bool { return true }

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// sealingConn is a client's Conn writing to a recorded wire, and the
// server's receiving keys to read what it wrote back.
func sealingConn(t *testing.T) (*Conn, *countingWriter, *noise.CipherState) {
	p := newPair(t, ServerConfig{}, ClientConfig{})
	cs, _, _, sr := p.handshake(t)
	wire := &countingWriter{}
	return newConn(&fakeConn{w: wire}, cs, nil, false, nil), wire, sr
}

// eofReadable is Readable at its end too, as a netstack conn is once the
// app's FIN is in.
type eofReadable struct{ *bytes.Reader }

func (eofReadable) Readable() bool { return true }

// ReadFromAndCloseWrite sends the end-of-stream frame in the same write
// as the last bytes when the source has its EOF ready behind them: from
// a netstack-like reader, and from a socket whose peer wrote and closed.
func TestReadFromAndCloseWriteOneWrite(t *testing.T) {
	small := bytes.Repeat([]byte("x"), 300)
	// A full batch whose last frame is short: the look for the EOF
	// reads into that frame's rest (it once sliced past the batch).
	big := bytes.Repeat([]byte("y"), 3*writeFramePayload+500)
	frame := func(n int) int { return frameHeaderSize + n + tagSize }
	end := frame(0)
	socket := func(data []byte) func(t *testing.T) io.Reader {
		return func(t *testing.T) io.Reader {
			a, b := tcpPair(t)
			if _, err := b.Write(data); err != nil {
				t.Fatal(err)
			}
			b.Close()
			waitReadable(t, a, len(data))
			return a
		}
	}
	tests := []struct {
		name string
		data []byte
		src  func(t *testing.T) io.Reader
		want []int // write sizes
	}{
		{"readable at EOF", small, func(*testing.T) io.Reader { return eofReadable{bytes.NewReader(small)} }, []int{frame(300) + end}},
		{"not readable at EOF: two writes", small, func(*testing.T) io.Reader { return readySource{bytes.NewReader(small)} }, []int{frame(300), end}},
		{"a socket, written and closed", small, socket(small), []int{frame(300) + end}},
		{"a socket, a full batch, written and closed", big, socket(big), []int{3*frame(writeFramePayload) + frame(500) + end}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, wire, sr := sealingConn(t)
			n, err := c.ReadFromAndCloseWrite(tt.src(t))
			if err != nil || n != int64(len(tt.data)) {
				t.Fatalf("ReadFromAndCloseWrite = %d, %v; want %d, nil", n, err, len(tt.data))
			}
			if !equalInts(wire.writes, tt.want) {
				t.Errorf("writes %v, want %v", wire.writes, tt.want)
			}
			if err := c.CloseWrite(); err != nil {
				t.Errorf("CloseWrite after it: %v, want nil (a no-op)", err)
			}
			if len(wire.writes) != len(tt.want) {
				t.Errorf("CloseWrite wrote again: %v", wire.writes)
			}
			got, err := io.ReadAll(newConn(&fakeConn{r: bytes.NewReader(wire.Bytes())}, nil, sr, false, nil))
			if err != nil || !bytes.Equal(got, tt.data) {
				t.Errorf("read back %d bytes, %v; want %d and a clean end", len(got), err, len(tt.data))
			}
		})
	}
}

// waitReadable waits until c holds n bytes to read (on loopback the
// peer's FIN, sent after them, is in by then too).
func waitReadable(t *testing.T, c *net.TCPConn, n int) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	for range 2000 {
		q := 0
		rc.Control(func(fd uintptr) { q, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
		if q >= n {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("%d bytes never arrived", n)
}
