//go:build linux

// Command flowcheck is a test tool for the netns integration tests: it runs
// many TCP flows at once and checks every byte of every one.
//
//	flowcheck serve -listen 0.0.0.0:9000
//	flowcheck run -addr 198.51.100.10:9000 -flows 200 -size 1MiB
//	flowcheck run -addr 198.51.100.10:9000 -flows 100 -hold 20s
//
// (-hold: every flow opens, idles, and then runs; open=N is printed once
// all are open.)
// Each flow: the client sends -size random bytes and half-closes; the server
// reads to EOF, then answers with the SHA-256 of what it received followed by
// the bytes themselves, and half-closes. The client checks the digest (the
// upload arrived intact) and the echo (the download did). The server only
// replies after the client's EOF, so every flow also proves that a
// half-close is carried both ways.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: flowcheck serve|run [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "run":
		err = run(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "flowcheck:", err)
		os.Exit(1)
	}
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	listen := fs.String("listen", "0.0.0.0:9000", "listen address")
	fs.Parse(args)
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	fmt.Println("listening", ln.Addr())
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Minute))
			data, err := io.ReadAll(io.LimitReader(c, 1<<30))
			if err != nil {
				return
			}
			sum := sha256.Sum256(data)
			c.Write(sum[:])
			c.Write(data)
			c.(*net.TCPConn).CloseWrite()
			io.Copy(io.Discard, c)
		}()
	}
}

func parseSize(s string) (int, error) {
	mult := 1
	for _, u := range []struct {
		suf string
		m   int
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if strings.HasSuffix(s, u.suf) {
			s, mult = strings.TrimSuffix(s, u.suf), u.m
			break
		}
	}
	n, err := strconv.Atoi(s)
	return n * mult, err
}

func run(args []string) error {
	fs := flag.NewFlagSet("run", flag.ExitOnError)
	addr := fs.String("addr", "", "server address")
	flows := fs.Int("flows", 1, "concurrent flows")
	sizeS := fs.String("size", "1MiB", "bytes each way per flow")
	timeout := fs.Duration("timeout", 3*time.Minute, "overall deadline")
	hold := fs.Duration("hold", 0, "keep each flow open and idle this long before sending; once every flow is open, print open=N")
	fs.Parse(args)
	size, err := parseSize(*sizeS)
	if err != nil {
		return fmt.Errorf("-size: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	var ok, bad, timeouts, opened atomic.Int64
	var mu sync.Mutex
	var firstErr error
	var wg sync.WaitGroup
	for i := 0; i < *flows; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			isOpen := func() {
				if opened.Add(1) == int64(*flows) && *hold > 0 {
					fmt.Printf("open=%d\n", *flows)
				}
			}
			if err := oneFlow(ctx, *addr, size, *hold, isOpen); err != nil {
				bad.Add(1)
				if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
					timeouts.Add(1)
				}
				mu.Lock()
				if firstErr == nil {
					firstErr = fmt.Errorf("flow %d: %w", i, err)
				}
				mu.Unlock()
				return
			}
			ok.Add(1)
		}(i)
	}
	wg.Wait()
	fmt.Printf("flows=%d intact=%d failed=%d timeouts=%d bytes_each_way=%d\n", *flows, ok.Load(), bad.Load(), timeouts.Load(), size)
	if bad.Load() > 0 {
		return firstErr
	}
	return nil
}

// oneFlow runs one flow; open is called once it is connected, and hold
// is how long it then stays idle.
func oneFlow(ctx context.Context, addr string, size int, hold time.Duration, open func()) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	open()
	if hold > 0 {
		select {
		case <-time.After(hold):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	data := make([]byte, size)
	rand.Read(data)
	if _, err := c.Write(data); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return fmt.Errorf("half-close: %w", err)
	}
	reply, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("read after %d bytes: %w", len(reply), err)
	}
	if len(reply) != sha256.Size+size {
		return fmt.Errorf("reply has %d bytes, want %d", len(reply), sha256.Size+size)
	}
	sum := sha256.Sum256(data)
	if !bytes.Equal(reply[:sha256.Size], sum[:]) {
		return errors.New("server's digest of our bytes differs: upstream corrupted")
	}
	if !bytes.Equal(reply[sha256.Size:], data) {
		return errors.New("echoed bytes differ: downstream corrupted")
	}
	return nil
}
