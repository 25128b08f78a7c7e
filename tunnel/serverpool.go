//go:build linux

package tunnel

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"time"

	"github.com/flynn/noise"
)

// pooledWarm: a pooled connection used within this long of its handshake
// behaves as a fresh one; one that waited longer has its receive buffer
// set (see servePooled).
const pooledWarm = 500 * time.Millisecond

// pooledRcvBuf is what such a connection's receive buffer is set to (the
// kernel doubles it: 8 MiB, a window for 1 Gbit/s at 60 ms).
const pooledRcvBuf = 4 << 20

// servePooled keeps an authenticated connection that named no target
// (msg1 with protoPool) until its request frame arrives, then serves the
// request as a flow. Such a connection costs the server one goroutine
// waiting on a 38-byte read and the kernel's socket: no buffer, no flow
// slot. It is counted per peer and in all, against MaxPooledPerPeer and
// MaxPooled, and closed after PoolIdle unused.
//
// Why the pool is safe to replay: a replayed pool msg1 is refused by the
// replay cache like any other, and even an accepted one leads nowhere,
// since the request frame is sealed with keys only the holder of msg1's
// ephemeral key can derive. The destination itself now travels under
// forward-secret keys (ee, se), not under msg1's es/ss.
//
// A connection whose msg1 says soon is a flow that found the client's
// pool empty and keeps its destination off msg1 (ClientConfig.
// EarlyDestination off): its request frame follows msg2 at once, so it
// is a flow being opened, not a pooled connection: not counted against
// MaxPooledPerPeer and MaxPooled, and its request must come within
// HandshakeDeadline, as msg1 had to.
func (s *Server) servePooled(ctx context.Context, raw net.Conn, p *pendingFlow, rateOK bool, sv *serveState) {
	pooled := !p.dst.soon
	ok := rateOK
	var peerN, total int64
	if ok && pooled {
		peerN, total, ok = s.enterPool(p.peer)
	}
	if !ok {
		// Over the rate is counted as over the rate, whether the
		// connection waits for a pool or a flow that found none.
		if rateOK {
			s.poolLimited.Add(1)
		} else {
			s.rateLimited.Add(1)
		}
		p.peer.limited.Add(1)
		s.log.Debug("pooled connection over a limit", "peer", p.key.String(), "soon", p.dst.soon, "rate_ok", rateOK, "peer_pooled", peerN, "pooled", total)
		s.writeMsg2(raw, p.hs, Limited, p.cipher)
		raw.Close()
		return
	}
	keys, err := s.writeMsg2(raw, p.hs, Connected, p.cipher)
	if err != nil {
		if pooled {
			s.leavePool(p.peer)
		}
		s.poolUnused.Add(1)
		raw.Close()
		return
	}
	p.hs = nil
	p.peer.lastSeen.Store(time.Now().UnixNano())
	s.awaitRequest(ctx, raw, raw, p, keys, true, pooled, sv)
}

// awaitRequest waits for the request frame (read from src: raw, or what
// was read of it already and then raw) and serves it as a flow. fresh:
// the connection is just through its handshake, not back from a flow.
// pooled: it is counted in pooled and may wait PoolIdle; otherwise (a
// soon connection, see servePooled) HandshakeDeadline.
func (s *Server) awaitRequest(ctx context.Context, raw net.Conn, src io.Reader, p *pendingFlow, keys transportKeys, fresh, pooled bool, sv *serveState) {
	tc, _ := raw.(*net.TCPConn)
	wait := s.cfg.HandshakeDeadline
	if pooled {
		// No keepalives while it waits: PoolIdle bounds its life, and
		// on a client's metered uplink they would cost more than the
		// pool saves.
		if tc != nil {
			tc.SetKeepAlive(false)
		}
		wait = s.cfg.PoolIdle
	}
	waitFrom := time.Now()
	raw.SetReadDeadline(waitFrom.Add(wait))
	t, err := readRequestFrame(src, keys.recv)
	if pooled {
		s.leavePool(p.peer)
	}
	if err != nil {
		if ctx.Err() == nil {
			s.log.Debug("connection closed without a request", "peer", p.key.String(), "pooled", pooled, "err", err)
		}
		if fresh || !errors.Is(err, io.EOF) && !isTimeout(err) {
			abort(raw)
		} else {
			// Back from a flow, the connection may still hold the
			// end of its replies in the send buffer: a client that
			// closed its side (FIN: it does not reuse, or its pool
			// is full) or PoolIdle passed gets them, then a FIN.
			raw.Close()
		}
		// Counted once closed: a test that waits for the count then
		// finds the RST sent.
		s.poolUnused.Add(1)
		return
	}
	raw.SetReadDeadline(time.Time{})
	if tc != nil {
		tc.SetKeepAliveConfig(keepAlive())
	}
	// Linux 6.18 (measured 2026-12): an MPTCP connection idle for
	// seconds between its handshake and its first data never grows
	// its receive buffer as a fresh one does (the first segment
	// after the idle echoes a timestamp from before it, and the
	// receive-side RTT estimate the autotuning paces itself by
	// takes the idle for a round trip): one upload then ran at a
	// third of the links' rate for its whole 5 s, in both the
	// e2e test and a plain MPTCP socket pair, and at full rate
	// with the buffer set. So a pooled connection that waited
	// gets, at once, a buffer as large as autotuning would give a
	// fast flow (a limit, not an allocation: an idle flow holds
	// none of it), capped at pooledRcvBuf so that an upload to a
	// slow destination cannot queue more than that here. A
	// connection a finished flow left waits the same way.
	if pooled {
		pinAfterWait(raw, waitFrom, s.rmemMax, s.log)
	}
	p.dst, p.keys = t, keys
	s.serveFlow(ctx, p, s.newFlow(raw, p, sv), true, sv.handle)
}

// enterPool counts a connection waiting for its request frame against
// MaxPooledPerPeer and MaxPooled. ok false: over one of them, and not
// counted; the counts are returned either way, for the log.
func (s *Server) enterPool(peer *peerState) (peerN, total int64, ok bool) {
	peerN, total = peer.pooled.Add(1), s.pooled.Add(1)
	if peerN > int64(s.cfg.MaxPooledPerPeer) || total > int64(s.cfg.MaxPooled) {
		s.leavePool(peer)
		return peerN, total, false
	}
	return peerN, total, true
}

// leavePool undoes enterPool's count.
func (s *Server) leavePool(peer *peerState) {
	peer.pooled.Add(-1)
	s.pooled.Add(-1)
}

// pinAfterWait sets c's receive buffer (pinReceiveBuffer) when c has
// waited since since for longer than pooledWarm: as large as autotuning
// would give it under rmemMax (net.ipv4.tcp_rmem's maximum; 0: unknown,
// left alone), at most pooledRcvBuf. See awaitRequest for why.
func pinAfterWait(c net.Conn, since time.Time, rmemMax int, log *slog.Logger) {
	if time.Since(since) < pooledWarm || rmemMax <= 0 {
		return
	}
	if err := pinReceiveBuffer(c, min(rmemMax/2, pooledRcvBuf)); err != nil {
		log.Debug("receive buffer not set", "err", err)
	}
}

// readRequestFrame reads exactly a request frame, nothing after it (the
// client sends nothing more before the verdict), and returns its target.
func readRequestFrame(r io.Reader, recv *noise.CipherState) (target, error) {
	var b [requestFrameSize]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return target{}, err
	}
	pt, err := openFrame(b[:], requestSize, recv)
	if err != nil {
		return target{}, err
	}
	return parseTarget(pt, false)
}

// sealFrame seals pt as one transport frame into buf, which must hold
// frameHeaderSize+len(pt)+tagSize bytes.
func sealFrame(buf []byte, cs *noise.CipherState, pt []byte) ([]byte, error) {
	out, err := cs.Encrypt(buf[:frameHeaderSize], nil, pt)
	if err != nil {
		return nil, err
	}
	binary.BigEndian.PutUint16(out, uint16(len(out)-frameHeaderSize))
	return out, nil
}

// openFrame opens b, one whole frame of a fixed size (the pool's request,
// ready and verdict frames), whose plaintext must be ptSize bytes: the
// length header must say so before anything is decrypted.
func openFrame(b []byte, ptSize int, recv *noise.CipherState) ([]byte, error) {
	if len(b) != frameHeaderSize+ptSize+tagSize {
		return nil, ErrBadFrame
	}
	if n := binary.BigEndian.Uint16(b[:frameHeaderSize]); int(n) != ptSize+tagSize {
		return nil, fmt.Errorf("%w: a frame of %d bytes where %d were due", ErrBadFrame, n, ptSize+tagSize)
	}
	pt, err := recv.Decrypt(nil, nil, b[frameHeaderSize:])
	if err != nil {
		return nil, ErrTampered
	}
	return pt, nil
}

// writeReadyFrame sends the ready frame (reuse.go): nothing to say but
// that the connection waits for the next request, and with it the ACK
// of the client's end-of-stream frame.
func (s *Server) writeReadyFrame(raw net.Conn, send *noise.CipherState) error {
	return s.writeSmallFrame(raw, send, nil)
}

// writeVerdictFrame sends v as the first frame of a pooled connection.
func (s *Server) writeVerdictFrame(raw net.Conn, send *noise.CipherState, v Verdict) error {
	var payload [msg2PayloadSize]byte
	putMsg2Payload(payload[:], v, 0) // the cipher byte: agreed in msg2
	return s.writeSmallFrame(raw, send, payload[:])
}

// writeSmallFrame seals pt (at most a verdict's) as one frame and writes
// it within the handshake deadline: a peer that stops reading cannot
// hold the goroutine.
func (s *Server) writeSmallFrame(raw net.Conn, send *noise.CipherState, pt []byte) error {
	var buf [verdictFrameSize]byte
	out, err := sealFrame(buf[:frameHeaderSize+len(pt)+tagSize], send, pt)
	if err != nil {
		return err
	}
	raw.SetWriteDeadline(time.Now().Add(s.cfg.HandshakeDeadline))
	_, err = raw.Write(out)
	raw.SetWriteDeadline(time.Time{})
	return err
}
