//go:build linux

package dnsconf

import (
	"os"
	"path/filepath"
)

// A client may run in a network namespace of its own (`ip netns exec`, a
// test, a container). systemd-resolved and the host's resolv.conf then
// belong to the host, not to that namespace: configuring resolved's link
// by ifindex would name another device of the host's, and writing the
// host's resolv.conf would send the host's lookups to addresses that only
// this namespace routes. These two checks keep mpvpn from doing either.

// initRoot is where the initial namespaces' process (PID 1) sees the file
// system; a variable so that tests can point it elsewhere.
var initRoot = "/proc/1/root"

// sameInode reports whether a and b are the same file (not following a
// final symlink). An error is "no".
func sameInode(a, b string) bool {
	sa, err := os.Lstat(a)
	if err != nil {
		return false
	}
	sb, err := os.Lstat(b)
	return err == nil && os.SameFile(sa, sb)
}

// ownNetns reports whether this process's network namespace is not PID
// 1's. When PID 1's cannot be read (no permission, no /proc), it is
// taken for the same one: the ordinary case of a client on the host.
func ownNetns() bool {
	self, err := os.Stat("/proc/self/ns/net")
	if err != nil {
		return false
	}
	pid1, err := os.Stat("/proc/1/ns/net")
	return err == nil && !os.SameFile(self, pid1)
}

// hostsFile reports whether path, as this process sees it, is the very
// file PID 1 sees at path: a resolv.conf of the host's, not one of this
// namespace's own (`ip netns exec` bind-mounts /etc/netns/NAME/resolv.conf
// over it; a container has its own root or its own bind mount).
func hostsFile(path string) bool {
	abs, err := filepath.Abs(path)
	if err != nil {
		return false
	}
	return sameInode(abs, filepath.Join(initRoot, abs))
}
