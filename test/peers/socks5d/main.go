// Command socks5d is the far end of the tun2socks peer in scripts/peers.sh:
// a SOCKS5 server (RFC 1928) with no authentication and CONNECT only, which
// relays each connection with io.Copy between two *net.TCPConn, so the
// kernel splices and the server adds as little as a relay can. It exists so
// the peer rows measure tun2socks, not a slow proxy.
package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"time"
)

const (
	socksVersion = 5
	cmdConnect   = 1
	atypIPv4     = 1
	atypDomain   = 3
	atypIPv6     = 4

	repSucceeded   = 0
	repRefused     = 5
	repUnsupported = 7
)

func main() {
	listen := flag.String("l", "127.0.0.1:1080", "listen address")
	mptcp := flag.Bool("mptcp", false, "listen and dial with Multipath TCP")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(log, *listen, *mptcp); err != nil {
		log.Error("socks5d", "err", err)
		os.Exit(1)
	}
}

func run(log *slog.Logger, addr string, mptcp bool) error {
	var lc net.ListenConfig
	// Go 1.24+ listens with MPTCP by default; say which one is measured.
	lc.SetMultipathTCP(mptcp)
	ln, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", addr, err)
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	d.SetMultipathTCP(mptcp)
	log.Info("listening", "addr", ln.Addr(), "mptcp", mptcp)
	for {
		c, err := ln.Accept()
		if err != nil {
			return fmt.Errorf("accept: %w", err)
		}
		go func() {
			if err := serve(c.(*net.TCPConn), d); err != nil {
				log.Debug("connection", "remote", c.RemoteAddr(), "err", err)
			}
		}()
	}
}

// serve answers one client: greeting, CONNECT request, then the relay.
func serve(c *net.TCPConn, d *net.Dialer) error {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var b [4 + 255 + 2]byte
	if _, err := io.ReadFull(c, b[:2]); err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	if b[0] != socksVersion {
		return fmt.Errorf("version %d", b[0])
	}
	if _, err := io.ReadFull(c, b[:b[1]]); err != nil {
		return fmt.Errorf("methods: %w", err)
	}
	if _, err := c.Write([]byte{socksVersion, 0}); err != nil { // no authentication
		return err
	}
	target, err := readRequest(c, b[:])
	if err != nil {
		reply(c, repUnsupported, netip.AddrPort{})
		return err
	}
	up, err := d.Dial("tcp", target)
	if err != nil {
		reply(c, repRefused, netip.AddrPort{})
		return fmt.Errorf("dial %s: %w", target, err)
	}
	defer up.Close()
	if err := reply(c, repSucceeded, up.LocalAddr().(*net.TCPAddr).AddrPort()); err != nil {
		return err
	}
	c.SetDeadline(time.Time{})
	relay(c, up.(*net.TCPConn))
	return nil
}

// readRequest reads a CONNECT request and returns its target as host:port.
func readRequest(c io.Reader, b []byte) (string, error) {
	if _, err := io.ReadFull(c, b[:4]); err != nil {
		return "", fmt.Errorf("request: %w", err)
	}
	if b[0] != socksVersion || b[1] != cmdConnect {
		return "", fmt.Errorf("unsupported request %d/%d", b[0], b[1])
	}
	var host string
	switch b[3] {
	case atypIPv4, atypIPv6:
		n := 4
		if b[3] == atypIPv6 {
			n = 16
		}
		if _, err := io.ReadFull(c, b[:n]); err != nil {
			return "", err
		}
		a, _ := netip.AddrFromSlice(b[:n])
		host = a.String()
	case atypDomain:
		if _, err := io.ReadFull(c, b[:1]); err != nil {
			return "", err
		}
		n := int(b[0])
		if _, err := io.ReadFull(c, b[:n]); err != nil {
			return "", err
		}
		host = string(b[:n])
	default:
		return "", errors.New("unknown address type")
	}
	if _, err := io.ReadFull(c, b[:2]); err != nil {
		return "", err
	}
	return net.JoinHostPort(host, strconv.Itoa(int(binary.BigEndian.Uint16(b[:2])))), nil
}

func reply(c io.Writer, code byte, bound netip.AddrPort) error {
	r := []byte{socksVersion, code, 0, atypIPv4}
	a := bound.Addr().Unmap()
	switch {
	case a.Is6():
		r[3] = atypIPv6
		r = append(r, a.AsSlice()...)
	case a.Is4():
		r = append(r, a.AsSlice()...)
	default:
		r = append(r, 0, 0, 0, 0)
	}
	r = binary.BigEndian.AppendUint16(r, bound.Port())
	_, err := c.Write(r)
	return err
}

// relay copies both ways until both are done, passing each half-close on.
func relay(a, b *net.TCPConn) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		io.Copy(b, a)
		b.CloseWrite()
	}()
	io.Copy(a, b)
	a.CloseWrite()
	wg.Wait()
}
