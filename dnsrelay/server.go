//go:build linux

package dnsrelay

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"
)

// Defaults of an Upstream and of ServeStream.
const (
	DefaultTimeout = 5 * time.Second
	// retransmit is how long a UDP query waits before it is sent again:
	// a lost datagram between the concentrator and its resolver costs a
	// second, not the whole timeout.
	retransmit = time.Second
	// DefaultMaxInFlight bounds the queries of one stream being resolved
	// at once; beyond it the stream is not read until one is answered
	// (TCP's flow control pushes back to the client).
	DefaultMaxInFlight = 256
)

// Upstream is the resolver the concentrator asks.
type Upstream struct {
	Addr    netip.AddrPort
	Timeout time.Duration // per query; 0: DefaultTimeout
	// Dialer opens the sockets to Addr; nil: a zero net.Dialer.
	Dialer *net.Dialer
}

// UpstreamFromResolvConf is the first nameserver of a resolv.conf file
// (the host's own resolver, the concentrator's default), port 53.
func UpstreamFromResolvConf(path string) (netip.AddrPort, error) {
	f, err := os.Open(path)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("find the host's resolver: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(fields[1])
		if err != nil {
			continue
		}
		return netip.AddrPortFrom(a, 53), nil
	}
	if err := sc.Err(); err != nil {
		return netip.AddrPort{}, fmt.Errorf("find the host's resolver in %s: %w", path, err)
	}
	return netip.AddrPort{}, fmt.Errorf("%s names no nameserver: give --dns-upstream", path)
}

func (u *Upstream) timeout() time.Duration {
	if u.Timeout > 0 {
		return u.Timeout
	}
	return DefaultTimeout
}

func (u *Upstream) dialer() *net.Dialer {
	if u.Dialer != nil {
		return u.Dialer
	}
	return &net.Dialer{}
}

// Exchange sends query to the upstream and returns its answer: over UDP
// (a fresh socket, so a fresh source port, for each query), again over
// TCP when the UDP answer is truncated.
func (u *Upstream) Exchange(ctx context.Context, query []byte) ([]byte, error) {
	if !isQuery(query) {
		return nil, errMalformed
	}
	ctx, cancel := context.WithTimeout(ctx, u.timeout())
	defer cancel()
	resp, err := u.exchangeUDP(ctx, query)
	if err != nil {
		return nil, err
	}
	if !truncated(resp) {
		return resp, nil
	}
	return u.exchangeTCP(ctx, query)
}

func (u *Upstream) exchangeUDP(ctx context.Context, query []byte) ([]byte, error) {
	c, err := u.dialer().DialContext(ctx, "udp", u.Addr.String())
	if err != nil {
		return nil, fmt.Errorf("dnsrelay: upstream %s: %w", u.Addr, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	buf := make([]byte, MaxMessage)
	for {
		if _, err := c.Write(query); err != nil {
			return nil, fmt.Errorf("dnsrelay: upstream %s: %w", u.Addr, ctxErr(ctx, err))
		}
		c.SetReadDeadline(time.Now().Add(retransmit))
		for {
			n, err := c.Read(buf)
			if errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() == nil {
				break // send again
			}
			if err != nil {
				return nil, fmt.Errorf("dnsrelay: upstream %s: %w", u.Addr, ctxErr(ctx, err))
			}
			// The socket is connected, so only the upstream's address
			// reaches it; an answer must also carry the query's ID.
			if m := buf[:n]; isResponse(m) && id(m) == id(query) {
				return append([]byte(nil), m...), nil
			}
		}
	}
}

func (u *Upstream) exchangeTCP(ctx context.Context, query []byte) ([]byte, error) {
	c, err := u.dialer().DialContext(ctx, "tcp", u.Addr.String())
	if err != nil {
		return nil, fmt.Errorf("dnsrelay: upstream %s over TCP: %w", u.Addr, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := writeMsg(c, query); err != nil {
		return nil, fmt.Errorf("dnsrelay: upstream %s over TCP: %w", u.Addr, ctxErr(ctx, err))
	}
	buf := make([]byte, MaxMessage)
	for {
		m, err := readMsg(c, buf)
		if err != nil {
			return nil, fmt.Errorf("dnsrelay: upstream %s over TCP: %w", u.Addr, ctxErr(ctx, err))
		}
		if isResponse(m) && id(m) == id(query) {
			return append([]byte(nil), m...), nil
		}
	}
}

// ctxErr prefers the context's reason to the deadline error it caused.
func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// readMsg reads one length-prefixed message into buf (MaxMessage long).
// A zero length is malformed: no DNS message is empty.
func readMsg(r io.Reader, buf []byte) ([]byte, error) {
	var l [2]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint16(l[:]))
	if n < headerSize {
		return nil, errMalformed
	}
	if _, err := io.ReadFull(r, buf[:n]); err != nil {
		return nil, noEOF(err)
	}
	return buf[:n], nil
}

// noEOF: a stream that ends inside a message did not end cleanly.
func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// writeMsg writes m with its length in one Write (one frame, one segment).
func writeMsg(w io.Writer, m []byte) error {
	if len(m) > MaxMessage {
		return errMalformed
	}
	b := make([]byte, 2+len(m))
	binary.BigEndian.PutUint16(b, uint16(len(m)))
	copy(b[2:], m)
	_, err := w.Write(b)
	return err
}

// StreamStats is what one ServeStream call did.
type StreamStats struct {
	Queries, Answered, Failed uint64
}

// ServeStream answers the DNS-over-TCP stream rw, one client's tunnel
// flow to the resolver service: each query is resolved by up at once,
// at most maxInFlight at a time (0: DefaultMaxInFlight), and answered in
// the order the answers come. A query the upstream does not answer in
// time is answered SERVFAIL. It returns when the stream ends (nil for a
// clean end), fails, or ctx is done, once every query it started has
// ended; rw is left for the caller to close.
func ServeStream(ctx context.Context, rw io.ReadWriter, up *Upstream, maxInFlight int, log *slog.Logger) (StreamStats, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if maxInFlight <= 0 {
		maxInFlight = DefaultMaxInFlight
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg    sync.WaitGroup
		wmu   sync.Mutex
		werr  error
		smu   sync.Mutex
		stats StreamStats
	)
	sem := make(chan struct{}, maxInFlight)
	answer := func(m []byte) {
		wmu.Lock()
		defer wmu.Unlock()
		if werr != nil {
			return
		}
		if werr = writeMsg(rw, m); werr != nil {
			cancel() // the stream is gone: stop resolving for it
		}
	}
	buf := make([]byte, MaxMessage)
	var rerr error
	for {
		m, err := readMsg(rw, buf)
		if err != nil {
			if err != io.EOF {
				rerr = err
			}
			break
		}
		if !isQuery(m) {
			rerr = errMalformed
			break
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		q := append([]byte(nil), m...)
		smu.Lock()
		stats.Queries++
		smu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			resp, err := up.Exchange(ctx, q)
			smu.Lock()
			if err != nil {
				stats.Failed++
			} else {
				stats.Answered++
			}
			smu.Unlock()
			if err != nil {
				log.Debug("upstream did not answer", "err", err)
				if resp = servfail(q); resp == nil {
					return
				}
			}
			answer(resp)
		}()
	}
	wg.Wait()
	smu.Lock()
	defer smu.Unlock()
	if rerr == nil {
		rerr = werr
	}
	if rerr == nil && ctx.Err() != nil {
		rerr = ctx.Err()
	}
	return stats, rerr
}
