//go:build linux

package main

import (
	"log/slog"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// raiseNoFile lifts RLIMIT_NOFILE as far as this process may: every flow
// holds sockets (two on the concentrator), and the usual hard limit of a
// few thousand would refuse flows near it. Go raises the soft limit to
// the hard one at start; a process with CAP_SYS_RESOURCE (root outside a
// service) may raise the hard one too, up to fs.nr_open; a service gets
// its limit from the unit's LimitNOFILE.
func raiseNoFile(log *slog.Logger) {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return
	}
	want := l.Max
	if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil && n > want {
			want = n
		}
	}
	if want > l.Max && syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: want, Max: want}) == nil {
		l.Cur, l.Max = want, want
	} else if l.Cur < l.Max && syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: l.Max, Max: l.Max}) == nil {
		l.Cur = l.Max
	}
	log.Debug("open-file limit", "nofile", l.Cur)
}
