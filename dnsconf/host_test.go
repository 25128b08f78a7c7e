//go:build linux

package dnsconf

import (
	"os"
	"path/filepath"
	"testing"
)

// TestHostsFile: a path is the host's when PID 1's root shows the very
// same file there, not when it shows another file of the same name.
func TestHostsFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "resolv.conf")
	if err := os.WriteFile(p, []byte("nameserver 192.0.2.1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	old := initRoot
	t.Cleanup(func() { initRoot = old })

	initRoot = "/"
	if !hostsFile(p) {
		t.Error("the same file under the same root is not the host's")
	}
	other := t.TempDir()
	if err := os.MkdirAll(filepath.Join(other, dir), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(other, p), []byte("nameserver 192.0.2.1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	initRoot = other
	if hostsFile(p) {
		t.Error("a file with the same name and content under another root taken for the host's")
	}
	initRoot = filepath.Join(dir, "missing")
	if hostsFile(p) {
		t.Error("a root without the file taken for the host's")
	}
	// This test runs in the host's own network namespace (or PID 1's
	// cannot be read): not a namespace of its own.
	if ownNetns() {
		t.Log("this test process runs in a network namespace other than PID 1's")
	}
}
