//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/BurntSushi/toml"
	"github.com/urfave/cli/v2"

	"github.com/mpvpn/mpvpn/internal/unit"
	"github.com/mpvpn/mpvpn/tunnel"
)

// daemonConfig is a configuration file as `mpvpn client|server --config`
// reads it, with what install needs to know of it.
type daemonConfig struct {
	raw     map[string]any // the file's keys and values, to write out again
	key     string         // absolute path of the private key file it names
	writes  [][2]string    // flag and file of what it makes: the status socket, the client's journal
	listens []string       // addresses it binds: the server's --listen, --metrics
}

// readDaemonConfig reads a configuration with the daemon's own loader
// (loadConfig on the daemon's own flags, so an unknown key is an error)
// and checks it as the daemon does before it changes the host: parseClient
// for the client, which reads the key; the key and peers for the server.
// The service is given nothing but --config, so what the file leaves out
// (--key, --route, --peer) is an error here too.
func readDaemonConfig(ctx context.Context, role, path string) (*daemonConfig, error) {
	cmd := clientCommand()
	if role == "server" {
		cmd = serverCommand()
	}
	var dc daemonConfig
	quiet := slog.New(slog.DiscardHandler) // install says itself what is wrong with the key's mode
	cmd.Action = func(c *cli.Context) error {
		if err := loadConfig(c); err != nil {
			return err
		}
		var err error
		if role == "client" {
			_, err = parseClient(c, quiet)
		} else {
			err = checkServer(c, quiet)
		}
		if err != nil {
			return fmt.Errorf("--config %s: %w", path, err)
		}
		if dc.key, err = filepath.Abs(c.Path("key")); err != nil {
			return fmt.Errorf("--config %s: key: %w", path, err)
		}
		dc.writes = append(dc.writes, [2]string{"control", c.Path("control")})
		if role == "client" {
			dc.writes = append(dc.writes, [2]string{"journal", c.Path("journal")})
		}
		if m := c.String("metrics"); m != "" {
			dc.listens = append(dc.listens, m)
		}
		if role == "server" {
			dc.listens = append(dc.listens, c.String("listen"))
		}
		return nil
	}
	app := &cli.App{
		Name:           "mpvpn",
		Commands:       []*cli.Command{cmd},
		Writer:         io.Discard,
		ErrWriter:      io.Discard,
		ExitErrHandler: func(*cli.Context, error) {},
	}
	if err := app.RunContext(ctx, []string{"mpvpn", role, "--config", path}); err != nil {
		return nil, err
	}
	// The unit's sandbox (ProtectSystem=strict) leaves only its runtime
	// and state directories writable.
	for _, w := range dc.writes {
		if flag, file := w[0], w[1]; !below(file, "/run/mpvpn") && !below(file, "/var/lib/mpvpn") {
			return nil, fmt.Errorf("--config %s: %s = %q: the service can write only below /run/mpvpn and /var/lib/mpvpn (ProtectSystem=strict); leave it out or put it there", path, flag, file)
		}
	}
	if _, err := toml.DecodeFile(path, &dc.raw); err != nil {
		return nil, fmt.Errorf("--config %s: %w", path, err)
	}
	return &dc, nil
}

// below reports whether path is inside dir (and not dir itself).
func below(path, dir string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && filepath.IsAbs(path) && rel != "." && !strings.HasPrefix(rel, "../") && rel != ".."
}

// checkServer is what runServer checks of its flags that install can
// check without binding anything: the key file and the peers.
func checkServer(c *cli.Context, log *slog.Logger) error {
	if _, err := readKeyFileLog(c.Path("key"), log); err != nil {
		return err
	}
	peers, err := parsePublicKeys("peer", c.StringSlice("peer"))
	if err != nil {
		return err
	}
	if len(peers) == 0 {
		return usageError("--peer is required: the public key of each client allowed to connect")
	}
	if _, _, err := net.SplitHostPort(c.String("listen")); err != nil {
		return usageError("--listen %q: want ADDR:PORT", c.String("listen"))
	}
	return nil
}

// bindsLowPort reports whether any of the addresses has a port below 1024,
// which only CAP_NET_BIND_SERVICE may bind.
func bindsLowPort(addrs []string) (bool, error) {
	for _, a := range addrs {
		_, port, err := net.SplitHostPort(a)
		if err != nil {
			return false, usageError("%q: want ADDR:PORT", a)
		}
		n, err := net.LookupPort("tcp", port)
		if err != nil {
			return false, fmt.Errorf("%q: %w", a, err)
		}
		if n > 0 && n < 1024 {
			return true, nil
		}
	}
	return false, nil
}

// keyFile is a private key file read for copying.
type keyFile struct {
	data []byte
	mode fs.FileMode
	info fs.FileInfo
}

func readKeyFile(path string) (*keyFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("key: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("key %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("key %s: not a regular file", path)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxKeyFile))
	if err != nil {
		return nil, fmt.Errorf("key %s: %w", path, err)
	}
	if _, err := tunnel.ParsePrivateKey(strings.TrimSpace(string(b))); err != nil {
		return nil, fmt.Errorf("key %s: %w", path, err)
	}
	return &keyFile{data: b, mode: fi.Mode().Perm(), info: fi}, nil
}

// keyCopyNote, in the header of an installed configuration, records that
// install copied the key next to it, so that uninstall removes the copy
// and nothing else: a key the configuration named at that path already is
// the administrator's, and stays.
const keyCopyNote = "# The key is a copy `mpvpn install` made"

// renderConfig is the installed configuration: the same keys and values,
// with the key's path pointing at its installed place, under a header that
// says where it came from; keyLine is the header's keyCopyNote line, if
// install copied the key.
func renderConfig(role, source string, raw map[string]any, keyLine string) ([]byte, error) {
	vals := make(map[string]any, len(raw))
	for k, v := range raw {
		vals[k] = v
	}
	vals["key"] = installedKey(role)
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s %s` from %s (its comments are not kept).\n", unit.Marker, role, source)
	fmt.Fprintf(&b, "# %s runs `mpvpn %s --config %s`: change this file, then\n", unit.Name(role), role, installedConfig(role))
	fmt.Fprintf(&b, "# `systemctl restart %s`. `mpvpn uninstall %s` removes it.\n", unit.Name(role), role)
	if keyLine != "" {
		b.WriteString(keyLine + "\n")
	}
	b.WriteString("\n")
	if err := toml.NewEncoder(&b).Encode(vals); err != nil {
		return nil, fmt.Errorf("write the configuration: %w", err)
	}
	return b.Bytes(), nil
}

func keyCopyLine(role, source string) string {
	return fmt.Sprintf("%s of %s; `mpvpn uninstall %s` removes it too.", keyCopyNote, source, role)
}

// copiedKeyLine returns an installed configuration's keyCopyNote line, or
// "" if install did not copy its key.
func copiedKeyLine(content []byte) string {
	if !unit.Ours(content) {
		return ""
	}
	sc := bufio.NewScanner(bytes.NewReader(content))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "#") {
			return ""
		}
		if strings.HasPrefix(line, keyCopyNote) {
			return line
		}
	}
	return ""
}
