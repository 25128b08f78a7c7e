//go:build linux

// Command voicebench measures a voice-like UDP stream: -rate datagrams a
// second of -size bytes to an echo (voicebench -listen), each numbered and
// stamped, and reports for each phase (by when a datagram was sent) how
// many came back, their round-trip time at the median and the 99th
// percentile, and how many never came back within -late. Phases are
// "name:from-to" in seconds since the start, comma-separated, e.g.
//
//	voicebench -to 198.51.100.10:7007 -duration 30s -phases "loss:0-10,outage:10-15,after:15-30"
//
// It prints one JSON object per phase on a line of its own.
package main

import (
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

func main() {
	listen := flag.String("listen", "", "echo server: listen on this ADDR:PORT")
	to := flag.String("to", "", "the echo server's ADDR:PORT")
	rate := flag.Int("rate", 50, "datagrams a second")
	size := flag.Int("size", 160, "bytes a datagram (at least 16)")
	duration := flag.Duration("duration", 20*time.Second, "how long to send")
	late := flag.Duration("late", 2*time.Second, "a reply later than this counts as lost")
	phases := flag.String("phases", "all:0-1000000", "name:from-to,… in seconds")
	flag.Parse()
	var err error
	switch {
	case *listen != "":
		err = serve(*listen)
	case *to != "":
		err = run(*to, *rate, *size, *duration, *late, *phases)
	default:
		err = fmt.Errorf("give -listen or -to")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "voicebench:", err)
		os.Exit(1)
	}
}

func serve(addr string) error {
	c, err := net.ListenPacket("udp", addr)
	if err != nil {
		return err
	}
	fmt.Println("listening")
	buf := make([]byte, 65536)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return err
		}
		c.WriteTo(buf[:n], from)
	}
}

type phase struct {
	Name     string  `json:"phase"`
	from, to float64 // seconds
	Sent     int     `json:"sent"`
	Received int     `json:"received"`
	LossPct  float64 `json:"loss_pct"`
	P50      float64 `json:"p50_ms"`
	P99      float64 `json:"p99_ms"`
	Max      float64 `json:"max_ms"`
	rtts     []float64
}

func parsePhases(s string) ([]*phase, error) {
	var out []*phase
	for _, f := range strings.Split(s, ",") {
		name, span, ok := strings.Cut(f, ":")
		a, b, ok2 := strings.Cut(span, "-")
		from, err1 := strconv.ParseFloat(a, 64)
		to, err2 := strconv.ParseFloat(b, 64)
		if !ok || !ok2 || err1 != nil || err2 != nil || to <= from {
			return nil, fmt.Errorf("phase %q: want name:from-to", f)
		}
		out = append(out, &phase{Name: name, from: from, to: to})
	}
	return out, nil
}

func run(to string, rate, size int, duration, late time.Duration, phaseSpec string) error {
	ps, err := parsePhases(phaseSpec)
	if err != nil {
		return err
	}
	if size < 16 || rate < 1 {
		return fmt.Errorf("-size at least 16, -rate at least 1")
	}
	c, err := net.Dial("udp", to)
	if err != nil {
		return err
	}
	defer c.Close()
	n := int(duration.Seconds() * float64(rate))
	// Written by the sender, read by the receiver when the echo comes.
	sentAt := make([]atomic.Int64, n)
	rtt := make([]time.Duration, n) // 0: not back
	start := time.Now()
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			c.SetReadDeadline(start.Add(duration + late))
			m, err := c.Read(buf)
			if err != nil {
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					return
				}
				continue // an ICMP error, say
			}
			if m < 16 {
				continue
			}
			i := int(binary.BigEndian.Uint64(buf[0:8]))
			if i < 0 || i >= n || rtt[i] != 0 {
				continue
			}
			d := time.Since(start) - time.Duration(sentAt[i].Load())
			if d <= late {
				rtt[i] = max(d, 1)
			}
		}
	}()
	p := make([]byte, size)
	for i := range n {
		at := time.Duration(i) * time.Second / time.Duration(rate)
		time.Sleep(time.Until(start.Add(at)))
		sentAt[i].Store(int64(time.Since(start)))
		binary.BigEndian.PutUint64(p[0:8], uint64(i))
		c.Write(p) // a send error is a lost datagram
	}
	<-done
	for i := range n {
		s := time.Duration(sentAt[i].Load()).Seconds()
		for _, ph := range ps {
			if s >= ph.from && s < ph.to {
				ph.Sent++
				if rtt[i] > 0 {
					ph.Received++
					ph.rtts = append(ph.rtts, float64(rtt[i])/1e6)
				}
			}
		}
	}
	enc := json.NewEncoder(os.Stdout)
	for _, ph := range ps {
		if ph.Sent > 0 {
			ph.LossPct = 100 * float64(ph.Sent-ph.Received) / float64(ph.Sent)
		}
		if len(ph.rtts) > 0 {
			slices.Sort(ph.rtts)
			ph.P50 = ph.rtts[len(ph.rtts)/2]
			ph.P99 = ph.rtts[min(len(ph.rtts)-1, len(ph.rtts)*99/100)]
			ph.Max = ph.rtts[len(ph.rtts)-1]
		}
		enc.Encode(ph)
	}
	return nil
}
