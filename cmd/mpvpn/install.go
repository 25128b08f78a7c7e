//go:build linux

package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/mpvpn/mpvpn/internal/unit"
)

// Where install puts things, as seen from the system that runs them (under
// --root DIR they are written below DIR).
const (
	etcDir   = "/etc/mpvpn"
	unitDir  = "/etc/systemd/system"
	wantsDir = unitDir + "/multi-user.target.wants" // the unit's WantedBy=
)

func installedConfig(role string) string { return etcDir + "/" + role + ".toml" }
func installedKey(role string) string    { return etcDir + "/" + role + ".key" }
func installedUnit(role string) string   { return unitDir + "/" + unit.Name(role) }
func wantsLink(role string) string       { return wantsDir + "/" + unit.Name(role) }

// installHost is what install and uninstall need of the machine they run
// on; tests replace it.
type installHost struct {
	euid func() int
	// systemd reports whether systemd manages this system, as
	// sd_booted(3) tells: /run/systemd/system exists.
	systemd    func() bool
	systemctl  func(ctx context.Context, args ...string) error
	executable func() (string, error)
}

var thisHost = installHost{
	euid: os.Geteuid,
	systemd: func() bool {
		fi, err := os.Lstat("/run/systemd/system")
		return err == nil && fi.IsDir()
	},
	systemctl:  runSystemctl,
	executable: os.Executable,
}

// runSystemctl runs systemctl, systemd's documented command-line interface
// for reloading and enabling units. Its D-Bus API would do the same for a
// client library and more code; three calls do not need it.
func runSystemctl(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "systemctl", args...).CombinedOutput()
	if err != nil {
		if msg := strings.TrimSpace(string(out)); msg != "" {
			return fmt.Errorf("systemctl %s: %w: %s", strings.Join(args, " "), err, msg)
		}
		return fmt.Errorf("systemctl %s: %w", strings.Join(args, " "), err)
	}
	return nil
}

var roles = []string{"client", "server"}

func installCommand() *cli.Command   { return installCommandOn(thisHost) }
func uninstallCommand() *cli.Command { return uninstallCommandOn(thisHost) }

func rootFlag() cli.Flag {
	return &cli.PathFlag{Name: "root", Usage: "work on the directory tree `DIR` instead of this system, as systemctl --root does: nothing running is touched"}
}

func installCommandOn(h installHost) *cli.Command {
	cmd := &cli.Command{
		Name:  "install",
		Usage: "run mpvpn client or server as a hardened systemd service (writes /etc/mpvpn and the unit)",
		Description: "  mpvpn install client --config client.toml\n\n" +
			"Checks the configuration as `mpvpn client --config` would, copies it to /etc/mpvpn/client.toml\n" +
			"and its key to /etc/mpvpn/client.key (both 0600), writes /etc/systemd/system/mpvpn-client.service\n" +
			"and enables it; where systemd runs, it is (re)started. Nothing is written if the configuration\n" +
			"is wrong, and files that mpvpn install did not write are not replaced without --force.",
		Action: func(c *cli.Context) error {
			return usageError("say what to install: mpvpn install client|server --config FILE")
		},
	}
	for _, role := range roles {
		cmd.Subcommands = append(cmd.Subcommands, &cli.Command{
			Name:  role,
			Usage: "install mpvpn-" + role + ".service, running `mpvpn " + role + " --config " + installedConfig(role) + "`",
			Flags: []cli.Flag{
				&cli.PathFlag{Name: "config", Usage: "the configuration `FILE` to install: TOML with the flags of mpvpn " + role + ", as its --config reads"},
				rootFlag(),
				&cli.PathFlag{Name: "bin", Usage: "the mpvpn binary the unit runs, an absolute `PATH` (default: this mpvpn's own path; under --root, the path in that tree's system, not checked)"},
				&cli.BoolFlag{Name: "force", Usage: "replace a unit, configuration or key at the install paths that mpvpn install did not write"},
			},
			Action: func(c *cli.Context) error {
				if c.Path("config") == "" {
					return usageError("--config is required: the mpvpn %s configuration to install", role)
				}
				in, err := newInstaller(c, h, "install "+role)
				if err != nil {
					return err
				}
				in.force = c.Bool("force")
				bin, err := in.binary(c.Path("bin"))
				if err != nil {
					return err
				}
				return in.install(c.Context, role, c.Path("config"), bin)
			},
		})
	}
	return cmd
}

func uninstallCommandOn(h installHost) *cli.Command {
	cmd := &cli.Command{
		Name:  "uninstall",
		Usage: "stop, disable and remove what `mpvpn install` wrote",
		Description: "  mpvpn uninstall client\n\n" +
			"Where systemd runs, stops and disables the service; removes the unit, its enablement, the\n" +
			"configuration and the key copy that mpvpn install wrote, and /etc/mpvpn if that leaves it\n" +
			"empty. Files it did not write are left, and named.",
		Action: func(c *cli.Context) error {
			return usageError("say what to uninstall: mpvpn uninstall client|server")
		},
	}
	for _, role := range roles {
		cmd.Subcommands = append(cmd.Subcommands, &cli.Command{
			Name:  role,
			Usage: "remove mpvpn-" + role + ".service and its files",
			Flags: []cli.Flag{rootFlag()},
			Action: func(c *cli.Context) error {
				in, err := newInstaller(c, h, "uninstall "+role)
				if err != nil {
					return err
				}
				return in.uninstall(c.Context, role)
			},
		})
	}
	return cmd
}

// installer does install and uninstall for one tree.
type installer struct {
	root  string // the tree: "/" for this system
	tree  bool   // --root: a tree, never the running system
	live  bool   // systemd runs the system being changed: tell it
	force bool
	out   io.Writer
	host  installHost
}

func newInstaller(c *cli.Context, h installHost, what string) (*installer, error) {
	in := &installer{root: "/", out: c.App.Writer, host: h}
	if dir := c.Path("root"); dir != "" {
		abs, err := filepath.Abs(dir)
		if err != nil {
			return nil, fmt.Errorf("--root %s: %w", dir, err)
		}
		if fi, err := os.Stat(abs); err != nil {
			return nil, fmt.Errorf("--root: %w", err)
		} else if !fi.IsDir() {
			return nil, fmt.Errorf("--root %s: not a directory", dir)
		}
		// Like systemctl --root: only the tree, never the running
		// system, even when DIR is /.
		in.root, in.tree = abs, true
		return in, nil
	}
	if h.euid() != 0 {
		return nil, fmt.Errorf("%s changes %s and %s: run it as root (sudo), or give --root DIR to work on a directory tree", what, etcDir, unitDir)
	}
	in.live = h.systemd()
	return in, nil
}

// where says which tree, in messages.
func (in *installer) where() string {
	if !in.tree {
		return ""
	}
	return " in " + in.root
}

// at is where a path of the installed system is in the tree.
func (in *installer) at(p string) string { return filepath.Join(in.root, p) }

func (in *installer) say(format string, args ...any) {
	fmt.Fprintf(in.out, format+"\n", args...)
}

// hiddenDirs are what the unit's sandbox hides from the service
// (ProtectHome=yes, PrivateTmp=yes): a binary there would not start.
var hiddenDirs = []string{"/home", "/root", "/run/user", "/tmp", "/var/tmp"}

// binary is the mpvpn the unit runs: --bin, or the one running now.
func (in *installer) binary(flag string) (string, error) {
	bin, what := flag, "--bin "+flag
	if bin == "" {
		exe, err := in.host.executable()
		if err != nil {
			return "", fmt.Errorf("cannot tell where this mpvpn is (%w): give --bin PATH", err)
		}
		// A binary from `go run` or a build directory vanishes; a unit
		// pointing at it would fail at the next boot.
		if tmp := filepath.Clean(os.TempDir()) + "/"; strings.HasPrefix(exe, tmp) {
			return "", fmt.Errorf("this mpvpn is %s, a temporary file: copy it where it stays (e.g. /usr/local/bin/mpvpn) and give --bin", exe)
		}
		bin, what = exe, "this mpvpn, "+exe+","
	}
	if !filepath.IsAbs(bin) {
		return "", usageError("%s: want an absolute path", what)
	}
	paths := []string{bin}
	if !in.tree {
		fi, err := os.Stat(bin)
		if err != nil {
			return "", fmt.Errorf("--bin: %w", err)
		}
		if !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
			return "", fmt.Errorf("%s: not an executable file", what)
		}
		if real, err := filepath.EvalSymlinks(bin); err == nil {
			paths = append(paths, real)
		}
	} // else: the path in the tree's system, which may not hold it yet
	for _, p := range paths {
		for _, d := range hiddenDirs {
			if p == d || below(p, d) {
				return "", fmt.Errorf("%s is in %s, which the service's sandbox hides (ProtectHome=, PrivateTmp=): copy it to /usr/local/bin/mpvpn and give --bin /usr/local/bin/mpvpn", what, d)
			}
		}
	}
	return bin, nil
}

// systemctl tells the running systemd, when there is one to tell.
func (in *installer) systemctl(ctx context.Context, args ...string) error {
	if !in.live {
		return nil
	}
	if err := in.host.systemctl(ctx, args...); err != nil {
		return err
	}
	in.say("systemctl %s", strings.Join(args, " "))
	return nil
}
