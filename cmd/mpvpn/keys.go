package main

import (
	"bufio"
	"fmt"
	"io"
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
			_, err = fmt.Fprintln(c.App.Writer, k.String())
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

// readKeyFile reads a private key file written by `mpvpn keygen`.
func readKeyFile(path string) (tunnel.PrivateKey, error) {
	if path == "" {
		return tunnel.PrivateKey{}, fmt.Errorf("--key is required (a file written by `mpvpn keygen`)")
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return tunnel.PrivateKey{}, fmt.Errorf("--key: %w", err)
	}
	k, err := tunnel.ParsePrivateKey(strings.TrimSpace(string(b)))
	if err != nil {
		return tunnel.PrivateKey{}, fmt.Errorf("--key %s: %w", path, err)
	}
	return k, nil
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
