//go:build linux

package main

import (
	"bytes"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A key file others may read or write is used, with one warning that
// names the file and its mode and says how to fix it; a private one is
// used silently.
func TestReadKeyFileMode(t *testing.T) {
	priv, _, err := run(t, "", "keygen")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		mode  fs.FileMode
		octal string
		want  string // in the warning; "" for none
	}{
		{0o600, "0600", ""},
		{0o400, "0400", ""},
		{0o700, "0700", ""},
		{0o640, "0640", "group readable"},
		{0o604, "0604", "world readable"},
		{0o644, "0644", "group and world readable"},
		{0o620, "0620", "group writable"},
		{0o666, "0666", "group and world readable and writable"},
		{0o601, "0601", "world accessible"},
	}
	for _, tt := range tests {
		t.Run(tt.mode.String(), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "client.key")
			if err := os.WriteFile(path, []byte(priv), 0o600); err != nil {
				t.Fatal(err)
			}
			// Chmod, not WriteFile's mode: the umask would take bits away.
			if err := os.Chmod(path, tt.mode); err != nil {
				t.Fatal(err)
			}
			var logs bytes.Buffer
			k, err := readKeyFileLog(path, slog.New(slog.NewTextHandler(&logs, nil)))
			if err != nil {
				t.Fatal(err)
			}
			if got := k.Base64Secret(); got != strings.TrimSpace(priv) {
				t.Errorf("key %q, want %q", got, strings.TrimSpace(priv))
			}
			out := logs.String()
			if tt.want == "" {
				if out != "" {
					t.Errorf("warned about mode %v: %s", tt.mode, out)
				}
				return
			}
			if n := strings.Count(out, "\n"); n != 1 {
				t.Errorf("%d log lines, want one warning:\n%s", n, out)
			}
			for _, w := range []string{
				"level=WARN", "private key file is " + tt.want + ":", "chmod 600 " + path,
				"file=" + path, "mode=" + tt.octal,
			} {
				if !strings.Contains(out, w) {
					t.Errorf("warning lacks %q:\n%s", w, out)
				}
			}
			if strings.Contains(out, strings.TrimSpace(priv)) {
				t.Errorf("warning shows the key:\n%s", out)
			}
		})
	}
}
