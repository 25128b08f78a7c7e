package e2e

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// A backup uplink carries (almost) nothing while a primary works, and
// carries the flow when every primary is down.
func TestBackupUplink(t *testing.T) {
	e := newEnv(t, options{topo: outageNet(), uplinks: []string{"wan0", "wan1:backup"}})
	const size = 48 << 20
	sum := e.randomFile(t, "big", size)

	t.Run("primary works", func(t *testing.T) {
		before, after := e.download(t, "big", sum, "60")
		total, share := shares(before.rx, after.rx)
		t.Logf("%d bytes: wan0 %.1f%%, wan1 (backup) %.1f%%", total, 100*share[0], 100*share[1])
		// Probes and the join's handshake are all the backup may carry.
		if share[1] > 0.02 {
			t.Errorf("the backup uplink carried %.1f%% of the bytes while the primary worked", 100*share[1])
		}
	})

	t.Run("primary down", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "big")
		dl := e.tp.Start(e.tp.Client, "curl", "curl", "-sS", "-m", "120", "-o", out, destURL("big"))
		waitSize(t, dl, out, size/5)
		e.tp.Blackhole(topo.A, true)
		before := e.uplinkBytes()
		if err := dl.Wait(2 * 60e9); err != nil {
			t.Fatalf("curl: %v\n%s\nclient log:\n%s", err, dl.Log(), tail(e.client.Log(), 40))
		}
		after := e.uplinkBytes()
		if got := fileSum(t, out); got != sum {
			t.Fatalf("sha256 %s, want %s", got, sum)
		}
		b := after.rx[1] - before.rx[1]
		t.Logf("after A went dark the backup received %d bytes", b)
		if b < size/2 {
			t.Errorf("the backup received only %d bytes of the rest of the flow", b)
		}
	})
}

// Without --uplink the client takes every interface with a default route.
func TestUplinksDiscovered(t *testing.T) {
	e := newEnv(t, options{topo: outageNet(), uplinks: []string{}})
	if log := e.client.Log(); !strings.Contains(log, "uplinks discovered") || !strings.Contains(log, "wan0") || !strings.Contains(log, "wan1") {
		t.Fatalf("the client did not discover wan0 and wan1:\n%s", tail(log, 20))
	}
	const size = 16 << 20
	before, after := e.download(t, "big", e.randomFile(t, "big", size), "60")
	total, share := shares(before.rx, after.rx)
	t.Logf("%d bytes: wan0 %.0f%%, wan1 %.0f%%", total, 100*share[0], 100*share[1])
	for i, s := range share {
		if s < minShare {
			t.Errorf("wan%d carried %.0f%%", i, 100*s)
		}
	}
}
