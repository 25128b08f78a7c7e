//go:build linux

package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// --handshake-timeout must be positive; the check fails before the host is
// touched, so it runs as any user.
func TestServerHandshakeTimeoutFlag(t *testing.T) {
	priv, _, err := run(t, "", "keygen")
	if err != nil {
		t.Fatal(err)
	}
	pub, _, _ := run(t, priv, "pubkey")
	key := filepath.Join(t.TempDir(), "server.key")
	if err := os.WriteFile(key, []byte(priv), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"0s", "-1s", "soon"} {
		_, _, err := run(t, "", "server", "--key", key, "--peer", strings.TrimSpace(pub), "--handshake-timeout", v)
		if err == nil {
			t.Fatalf("mpvpn server --handshake-timeout %s succeeded", v)
		}
		if msg := oneLine(err); !strings.Contains(msg, "handshake-timeout") {
			t.Errorf("--handshake-timeout %s: error %q does not name the flag", v, msg)
		}
	}
}
