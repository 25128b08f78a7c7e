package pathmgr

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"github.com/vishvananda/netns"
)

const procSys = "/proc/sys"

// sysctlPath maps a name to its file. As in sysctl(8), a name containing
// '/' is taken as a path below /proc/sys, so an interface whose name has
// a dot (a VLAN such as "eth0.100") can still be named:
// "net/ipv4/conf/eth0.100/rp_filter". Otherwise dots separate components.
func sysctlPath(name string) (string, error) {
	if name == "" || strings.Contains(name, "..") || strings.HasPrefix(name, "/") || strings.HasPrefix(name, ".") {
		return "", fmt.Errorf("sysctl %q: not a setting name", name)
	}
	if !strings.Contains(name, "/") {
		name = strings.ReplaceAll(name, ".", "/")
	}
	return filepath.Join(procSys, name), nil
}

// GetSysctl reads a kernel setting, e.g. GetSysctl("net.mptcp.enabled"),
// in the calling thread's network namespace.
func GetSysctl(name string) (string, error) {
	p, err := sysctlPath(name)
	if err != nil {
		return "", err
	}
	b, err := os.ReadFile(p)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("sysctl %s: this kernel has no such setting: %w", name, err)
		}
		return "", fmt.Errorf("sysctl %s: %w", name, err)
	}
	return strings.TrimSpace(string(b)), nil
}

// SetSysctl writes a kernel setting, e.g.
// SetSysctl("net.mptcp.blackhole_timeout", "0"), in the calling thread's
// network namespace.
func SetSysctl(name, value string) error {
	p, err := sysctlPath(name)
	if err != nil {
		return err
	}
	if err := os.WriteFile(p, []byte(value+"\n"), 0o644); err != nil {
		switch {
		case errors.Is(err, os.ErrNotExist):
			return fmt.Errorf("sysctl %s=%s: this kernel has no such setting: %w", name, value, err)
		case errors.Is(err, os.ErrPermission):
			return fmt.Errorf("sysctl %s=%s: not allowed (needs root / CAP_NET_ADMIN in the namespace's owner): %w", name, value, err)
		}
		return fmt.Errorf("sysctl %s=%s: %w", name, value, err)
	}
	return nil
}

// sysctlChange remembers one setting's value before mpvpn changed it.
type sysctlChange struct {
	name, old, set string
}

// restore puts the old value back, unless someone changed the setting
// since (then theirs wins). A setting that is gone (its interface was
// removed) needs nothing.
func (c *sysctlChange) restore() error {
	cur, err := GetSysctl(c.name)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	if cur != c.set {
		return nil
	}
	return SetSysctl(c.name, c.old)
}

// loosenRPFilter makes reverse-path filtering on an interface loose (2)
// when it is effectively strict (1). The kernel uses the larger of
// conf.all and conf.<if>, so with all=1 the interface's own 0 is strict
// too. Strict filtering drops MPTCP joins whose replies return on another
// interface than the route back to their source. It returns the change to
// undo, or nil when nothing changed.
func loosenRPFilter(ifname string, journal func(kind, name, before string) error) (*sysctlChange, error) {
	name := "net/ipv4/conf/" + ifname + "/rp_filter"
	all, err := GetSysctl("net/ipv4/conf/all/rp_filter")
	if err != nil {
		return nil, err
	}
	own, err := GetSysctl(name)
	if err != nil {
		return nil, err
	}
	a, _ := strconv.Atoi(all)
	o, _ := strconv.Atoi(own)
	if max(a, o) != 1 {
		return nil, nil
	}
	if journal != nil {
		if err := journal(JournalSysctl, name, own); err != nil {
			return nil, err
		}
	}
	if err := SetSysctl(name, "2"); err != nil {
		return nil, err
	}
	return &sysctlChange{name: name, old: own, set: "2"}, nil
}

// inNetns runs fn on a fresh OS thread that has joined ns. The thread is
// never unlocked, so the runtime ends it with the goroutine and no other
// goroutine ever runs in ns by accident. /proc/sys/net shows the network
// namespace of the thread that opens it, so this is how a Manager reaches
// its namespace's sysctls from whatever goroutine calls it.
func inNetns(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("enter network namespace: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}
