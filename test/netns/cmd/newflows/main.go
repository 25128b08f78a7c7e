//go:build linux

// Command newflows opens new TCP flows one after another (or a few at a
// time) to an HTTP server and measures each: whether it opened and got an
// answer, and how long from connect() to the first byte of the reply. It
// is the "real client" of the flood test and of the flood row of
// scripts/bench.sh: run in the client namespace, its flows go through the
// mpvpn client's TUN like any application's.
//
//	newflows -url http://198.51.100.10/index.html -n 200 -parallel 4 -timeout 10s
//
// It prints one line of JSON: flows tried, succeeded, failed (with the
// first errors), and the median and 90th percentile of the time to the
// first byte of the successful ones.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"slices"
	"sync"
	"time"
)

type result struct {
	Tried     int      `json:"tried"`
	OK        int      `json:"ok"`
	Failed    int      `json:"failed"`
	Errors    []string `json:"errors,omitempty"` // the first few
	FirstByte struct {
		P50Ms float64 `json:"p50_ms"`
		P90Ms float64 `json:"p90_ms"`
		MaxMs float64 `json:"max_ms"`
	} `json:"first_byte"`
}

func main() {
	rawURL := flag.String("url", "", "http://HOST[:PORT]/PATH to GET")
	n := flag.Int("n", 100, "flows to open")
	parallel := flag.Int("parallel", 1, "flows open at once")
	timeout := flag.Duration("timeout", 10*time.Second, "give up on a flow after this long")
	drain := flag.Bool("drain", false, "read each reply to its end before closing (a clean close both ways, not a reset for unread bytes)")
	flag.Parse()
	if err := run(*rawURL, *n, *parallel, *timeout, *drain); err != nil {
		fmt.Fprintln(os.Stderr, "newflows:", err)
		os.Exit(1)
	}
}

func run(rawURL string, n, parallel int, timeout time.Duration, drain bool) error {
	u, err := url.Parse(rawURL)
	if err != nil || u.Scheme != "http" || u.Host == "" {
		return fmt.Errorf("-url %q: want http://HOST[:PORT]/PATH", rawURL)
	}
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), "80")
	}
	path := u.RequestURI()
	var (
		mu    sync.Mutex
		res   result
		times []time.Duration
		wg    sync.WaitGroup
		next  = make(chan struct{})
	)
	for range max(parallel, 1) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				d, err := one(host, u.Hostname(), path, timeout, drain)
				mu.Lock()
				res.Tried++
				if err != nil {
					res.Failed++
					if len(res.Errors) < 5 {
						res.Errors = append(res.Errors, err.Error())
					}
				} else {
					res.OK++
					times = append(times, d)
				}
				mu.Unlock()
			}
		}()
	}
	for range n {
		next <- struct{}{}
	}
	close(next)
	wg.Wait()
	slices.Sort(times)
	if len(times) > 0 {
		ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
		res.FirstByte.P50Ms = ms(times[len(times)/2])
		res.FirstByte.P90Ms = ms(times[len(times)*9/10])
		res.FirstByte.MaxMs = ms(times[len(times)-1])
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// one opens a flow, sends a GET and reads the reply's status line; it
// returns the time from the start of connect to the reply's first byte.
func one(addr, host, path string, timeout time.Duration, drain bool) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	start := time.Now()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return 0, fmt.Errorf("connect: %w", err)
	}
	defer c.Close()
	c.SetDeadline(start.Add(timeout))
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n", path, host); err != nil {
		return 0, fmt.Errorf("send: %w", err)
	}
	r := bufio.NewReader(c)
	if _, err := r.Peek(1); err != nil {
		return 0, fmt.Errorf("first byte: %w", err)
	}
	took := time.Since(start)
	line, err := r.ReadString('\n')
	if err != nil {
		return 0, fmt.Errorf("status line: %w", err)
	}
	if len(line) < 12 || line[:5] != "HTTP/" || line[9:12] != "200" {
		return 0, errors.New("status: " + line)
	}
	if drain {
		if _, err := io.Copy(io.Discard, r); err != nil {
			return 0, fmt.Errorf("reply: %w", err)
		}
	}
	return took, nil
}
