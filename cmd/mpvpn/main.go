//go:build linux

// Command mpvpn is a transparent multipath VPN for Linux: `mpvpn client`
// carries each TCP flow of the host's apps as one Multipath TCP connection
// over every uplink to `mpvpn server`, which re-originates it.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"
)

func main() {
	app := newApp(os.Stdin, os.Stdout, os.Stderr)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := app.RunContext(ctx, os.Args)
	stop()
	if err != nil {
		// One clear line and a non-zero exit: scripts and humans both
		// read the first line only.
		fmt.Fprintf(os.Stderr, "mpvpn: %s\n", oneLine(err))
		os.Exit(1)
	}
}

func oneLine(err error) string {
	return strings.ReplaceAll(err.Error(), "\n", "; ")
}

func newApp(stdin io.Reader, stdout, stderr io.Writer) *cli.App {
	return &cli.App{
		Name:  "mpvpn",
		Usage: "transparent multipath VPN: every TCP flow over all uplinks as one Multipath TCP connection",
		Description: "mpvpn client catches the host's TCP flows on a TUN device, terminates them in a userspace\n" +
			"network stack and carries each one as a kernel Multipath TCP connection over every uplink\n" +
			"to an mpvpn server (the concentrator), which connects to the real destination.",
		Reader:               stdin,
		Writer:               stdout,
		ErrWriter:            stderr,
		HideHelpCommand:      true,
		EnableBashCompletion: false,
		// Errors are printed once, by main, as one line.
		ExitErrHandler: func(*cli.Context, error) {},
		Commands: []*cli.Command{
			keygenCommand(),
			pubkeyCommand(),
			serverCommand(),
			clientCommand(),
			statusCommand(),
			downCommand(),
			execCommand(),
			installCommand(),
			uninstallCommand(),
		},
	}
}

// logFlags are shared by the long-running commands.
var logFlags = []cli.Flag{
	&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
}

func newLogger(c *cli.Context) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", c.String("log-level"))
	}
	return slog.New(slog.NewTextHandler(c.App.ErrWriter, &slog.HandlerOptions{Level: lvl})), nil
}

// usageError marks a mistake in the command line or config file.
// cipherFlag is --cipher, the same three values on both ends; usage says
// what this end does with them.
func cipherFlag(usage string) cli.Flag {
	return &cli.StringFlag{Name: "cipher", Value: "auto", Usage: "seal flows with this `CIPHER`: " + usage}
}

func usageError(format string, args ...any) error {
	return errors.New(fmt.Sprintf(format, args...))
}
