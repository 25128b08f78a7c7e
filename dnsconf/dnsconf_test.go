//go:build linux

package dnsconf

import (
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseMode(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Mode
		err  bool
	}{
		{"auto", Auto, false},
		{"resolved", Resolved, false},
		{"resolv.conf", File, false},
		{"off", Off, false},
		{"", "", true},
		{"file", "", true},
		{"Auto", "", true},
	} {
		got, err := ParseMode(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseMode(%q) = %q, %v; want %q, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

func TestPrepareErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		cfg  Config
		want string // in the error
	}{
		{"no servers", Config{Mode: File, Path: filepath.Join(dir, "r")}, "no DNS server"},
		{"zero server", Config{Mode: File, Path: filepath.Join(dir, "r"), Servers: []netip.Addr{{}}}, "invalid"},
		{"bad mode", Config{Mode: "dhcp", Servers: servers}, "unknown DNS mode"},
		{"directory", Config{Mode: File, Path: dir, Servers: servers}, "neither a regular file nor a symlink"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Prepare(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Prepare: %v; want an error with %q", err, tc.want)
			}
		})
	}
}

func TestOff(t *testing.T) {
	st, err := Prepare(Config{Mode: Off}) // no servers needed to do nothing
	if err != nil {
		t.Fatal(err)
	}
	if st.Backend != Off {
		t.Fatalf("backend %q", st.Backend)
	}
	if err := Apply(st, nil); err != nil {
		t.Fatal(err)
	}
	if msg, err := Undo(st, nil); err != nil || !strings.Contains(msg, "nothing to undo") {
		t.Fatalf("Undo: %q, %v", msg, err)
	}
}

func TestUnknownBackend(t *testing.T) {
	if err := Apply(State{Backend: Auto}, nil); err == nil {
		t.Error("Apply with backend auto: no error")
	}
	if _, err := Undo(State{}, nil); err == nil {
		t.Error("Undo of a zero state: no error")
	}
}
