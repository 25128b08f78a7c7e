//go:build linux

package e2e

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/mpvpn/mpvpn/test/netns/topo"
	"github.com/mpvpn/mpvpn/tunnel"
)

// cipherStatus is the part of `mpvpn status --json` about ciphers.
type cipherStatus struct {
	Flows struct {
		Total   uint64   `json:"total"`
		Ciphers []string `json:"ciphers"`
		AESGCM  uint64   `json:"aes_gcm"`
	} `json:"flows"`
}

func (e *env) cipherStatus(t *testing.T, socket string) cipherStatus {
	t.Helper()
	out, err := exec.Command(bin.mpvpn, "status", "--json", "--socket", socket).Output()
	if err != nil {
		t.Fatalf("mpvpn status --json --socket %s: %v", socket, err)
	}
	var st cipherStatus
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("status JSON: %v\n%s", err, out)
	}
	return st
}

// TestCipherChoice: `--cipher` on each end, as a user sets it: the flows
// of a download are sealed with AES-256-GCM exactly when the client
// offers it and the concentrator takes it (auto: when this host's CPU has
// AES instructions, as both ends here share it), the bytes arrive either
// way, and both ends' status says which ciphers they use and how many
// flows were sealed with AES-256-GCM.
func TestCipherChoice(t *testing.T) {
	hw := tunnel.HardwareAES()
	t.Logf("this host has AES instructions: %v", hw)
	both := []string{"aes-256-gcm", "chacha20-poly1305"}
	only := []string{"chacha20-poly1305"}
	auto := only
	if hw {
		auto = both
	}
	for _, tt := range []struct {
		name                   string
		client, server         string // --cipher ("": not given)
		clientCiphers, srvCiph []string
		aes                    bool
	}{
		{"defaults", "", "", auto, auto, hw},
		{"client chacha20-poly1305", "chacha20-poly1305", "", only, auto, false},
		{"server chacha20-poly1305", "aes-256-gcm", "chacha20-poly1305", both, only, false},
		{"both aes-256-gcm", "aes-256-gcm", "aes-256-gcm", both, both, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var o options
			o.topo = topo.Options{NoEmu: true}
			if tt.client != "" {
				o.clientArgs = []string{"--cipher", tt.client}
			}
			if tt.server != "" {
				o.serverArgs = []string{"--cipher", tt.server}
			}
			e := newEnv(t, o)
			const size = 4 << 20
			sum := e.randomFile(t, "blob", size)
			out := filepath.Join(t.TempDir(), "blob")
			if code, msg := e.curl(t, "-m", "60", "-o", out, destURL("blob")); code != 0 {
				t.Fatalf("curl exit %d: %s", code, msg)
			}
			if got := fileSum(t, out); got != sum {
				t.Fatalf("sha256 %s, want %s", got, sum)
			}
			cs, ss := e.cipherStatus(t, e.clientSocket()), e.cipherStatus(t, e.serverSocket())
			if !slices.Equal(cs.Flows.Ciphers, tt.clientCiphers) || !slices.Equal(ss.Flows.Ciphers, tt.srvCiph) {
				t.Errorf("ciphers: client %v, server %v; want %v, %v", cs.Flows.Ciphers, ss.Flows.Ciphers, tt.clientCiphers, tt.srvCiph)
			}
			if cs.Flows.Total == 0 {
				t.Fatal("the client counts no flow after a download")
			}
			wantC, wantS := uint64(0), uint64(0)
			if tt.aes {
				wantC, wantS = cs.Flows.Total, ss.Flows.Total
			}
			if cs.Flows.AESGCM != wantC || ss.Flows.AESGCM != wantS {
				t.Errorf("flows sealed with AES-256-GCM: client %d of %d, server %d of %d; want %d and %d",
					cs.Flows.AESGCM, cs.Flows.Total, ss.Flows.AESGCM, ss.Flows.Total, wantC, wantS)
			}
			t.Logf("client %v, server %v: %d of %d flows on aes-256-gcm", cs.Flows.Ciphers, ss.Flows.Ciphers, cs.Flows.AESGCM, cs.Flows.Total)
			table, err := exec.Command(bin.mpvpn, "status", "--socket", e.clientSocket()).Output()
			if err != nil || !strings.Contains(string(table), "sealed with aes-256-gcm (offers: "+strings.Join(tt.clientCiphers, ", ")+")") {
				t.Errorf("mpvpn status: %v\n%s", err, table)
			}
		})
	}
}
