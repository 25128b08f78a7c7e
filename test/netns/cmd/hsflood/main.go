//go:build linux

// Command hsflood floods a concentrator's listener with connections that
// never authenticate, from many source addresses, for the attack tests
// and the flood row of scripts/bench.sh (issue 8, item 1).
//
//	hsflood -target 203.0.113.1:7100 -src 198.51.100.100 -sources 64 \
//	        -conns 80 -mode mixed -rate 3000 -duration 20s
//
// Each of -sources consecutive addresses starting at -src (which must be
// configured on the host, e.g. on lo) keeps -conns connections open: a
// "silent" one sends nothing, a "garbage" one sends 148 random bytes (the
// size of a real first message) and then nothing; "mixed" alternates.
// When the server closes one, it is opened again, no faster than -rate
// new connections a second in all. So the flood holds sources×conns
// connections, more than a concentrator's whole half-open table by
// default, and keeps replacing the ones the server evicts.
//
// At the end (after -duration, or on SIGINT/SIGTERM) it prints one line of
// JSON: connections opened, connect errors, closed by the server, and how
// long the server held them (median), so a test can tell a flood that was
// evicted at once from one held until the handshake deadline.
package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/time/rate"
)

type result struct {
	Opened        int64   `json:"opened"`
	ConnectErrors int64   `json:"connect_errors"`
	ClosedByPeer  int64   `json:"closed_by_server"`
	HeldMedianMs  float64 `json:"held_median_ms"`
	HeldP90Ms     float64 `json:"held_p90_ms"`
	MaxOpen       int64   `json:"max_open"`
	FirstError    string  `json:"first_error,omitempty"`
}

func main() {
	target := flag.String("target", "", "the concentrator's ADDR:PORT")
	src := flag.String("src", "", "the first source address")
	sources := flag.Int("sources", 64, "how many consecutive source addresses, from -src")
	conns := flag.Int("conns", 64, "connections kept open per source address")
	mode := flag.String("mode", "mixed", "silent, garbage or mixed")
	perSec := flag.Float64("rate", 2000, "new connections per second, in all")
	duration := flag.Duration("duration", 20*time.Second, "how long to flood")
	flag.Parse()
	if err := run(*target, *src, *sources, *conns, *mode, *perSec, *duration); err != nil {
		fmt.Fprintln(os.Stderr, "hsflood:", err)
		os.Exit(1)
	}
}

func run(target, src string, sources, conns int, mode string, perSec float64, duration time.Duration) error {
	dst, err := netip.ParseAddrPort(target)
	if err != nil {
		return fmt.Errorf("-target: %w", err)
	}
	first, err := netip.ParseAddr(src)
	if err != nil {
		return fmt.Errorf("-src: %w", err)
	}
	switch mode {
	case "silent", "garbage", "mixed":
	default:
		return fmt.Errorf("-mode %q: want silent, garbage or mixed", mode)
	}
	raiseNoFile()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, duration)
	defer cancel()

	lim := rate.NewLimiter(rate.Limit(perSec), max(1, int(perSec/10)))
	var (
		res      result
		open     atomic.Int64
		mu       sync.Mutex
		held     []time.Duration
		firstErr atomic.Value
	)
	var wg sync.WaitGroup
	addr := first
	for s := range sources {
		a := addr
		addr = addr.Next()
		for c := range conns {
			garbage := mode == "garbage" || (mode == "mixed" && (s+c)%2 == 1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				d := net.Dialer{LocalAddr: &net.TCPAddr{IP: a.AsSlice()}, Timeout: 5 * time.Second}
				for {
					if err := lim.Wait(ctx); err != nil {
						return
					}
					conn, err := d.DialContext(ctx, "tcp", dst.String())
					if err != nil {
						if ctx.Err() != nil {
							return
						}
						atomic.AddInt64(&res.ConnectErrors, 1)
						firstErr.CompareAndSwap(nil, err.Error())
						continue
					}
					atomic.AddInt64(&res.Opened, 1)
					if n := open.Add(1); n > atomic.LoadInt64(&res.MaxOpen) {
						atomic.StoreInt64(&res.MaxOpen, n) // racy max; good enough for a report
					}
					opened := time.Now()
					if garbage {
						var b [148]byte
						rand.Read(b[:])
						conn.Write(b[:])
					}
					stopClose := context.AfterFunc(ctx, func() { conn.Close() })
					var one [1]byte
					_, rerr := conn.Read(one[:]) // the server sends nothing: this ends when it closes
					stopped := !stopClose()
					conn.Close()
					open.Add(-1)
					if stopped || ctx.Err() != nil {
						return
					}
					if rerr != nil && !errors.Is(rerr, net.ErrClosed) {
						atomic.AddInt64(&res.ClosedByPeer, 1)
						mu.Lock()
						held = append(held, time.Since(opened))
						mu.Unlock()
					}
				}
			}()
		}
	}
	wg.Wait()
	slices.Sort(held)
	if len(held) > 0 {
		res.HeldMedianMs = float64(held[len(held)/2]) / 1e6
		res.HeldP90Ms = float64(held[len(held)*9/10]) / 1e6
	}
	if e, ok := firstErr.Load().(string); ok {
		res.FirstError = e
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// raiseNoFile lifts the soft limit on open files to the hard one: a flood
// holds thousands of sockets.
func raiseNoFile() {
	var l syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l) == nil && l.Cur < l.Max {
		l.Cur = l.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
	}
}
