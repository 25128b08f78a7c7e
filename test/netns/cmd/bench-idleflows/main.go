//go:build linux

// Command bench-idleflows opens many idle TCP flows and holds them, for the
// memory rows of scripts/bench.sh.
//
//	bench-idleflows serve -listen 198.51.100.10:9100
//	bench-idleflows dial -addr 198.51.100.10:9100 -n 1000,10000 -batch 500
//
// serve accepts every connection and holds it open without reading or
// writing until the peer closes it; it prints "held N" whenever the number
// of open connections changed (at most every 200 ms).
//
// dial opens connections in batches (all of a batch in parallel, the next
// batch only when the previous one finished: the mpvpn client caps
// half-open flows per destination IP) until the first stage's count is
// open, prints "ready N" and waits for SIGUSR1 before going on to the next
// stage. After the last stage it holds everything until SIGINT/SIGTERM. A
// failed connection is retried up to -retries times; when a batch still
// fails, dial prints "stuck N: <error>" (N = flows open) and holds what it
// has, like after the last stage. With the mpvpn client, a connect succeeds
// only once the destination accepted, so an open flow is open end to end.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: bench-idleflows serve|dial [flags]")
		os.Exit(2)
	}
	raiseNoFile()
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "dial":
		err = dial(os.Args[2:])
	default:
		fmt.Fprintln(os.Stderr, "usage: bench-idleflows serve|dial [flags]")
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-idleflows:", err)
		os.Exit(1)
	}
}

// raiseNoFile sets the soft RLIMIT_NOFILE to the hard one (Go does this
// too, but say what we got).
func raiseNoFile() {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return
	}
	r.Cur = r.Max
	syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r)
	fmt.Fprintf(os.Stderr, "RLIMIT_NOFILE %d\n", r.Cur)
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	listen := fs.String("listen", "198.51.100.10:9100", "address to listen on")
	if err := fs.Parse(args); err != nil {
		return err
	}
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false)
	ln, err := lc.Listen(context.Background(), "tcp", *listen)
	if err != nil {
		return err
	}
	fmt.Printf("listening %s\n", ln.Addr())
	var held atomic.Int64
	go func() {
		last := int64(-1)
		for {
			time.Sleep(200 * time.Millisecond)
			if n := held.Load(); n != last {
				fmt.Printf("held %d\n", n)
				last = n
			}
		}
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				fmt.Printf("accept: %v\n", err)
				time.Sleep(50 * time.Millisecond)
				continue
			}
			return err
		}
		held.Add(1)
		go func() {
			// Hold until the peer closes; nothing is ever sent.
			io.Copy(io.Discard, c)
			c.Close()
			held.Add(-1)
		}()
	}
}

func dial(args []string) error {
	fs := flag.NewFlagSet("dial", flag.ContinueOnError)
	addr := fs.String("addr", "198.51.100.10:9100", "address to connect to")
	stagesFlag := fs.String("n", "1000,10000", "comma-separated cumulative counts; pause (SIGUSR1 to continue) after each")
	batch := fs.Int("batch", 500, "connections opened in parallel per batch")
	timeout := fs.Duration("timeout", 15*time.Second, "per-connection connect timeout")
	retries := fs.Int("retries", 3, "retries per failed connection")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var stages []int
	for _, s := range strings.Split(*stagesFlag, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n <= 0 {
			return fmt.Errorf("-n %q: want positive counts", *stagesFlag)
		}
		stages = append(stages, n)
	}
	cont := make(chan os.Signal, 1)
	signal.Notify(cont, syscall.SIGUSR1)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)

	d := net.Dialer{Timeout: *timeout}
	d.SetMultipathTCP(false)
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	hold := func() error {
		<-stop
		return nil
	}
	start := time.Now()
	for i, target := range stages {
		for len(conns) < target {
			k := min(*batch, target-len(conns))
			got := make([]net.Conn, k)
			errs := make([]error, k)
			var wg sync.WaitGroup
			for j := range k {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for try := 0; ; try++ {
						c, err := d.Dial("tcp", *addr)
						if err == nil {
							got[j] = c
							return
						}
						errs[j] = err
						if try >= *retries {
							return
						}
						time.Sleep(200 * time.Millisecond)
					}
				}()
			}
			wg.Wait()
			var firstErr error
			failed := 0
			for j := range k {
				if got[j] != nil {
					conns = append(conns, got[j])
				} else {
					failed++
					if firstErr == nil {
						firstErr = errs[j]
					}
				}
			}
			fmt.Printf("open %d (%.1fs)\n", len(conns), time.Since(start).Seconds())
			if failed > 0 {
				fmt.Printf("stuck %d: %d of a batch of %d failed: %v\n", len(conns), failed, k, firstErr)
				return hold()
			}
		}
		fmt.Printf("ready %d (%.1fs)\n", len(conns), time.Since(start).Seconds())
		if i == len(stages)-1 {
			return hold()
		}
		select {
		case <-cont:
		case <-stop:
			return nil
		}
	}
	return nil
}
