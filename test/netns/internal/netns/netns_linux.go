// Package netns runs Go code inside a named network namespace without
// exec'ing anything: the test harness creates sockets there (a socket keeps
// the namespace it was created in for its whole life) and writes per-namespace
// sysctls.
package netns

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"golang.org/x/sys/unix"
)

// Dir is where iproute2 keeps its named namespaces (`ip netns add`).
const Dir = "/run/netns"

// Path returns the bind-mount path of the namespace called name; an absolute
// path is returned unchanged.
func Path(name string) string {
	if filepath.IsAbs(name) {
		return name
	}
	return filepath.Join(Dir, name)
}

// Do runs fn on an OS thread that has joined the network namespace ns (a name
// under /run/netns or an absolute path); "" runs fn where the caller is.
// Sockets fn creates stay in ns after Do returns and may be used from any
// goroutine.
//
// fn runs on a fresh goroutine locked to its thread. Since Go 1.10 threads the
// runtime starts while a goroutine is locked are cloned from a clean template
// thread, so the namespace switch cannot leak into other goroutines; if the
// thread cannot be switched back it stays locked and the runtime discards it
// when the goroutine exits.
func Do(ns string, fn func() error) error {
	if ns == "" {
		return fn()
	}
	target, err := os.Open(Path(ns))
	if err != nil {
		return fmt.Errorf("netns %s: %w", ns, err)
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netns: own namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netns: enter %s: %w", ns, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: it dies with this goroutine.
			errc <- errors.Join(ferr, fmt.Errorf("netns: leave %s: %w", ns, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Sysctl writes a per-namespace kernel setting such as
// "net.ipv4.ip_forward" inside ns. /proc/sys/net resolves against the
// namespace of the thread that opens the file, so this needs no exec.
func Sysctl(ns, name, value string) error {
	p := filepath.Join("/proc/sys", filepath.FromSlash(dotsToSlashes(name)))
	return Do(ns, func() error {
		if err := os.WriteFile(p, []byte(value+"\n"), 0o644); err != nil {
			return fmt.Errorf("sysctl %s=%s in %s: %w", name, value, ns, err)
		}
		return nil
	})
}

// ReadSysctl reads a per-namespace kernel setting inside ns.
func ReadSysctl(ns, name string) (string, error) {
	p := filepath.Join("/proc/sys", filepath.FromSlash(dotsToSlashes(name)))
	var v string
	err := Do(ns, func() error {
		b, err := os.ReadFile(p)
		if err != nil {
			return fmt.Errorf("sysctl %s in %s: %w", name, ns, err)
		}
		v = string(b)
		return nil
	})
	for len(v) > 0 && (v[len(v)-1] == '\n' || v[len(v)-1] == ' ') {
		v = v[:len(v)-1]
	}
	return v, err
}

// dotsToSlashes turns a sysctl name into its path. Interface names may hold
// dots only in theory; the harness's never do.
func dotsToSlashes(name string) string {
	b := []byte(name)
	for i, c := range b {
		if c == '.' {
			b[i] = '/'
		}
	}
	return string(b)
}
