//go:build linux

// Package netnstest runs kernel-facing tests inside a network namespace of
// their own, so that routes, rules, MPTCP endpoints and sysctls can be
// changed without touching the host. It is for tests only.
package netnstest

import (
	"os"
	"testing"
)

// CannotRun fails the test under CI (CI=true) and skips it elsewhere: a CI
// run that silently skipped the kernel tests would prove nothing.
func CannotRun(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("cannot run (and CI=true): "+format, args...)
	}
	t.Skipf(format, args...)
}

// RequireMPTCP fails or skips (see CannotRun) when the kernel has no MPTCP.
func RequireMPTCP(t testing.TB) {
	t.Helper()
	if _, err := os.Stat("/proc/sys/net/mptcp/enabled"); err != nil {
		CannotRun(t, "the kernel has no MPTCP: %v", err)
	}
}
