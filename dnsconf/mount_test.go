//go:build linux

package dnsconf

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mpvpn/mpvpn/internal/netnstest"
	"golang.org/x/sys/unix"
)

// bindMountEnv set to 1 makes TestBindMount run its body: the test binary
// re-executes itself under unshare(1) in a private mount namespace, where
// the body's bind mount is nobody else's business and goes with it.
const bindMountEnv = "DNSCONF_TEST_BINDMOUNT_CHILD"

// Under `ip netns exec NAME`, /etc/resolv.conf is a bind mount of
// /etc/netns/NAME/resolv.conf, and rename(2) over it fails with EBUSY.
// Apply and Undo must write it in place, whether the mount is seen first
// (mount IDs) or only when the rename fails.
func TestBindMount(t *testing.T) {
	if os.Getenv(bindMountEnv) == "1" {
		bindMountBody(t)
		return
	}
	if os.Geteuid() != 0 {
		netnstest.CannotRun(t, "needs root for a mount namespace and a bind mount")
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		netnstest.CannotRun(t, "no unshare(1): %v", err)
	}
	cmd := exec.Command(unshare, "--mount", "--propagation", "private",
		os.Args[0], "-test.run=^TestBindMount$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), bindMountEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil && !bytes.Contains(out, []byte("=== RUN")) {
		netnstest.CannotRun(t, "unshare --mount: %v\n%s", err, out)
	}
	if err != nil {
		t.Fatalf("in the mount namespace: %v\n%s", err, out)
	}
	if !bytes.Contains(out, []byte("--- PASS: TestBindMount")) {
		t.Fatalf("the child did not pass:\n%s", out)
	}
	t.Logf("child:\n%s", out)
}

func bindMountBody(t *testing.T) {
	for _, tc := range []struct {
		name        string
		detectMount bool // false: only the rename's EBUSY tells
	}{
		{"mount seen", true},
		{"rename busy", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			etc, nsdir := filepath.Join(dir, "etc"), filepath.Join(dir, "netns", "ns1")
			for _, d := range []string{etc, nsdir} {
				if err := os.MkdirAll(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			path := filepath.Join(etc, "resolv.conf")  // the host's, covered by the mount
			src := filepath.Join(nsdir, "resolv.conf") // the namespace's
			const host, ns = "nameserver 192.0.2.1\n", "# the namespace's own\nnameserver 198.51.100.53\n"
			writeFile(t, path, host, 0o644)
			writeFile(t, src, ns, 0o640)
			if err := unix.Mount(src, path, "", unix.MS_BIND, ""); err != nil {
				t.Fatalf("bind mount: %v", err)
			}
			mounted := true
			unmount := func() {
				if mounted {
					if err := unix.Unmount(path, unix.MNT_DETACH); err != nil {
						t.Errorf("unmount: %v", err)
					}
					mounted = false
				}
			}
			t.Cleanup(unmount) // before TempDir's removal, which a mount point would stop

			// The set-up is the one that breaks a plain rename.
			tmp := filepath.Join(etc, "tmp")
			writeFile(t, tmp, "x", 0o644)
			if err := os.Rename(tmp, path); !errors.Is(err, unix.EBUSY) {
				t.Fatalf("rename over the bind mount: %v; want EBUSY", err)
			}
			os.Remove(tmp)
			if !isMountPoint(path) {
				t.Fatal("isMountPoint: false for a bind mount")
			}
			if isMountPoint(src) {
				t.Fatal("isMountPoint: true for a plain file")
			}

			log := testLogger(t)
			st, err := Prepare(Config{Mode: File, Path: path, Servers: servers, Logger: log})
			if err != nil {
				t.Fatal(err)
			}
			if string(st.Before) != ns {
				t.Fatalf("Before = %q; want the namespace's file", st.Before)
			}
			st = roundTrip(t, st)
			before := observe(t, path)

			if tc.detectMount {
				err = Apply(st, log)
			} else {
				var how string
				how, err = put(path, st.Wrote, 0o644, -1, -1, false)
				if !strings.Contains(how, "busy") {
					t.Errorf("put: %q; want it to go in place after EBUSY", how)
				}
			}
			if err != nil {
				t.Fatal(err)
			}
			// In place: the namespace's file itself holds mpvpn's, with
			// its own mode, and the mount is still there.
			for _, p := range []string{path, src} {
				if b, err := os.ReadFile(p); err != nil || !bytes.Equal(b, st.Wrote) {
					t.Fatalf("after Apply, %s = %q, %v; want mpvpn's", p, b, err)
				}
			}
			if !isMountPoint(path) {
				t.Fatal("the bind mount went")
			}
			assertNoTemp(t, etc)

			msg, err := Undo(st, log)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(msg, "restored") {
				t.Errorf("Undo: %q", msg)
			}
			if got := observe(t, path); got != before {
				t.Fatalf("after Undo: %s\nwant %s", got, before)
			}
			if got := observe(t, src); !strings.Contains(got, "file 0640") {
				t.Fatalf("the namespace's file: %s", got)
			}
			assertNoTemp(t, etc)

			unmount()
			if b, err := os.ReadFile(path); err != nil || string(b) != host {
				t.Fatalf("the file under the mount: %q, %v; want it untouched", b, err)
			}
		})
	}
}
