package pathmgr

import (
	"bytes"
	"errors"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vishvananda/netns"
)

func openPM(t *testing.T) *PM {
	t.Helper()
	pm, err := OpenPM(netns.None())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pm.Close() })
	return pm
}

func TestPMEndpointRoundTrip(t *testing.T) {
	withNetns(t, func() {
		link := addLink(t, "wan0", "10.1.0.2/24", "10.2.0.2/24", "10.3.0.2/24", "fd00::2/64")
		idx := link.Attrs().Index
		pm := openPM(t)

		tests := []struct {
			name string
			in   Endpoint
			ip   string // what `ip mptcp endpoint show` prints for it
		}{
			{"subflow dev", Endpoint{Addr: mustAddr("10.1.0.2"), Flags: FlagSubflow, IfIndex: idx}, "10.1.0.2 id ID subflow dev wan0"},
			{"subflow backup", Endpoint{Addr: mustAddr("10.2.0.2"), Flags: FlagSubflow | FlagBackup}, "10.2.0.2 id ID subflow backup"},
			// The port is host order on the wire; iproute2 printing
			// 4001 proves the encoding.
			{"signal port", Endpoint{Addr: mustAddr("10.3.0.2"), Port: 4001, Flags: FlagSignal}, "10.3.0.2 port 4001 id ID signal"},
			{"ipv6 fullmesh", Endpoint{Addr: mustAddr("fd00::2"), Flags: FlagSubflow | FlagFullmesh, IfIndex: idx}, "fd00::2 id ID subflow fullmesh dev wan0"},
			{"explicit id", Endpoint{ID: 42, Addr: mustAddr("10.9.9.9"), Flags: FlagSubflow}, "10.9.9.9 id 42 subflow"},
		}
		got := map[string]Endpoint{}
		for _, tt := range tests {
			ep, err := pm.AddEndpoint(tt.in)
			if err != nil {
				t.Fatalf("%s: add: %v", tt.name, err)
			}
			want := tt.in
			if want.ID == 0 {
				if ep.ID == 0 {
					t.Fatalf("%s: the kernel allocated no id: %+v", tt.name, ep)
				}
				want.ID = ep.ID
			}
			if ep != want {
				t.Errorf("%s: added %+v, kernel holds %+v", tt.name, want, ep)
			}
			byID, err := pm.Endpoint(ep.ID)
			if err != nil || byID != ep {
				t.Errorf("%s: get id %d = %+v, %v; want %+v", tt.name, ep.ID, byID, err, ep)
			}
			got[tt.name] = ep
		}

		dump, err := pm.Endpoints()
		if err != nil {
			t.Fatal(err)
		}
		if len(dump) != len(tests) {
			t.Fatalf("dump has %d endpoints, want %d: %v", len(dump), len(tests), dump)
		}

		// Cross-check the encoding against iproute2 where it exists.
		if out, err := exec.Command("ip", "mptcp", "endpoint", "show").CombinedOutput(); err == nil {
			text := string(out)
			for _, tt := range tests {
				line := strings.Replace(tt.ip, "id ID", "id "+itoa(got[tt.name].ID), 1)
				if !strings.Contains(text, line) {
					t.Errorf("%s: `ip mptcp endpoint show` lacks %q:\n%s", tt.name, line, text)
				}
			}
		} else {
			t.Logf("no iproute2 cross-check: %v", err)
		}

		// Flags: only backup and fullmesh change.
		sub := got["subflow dev"]
		for _, flags := range []EndpointFlags{FlagSubflow | FlagBackup, FlagSubflow} {
			if err := pm.SetEndpointFlags(sub.ID, flags); err != nil {
				t.Fatalf("set flags %s: %v", flags, err)
			}
			ep, err := pm.Endpoint(sub.ID)
			if err != nil {
				t.Fatal(err)
			}
			if ep.Flags != flags {
				t.Errorf("after set flags %q the endpoint has %q", flags, ep.Flags)
			}
		}
		if err := pm.SetEndpointFlags(200, FlagBackup); err == nil {
			t.Error("set flags of a missing endpoint succeeded")
		}

		for _, tt := range tests {
			if err := pm.DelEndpoint(got[tt.name].ID); err != nil {
				t.Errorf("%s: delete: %v", tt.name, err)
			}
		}
		if err := pm.DelEndpoint(got["subflow dev"].ID); err == nil {
			t.Error("deleting a deleted endpoint succeeded")
		}
		if dump, err := pm.Endpoints(); err != nil || len(dump) != 0 {
			t.Errorf("after deleting all: %v, %v", dump, err)
		}
	})
}

func itoa(id uint8) string { return strconv.Itoa(int(id)) }

func TestPMAddErrors(t *testing.T) {
	withNetns(t, func() {
		addLink(t, "wan0", "10.1.0.2/24")
		pm := openPM(t)
		if _, err := pm.AddEndpoint(Endpoint{Addr: mustAddr("10.1.0.2"), Flags: FlagSubflow}); err != nil {
			t.Fatal(err)
		}

		tests := []struct {
			name    string
			in      Endpoint
			errno   syscall.Errno
			message string
		}{
			{"duplicate", Endpoint{Addr: mustAddr("10.1.0.2"), Flags: FlagSubflow | FlagBackup}, syscall.EEXIST, "already exists"},
			{"port without signal", Endpoint{Addr: mustAddr("10.1.0.3"), Port: 80, Flags: FlagSubflow}, syscall.EINVAL, "signal"},
			{"implicit", Endpoint{Addr: mustAddr("10.1.0.4"), Flags: FlagImplicit}, syscall.EINVAL, "IMPLICIT"},
		}
		for _, tt := range tests {
			_, err := pm.AddEndpoint(tt.in)
			if !errors.Is(err, tt.errno) || !strings.Contains(err.Error(), tt.message) {
				t.Errorf("%s: got %v, want %v mentioning %q", tt.name, err, tt.errno, tt.message)
			}
		}

		// The kernel holds at most 8 endpoints.
		for i := 2; i <= MaxEndpoints; i++ {
			if _, err := pm.AddEndpoint(Endpoint{Addr: mustAddr("10.8.0." + itoa(uint8(i))), Flags: FlagSubflow}); err != nil {
				t.Fatalf("endpoint %d: %v", i, err)
			}
		}
		_, err := pm.AddEndpoint(Endpoint{Addr: mustAddr("10.8.0.100"), Flags: FlagSubflow})
		if !errors.Is(err, syscall.ERANGE) || !strings.Contains(err.Error(), "at most 8") {
			t.Errorf("ninth endpoint: got %v, want ERANGE mentioning the limit", err)
		}

		if err := pm.FlushEndpoints(); err != nil {
			t.Fatal(err)
		}
		if dump, err := pm.Endpoints(); err != nil || len(dump) != 0 {
			t.Errorf("after flush: %v, %v", dump, err)
		}
	})
}

func TestPMLimits(t *testing.T) {
	withNetns(t, func() {
		pm := openPM(t)
		def, err := pm.Limits()
		if err != nil {
			t.Fatal(err)
		}
		if def != (Limits{Subflows: 2, AddAddrAccepted: 0}) {
			t.Errorf("a new namespace has limits %+v, want the kernel default 2/0", def)
		}
		tests := []struct {
			in Limits
			ok bool
		}{
			{Limits{Subflows: 4, AddAddrAccepted: 3}, true},
			{Limits{Subflows: 8, AddAddrAccepted: 8}, true},
			{Limits{Subflows: 0, AddAddrAccepted: 0}, true},
			{Limits{Subflows: 9, AddAddrAccepted: 0}, false},
			{Limits{Subflows: 2, AddAddrAccepted: 9}, false},
		}
		last := Limits{}
		for _, tt := range tests {
			err := pm.SetLimits(tt.in)
			if tt.ok {
				if err != nil {
					t.Errorf("set %+v: %v", tt.in, err)
					continue
				}
				last = tt.in
			} else {
				if !errors.Is(err, syscall.EINVAL) || !strings.Contains(err.Error(), "at most 8") {
					t.Errorf("set %+v: got %v, want EINVAL naming the limit", tt.in, err)
				}
				// The kernel refuses too, on its own.
				if kerr := pm.setLimits(tt.in); !errors.Is(kerr, syscall.EINVAL) {
					t.Errorf("kernel accepted %+v: %v", tt.in, kerr)
				}
			}
			got, err := pm.Limits()
			if err != nil || got != last {
				t.Errorf("after set %+v: limits %+v, %v; want %+v", tt.in, got, err, last)
			}
		}
	})
}

func TestRaiseLimits(t *testing.T) {
	withNetns(t, func() {
		pm := openPM(t)
		tests := []struct {
			name          string
			before, raise Limits
			want          Limits
		}{
			{"raise both", Limits{2, 0}, Limits{8, 8}, Limits{8, 8}},
			{"keep higher", Limits{6, 1}, Limits{4, 4}, Limits{6, 4}},
			{"nothing to do", Limits{8, 8}, Limits{2, 0}, Limits{8, 8}},
		}
		for _, tt := range tests {
			if err := SetLimits(tt.before.Subflows, tt.before.AddAddrAccepted); err != nil {
				t.Fatal(err)
			}
			restore, err := RaiseLimits(tt.raise.Subflows, tt.raise.AddAddrAccepted)
			if err != nil {
				t.Fatalf("%s: %v", tt.name, err)
			}
			if got, _ := pm.Limits(); got != tt.want {
				t.Errorf("%s: raised to %+v, want %+v", tt.name, got, tt.want)
			}
			if err := restore(); err != nil {
				t.Errorf("%s: restore: %v", tt.name, err)
			}
			if err := restore(); err != nil {
				t.Errorf("%s: second restore: %v", tt.name, err)
			}
			if got, _ := pm.Limits(); got != tt.before {
				t.Errorf("%s: restored to %+v, want %+v", tt.name, got, tt.before)
			}
		}
		if _, err := RaiseLimits(9, 0); err == nil {
			t.Error("RaiseLimits(9, 0) succeeded")
		}
	})
}

// The generic netlink header is four bytes, the last two reserved and zero.
func TestGenlHeader(t *testing.T) {
	h := genlHeader{cmd: pmCmdAddAddr, version: pmVersion}
	if got, want := h.Serialize(), []byte{pmCmdAddAddr, pmVersion, 0, 0}; !bytes.Equal(got, want) || h.Len() != len(want) {
		t.Errorf("Serialize() = %v, Len() = %d; want %v", got, h.Len(), want)
	}
}
