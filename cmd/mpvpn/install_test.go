//go:build linux

package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/mpvpn/mpvpn/client"
	"github.com/mpvpn/mpvpn/tunnel"
)

// Every test here installs into a tree under t.TempDir() (--root, or an
// installer whose root is the tree) with a host whose euid, systemd and
// systemctl are fakes: none writes the host's /etc or talks to its systemd.

// fakeHost is root on a system without systemd, unless a test says
// otherwise; it records systemctl's calls.
type fakeHost struct {
	euid    int
	systemd bool
	fail    string // a systemctl verb that fails
	calls   [][]string
}

func (f *fakeHost) host() installHost {
	return installHost{
		euid:    func() int { return f.euid },
		systemd: func() bool { return f.systemd },
		systemctl: func(_ context.Context, args ...string) error {
			f.calls = append(f.calls, args)
			if len(args) > 0 && args[0] == f.fail {
				return fmt.Errorf("systemctl %s: exit status 1", strings.Join(args, " "))
			}
			return nil
		},
		executable: os.Executable,
	}
}

// runInstall runs `mpvpn ARGS` with install and uninstall on host h.
func runInstall(t *testing.T, h installHost, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	app := &cli.App{
		Name:           "mpvpn",
		Commands:       []*cli.Command{installCommandOn(h), uninstallCommandOn(h)},
		Writer:         &out,
		ErrWriter:      &out,
		ExitErrHandler: func(*cli.Context, error) {},
	}
	err := app.RunContext(context.Background(), append([]string{"mpvpn"}, args...))
	return out.String(), err
}

// fixture is a set of configurations (and their keys) outside the tree.
type fixture struct {
	dir                    string
	clientConf, serverConf string
	clientKey, serverKey   string
	serverPub              string
	clientPub              string
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{dir: t.TempDir()}
	ck, err := tunnel.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	sk, err := tunnel.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	f.clientPub, f.serverPub = ck.Public().String(), sk.Public().String()
	f.clientKey = f.write(t, "client.key", ck.Base64Secret()+"\n", 0o600)
	f.serverKey = f.write(t, "server.key", sk.Base64Secret()+"\n", 0o600)
	f.clientConf = f.client(t, "client.toml", "")
	f.serverConf = f.server(t, "server.toml", "")
	return f
}

func (f *fixture) write(t *testing.T, name, content string, mode fs.FileMode) string {
	t.Helper()
	p := filepath.Join(f.dir, name)
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
	return p
}

// client writes a client configuration; each "name = value" line of
// extra adds a key or replaces the fixture's.
func (f *fixture) client(t *testing.T, name, extra string) string {
	t.Helper()
	return f.write(t, name, tomlWith(`# a comment
server = "203.0.113.1:7100"
server-key = "`+f.serverPub+`"
key = "`+f.clientKey+`"
uplink = ["wan0", "wan1:backup"]
route = ["198.51.100.0/24", "192.0.2.0/24"]
mtu = 9000
`, extra), 0o600)
}

func (f *fixture) server(t *testing.T, name, extra string) string {
	t.Helper()
	return f.write(t, name, tomlWith(`listen = "0.0.0.0:7100"
key = "`+f.serverKey+`"
peer = ["`+f.clientPub+`"]
`, extra), 0o600)
}

// tomlWith is base with the keys of extra's lines replaced or added.
func tomlWith(base, extra string) string {
	lines := strings.Split(strings.TrimSuffix(base, "\n"), "\n")
	for _, e := range strings.Split(strings.TrimSuffix(extra, "\n"), "\n") {
		k, _, ok := strings.Cut(e, " = ")
		if !ok {
			continue
		}
		i := slices.IndexFunc(lines, func(l string) bool { return strings.HasPrefix(l, k+" = ") })
		if i < 0 {
			lines = append(lines, e)
		} else {
			lines[i] = e
		}
	}
	return strings.Join(lines, "\n") + "\n"
}

// newTree is a system's /etc as install finds it: systemd's directories
// with another service enabled, and a file of the administrator's.
func newTree(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"etc/systemd/system/multi-user.target.wants"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	must(t, os.WriteFile(filepath.Join(root, "etc/hostname"), []byte("host\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(root, "etc/systemd/system/other.service"), []byte("[Service]\nExecStart=/bin/true\n"), 0o644))
	must(t, os.Symlink("/etc/systemd/system/other.service", filepath.Join(root, "etc/systemd/system/multi-user.target.wants/other.service")))
	return root
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// listing is every entry of the tree with its type, mode, and content or
// symlink target: two listings are equal only if the trees are.
func listing(t *testing.T, root string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		fmt.Fprintf(&b, "%s %s", fi.Mode(), rel)
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, " -> %s", target)
		case fi.Mode().IsRegular():
			c, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, " %x", sha256.Sum256(c))
		}
		b.WriteString("\n")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func sameTree(t *testing.T, what, before, after string) {
	t.Helper()
	if before != after {
		t.Fatalf("%s: the tree changed.\nbefore:\n%s\nafter:\n%s", what, before, after)
	}
}

func TestInstallUninstallLeavesTreeAsItWas(t *testing.T) {
	tests := []struct {
		name  string
		roles []string
		// prepare changes the tree (and fixture) before the "before"
		// listing; it returns the configuration to install per role.
		prepare  func(t *testing.T, f *fixture, root string) map[string]string
		wantLeft []string // uninstall names these as left
	}{
		{name: "client", roles: []string{"client"}},
		{name: "server", roles: []string{"server"}},
		{name: "client and server", roles: []string{"client", "server"}},
		{
			name: "/etc/mpvpn holds someone's file", roles: []string{"client"},
			prepare: func(t *testing.T, f *fixture, root string) map[string]string {
				must(t, os.Mkdir(filepath.Join(root, "etc/mpvpn"), 0o700))
				must(t, os.WriteFile(filepath.Join(root, "etc/mpvpn/NOTES"), []byte("mine\n"), 0o600))
				return nil
			},
			wantLeft: []string{"etc/mpvpn: not empty (NOTES)"},
		},
		{
			// README's example: the key already is /etc/mpvpn/client.key.
			name: "key already at the install path", roles: []string{"client"},
			prepare: func(t *testing.T, f *fixture, root string) map[string]string {
				must(t, os.Mkdir(filepath.Join(root, "etc/mpvpn"), 0o700))
				key := filepath.Join(root, "etc/mpvpn/client.key")
				b, err := os.ReadFile(f.clientKey)
				must(t, err)
				must(t, os.WriteFile(key, b, 0o600))
				return map[string]string{"client": f.client(t, "own-key.toml", "key = \""+key+"\"\n")}
			},
			wantLeft: []string{"etc/mpvpn/client.key: not written by mpvpn install", "etc/mpvpn: not empty (client.key)"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f, root, h := newFixture(t), newTree(t), &fakeHost{}
			confs := map[string]string{"client": f.clientConf, "server": f.serverConf}
			if tc.prepare != nil {
				for role, c := range tc.prepare(t, f, root) {
					confs[role] = c
				}
			}
			before := listing(t, root)
			for _, role := range tc.roles {
				if out, err := runInstall(t, h.host(), "install", role, "--config", confs[role], "--root", root, "--bin", "/usr/local/bin/mpvpn"); err != nil {
					t.Fatalf("install %s: %v\n%s", role, err, out)
				}
				if _, err := os.Stat(filepath.Join(root, installedUnit(role))); err != nil {
					t.Fatalf("install %s wrote no unit: %v", role, err)
				}
			}
			if listing(t, root) == before {
				t.Fatal("install changed nothing")
			}
			var outs string
			for _, role := range tc.roles {
				out, err := runInstall(t, h.host(), "uninstall", role, "--root", root)
				if err != nil {
					t.Fatalf("uninstall %s: %v\n%s", role, err, out)
				}
				for _, p := range []string{installedUnit(role), wantsLink(role), installedConfig(role)} {
					if !strings.Contains(out, "removed "+filepath.Join(root, p)+"\n") {
						t.Errorf("uninstall %s does not say it removed %s:\n%s", role, p, out)
					}
				}
				outs += out
			}
			sameTree(t, "install, then uninstall", before, listing(t, root))
			for _, l := range tc.wantLeft {
				if !strings.Contains(outs, "left "+filepath.Join(root, l)) {
					t.Errorf("uninstall does not say %q:\n%s", "left "+l, outs)
				}
			}
			if len(h.calls) > 0 {
				t.Errorf("with --root, systemctl was called: %v", h.calls)
			}
		})
	}
}

func TestInstallModes(t *testing.T) {
	f, root, h := newFixture(t), newTree(t), &fakeHost{}
	// A key the others may read: copied 0600 anyway, and said so; the
	// original is not touched.
	must(t, os.Chmod(f.clientKey, 0o644))
	out, err := runInstall(t, h.host(), "install", "client", "--config", f.clientConf, "--root", root, "--bin", "/usr/local/bin/mpvpn")
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !strings.Contains(out, f.clientKey+" is group and world readable (mode 0644); its copy is 0600") {
		t.Errorf("install does not say the key was readable by others:\n%s", out)
	}
	for p, want := range map[string]fs.FileMode{
		etcDir:                             fs.ModeDir | 0o700,
		installedConfig("client"):          0o600,
		installedKey("client"):             0o600,
		installedUnit("client"):            0o644,
		unitDir:                            fs.ModeDir | 0o755,
		wantsLink("client"):                fs.ModeSymlink | 0o777,
		"etc/hostname":                     0o644, // not install's
		"etc/systemd/system/other.service": 0o644,
	} {
		fi, err := os.Lstat(filepath.Join(root, p))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != want {
			t.Errorf("%s: mode %v, want %v", p, fi.Mode(), want)
		}
	}
	if fi, _ := os.Stat(f.clientKey); fi.Mode().Perm() != 0o644 {
		t.Errorf("the original key's mode changed to %v", fi.Mode())
	}
	if target, _ := os.Readlink(filepath.Join(root, wantsLink("client"))); target != installedUnit("client") {
		t.Errorf("%s -> %q, want %s (as systemctl --root enable makes it)", wantsLink("client"), target, installedUnit("client"))
	}
}

// The installed configuration is read by the daemon's own loader and names
// the key copy, which holds the same key.
func TestInstalledConfigLoads(t *testing.T) {
	f, root, h := newFixture(t), newTree(t), &fakeHost{}
	for _, role := range []string{"client", "server"} {
		conf := map[string]string{"client": f.clientConf, "server": f.serverConf}[role]
		srcKey := map[string]string{"client": f.clientKey, "server": f.serverKey}[role]
		if out, err := runInstall(t, h.host(), "install", role, "--config", conf, "--root", root, "--bin", "/usr/local/bin/mpvpn"); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		cmd := map[string]func() *cli.Command{"client": clientCommand, "server": serverCommand}[role]()
		var keyPath string
		var cfg *client.Config
		cmd.Action = func(c *cli.Context) error {
			if err := loadConfig(c); err != nil {
				return err
			}
			keyPath = c.Path("key")
			// The key's path is the installed system's: read it in the tree.
			if err := c.Set("key", filepath.Join(root, keyPath)); err != nil {
				return err
			}
			if role == "client" {
				var err error
				cfg, err = parseClient(c, slog.New(slog.DiscardHandler))
				return err
			}
			return checkServer(c, slog.New(slog.DiscardHandler))
		}
		app := &cli.App{Commands: []*cli.Command{cmd}, Writer: &bytes.Buffer{}, ErrWriter: &bytes.Buffer{}, ExitErrHandler: func(*cli.Context, error) {}}
		if err := app.Run([]string{"mpvpn", role, "--config", filepath.Join(root, installedConfig(role))}); err != nil {
			t.Fatalf("mpvpn %s --config (installed): %v", role, err)
		}
		if keyPath != installedKey(role) {
			t.Errorf("%s: key = %q, want %s", role, keyPath, installedKey(role))
		}
		orig, _ := os.ReadFile(srcKey)
		copied, _ := os.ReadFile(filepath.Join(root, installedKey(role)))
		if !bytes.Equal(orig, copied) {
			t.Errorf("%s: %s is not a copy of %s", role, installedKey(role), srcKey)
		}
		if role == "client" && (len(cfg.Routes) != 2 || cfg.MTU != 9000 || len(cfg.Uplinks) != 2 || !cfg.Uplinks[1].Backup) {
			t.Errorf("the installed client configuration is not the original's: routes %v, mtu %d, uplinks %v", cfg.Routes, cfg.MTU, cfg.Uplinks)
		}
	}
}
