//go:build linux

package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/mpvpn/mpvpn/internal/netnstest"
	"github.com/mpvpn/mpvpn/internal/unit"
)

// A configuration the daemon would refuse writes nothing: each case is one
// line naming the mistake, and the tree is as it was.
func TestInstallBadConfigWritesNothing(t *testing.T) {
	f := newFixture(t)
	bad := f.write(t, "bad.key", "c2hvcnQ=\n", 0o600)
	tests := []struct {
		name string
		args func() []string
		want string
	}{
		{"unknown key", func() []string {
			return []string{"client", "--config", f.client(t, "c.toml", "uplinks = [\"wan0\"]\n")}
		}, `unknown key "uplinks"`},
		{"malformed TOML", func() []string { return []string{"client", "--config", f.write(t, "c.toml", "server = \n", 0o600)} }, "c.toml"},
		{"missing config", func() []string { return []string{"client", "--config", filepath.Join(f.dir, "nope.toml")} }, "nope.toml"},
		{"missing key file", func() []string {
			return []string{"client", "--config", f.client(t, "c.toml", "key = \""+filepath.Join(f.dir, "nope.key")+"\"\n")}
		}, "no such file"},
		{"malformed key", func() []string { return []string{"client", "--config", f.client(t, "c.toml", "key = \""+bad+"\"\n")} }, bad},
		{"no key", func() []string {
			return []string{"client", "--config", f.write(t, "c.toml", "server = \"203.0.113.1:7100\"\nserver-key = \""+f.serverPub+"\"\nroute = [\"198.51.100.0/24\"]\n", 0o600)}
		}, "--key is required"},
		{"no route (the service gets nothing but the file)", func() []string {
			return []string{"client", "--config", f.write(t, "c.toml", "server = \"203.0.113.1:7100\"\nserver-key = \""+f.serverPub+"\"\nkey = \""+f.clientKey+"\"\n", 0o600)}
		}, "--route, --route-all or a --rule ...=tunnel is required"},
		{"bad route", func() []string {
			return []string{"client", "--config", f.client(t, "c.toml", "route = [\"198.51.100.1/24\"]\n")}
		}, "198.51.100.0/24"},
		{"status socket outside /run/mpvpn", func() []string {
			return []string{"client", "--config", f.client(t, "c.toml", "control = \"/tmp/c.sock\"\n")}
		}, `control = "/tmp/c.sock"`},
		{"journal outside the service's directories", func() []string {
			return []string{"client", "--config", f.client(t, "c.toml", "journal = \"/etc/mpvpn/j\"\n")}
		}, `journal = "/etc/mpvpn/j"`},
		{"server without peer", func() []string {
			return []string{"server", "--config", f.write(t, "s.toml", "key = \""+f.serverKey+"\"\n", 0o600)}
		}, "--peer is required"},
		{"server bad peer", func() []string { return []string{"server", "--config", f.server(t, "s.toml", "peer = [\"xyz\"]\n")} }, "--peer"},
		{"server key missing", func() []string {
			return []string{"server", "--config", f.server(t, "s.toml", "key = \""+filepath.Join(f.dir, "nope.key")+"\"\n")}
		}, "no such file"},
		{"server listen without port", func() []string {
			return []string{"server", "--config", f.server(t, "s.toml", "listen = \"0.0.0.0\"\n")}
		}, "--listen"},
		{"no --config", func() []string { return []string{"client"} }, "--config is required"},
		{"relative --bin", func() []string { return []string{"client", "--config", f.clientConf, "--bin", "mpvpn"} }, "--bin mpvpn: want an absolute path"},
		{"--bin with a space", func() []string { return []string{"client", "--config", f.clientConf, "--bin", "/opt/my bin/mpvpn"} }, "/opt/my bin/mpvpn"},
		{"--bin in a home directory", func() []string { return []string{"client", "--config", f.clientConf, "--bin", "/home/me/go/bin/mpvpn"} }, "ProtectHome"},
		{"--bin in /tmp", func() []string { return []string{"client", "--config", f.clientConf, "--bin", "/tmp/mpvpn"} }, "PrivateTmp"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			root := newTree(t)
			before := listing(t, root)
			args := append([]string{"install"}, tc.args()...)
			if !slices.Contains(args, "--bin") {
				args = append(args, "--bin", "/usr/local/bin/mpvpn")
			}
			out, err := runInstall(t, (&fakeHost{}).host(), append(args, "--root", root)...)
			if err == nil {
				t.Fatalf("mpvpn %v succeeded:\n%s", args, out)
			}
			if msg := oneLine(err); !strings.Contains(msg, tc.want) {
				t.Errorf("error %q, want it to mention %q", msg, tc.want)
			}
			sameTree(t, "a refused install", before, listing(t, root))
		})
	}
}

// Without --root, install and uninstall need root, and say so in one line
// before they look at anything else.
func TestInstallNotRoot(t *testing.T) {
	f := newFixture(t)
	h := &fakeHost{euid: 1000, systemd: true}
	_, statErr := os.Lstat(etcDir) // the host's, looked at and never written
	for _, args := range [][]string{
		{"install", "client", "--config", f.clientConf, "--bin", "/usr/local/bin/mpvpn"},
		{"install", "server", "--config", f.serverConf},
		{"uninstall", "client"},
		{"uninstall", "server"},
	} {
		out, err := runInstall(t, h.host(), args...)
		if err == nil {
			t.Fatalf("mpvpn %v as uid 1000 succeeded:\n%s", args, out)
		}
		msg := oneLine(err)
		if strings.Contains(err.Error(), "\n") || !strings.Contains(msg, "run it as root") || !strings.Contains(msg, "--root DIR") {
			t.Errorf("mpvpn %v as uid 1000: %q; want one line saying to run it as root or with --root", args, msg)
		}
		if out != "" {
			t.Errorf("mpvpn %v as uid 1000 printed %q before refusing", args, out)
		}
	}
	if _, err := os.Lstat(etcDir); (err == nil) != (statErr == nil) {
		t.Errorf("%s appeared or went during the test", etcDir)
	}
	if len(h.calls) > 0 {
		t.Errorf("systemctl called: %v", h.calls)
	}
	// A tree of one's own needs no root.
	root := newTree(t)
	if out, err := runInstall(t, h.host(), "install", "client", "--config", f.clientConf, "--root", root, "--bin", "/usr/local/bin/mpvpn"); err != nil {
		t.Fatalf("install --root as uid 1000: %v\n%s", err, out)
	}
}

// Installing the same thing again changes nothing (and says so); a changed
// configuration replaces the installed one and nothing else.
func TestInstallReinstallIsIdempotent(t *testing.T) {
	f, root, h := newFixture(t), newTree(t), &fakeHost{}
	install := func(conf string) string {
		t.Helper()
		out, err := runInstall(t, h.host(), "install", "client", "--config", conf, "--root", root, "--bin", "/usr/local/bin/mpvpn")
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		return out
	}
	install(f.clientConf)
	first := listing(t, root)
	out := install(f.clientConf)
	sameTree(t, "a second install", first, listing(t, root))
	if n := strings.Count(out, "unchanged "); n != 4 || strings.Contains(out, "wrote ") {
		t.Errorf("a second install: want 4 files unchanged and none written:\n%s", out)
	}
	// The same configuration with another TUN name: only it changes.
	out = install(f.client(t, "client.toml", "tun = \"vpn1\"\n"))
	if !strings.Contains(out, "wrote "+filepath.Join(root, installedConfig("client"))) || strings.Count(out, "unchanged ") != 3 {
		t.Errorf("a changed configuration: want it rewritten, the 3 other files unchanged:\n%s", out)
	}
	conf, _ := os.ReadFile(filepath.Join(root, installedConfig("client")))
	if !strings.Contains(string(conf), `tun = "vpn1"`) {
		t.Errorf("the installed configuration lacks the change:\n%s", conf)
	}
	// A configuration that names the installed copy of the key (as one
	// edited in /etc/mpvpn and installed again does): the copy stays
	// install's, and uninstall still removes it.
	out = install(f.client(t, "again.toml", "key = \""+filepath.Join(root, installedKey("client"))+"\"\n"))
	if out, err := runInstall(t, h.host(), "uninstall", "client", "--root", root); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(root, installedKey("client"))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after a reinstall naming the key copy, uninstall left it (%v):\n%s", err, out)
	}
}

// Files at the install paths that install did not write are replaced only
// with --force, and uninstall leaves them.
func TestInstallForeignFilesNeedForce(t *testing.T) {
	tests := []struct {
		name  string
		path  string
		put   func(t *testing.T, p string)
		owned bool // uninstall leaves it when it was there before install
	}{
		{"unit", installedUnit("client"), func(t *testing.T, p string) {
			must(t, os.WriteFile(p, []byte("[Service]\nExecStart=/usr/bin/mpvpn client\n"), 0o644))
		}, true},
		{"masked unit", installedUnit("client"), func(t *testing.T, p string) { must(t, os.Symlink("/dev/null", p)) }, true},
		{"configuration", installedConfig("client"), func(t *testing.T, p string) {
			must(t, os.MkdirAll(filepath.Dir(p), 0o700))
			must(t, os.WriteFile(p, []byte("server = \"192.0.2.1:7100\"\n"), 0o600))
		}, true},
		{"another key", installedKey("client"), func(t *testing.T, p string) {
			must(t, os.MkdirAll(filepath.Dir(p), 0o700))
			must(t, os.WriteFile(p, []byte("someone else's\n"), 0o600))
		}, true},
		{"enablement", wantsLink("client"), func(t *testing.T, p string) { must(t, os.Symlink("/lib/systemd/system/x.service", p)) }, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f, root, h := newFixture(t), newTree(t), &fakeHost{}
			p := filepath.Join(root, tc.path)
			tc.put(t, p)
			before := listing(t, root)
			args := []string{"install", "client", "--config", f.clientConf, "--root", root, "--bin", "/usr/local/bin/mpvpn"}
			_, err := runInstall(t, h.host(), args...)
			if err == nil || !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "--force") {
				t.Fatalf("install over a foreign %s: %v; want an error naming %s and --force", tc.name, err, p)
			}
			sameTree(t, "install without --force", before, listing(t, root))

			// Uninstall leaves it, and says so.
			out, err := runInstall(t, h.host(), "uninstall", "client", "--root", root)
			if err != nil || !strings.Contains(out, "left "+p+": not written by mpvpn install") {
				t.Errorf("uninstall with a foreign %s: %v, %q; want it left and named", tc.name, err, out)
			}
			sameTree(t, "uninstall of foreign files", before, listing(t, root))

			out, err = runInstall(t, h.host(), append(args, "--force")...)
			if err != nil || !strings.Contains(out, "replaced (--force) "+p) {
				t.Fatalf("install --force: %v; want it to say it replaced %s:\n%s", err, p, out)
			}
			// Now it is install's, and uninstall removes it.
			if out, err := runInstall(t, h.host(), "uninstall", "client", "--root", root); err != nil || !strings.Contains(out, "removed "+p) {
				t.Errorf("uninstall after --force: %v; want %s removed:\n%s", err, p, out)
			}
		})
	}
}

// A write that fails half-way puts back what was there.
func TestInstallFailureRollsBack(t *testing.T) {
	f, root, h := newFixture(t), newTree(t), &fakeHost{}
	// The last write (the enablement) cannot be made: its directory is a file.
	wants := filepath.Join(root, wantsDir)
	must(t, os.RemoveAll(wants))
	must(t, os.WriteFile(wants, []byte("not a directory\n"), 0o644))
	before := listing(t, root)
	out, err := runInstall(t, h.host(), "install", "client", "--config", f.clientConf, "--root", root, "--bin", "/usr/local/bin/mpvpn")
	if err == nil || !strings.Contains(err.Error(), "nothing changed") {
		t.Fatalf("install with an unwritable %s: %v; want a failure that changed nothing:\n%s", wantsDir, err, out)
	}
	sameTree(t, "a failed install", before, listing(t, root))
}

// Where systemd runs, install reloads it and (re)starts the unit, and
// uninstall stops and disables it first. (The tree stands in for /.)
func TestInstallTellsRunningSystemd(t *testing.T) {
	f, root, h := newFixture(t), newTree(t), &fakeHost{systemd: true}
	var out strings.Builder
	in := &installer{root: root, live: true, out: &out, host: h.host()}
	bin, _ := os.Executable()
	ctx := context.Background()
	must(t, in.install(ctx, "client", f.clientConf, bin))
	must(t, in.install(ctx, "client", f.clientConf, bin)) // nothing changed: start, not restart
	must(t, in.uninstall(ctx, "client"))
	want := [][]string{
		{"daemon-reload"}, {"restart", "mpvpn-client.service"},
		{"start", "mpvpn-client.service"},
		{"disable", "--now", "mpvpn-client.service"}, {"daemon-reload"},
	}
	if !slices.EqualFunc(h.calls, want, slices.Equal[[]string]) {
		t.Errorf("systemctl calls %v, want %v", h.calls, want)
	}

	// A service that fails to start: the files stay, the error says where
	// to look.
	h.fail = "restart"
	err := in.install(ctx, "client", f.clientConf, bin)
	if err == nil || !strings.Contains(err.Error(), "journalctl -u mpvpn-client.service") {
		t.Errorf("a failed restart: %v; want an error pointing at the journal", err)
	}
	if _, err := os.Stat(filepath.Join(root, installedUnit("client"))); err != nil {
		t.Errorf("a failed restart removed the unit: %v", err)
	}
}

// The units install writes are valid to systemd (systemd-analyze verify:
// directives, the ExecStart binary, the dependencies), and their exposure
// (systemd-analyze security) stays where it was when they were written.
func TestUnitVerify(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		netnstest.CannotRun(t, "systemd-analyze is not installed (apt-get install systemd): %v", err)
	}
	// verify checks that ExecStart's binary exists and is executable, no
	// more; the test binary itself is in a temporary directory, which
	// install refuses (the sandbox's PrivateTmp would hide it).
	bin, err := exec.LookPath("true")
	if err != nil {
		t.Fatal(err)
	}
	if bin, err = filepath.Abs(bin); err != nil {
		t.Fatal(err)
	}
	f := newFixture(t)
	tests := []struct {
		name, role, conf string
		caps             string
		maxExposure      string // systemd-analyze security --threshold, in tenths
	}{
		{"client", "client", f.clientConf, "CAP_NET_ADMIN CAP_SYS_ADMIN", "35"},
		{"server", "server", f.serverConf, "CAP_NET_ADMIN CAP_SYS_ADMIN CAP_NET_RAW", "30"},
		{"server on port 443", "server", f.server(t, "s443.toml", "listen = \"0.0.0.0:443\"\n"), "CAP_NET_ADMIN CAP_SYS_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE", "30"},
		{"client with metrics on port 80", "client", f.client(t, "c80.toml", "metrics = \"127.0.0.1:80\"\n"), "CAP_NET_ADMIN CAP_SYS_ADMIN CAP_NET_BIND_SERVICE", "35"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			root := newTree(t)
			if out, err := runInstall(t, (&fakeHost{}).host(), "install", tc.role, "--config", tc.conf, "--root", root, "--bin", bin); err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			path := filepath.Join(root, installedUnit(tc.role))
			text, _ := os.ReadFile(path)
			if !strings.Contains(string(text), "\nCapabilityBoundingSet="+tc.caps+"\n") {
				t.Errorf("want CapabilityBoundingSet=%s in:\n%s", tc.caps, text)
			}
			// verify prints what it finds wrong (an unknown directive, a
			// missing binary) on stderr, and exits 0 for some of it.
			out, err := exec.Command("systemd-analyze", "verify", "--man=no", path).CombinedOutput()
			var bad []string
			for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
				if strings.Contains(l, unit.Name(tc.role)) {
					bad = append(bad, l)
				} else if l != "" {
					t.Logf("systemd-analyze verify (not about this unit): %s", l)
				}
			}
			if err != nil || len(bad) > 0 {
				t.Errorf("systemd-analyze verify %s: %v\n%s\n%s", path, err, strings.Join(bad, "\n"), text)
			}
			out, err = exec.Command("systemd-analyze", "security", "--offline=true", "--threshold="+tc.maxExposure, path).CombinedOutput()
			if err != nil {
				lines := strings.Split(strings.TrimSpace(string(out)), "\n")
				t.Errorf("systemd-analyze security: %v, exposure above %s/10: %s", err, tc.maxExposure, lines[len(lines)-1])
			}
		})
	}
}
