//go:build linux

package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/mpvpn/mpvpn/cgroup"
)

func execCommand() *cli.Command {
	return &cli.Command{
		Name:      "exec",
		Usage:     "run a program whose traffic a running client sends through the tunnel, past it, or nowhere",
		ArgsUsage: "--tunnel|--direct|--block -- CMD [ARGS...]",
		Description: "  sudo mpvpn exec --direct -- backup-tool --all\n\n" +
			"The program runs in a cgroup of mpvpn's (the client's --rule cgroup:... selectors, with\n" +
			"these three put first): --tunnel through the tunnel whatever the routes say, --direct\n" +
			"past it, --block nowhere (its connections are refused at once). Moving a process into a\n" +
			"cgroup needs root; run under sudo, the program then runs as the user who ran sudo.",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "tunnel", Usage: "through the tunnel"},
			&cli.BoolFlag{Name: "direct", Usage: "past the tunnel, straight out of an uplink"},
			&cli.BoolFlag{Name: "block", Usage: "nowhere: every connection refused"},
			&cli.BoolFlag{Name: "keep-root", Usage: "under sudo, run the program as root instead of the user who ran sudo"},
			&cli.StringFlag{Name: "cgroup", Value: cgroup.DefaultName, Usage: "the client's top-level cgroup `NAME` (its --cgroup)"},
		},
		Action: runExec,
	}
}

func runExec(c *cli.Context) error {
	var kinds []cgroup.Kind
	for _, k := range cgroup.Kinds {
		if c.Bool(string(k)) {
			kinds = append(kinds, k)
		}
	}
	if len(kinds) != 1 {
		return usageError("mpvpn exec: say one of --tunnel, --direct or --block")
	}
	argv := c.Args().Slice()
	if len(argv) == 0 {
		return usageError("mpvpn exec: no command given (mpvpn exec --%s -- CMD ARGS...)", kinds[0])
	}
	if os.Geteuid() != 0 {
		return errors.New("mpvpn exec needs root to move the program into mpvpn's cgroup (run it with sudo)")
	}
	m, err := cgroup.Mount()
	if err != nil {
		return err
	}
	t := cgroup.Tree{Mount: m, Name: c.String("cgroup")}
	// Look the program up before the move, so a typo leaves nothing
	// changed.
	prog, err := exec.LookPath(argv[0])
	if err != nil {
		return fmt.Errorf("mpvpn exec: %w", err)
	}
	if err := t.Join(kinds[0], os.Getpid()); err != nil {
		return err
	}
	if !c.Bool("keep-root") {
		if err := dropToSudoUser(); err != nil {
			return err
		}
	}
	if err := syscall.Exec(prog, argv, os.Environ()); err != nil {
		return fmt.Errorf("mpvpn exec %s: %w", prog, err)
	}
	return nil
}

// dropToSudoUser becomes the user who ran sudo, if sudo did: the cgroup
// move needed root, the program does not. (Its sockets are matched by the
// cgroup it now lives in, whoever it runs as.)
func dropToSudoUser() error {
	us, gs := os.Getenv("SUDO_UID"), os.Getenv("SUDO_GID")
	if us == "" || gs == "" {
		return nil
	}
	uid, err1 := strconv.Atoi(us)
	gid, err2 := strconv.Atoi(gs)
	if err1 != nil || err2 != nil {
		return fmt.Errorf("mpvpn exec: SUDO_UID=%q SUDO_GID=%q are not numbers", us, gs)
	}
	// Groups first, then the gid, then the uid: after Setuid there is no
	// right left to change the others. Go applies these to every thread
	// (Go 1.16+).
	if err := syscall.Setgroups([]int{gid}); err != nil {
		return fmt.Errorf("mpvpn exec: setgroups: %w", err)
	}
	if err := syscall.Setgid(gid); err != nil {
		return fmt.Errorf("mpvpn exec: setgid %d: %w", gid, err)
	}
	if err := syscall.Setuid(uid); err != nil {
		return fmt.Errorf("mpvpn exec: setuid %d: %w", uid, err)
	}
	return nil
}
