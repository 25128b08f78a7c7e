//go:build linux

package tunnel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flynn/noise"
)

// Errors a Conn's Read reports when the stream from the peer is not what
// the peer's Conn wrote. Each one closes the whole connection, and no byte
// of the offending frame, or of anything after it, reaches the reader.
var (
	// ErrTampered: a frame failed authentication. It was altered,
	// injected, duplicated, reordered or dropped on the way (the nonce is
	// implicit, so any of these breaks the tag).
	ErrTampered = errors.New("tunnel: frame failed authentication (altered, injected, replayed or reordered)")
	// ErrBadFrame: a length field shorter than the tag, or data after the
	// end-of-stream frame.
	ErrBadFrame = errors.New("tunnel: malformed frame")
	// ErrTruncated: the connection ended without an end-of-stream frame.
	// A FIN or RST injected by a third party looks like this, so it is
	// never reported as a clean io.EOF.
	ErrTruncated = fmt.Errorf("tunnel: stream ended without an end-of-stream frame: %w", io.ErrUnexpectedEOF)
	// ErrWriteAfterCloseWrite: Write after CloseWrite.
	ErrWriteAfterCloseWrite = errors.New("tunnel: write after CloseWrite")
	// ErrFrameTimeout: a frame was begun and not completed within the
	// Conn's frame timeout. A peer that stops in the middle of a frame
	// would otherwise pin the frame's buffer for ever.
	ErrFrameTimeout = errors.New("tunnel: a frame was begun and not completed in time")
)

// DefaultFrameTimeout is how long a frame may take from the moment a
// reader has to wait for the rest of it. It is longer than the client's
// default --all-down-timeout (60 s), so a frame cut in half by an outage
// of every uplink survives as long as the flow is allowed to wait.
const DefaultFrameTimeout = 90 * time.Second

// Buffers come from pools so that a flow costs no heap allocation per
// frame, and an idle flow holds none at all: a Read waiting for the next
// frame's header owns only a 2-byte array (see nextFrame), and ReadFrom
// waiting for its source owns no buffer (see ReadFrom).
//
// While bytes move, reads batch into a buffer of four frames, so that a
// socket read rarely ends in the middle of one and forces a move to the
// front. When a read would block in the middle of a frame, the partial
// frame moves into a buffer of one frame's size for the wait (a stalled or
// slowloris frame pins at most that, and for at most the frame timeout).
const (
	readBufSize  = 4 * maxFrameSize
	frameBufSize = maxFrameSize
)

// writeFramePayload is the most plaintext a Write or ReadFrom puts in one
// frame, and the most a receiver accepts. Measured with
// BenchmarkConnThroughput on loopback MPTCP (2 vCPUs, 2026-11): 32 KiB
// frames ran at 0.9–1.27 GB/s, 16 KiB at 0.83–1.16, 65519 at 0.52–0.77:
// a frame and its buffers that stay in L2 beat fewer, larger frames.
const writeFramePayload = maxPlaintext

var (
	readBufPool  = sync.Pool{New: func() any { b := make([]byte, readBufSize); return &b }}
	frameBufPool = sync.Pool{New: func() any { b := make([]byte, frameBufSize); return &b }}
	writeBufPool = sync.Pool{New: func() any { b := make([]byte, maxFrameSize); return &b }}
)

// Conn is one flow's encrypted stream: a net.Conn whose bytes travel as
// ChaCha20-Poly1305 frames over one (MPTCP) connection. It supports
// half-close: CloseWrite sends an authenticated end-of-stream frame and
// the peer's Read then returns io.EOF, while the other direction goes on.
//
// Close alone does not send that frame. As with TLS's close_notify, the
// peer then sees ErrTruncated rather than io.EOF, which is what an abort
// should look like; call CloseWrite first for a clean end.
//
// Read and Write may be called concurrently with each other; Reads are
// serialised among themselves, and so are Writes. Conn implements
// io.WriterTo and io.ReaderFrom so that io.Copy moves bytes with no copy
// beyond encryption and decryption, in place in pooled buffers.
type Conn struct {
	raw   net.Conn
	tcp   *net.TCPConn // raw, when it is TCP (MPTCP or fallback)
	mptcp bool

	rmu      sync.Mutex
	recv     *noise.CipherState
	rbuf     *[]byte // nil while no partial frame is buffered
	rsmall   bool    // rbuf is a frameBufPool buffer (waiting mid-frame)
	rs, re   int     // rbuf[rs:re] holds received, unparsed bytes
	hdr      [frameHeaderSize]byte
	hdrN     int
	pending  []byte     // decrypted, not yet returned; aliases rbuf
	rerr     error      // sticky: io.EOF after the end-of-stream frame, or fatal
	frameCap int        // most plaintext per frame written (tests change it)
	try      *tryReader // non-blocking reads of raw; nil if raw has no fd

	// Read deadlines: the caller's and the frame's; raw has the earlier.
	frameTimeout time.Duration
	frameStart   time.Time // when a reader first waited for this frame
	dmu          sync.Mutex
	userRD       time.Time
	frameRD      time.Time
	rawRD        time.Time
	handed       bool // the connection went to another flow (reuse.go): hands off

	wmu     sync.Mutex
	send    *noise.CipherState
	werr    error // sticky
	wclosed bool

	closeOnce sync.Once
	onClose   func()
	id        uint64 // the Client's number for the flow; 0 on the server
	cipher    Cipher
	// dest and opened: the client's flow, as its status lists it (the
	// server keeps its own list).
	dest   target
	opened time.Time

	// onReuse, when set, takes the connection for another flow once
	// this one ended cleanly both ways (reuse.go); Close then hands it
	// over instead of closing it, and CloseWrite sends the end-of-stream
	// frame without shutting the TCP side down.
	onReuse func(reusable)
	// afterEOF: how many bytes may follow the peer's end-of-stream frame
	// in the same read (the server: a client's next request frame, sent
	// as soon as the client's flow was over); after holds them.
	afterEOF int
	after    []byte
	aborted  atomic.Bool
}

// Cipher is the AEAD the flow's frames are sealed with, as the two ends
// agreed in the handshake.
func (c *Conn) Cipher() Cipher { return c.cipher }

// ID is the client's number for this flow, unique within its Client (0
// for a flow accepted by a Server).
func (c *Conn) ID() uint64 { return c.id }

// Dest is where the client's flow goes: the destination, or the service
// ("dns", "udp") for a flow of mpvpn's own; empty on the server.
func (c *Conn) Dest() string {
	if c.id == 0 {
		return ""
	}
	return c.dest.String()
}

// Opened is when the client's flow got its verdict (zero on the server).
func (c *Conn) Opened() time.Time { return c.opened }

// newKeyedConn is newConn for a connection through its handshake: the
// transport keys and the cipher they were agreed for.
func newKeyedConn(raw net.Conn, keys transportKeys, mptcp bool, onClose func()) *Conn {
	c := newConn(raw, keys.send, keys.recv, mptcp, onClose)
	c.cipher = keys.cipher
	return c
}

func newConn(raw net.Conn, send, recv *noise.CipherState, mptcp bool, onClose func()) *Conn {
	c := &Conn{raw: raw, send: send, recv: recv, mptcp: mptcp, onClose: onClose, frameCap: writeFramePayload, frameTimeout: DefaultFrameTimeout}
	c.tcp, _ = raw.(*net.TCPConn)
	if c.tcp != nil {
		c.try = newTryReader(c.tcp)
	}
	return c
}

// SetFrameTimeout sets how long a frame may take from the moment a reader
// has to wait for its rest (0: DefaultFrameTimeout); a frame over it
// fails the Read with ErrFrameTimeout and closes the flow.
func (c *Conn) SetFrameTimeout(d time.Duration) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if d <= 0 {
		d = DefaultFrameTimeout
	}
	c.frameTimeout = d
}

// TCP returns the underlying connection, or nil if it is not TCP (tests).
// Reading or writing it directly breaks the stream.
func (c *Conn) TCP() *net.TCPConn { return c.tcp }

// MultipathTCP reports whether the connection was using MPTCP when the
// handshake completed (false: it fell back to plain TCP).
func (c *Conn) MultipathTCP() bool { return c.mptcp }

func (c *Conn) LocalAddr() net.Addr  { return c.raw.LocalAddr() }
func (c *Conn) RemoteAddr() net.Addr { return c.raw.RemoteAddr() }
func (c *Conn) SetWriteDeadline(t time.Time) error {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	if c.handed {
		return net.ErrClosed
	}
	return c.raw.SetWriteDeadline(t)
}

// SetDeadline sets the read and write deadlines.
func (c *Conn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.SetWriteDeadline(t)
}

// SetReadDeadline sets the caller's read deadline. A frame's own deadline
// (the frame timeout) may end a Read earlier, and then fatally.
func (c *Conn) SetReadDeadline(t time.Time) error {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	c.userRD = t
	return c.applyRD()
}

// applyRD gives raw the earlier of the caller's and the frame's
// deadlines; called with dmu held.
func (c *Conn) applyRD() error {
	if c.handed {
		return net.ErrClosed
	}
	d := c.userRD
	if !c.frameRD.IsZero() && (d.IsZero() || c.frameRD.Before(d)) {
		d = c.frameRD
	}
	if d.Equal(c.rawRD) {
		return nil
	}
	c.rawRD = d
	return c.raw.SetReadDeadline(d)
}

// waitingMidFrame arms the frame deadline before a read that may block in
// the middle of a frame. Called with rmu held.
func (c *Conn) waitingMidFrame() {
	if c.frameStart.IsZero() {
		c.frameStart = time.Now()
	}
	c.dmu.Lock()
	c.frameRD = c.frameStart.Add(c.frameTimeout)
	c.applyRD()
	c.dmu.Unlock()
}

// frameDone disarms the frame deadline. Called with rmu held.
func (c *Conn) frameDone() {
	if c.frameStart.IsZero() {
		return
	}
	c.frameStart = time.Time{}
	c.dmu.Lock()
	c.frameRD = time.Time{}
	c.applyRD()
	c.dmu.Unlock()
}

// midFrameErr turns a timeout of a read in the middle of a frame into
// ErrFrameTimeout when it was the frame's deadline, not the caller's, that
// passed. Called with rmu held.
func (c *Conn) midFrameErr(err error) error {
	if !isTimeout(err) || c.frameStart.IsZero() {
		return err
	}
	c.dmu.Lock()
	frame, user := c.frameRD, c.userRD
	c.dmu.Unlock()
	if !frame.IsZero() && !time.Now().Before(frame) && (user.IsZero() || !user.Before(frame)) {
		return ErrFrameTimeout
	}
	return err
}

// Close closes the connection in both directions at once. When the flow
// ended cleanly both ways (each end's end-of-stream frame sent and
// received, nothing failed) and the Conn may be reused, the connection
// goes back instead, to carry the next flow (reuse.go).
func (c *Conn) Close() error {
	err := net.ErrClosed
	c.closeOnce.Do(func() {
		if r, ok := c.reusable(); ok {
			c.onReuse(r)
			err = nil
		} else {
			err = c.raw.Close()
		}
		if c.onClose != nil {
			c.onClose()
		}
	})
	return err
}

// Abort closes the connection with a reset instead of a FIN, so the peer
// (and through it the app at the far end) learns at once that the flow is
// gone. An aborted connection is never reused.
func (c *Conn) Abort() error {
	c.aborted.Store(true)
	if c.tcp != nil {
		c.tcp.SetLinger(0)
	}
	return c.Close()
}

func isTimeout(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }

// ---- reading ----

// Read returns the plaintext of the next frames. It never returns a byte
// of a frame that failed authentication.
func (c *Conn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		c.releaseReadBuf()
		return n, nil
	}
	if c.rerr != nil {
		return 0, c.rerr
	}
	if len(p) == 0 {
		return 0, nil
	}
	ct, err := c.nextFrame()
	if err != nil {
		return 0, c.readFailed(err)
	}
	if len(ct) == tagSize {
		return 0, c.endOfStream(ct)
	}
	if len(p) >= len(ct)-tagSize {
		// Straight into the caller's buffer: one pass, no copy.
		// (ct lives in our buffer, so they cannot overlap.)
		pt, err := c.recv.Decrypt(p[:0], nil, ct)
		if err != nil {
			return 0, c.readFailed(authErr(err))
		}
		c.releaseReadBuf()
		return len(pt), nil
	}
	pt, err := c.recv.Decrypt(ct[:0], nil, ct)
	if err != nil {
		return 0, c.readFailed(authErr(err))
	}
	n := copy(p, pt)
	c.pending = pt[n:]
	return n, nil
}

// WriteTo writes the decrypted stream to w until the peer's end-of-stream
// frame (then it returns nil, as io.Copy expects) or an error.
func (c *Conn) WriteTo(w io.Writer) (int64, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	var total int64
	if len(c.pending) > 0 {
		n, err := w.Write(c.pending)
		total += int64(n)
		c.pending = c.pending[n:]
		if err != nil {
			return total, err
		}
		c.releaseReadBuf()
	}
	for {
		if c.rerr == io.EOF {
			return total, nil
		}
		if c.rerr != nil {
			return total, c.rerr
		}
		ct, err := c.nextFrame()
		if err != nil {
			return total, c.readFailed(err)
		}
		if len(ct) == tagSize {
			if err := c.endOfStream(ct); err != io.EOF {
				return total, err
			}
			return total, nil
		}
		pt, err := c.recv.Decrypt(ct[:0], nil, ct)
		if err != nil {
			return total, c.readFailed(authErr(err))
		}
		n, err := w.Write(pt)
		total += int64(n)
		if err != nil {
			// Keep what w did not take for a later Read.
			c.pending = pt[n:]
			return total, err
		}
		c.releaseReadBuf()
	}
}

func authErr(err error) error {
	if errors.Is(err, noise.ErrMaxNonce) {
		return fmt.Errorf("tunnel: receive nonce exhausted: %w", err)
	}
	return ErrTampered
}

// endOfStream handles a frame with an empty plaintext.
func (c *Conn) endOfStream(ct []byte) error {
	if _, err := c.recv.Decrypt(ct[:0], nil, ct); err != nil {
		return c.readFailed(authErr(err))
	}
	if n := c.re - c.rs; n > 0 {
		// The peer's Conn sends nothing after its end-of-stream frame
		// but, on a connection that may be reused, the start of the
		// next flow's request; anything more is a protocol violation.
		if c.onReuse == nil || n > c.afterEOF {
			return c.readFailed(fmt.Errorf("%w: data after end of stream", ErrBadFrame))
		}
		c.after = append([]byte(nil), (*c.rbuf)[c.rs:c.re]...)
		c.rs = c.re
	}
	c.rerr = io.EOF
	c.releaseReadBuf()
	return io.EOF
}

// readFailed makes err sticky and closes the connection, except for a
// deadline, after which reading can resume where it stopped.
func (c *Conn) readFailed(err error) error {
	if isTimeout(err) {
		return err
	}
	c.rerr = err
	c.pending = nil
	c.putReadBuf()
	c.Close()
	return err
}

// releaseReadBuf gives the read buffer back once nothing in it is needed.
func (c *Conn) releaseReadBuf() {
	if c.rbuf != nil && len(c.pending) == 0 && c.rs == c.re {
		c.putReadBuf()
		c.rs, c.re = 0, 0
	}
}

func (c *Conn) putReadBuf() {
	if c.rbuf == nil {
		return
	}
	if c.rsmall {
		frameBufPool.Put(c.rbuf)
	} else {
		readBufPool.Put(c.rbuf)
	}
	c.rbuf, c.rsmall = nil, false
}

// swapReadBuf moves the unparsed bytes into a buffer of the other size:
// a frame's (small) for a wait in the middle of a frame, the batching one
// once the frame is done. It copies at most one frame, once per wait and
// once per frame, so a peer trickling bytes cannot make it copy per byte.
func (c *Conn) swapReadBuf(small bool) {
	var nb *[]byte
	if small {
		nb = frameBufPool.Get().(*[]byte)
	} else {
		nb = readBufPool.Get().(*[]byte)
	}
	n := 0
	if c.rbuf != nil {
		n = copy(*nb, (*c.rbuf)[c.rs:c.re])
		c.putReadBuf()
	}
	c.rbuf, c.rsmall, c.rs, c.re = nb, small, 0, n
}

// nextFrame returns the next frame's ciphertext, aliasing the read buffer
// (valid until the next call). The length is checked before anything is
// read past the header; no allocation ever depends on it. The state is
// kept across a deadline error, so a later call resumes the same frame.
func (c *Conn) nextFrame() ([]byte, error) {
	if c.rsmall && c.rs == c.re {
		c.putReadBuf()
	}
	if c.rbuf == nil {
		// Idle: wait for a header in a 2-byte array, so that a flow
		// with nothing to read holds no buffer at all.
		for c.hdrN < frameHeaderSize {
			if c.hdrN > 0 {
				c.waitingMidFrame()
			}
			n, err := c.raw.Read(c.hdr[c.hdrN:])
			c.hdrN += n
			if c.hdrN < frameHeaderSize && err != nil {
				return nil, c.midFrameErr(streamErr(err))
			}
		}
		if err := checkLength(c.hdr[:]); err != nil {
			return nil, err
		}
		c.swapReadBuf(false)
		c.re = copy(*c.rbuf, c.hdr[:])
		c.hdrN = 0
	} else if c.rsmall {
		// The frame that needed the wait is done: back to batching
		// reads, with what came after it.
		c.swapReadBuf(false)
	}
	if err := c.fill(frameHeaderSize); err != nil {
		return nil, err
	}
	buf := *c.rbuf
	if err := checkLength(buf[c.rs:]); err != nil {
		return nil, err
	}
	need := frameHeaderSize + int(binary.BigEndian.Uint16(buf[c.rs:]))
	if err := c.fill(need); err != nil {
		return nil, err
	}
	c.frameDone()
	buf = *c.rbuf
	ct := buf[c.rs+frameHeaderSize : c.rs+need]
	c.rs += need
	return ct, nil
}

func checkLength(hdr []byte) error {
	if n := int(binary.BigEndian.Uint16(hdr)); n < tagSize || n > maxCiphertext {
		return fmt.Errorf("%w: length %d", ErrBadFrame, n)
	}
	return nil
}

// fill reads until rbuf[rs:re] holds at least need bytes, first moving
// them to the front if the frame would not fit after rs. (Without that
// move a header split across the buffer's end would be read into an
// empty slice, forever.) When raw has a file descriptor, a read that
// would block in the middle of a frame first moves the frame into a
// buffer of its own size, so the wait pins no more than that; the wait
// is bounded by the frame timeout.
func (c *Conn) fill(need int) error {
	for c.re-c.rs < need {
		buf := *c.rbuf
		if len(buf)-c.rs < need {
			c.re = copy(buf, buf[c.rs:c.re])
			c.rs = 0
		}
		if c.try != nil && !c.rsmall {
			n, wouldBlock, err := c.try.read(buf[c.re:])
			if !wouldBlock {
				c.re += n
				if c.re-c.rs >= need {
					return nil
				}
				if err != nil {
					return c.midFrameErr(streamErr(err))
				}
				continue
			}
			c.swapReadBuf(true)
			buf = *c.rbuf
		}
		c.waitingMidFrame()
		n, err := c.raw.Read(buf[c.re:])
		c.re += n
		if c.re-c.rs >= need {
			return nil
		}
		if err != nil {
			return c.midFrameErr(streamErr(err))
		}
	}
	return nil
}

// streamErr turns the end of the TCP stream, which an authenticated
// end-of-stream frame should have preceded, into ErrTruncated.
func streamErr(err error) error {
	if err == io.EOF {
		return ErrTruncated
	}
	return err
}

// ---- writing ----

// Write sends p as frames of up to 32 KiB on the wire each (one frame
// per Write when p fits). An empty p sends nothing: an empty frame means
// end of stream.
func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.writable(); err != nil {
		return 0, err
	}
	bp := writeBufPool.Get().(*[]byte)
	defer writeBufPool.Put(bp)
	n := 0
	for n < len(p) {
		chunk := min(len(p)-n, c.frameCap)
		if err := c.writeFrame(*bp, p[n:n+chunk]); err != nil {
			return n, err
		}
		n += chunk
	}
	return n, nil
}

// ReadFrom encrypts what r yields until r's EOF (returning nil, as
// io.Copy expects; it does not CloseWrite). The plaintext is read straight
// into frame buffers and sealed in place.
//
// A Read that fills a frame while r already holds more is followed by
// more Reads, up to batchFrames full frames, and the frames go out in one
// write: see batchFrames for why. Only bytes r holds already are waited
// for, so no byte waits on the next one.
//
// While r has nothing to give, ReadFrom holds no buffer: a *net.TCPConn
// is read through its file descriptor with a buffer taken from the pool
// only once data is there, and a reader with a WaitRead() error method
// (the netstack's conns) is waited on before a buffer is taken. Any
// other reader is read into a buffer held for the whole call.
//
// Bytes ReadFrom has taken from r are never dropped silently: if they
// cannot be sent (a write deadline included), the error is returned and
// the stream is closed, since the caller cannot know how much of what it
// handed over is lost.
func (c *Conn) ReadFrom(r io.Reader) (int64, error) { return c.readFrom(r, false) }

// ReadFromAndCloseWrite is ReadFrom then CloseWrite, except that where r
// gives its last bytes and its EOF together (a web server's reply and
// its close), the end-of-stream frame goes out in the same write as
// those bytes. Two writes would not do: Linux 6.18's MPTCP scheduler
// sends each write on the subflow with the emptiest queue, and while the
// first write waits for its ACK that is the other, slower uplink's
// (measured 2026-12-05, 20 and 50 ms links: the end of a small reply
// reached the app 15 ms after its bytes). To know, after a short read,
// it reads r once more where that cannot block: a socket without
// waiting, a reader with Readable only when it says so.
func (c *Conn) ReadFromAndCloseWrite(r io.Reader) (int64, error) {
	n, err := c.readFrom(r, true)
	if err != nil {
		return n, err
	}
	return n, c.CloseWrite() // a no-op where the frame went with the bytes
}

func (c *Conn) readFrom(r io.Reader, closing bool) (int64, error) {
	if tc, ok := r.(*net.TCPConn); ok {
		if lr := newLazyReader(tc); lr != nil {
			return c.readFromLazy(lr, closing)
		}
	}
	waiter, _ := r.(interface{ WaitRead() error })
	ready, _ := r.(interface{ Readable() bool })
	b := newBatch(c.frameCap)
	defer b.release()
	var total int64
	for {
		if waiter != nil {
			b.release()
			if err := waiter.WaitRead(); err != nil {
				return total, err
			}
		}
		b.take()
		var rerr error
		for {
			var n int
			n, rerr = r.Read(b.space())
			b.add(n)
			if rerr != nil || n < c.frameCap || b.full() || ready == nil || !ready.Readable() {
				break
			}
		}
		if closing && rerr == nil && b.short() && ready != nil && ready.Readable() {
			// Readable after a short read: more bytes, or the EOF.
			var n int
			n, rerr = r.Read(b.rest())
			b.grow(n)
		}
		if b.k > 0 {
			n, err := c.sendBatch(b, closing && rerr == io.EOF)
			total += int64(n)
			if err != nil {
				return total, err
			}
		}
		if rerr == io.EOF {
			return total, nil
		}
		if rerr != nil {
			return total, rerr
		}
	}
}

func (c *Conn) readFromLazy(lr *lazyReader, closing bool) (int64, error) {
	b := newBatch(c.frameCap)
	lr.b = b
	defer b.release()
	var total int64
	for {
		// The first read waits, without a buffer; the ones after it
		// only take what the socket holds now.
		n, _, rerr := lr.read(true, false)
		b.add(n)
		for rerr == nil && n == c.frameCap && !b.full() {
			var wouldBlock bool
			n, wouldBlock, rerr = lr.read(false, false)
			if wouldBlock {
				break
			}
			b.add(n)
		}
		if closing && rerr == nil && b.short() {
			// The read the next round would begin with, made now:
			// a FIN behind the bytes goes with them.
			n, _, rerr = lr.read(false, true)
			b.grow(n)
		}
		if b.k > 0 {
			n, err := c.sendBatch(b, closing && rerr == io.EOF)
			total += int64(n)
			if err != nil {
				return total, err
			}
		}
		if rerr == io.EOF {
			return total, nil
		}
		if rerr != nil {
			return total, rerr
		}
	}
}

// batchFrames is the most frames ReadFrom sends in one write(2). Linux
// 6.18's MPTCP sends a write's last partial segment at once on every
// subflow (MSG_MORE does not reach the subflows: __mptcp_push_pending
// pushes with flags 0), so each write ends in a short segment. Measured
// on the aggregation links (40 + 20 Mbit/s, 2026-12-02): with one 32 KiB
// frame per write the subflows' segments averaged 0.5 to 1 % smaller
// than kernel MPTCP's under iperf3, which writes 128 KiB at a time.
const batchFrames = 4

var batchBufPool = sync.Pool{New: func() any { b := make([]byte, batchFrames*maxFrameSize); return &b }}

// batch is up to batchFrames frames back to back in one pooled buffer:
// frame i's plaintext is read in place at i*slot+frameHeaderSize and
// sealed in place. Every frame but the last is full (frameCap bytes), so
// the sealed frames are contiguous.
type batch struct {
	bp   *[]byte
	n    [batchFrames]int // plaintext bytes of each frame
	k    int              // frames filled
	slot int              // a full frame on the wire
	cap  int              // frameCap
}

func newBatch(frameCap int) *batch {
	return &batch{slot: frameHeaderSize + frameCap + tagSize, cap: frameCap}
}

func (b *batch) take() {
	if b.bp == nil {
		b.bp = batchBufPool.Get().(*[]byte)
	}
}

// release gives the buffer back; the batch must be empty.
func (b *batch) release() {
	if b.bp != nil {
		batchBufPool.Put(b.bp)
		b.bp = nil
	}
}

// space is where the next frame's plaintext goes.
func (b *batch) space() []byte {
	s := b.k*b.slot + frameHeaderSize
	return (*b.bp)[s : s+b.cap]
}

// add counts n bytes read into space() as a frame (none if n is 0).
func (b *batch) add(n int) {
	if n > 0 {
		b.n[b.k] = n
		b.k++
	}
}

func (b *batch) full() bool { return b.k == batchFrames }

// short says whether the last frame has room left (and there is one).
func (b *batch) short() bool { return b.k > 0 && b.n[b.k-1] < b.cap }

// rest is the room left in the last frame, for bytes that extend it.
func (b *batch) rest() []byte {
	s := (b.k-1)*b.slot + frameHeaderSize
	return (*b.bp)[s+b.n[b.k-1] : s+b.cap]
}

// grow counts n bytes read into rest() as part of the last frame.
func (b *batch) grow(n int) { b.n[b.k-1] += n }

// sendBatch seals b's frames and writes them in one write, then empties
// b; with end, the end-of-stream frame follows them in the same write
// (as CloseWrite then). It returns the plaintext bytes sent. Any failure
// is fatal to the stream (see ReadFrom).
func (c *Conn) sendBatch(b *batch, end bool) (int, error) {
	buf := *b.bp
	total := 0
	for i := range b.k {
		total += b.n[i]
	}
	k := b.k
	b.k = 0
	c.wmu.Lock()
	defer c.wmu.Unlock()
	err := c.writable()
	off := 0
	for i := 0; i < k && err == nil; i++ {
		s := i * b.slot
		out, serr := sealFrame(buf[s:], c.send, buf[s+frameHeaderSize:s+frameHeaderSize+b.n[i]])
		if serr != nil {
			// ErrMaxNonce, as in writeFrame.
			err = fmt.Errorf("send nonce exhausted: %w", serr)
			break
		}
		off = s + len(out)
	}
	sealedEnd := false
	if err == nil && end && off+frameHeaderSize+tagSize <= len(buf) {
		out, serr := sealFrame(buf[off:], c.send, nil)
		if serr != nil {
			err = fmt.Errorf("send nonce exhausted: %w", serr)
		} else {
			off += len(out)
			sealedEnd = true
		}
	}
	if err == nil {
		_, err = c.raw.Write(buf[:off])
	}
	if err != nil {
		if c.werr == nil {
			err = c.writeFailed(fmt.Errorf("tunnel: %d bytes read from the source could not be sent: %w", total, err))
		}
		return 0, err
	}
	if end {
		if !sealedEnd {
			bp := writeBufPool.Get().(*[]byte)
			err = c.writeFrame(*bp, nil)
			writeBufPool.Put(bp)
			if err != nil {
				return total, err
			}
		}
		return total, c.wroteEnd()
	}
	return total, nil
}

// CloseWrite sends the end-of-stream frame, then shuts down the sending
// side of the TCP connection. Further Writes fail; reading goes on.
func (c *Conn) CloseWrite() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.wclosed {
		return nil
	}
	if err := c.writable(); err != nil {
		return err
	}
	bp := writeBufPool.Get().(*[]byte)
	defer writeBufPool.Put(bp)
	if err := c.writeFrame(*bp, nil); err != nil {
		return err
	}
	return c.wroteEnd()
}

// wroteEnd follows the end-of-stream frame: no more Writes, and the FIN,
// unless the connection may carry another flow (the frame said it; a FIN
// would end the connection). Called with wmu held.
func (c *Conn) wroteEnd() error {
	c.wclosed = true
	if c.onReuse != nil {
		return nil
	}
	if cw, ok := c.raw.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

func (c *Conn) writable() error {
	if c.werr != nil {
		return c.werr
	}
	if c.wclosed {
		return ErrWriteAfterCloseWrite
	}
	return nil
}

// writeFrame seals pt into buf (pt may be buf[2:2+len(pt)]: sealing in
// place is allowed when the output starts exactly where the input does)
// and writes the frame. Called with wmu held.
func (c *Conn) writeFrame(buf, pt []byte) error {
	out, err := c.send.Encrypt(buf[:frameHeaderSize], nil, pt)
	if err != nil {
		// ErrMaxNonce: this flow may not send another byte under this
		// key, and there is no rekey; it ends here.
		return c.writeFailed(fmt.Errorf("tunnel: send nonce exhausted: %w", err))
	}
	binary.BigEndian.PutUint16(out, uint16(len(out)-frameHeaderSize))
	n, err := c.raw.Write(out)
	if err != nil {
		if n == 0 && isTimeout(err) {
			// Nothing left: take the nonce back and the stream is
			// intact, so a deadline is not fatal.
			c.send.SetNonce(c.send.Nonce() - 1)
			return err
		}
		return c.writeFailed(err)
	}
	return nil
}

// writeFailed makes err sticky and closes the connection: part of a frame
// may be on the wire, so nothing sent afterwards could be decrypted.
func (c *Conn) writeFailed(err error) error {
	c.werr = err
	c.Close()
	return err
}

// Interface checks.
var (
	_ net.Conn      = (*Conn)(nil)
	_ io.WriterTo   = (*Conn)(nil)
	_ io.ReaderFrom = (*Conn)(nil)
)
