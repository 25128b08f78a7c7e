//go:build linux

// Command linkemu is the userspace link emulator daemon of the test
// topology: a wire between two interfaces of its network namespace with
// rate, delay, jitter, loss, a tail-drop queue and a blackhole switch per
// direction, changed at run time over a control socket. See package
// github.com/mpvpn/mpvpn/test/netns/linkemu.
//
//	ip netns exec P-la linkemu -a cli -b isp -ctl /run/mpvpn-test/P/la.sock -up "rate=40mbit delay=10ms"
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/mpvpn/mpvpn/test/netns/linkemu"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := linkemu.RunDaemon(ctx, os.Args[1:], os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		stop()
		os.Exit(1)
	}
}
