//go:build linux

package main

import (
	"bufio"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/mpvpn/mpvpn/tunnel"
)

func keygenCommand() *cli.Command {
	return &cli.Command{
		Name:  "keygen",
		Usage: "print a new private key (base64 Curve25519, as `wg genkey`)",
		Description: "Writes a new private key to standard output. Keep it secret:\n" +
			"  umask 077; mpvpn keygen > client.key",
		Action: func(c *cli.Context) error {
			k, err := tunnel.GenerateKey()
			if err != nil {
				return fmt.Errorf("generate key: %w", err)
			}
			_, err = fmt.Fprintln(c.App.Writer, k.Base64Secret())
			return err
		},
	}
}

func pubkeyCommand() *cli.Command {
	return &cli.Command{
		Name:        "pubkey",
		Usage:       "read a private key on standard input, print its public key (as `wg pubkey`)",
		Description: "  mpvpn pubkey < client.key",
		Action: func(c *cli.Context) error {
			line, err := bufio.NewReader(io.LimitReader(c.App.Reader, 4096)).ReadString('\n')
			if err != nil && err != io.EOF {
				return fmt.Errorf("read private key: %w", err)
			}
			k, err := tunnel.ParsePrivateKey(strings.TrimSpace(line))
			if err != nil {
				return fmt.Errorf("standard input: %w", err)
			}
			_, err = fmt.Fprintln(c.App.Writer, k.Public().String())
			return err
		},
	}
}

// maxKeyFile bounds what is read of a key file: a key is one line.
const maxKeyFile = 4096

// readKeyFileLog reads a private key file and warns on log, once, if its
// mode lets group or others read or write it. A warning, not a refusal, as
// `wg` does: a key already exposed is better replaced than refused, and a
// refusal at startup would take the tunnel down on hosts that work today.
func readKeyFileLog(path string, log *slog.Logger) (tunnel.PrivateKey, error) {
	if path == "" {
		return tunnel.PrivateKey{}, fmt.Errorf("--key is required (a file written by `mpvpn keygen`)")
	}
	f, err := os.Open(path)
	if err != nil {
		return tunnel.PrivateKey{}, fmt.Errorf("--key: %w", err)
	}
	defer f.Close()
	// The mode of the file opened, not of the path: a symlink is judged
	// by its target, and a file swapped since cannot escape the check.
	fi, err := f.Stat()
	if err != nil {
		return tunnel.PrivateKey{}, fmt.Errorf("--key %s: %w", path, err)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxKeyFile))
	if err != nil {
		return tunnel.PrivateKey{}, fmt.Errorf("--key %s: %w", path, err)
	}
	k, err := tunnel.ParsePrivateKey(strings.TrimSpace(string(b)))
	if err != nil {
		return tunnel.PrivateKey{}, fmt.Errorf("--key %s: %w", path, err)
	}
	if w := keyModeWarning(fi.Mode()); w != "" {
		log.Warn("private key file is "+w+": whoever reads it can pose as this host, whoever writes it can swap the key; run chmod 600 "+path,
			"file", path, "mode", fmt.Sprintf("%04o", fi.Mode().Perm()))
	}
	return k, nil
}

// keyModeWarning says who besides the owner may use a key file of mode m,
// or "" if nobody may.
func keyModeWarning(m fs.FileMode) string {
	var who []string
	if m&0o070 != 0 {
		who = append(who, "group")
	}
	if m&0o007 != 0 {
		who = append(who, "world")
	}
	if len(who) == 0 {
		return ""
	}
	what := "accessible"
	switch {
	case m&0o044 != 0 && m&0o022 != 0:
		what = "readable and writable"
	case m&0o044 != 0:
		what = "readable"
	case m&0o022 != 0:
		what = "writable"
	}
	return strings.Join(who, " and ") + " " + what
}

func parsePublicKeys(flag string, ss []string) ([]tunnel.PublicKey, error) {
	var out []tunnel.PublicKey
	for _, s := range ss {
		k, err := tunnel.ParsePublicKey(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("--%s %q: %w", flag, s, err)
		}
		out = append(out, k)
	}
	return out, nil
}
