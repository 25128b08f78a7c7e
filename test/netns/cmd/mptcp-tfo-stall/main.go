//go:build linux

// Command mptcp-tfo-stall reproduces, with kernel MPTCP alone (no mpvpn
// code), why `mpvpn server` leaves TCP Fast Open off by default: on Linux
// 6.18 (checked 2026-11-24) a Multipath TCP connection that opened with
// data in the SYN (passive Fast Open accepted it) often stops delivering
// server→client data for good once a second subflow has joined. The same
// download without Fast Open, or with Fast Open and a single subflow,
// always completes.
//
//	mpvpn-topo up --no-emu --prefix tfo          # two uplinks, concentrator
//	ip netns exec tfo-conc mptcp-tfo-stall serve -listen 0.0.0.0:7200 -fast-open
//	ip netns exec tfo-cli  mptcp-tfo-stall run -addr 203.0.113.1:7200 -fast-open
//
// The client namespace needs MPTCP endpoints on both uplinks (what
// `mpvpn client` sets up, or `ip mptcp endpoint add ADDR dev IFACE
// subflow` with per-uplink routing tables). Each run prints one line per
// download: bytes received of the 10 MiB and the error, if any (a stall
// ends in a read timeout).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const size = 10 << 20

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: mptcp-tfo-stall serve|run [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	listen := fs.String("listen", "0.0.0.0:7200", "serve: listen address")
	addr := fs.String("addr", "", "run: server address")
	fastOpen := fs.Bool("fast-open", false, "use TCP Fast Open (TCP_FASTOPEN on the listener, TCP_FASTOPEN_CONNECT on the client)")
	n := fs.Int("n", 30, "run: downloads")
	fs.Parse(os.Args[2:])
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(*listen, *fastOpen)
	case "run":
		err = run(*addr, *fastOpen, *n)
	default:
		err = errors.New("unknown command " + os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mptcp-tfo-stall:", err)
		os.Exit(1)
	}
}

func setInt(rc syscall.RawConn, opt, v int) error {
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, opt, v) }); err != nil {
		return err
	}
	return serr
}

// serve reads the client's 144-byte request, then sends 10 MiB.
func serve(addr string, fastOpen bool) error {
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		if !fastOpen {
			return nil
		}
		return setInt(rc, unix.TCP_FASTOPEN, 64)
	}}
	lc.SetMultipathTCP(true)
	ln, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		return err
	}
	buf := make([]byte, 32<<10)
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			if _, err := io.ReadFull(c, make([]byte, 144)); err != nil {
				return
			}
			for sent := 0; sent < size; sent += len(buf) {
				if _, err := c.Write(buf); err != nil {
					return
				}
			}
		}()
	}
}

// run downloads n times; with Fast Open the request rides in the SYN once
// the first connection has cached a cookie.
func run(addr string, fastOpen bool, n int) error {
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		if !fastOpen {
			return nil
		}
		return setInt(rc, unix.TCP_FASTOPEN_CONNECT, 1)
	}}
	d.SetMultipathTCP(true)
	stalled := 0
	for i := range n {
		c, err := d.Dial("tcp", addr)
		if err != nil {
			return err
		}
		if _, err := c.Write(make([]byte, 144)); err != nil {
			c.Close()
			return err
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.Copy(io.Discard, c)
		c.Close()
		if got != size {
			stalled++
		}
		fmt.Printf("%d: %d of %d bytes, err=%v\n", i, got, size, err)
	}
	fmt.Printf("stalled %d of %d\n", stalled, n)
	return nil
}
