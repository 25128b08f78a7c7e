//go:build linux

// Package linkemu is a userspace link emulator: a "wire" between two network
// interfaces that copies Ethernet frames both ways and, per direction, limits
// the rate (token bucket over whole frames), adds delay and jitter, loses
// frames at random, tail-drops when its queue is full, and can go dark while
// both interfaces stay up.
//
// The kernel the tests run on has no tc netem (tbf/htb exist, but only shape
// rate), hence this. The scheduling model lives in pipe.go and is tested
// without root; wire_linux.go moves frames with AF_PACKET sockets.
package linkemu

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// Dir names a direction through the wire. Up is from the wire's A interface
// to its B interface (client → ISP in the test topology), Down the reverse.
type Dir int

const (
	Up Dir = iota
	Down
	// Both addresses Up and Down at once (for setting parameters).
	Both
)

func (d Dir) String() string {
	switch d {
	case Up:
		return "up"
	case Down:
		return "down"
	case Both:
		return "both"
	}
	return "dir(" + strconv.Itoa(int(d)) + ")"
}

// ParseDir parses "up", "down" or "both".
func ParseDir(s string) (Dir, error) {
	switch strings.ToLower(s) {
	case "up":
		return Up, nil
	case "down":
		return Down, nil
	case "both", "":
		return Both, nil
	}
	return 0, fmt.Errorf("linkemu: direction %q: want up, down or both", s)
}

// one maps Both to Up, for reading parameters and counters.
func (d Dir) one() Dir {
	if d == Both {
		return Up
	}
	return d
}

// dirs expands d into the directions it addresses.
func (d Dir) dirs() []Dir {
	if d == Both {
		return []Dir{Up, Down}
	}
	return []Dir{d}
}

// Params describe one direction of the link. The zero value is a perfect
// wire: unlimited, no delay, no loss.
type Params struct {
	// Rate in bits per second, counted over whole Ethernet frames (header
	// included; no preamble, FCS or inter-frame gap). 0 = unlimited.
	Rate uint64
	// Delay is the one-way propagation delay added to every frame.
	Delay time.Duration
	// Jitter adds a uniformly random extra delay in [0, Jitter]. Frames keep
	// their order within a direction (a frame is never delivered before the
	// one sent ahead of it) unless Reorder is set.
	Jitter time.Duration
	// Loss is the probability (0..1) that a frame is lost after it went
	// through the bottleneck, like a radio loss: it still used up the rate.
	Loss float64
	// Queue is the bottleneck buffer in bytes; arrivals that do not fit are
	// tail-dropped. 0 = 100 ms worth at Rate (at least 10 full frames).
	// Only meaningful with a Rate.
	Queue int
	// Burst is the token bucket depth in bytes. 0 = 1 ms worth at Rate, at
	// least two full frames.
	Burst int
	// Blackhole drops every frame while both interfaces stay up ("carrier
	// up, nothing passes"). Frames already inside the wire are dropped too.
	Blackhole bool
	// Reorder lets Jitter reorder frames, as netem does; off by default
	// because real links rarely reorder and TCP reacts to it.
	Reorder bool
}

// maxFrame is the largest frame the wire carries: a 1500-byte MTU plus the
// Ethernet header. Bigger frames mean an offload was left on (see the notes
// at the top of wire_linux.go) and are dropped.
const maxFrame = 1514

const (
	defaultQueueTime = 100 * time.Millisecond
	minQueue         = 10 * maxFrame
	defaultBurstTime = time.Millisecond
	minBurst         = 2 * maxFrame
)

// bytesIn returns how many bytes Rate carries in d.
func (p Params) bytesIn(d time.Duration) float64 {
	return float64(p.Rate) / 8 * d.Seconds()
}

// queueLimit is the effective bottleneck buffer in bytes.
func (p Params) queueLimit() float64 {
	if p.Queue > 0 {
		return float64(p.Queue)
	}
	return math.Max(p.bytesIn(defaultQueueTime), minQueue)
}

// burst is the effective token bucket depth in bytes.
func (p Params) burst() float64 {
	if p.Burst > 0 {
		return float64(p.Burst)
	}
	return math.Max(p.bytesIn(defaultBurstTime), minBurst)
}

// Validate reports parameters the emulator cannot honour.
func (p Params) Validate() error {
	var errs []error
	if p.Delay < 0 || p.Jitter < 0 {
		errs = append(errs, errors.New("delay and jitter must not be negative"))
	}
	if p.Delay > time.Minute || p.Jitter > time.Minute {
		errs = append(errs, errors.New("delay and jitter must be at most a minute"))
	}
	if math.IsNaN(p.Loss) || p.Loss < 0 || p.Loss > 1 {
		errs = append(errs, fmt.Errorf("loss %v not in [0, 1]", p.Loss))
	}
	if p.Queue < 0 || p.Burst < 0 {
		errs = append(errs, errors.New("queue and burst must not be negative"))
	}
	if p.Rate != 0 && p.Rate < 8000 {
		errs = append(errs, fmt.Errorf("rate %d bit/s below 8 kbit/s", p.Rate))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("linkemu: %w", err)
	}
	return nil
}

// String formats p as the key=value list that ParseParams and Set accept,
// e.g. "rate=40mbit delay=10ms jitter=0s loss=0% queue=0 burst=0
// blackhole=off reorder=off".
func (p Params) String() string {
	return strings.Join([]string{
		"rate=" + FormatRate(p.Rate),
		"delay=" + p.Delay.String(),
		"jitter=" + p.Jitter.String(),
		"loss=" + strconv.FormatFloat(p.Loss*100, 'g', -1, 64) + "%",
		"queue=" + strconv.Itoa(p.Queue),
		"burst=" + strconv.Itoa(p.Burst),
		"blackhole=" + onOff(p.Blackhole),
		"reorder=" + onOff(p.Reorder),
	}, " ")
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// ParseParams parses a space-separated key=value list onto the zero Params.
func ParseParams(s string) (Params, error) {
	var p Params
	err := p.Set(s)
	return p, err
}

// Set applies a space-separated key=value list to p; keys not mentioned keep
// their value. Keys: rate (e.g. 40mbit, 1.5gbit, 64000, 0 = unlimited), delay
// and jitter (Go durations: 10ms), loss (1% or 0.01), queue and burst (bytes:
// 150000, 64kb, 1mb; 0 = default), blackhole and reorder (on/off). On error p
// is unchanged.
func (p *Params) Set(s string) error {
	q := *p
	for _, kv := range strings.Fields(s) {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return fmt.Errorf("linkemu: %q: want key=value", kv)
		}
		var err error
		switch strings.ToLower(k) {
		case "rate":
			q.Rate, err = ParseRate(v)
		case "delay":
			q.Delay, err = time.ParseDuration(v)
		case "jitter":
			q.Jitter, err = time.ParseDuration(v)
		case "loss":
			q.Loss, err = parseLoss(v)
		case "queue", "limit":
			q.Queue, err = parseBytes(v)
		case "burst":
			q.Burst, err = parseBytes(v)
		case "blackhole":
			q.Blackhole, err = parseOnOff(v)
		case "reorder":
			q.Reorder, err = parseOnOff(v)
		default:
			err = errors.New("unknown key")
		}
		if err != nil {
			return fmt.Errorf("linkemu: %s: %w", kv, err)
		}
	}
	if err := q.Validate(); err != nil {
		return err
	}
	*p = q
	return nil
}

// ParseRate parses a rate in bits per second with tc's decimal units: "bit",
// "kbit", "mbit", "gbit" (also k, m, g), e.g. "40mbit" or "2.5gbit". "0",
// "unlimited" and "none" mean no limit. Byte units ("mbps" is megabytes to
// tc but megabits to most people) are refused as ambiguous.
func ParseRate(s string) (uint64, error) {
	l := strings.ToLower(strings.TrimSpace(s))
	switch l {
	case "0", "unlimited", "none", "off":
		return 0, nil
	}
	if strings.HasSuffix(l, "bps") || strings.HasSuffix(l, "b/s") {
		return 0, fmt.Errorf("rate %q: byte units are ambiguous, use bit, kbit, mbit or gbit", s)
	}
	mult := 1.0
	num := l
	for _, u := range []struct {
		suffix string
		mult   float64
	}{{"gbit", 1e9}, {"mbit", 1e6}, {"kbit", 1e3}, {"bit", 1}, {"g", 1e9}, {"m", 1e6}, {"k", 1e3}} {
		if strings.HasSuffix(l, u.suffix) {
			num, mult = strings.TrimSuffix(l, u.suffix), u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f < 0 || math.IsInf(f, 0) || f*mult > math.MaxUint64/2 {
		return 0, fmt.Errorf("rate %q: want e.g. 40mbit", s)
	}
	return uint64(math.Round(f * mult)), nil
}

// FormatRate formats bits per second the way ParseRate reads them; 0 is
// "unlimited".
func FormatRate(r uint64) string {
	switch {
	case r == 0:
		return "unlimited"
	case r%1e9 == 0:
		return strconv.FormatUint(r/1e9, 10) + "gbit"
	case r%1e6 == 0:
		return strconv.FormatUint(r/1e6, 10) + "mbit"
	case r%1e3 == 0:
		return strconv.FormatUint(r/1e3, 10) + "kbit"
	}
	return strconv.FormatUint(r, 10) + "bit"
}

func parseLoss(s string) (float64, error) {
	if pct, ok := strings.CutSuffix(s, "%"); ok {
		f, err := strconv.ParseFloat(pct, 64)
		return f / 100, err
	}
	return strconv.ParseFloat(s, 64)
}

// parseBytes reads a byte count with tc's binary suffixes: k/kb = 1024,
// m/mb = 1024², b = 1.
func parseBytes(s string) (int, error) {
	l := strings.ToLower(s)
	mult := 1
	for _, u := range []struct {
		suffix string
		mult   int
	}{{"kb", 1 << 10}, {"mb", 1 << 20}, {"k", 1 << 10}, {"m", 1 << 20}, {"b", 1}} {
		if strings.HasSuffix(l, u.suffix) {
			l, mult = strings.TrimSuffix(l, u.suffix), u.mult
			break
		}
	}
	n, err := strconv.Atoi(l)
	if err != nil || n < 0 || n > math.MaxInt32/mult {
		return 0, fmt.Errorf("bytes %q: want e.g. 150000 or 64kb", s)
	}
	return n * mult, nil
}

func parseOnOff(s string) (bool, error) {
	switch strings.ToLower(s) {
	case "on", "true", "1", "yes":
		return true, nil
	case "off", "false", "0", "no":
		return false, nil
	}
	return false, fmt.Errorf("%q: want on or off", s)
}
