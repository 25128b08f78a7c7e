//go:build linux

package linkemu

import (
	"strings"
	"testing"
	"time"
)

func TestParseRate(t *testing.T) {
	tests := []struct {
		in   string
		want uint64
		err  bool
	}{
		{"40mbit", 40_000_000, false},
		{"40Mbit", 40_000_000, false},
		{"1.5gbit", 1_500_000_000, false},
		{"500kbit", 500_000, false},
		{"64000", 64_000, false},
		{"64000bit", 64_000, false},
		{"20m", 20_000_000, false},
		{"0", 0, false},
		{"unlimited", 0, false},
		{"10mbps", 0, true},
		{"fast", 0, true},
		{"-1mbit", 0, true},
	}
	for _, tt := range tests {
		got, err := ParseRate(tt.in)
		if (err != nil) != tt.err || got != tt.want {
			t.Errorf("ParseRate(%q) = %d, %v; want %d, error %v", tt.in, got, err, tt.want, tt.err)
		}
	}
	for _, r := range []uint64{0, 1500, 64_000, 40_000_000, 2_000_000_000, 1_234_567} {
		if got, err := ParseRate(FormatRate(r)); err != nil || got != r {
			t.Errorf("ParseRate(FormatRate(%d)) = %d, %v", r, got, err)
		}
	}
}

func TestParamsSet(t *testing.T) {
	base := Params{Rate: 40e6, Delay: 10 * time.Millisecond}
	tests := []struct {
		in   string
		want Params
		err  string
	}{
		{"", base, ""},
		{"loss=1%", Params{Rate: 40e6, Delay: 10 * time.Millisecond, Loss: 0.01}, ""},
		{"loss=0.5", Params{Rate: 40e6, Delay: 10 * time.Millisecond, Loss: 0.5}, ""},
		{"rate=20mbit delay=5ms jitter=2ms", Params{Rate: 20e6, Delay: 5 * time.Millisecond, Jitter: 2 * time.Millisecond}, ""},
		{"queue=64kb burst=3028", Params{Rate: 40e6, Delay: 10 * time.Millisecond, Queue: 65536, Burst: 3028}, ""},
		{"blackhole=on reorder=on", Params{Rate: 40e6, Delay: 10 * time.Millisecond, Blackhole: true, Reorder: true}, ""},
		{"rate=0", Params{Delay: 10 * time.Millisecond}, ""},
		{"loss=150%", base, "loss"},
		{"delay=-1ms", base, "negative"},
		{"colour=red", base, "unknown key"},
		{"rate", base, "key=value"},
		{"blackhole=maybe", base, "on or off"},
		{"rate=100bit", base, "below"},
	}
	for _, tt := range tests {
		p := base
		err := p.Set(tt.in)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("Set(%q) error %v, want one about %q", tt.in, err, tt.err)
			}
		} else if err != nil {
			t.Errorf("Set(%q): %v", tt.in, err)
		}
		if p != tt.want {
			t.Errorf("Set(%q) = %+v, want %+v", tt.in, p, tt.want)
		}
	}
}

func TestParamsRoundTrip(t *testing.T) {
	for _, p := range []Params{
		{},
		{Rate: 40e6, Delay: 10 * time.Millisecond, Jitter: time.Millisecond, Loss: 0.015, Queue: 150000, Burst: 3028, Blackhole: true, Reorder: true},
		{Rate: 1_234_567, Delay: 1500 * time.Microsecond, Loss: 1},
	} {
		got, err := ParseParams(p.String())
		if err != nil || got != p {
			t.Errorf("ParseParams(%q) = %+v, %v; want %+v", p.String(), got, err, p)
		}
	}
}

func TestParseDir(t *testing.T) {
	for in, want := range map[string]Dir{"up": Up, "DOWN": Down, "both": Both, "": Both} {
		if got, err := ParseDir(in); err != nil || got != want {
			t.Errorf("ParseDir(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseDir("sideways"); err == nil {
		t.Error("ParseDir(sideways) succeeded")
	}
}
