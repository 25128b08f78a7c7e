package linkemu

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
)

// RunDaemon is the linkemu command line (cmd/linkemu, and `mpvpn-topo
// linkemu`): it joins two interfaces of the current network namespace and
// serves the control socket until ctx is done or the wire fails.
//
//	linkemu -a cli -b isp -ctl /run/mpvpn-test/P/la.sock [-up "rate=40mbit delay=10ms"] [-down "..."]
func RunDaemon(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("linkemu", flag.ContinueOnError)
	fs.SetOutput(stderr)
	a := fs.String("a", "", "interface on the A side (Up is A → B)")
	b := fs.String("b", "", "interface on the B side")
	ctl := fs.String("ctl", "", "control socket path")
	up := fs.String("up", "", "initial Up parameters, e.g. \"rate=40mbit delay=10ms\"")
	down := fs.String("down", "", "initial Down parameters")
	ns := fs.String("netns", "", "network namespace holding A and B (default: the current one)")
	seed := fs.Uint64("seed", 0, "random seed for loss and jitter (0 = random)")
	tick := fs.Duration("tick", 0, "wake-up grid while traffic flows (0 = 1ms, negative = every frame)")
	verbose := fs.Bool("v", false, "debug logging")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *a == "" || *b == "" || *ctl == "" {
		fs.Usage()
		return errors.New("linkemu: -a, -b and -ctl are required")
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	upP, err := ParseParams(*up)
	if err != nil {
		return fmt.Errorf("-up: %w", err)
	}
	downP, err := ParseParams(*down)
	if err != nil {
		return fmt.Errorf("-down: %w", err)
	}
	w, err := New(Config{A: *a, B: *b, NetNS: *ns, Up: upP, Down: downP, Seed: *seed, Tick: *tick, Logger: log})
	if err != nil {
		return err
	}
	defer w.Close()

	if err := os.MkdirAll(filepath.Dir(*ctl), 0o755); err != nil {
		return fmt.Errorf("linkemu: %w", err)
	}
	// A socket file left by a killed daemon would make Listen fail.
	if err := os.Remove(*ctl); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("linkemu: %w", err)
	}
	ln, err := net.Listen("unix", *ctl)
	if err != nil {
		return fmt.Errorf("linkemu: control: %w", err)
	}
	defer os.Remove(*ctl)
	if err := os.Chmod(*ctl, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("linkemu: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, ln, w, log) }()
	log.Info("linkemu ready", "ctl", *ctl, "pid", os.Getpid())
	select {
	case <-ctx.Done():
		return <-served
	case err := <-w.Err():
		cancel()
		<-served
		return err
	case err := <-served:
		return err
	}
}
