//go:build linux

package main

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/mpvpn/mpvpn/client"
)

// run runs the app as main would, minus os.Exit.
func run(t *testing.T, stdin string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errOut bytes.Buffer
	app := newApp(strings.NewReader(stdin), &out, &errOut)
	err = app.RunContext(context.Background(), append([]string{"mpvpn"}, args...))
	return out.String(), errOut.String(), err
}

// Every flag of every command says what it does.
func TestHelpDescribesEveryFlag(t *testing.T) {
	app := newApp(nil, &bytes.Buffer{}, &bytes.Buffer{})
	for _, cmd := range app.Commands {
		for _, f := range cmd.Flags {
			df, ok := f.(cli.DocGenerationFlag)
			if !ok || strings.TrimSpace(df.GetUsage()) == "" {
				t.Errorf("mpvpn %s --%s has no usage text", cmd.Name, f.Names()[0])
			}
		}
		out, _, err := run(t, "", cmd.Name, "--help")
		if err != nil {
			t.Fatalf("mpvpn %s --help: %v", cmd.Name, err)
		}
		for _, f := range cmd.Flags {
			if !strings.Contains(out, "--"+f.Names()[0]) {
				t.Errorf("mpvpn %s --help does not mention --%s:\n%s", cmd.Name, f.Names()[0], out)
			}
		}
	}
	out, _, err := run(t, "", "--help")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"keygen", "pubkey", "server", "client"} {
		if !strings.Contains(out, name) {
			t.Errorf("mpvpn --help does not list %s:\n%s", name, out)
		}
	}
}

func TestKeygenPubkey(t *testing.T) {
	priv, _, err := run(t, "", "keygen")
	if err != nil {
		t.Fatal(err)
	}
	pub1, _, err := run(t, priv, "pubkey")
	if err != nil {
		t.Fatal(err)
	}
	pub2, _, err := run(t, priv, "pubkey")
	if err != nil {
		t.Fatal(err)
	}
	if pub1 != pub2 || len(strings.TrimSpace(pub1)) != 44 || pub1 == priv {
		t.Fatalf("pubkey of %q: %q then %q; want the same 44-character key twice", priv, pub1, pub2)
	}
	if _, _, err := run(t, "not a key\n", "pubkey"); err == nil {
		t.Fatal("pubkey accepted garbage")
	}
}

// Mistakes in the configuration are one line, found before the host is
// touched: every case here fails inside parsing, which runs as any user.
func TestConfigErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	priv, _, err := run(t, "", "keygen")
	if err != nil {
		t.Fatal(err)
	}
	pub, _, _ := run(t, priv, "pubkey")
	pub = strings.TrimSpace(pub)
	key := write("good.key", priv, 0o600)
	bad := write("bad.key", "c2hvcnQ=\n", 0o600)
	missing := filepath.Join(dir, "missing.key")
	unknownKey := write("unknown.toml", "server = \"203.0.113.1:7100\"\nuplinks = [\"wan0\"]\n", 0o600)
	badTOML := write("bad.toml", "server = \n", 0o600)

	client := func(extra ...string) []string {
		return append([]string{"client", "--server", "203.0.113.1:7100", "--server-key", pub, "--key", key, "--uplink", "wan0", "--route", "198.51.100.0/24"}, extra...)
	}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no server", []string{"client", "--key", key}, "--server is required"},
		{"bad server", client("--server", "example:port"), "--server"},
		{"bad server key", client("--server-key", "abc"), "--server-key"},
		{"missing key file", client("--key", missing), "no such file"},
		{"malformed key file", client("--key", bad), bad},
		{"bad uplink option", client("--uplink", "wan1:fast"), "IFACE:backup"},
		{"bad route", client("--route", "198.51.100.0/33"), "--route"},
		{"route with host bits", client("--route", "198.51.100.1/24"), "198.51.100.0/24"},
		{"bad mtu", client("--mtu", "100"), "--mtu"},
		{"bad log level", client("--log-level", "loud"), "--log-level"},
		{"unknown config key", []string{"client", "--config", unknownKey}, `unknown key "uplinks"`},
		{"malformed config", []string{"client", "--config", badTOML}, badTOML},
		{"server without peer", []string{"server", "--key", key}, "--peer is required"},
		{"server bad peer", []string{"server", "--key", key, "--peer", "xyz"}, "--peer"},
		{"server missing key", []string{"server", "--key", missing, "--peer", pub}, "no such file"},
		{"server no flows", []string{"server", "--key", key, "--peer", pub, "--max-flows-per-client", "0"}, "--max-flows-per-client"},
		{"bad all-down timeout", client("--all-down-timeout", "0s"), "--all-down-timeout"},
		{"status bad interval", []string{"status", "--interval", "0s"}, "--interval"},
		{"status, nothing running", []string{"status", "--socket", missing}, "no mpvpn running"},
		{"exec without a kind", []string{"exec", "--", "true"}, "one of --tunnel, --direct or --block"},
		{"exec with two kinds", []string{"exec", "--direct", "--block", "--", "true"}, "one of --tunnel, --direct or --block"},
		{"exec without a command", []string{"exec", "--direct"}, "no command given"},
		{"down, bad journal", []string{"down", "--journal", badTOML}, "journal"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := run(t, "", tc.args...)
			if err == nil {
				t.Fatalf("mpvpn %v succeeded", tc.args)
			}
			msg := oneLine(err)
			if strings.Contains(msg, "\n") || !strings.Contains(msg, tc.want) {
				t.Fatalf("error %q, want one line mentioning %q", msg, tc.want)
			}
		})
	}
}

// A --config file supplies flags by their names; the command line wins.
func TestConfigFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "c.toml")
	if err := os.WriteFile(p, []byte("server = \"203.0.113.1:7100\"\nroute = [\"198.51.100.0/24\", \"192.0.2.0/24\"]\nmtu = 9000\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var got *client.Config
	cmd := clientCommand()
	cmd.Action = func(c *cli.Context) error {
		if err := loadConfig(c); err != nil {
			return err
		}
		// Fill what the file leaves out so parseClient can finish.
		for k, v := range map[string]string{"server-key": "W0xvU16wFeSbn9gNC+1qgjLfJcG6KFrljnVkkC+80y8=", "uplink": "wan0"} {
			if err := c.Set(k, v); err != nil {
				return err
			}
		}
		key := filepath.Join(dir, "k")
		priv, _, _ := run(t, "", "keygen")
		os.WriteFile(key, []byte(priv), 0o600)
		if err := c.Set("key", key); err != nil {
			return err
		}
		var err error
		got, err = parseClient(c, slog.New(slog.DiscardHandler))
		return err
	}
	app := &cli.App{Commands: []*cli.Command{cmd}, Writer: &bytes.Buffer{}, ErrWriter: &bytes.Buffer{}}
	if err := app.Run([]string{"mpvpn", "client", "--config", p, "--mtu", "1400"}); err != nil {
		t.Fatal(err)
	}
	if got.Server.String() != "203.0.113.1:7100" {
		t.Errorf("server = %s, want the file's", got.Server)
	}
	if len(got.Routes) != 2 || got.Routes[1].String() != "192.0.2.0/24" {
		t.Errorf("routes = %v, want both of the file's", got.Routes)
	}
	if got.MTU != 1400 {
		t.Errorf("mtu = %d, want the command line's 1400 over the file's 9000", got.MTU)
	}
}
