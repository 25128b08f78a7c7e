//go:build linux

// Package sysctl reads and writes kernel settings under /proc/sys and
// remembers what it changed, so a daemon can put the host back as it
// found it.
package sysctl

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
)

// Root is where the settings live; tests point it elsewhere.
type Root string

// Proc is the real /proc/sys.
const Proc Root = "/proc/sys"

// path maps a name to its file. As in sysctl(8), a name holding a '/' is
// a path below the root, so that an interface name with a dot ("eth0.100")
// can be named: "net/ipv4/conf/eth0.100/rp_filter".
func (r Root) path(name string) string {
	if !strings.Contains(name, "/") {
		name = strings.ReplaceAll(name, ".", "/")
	}
	return filepath.Join(string(r), name)
}

// Get returns a setting's value, e.g. Get("net.mptcp.enabled") = "1".
func (r Root) Get(name string) (string, error) {
	b, err := os.ReadFile(r.path(name))
	if err != nil {
		return "", fmt.Errorf("sysctl %s: %w", name, err)
	}
	return strings.TrimSpace(string(b)), nil
}

// Set writes a setting.
func (r Root) Set(name, value string) error {
	if err := os.WriteFile(r.path(name), []byte(value+"\n"), 0o644); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", name, value, err)
	}
	return nil
}

// Changes records settings changed through it and restores them.
type Changes struct {
	Root Root
	// Journal, if set, is told each setting's old value before it is
	// changed; an error leaves the setting as it was. (A daemon writes
	// it to its host-state journal, so a crash cannot lose the original:
	// until issue 9 the next start took the crashed run's values for the
	// host's own.)
	Journal func(name, before string) error
	mu      sync.Mutex
	old     []kv
}

type kv struct{ name, value string }

// Set changes a setting if it differs, remembering the old value once.
func (c *Changes) Set(name, value string) error {
	old, err := c.Root.Get(name)
	if err != nil {
		return err
	}
	if old == value {
		return nil
	}
	if c.Journal != nil {
		if err := c.Journal(name, old); err != nil {
			return fmt.Errorf("sysctl %s: %w", name, err)
		}
	}
	if err := c.Root.Set(name, value); err != nil {
		return err
	}
	c.mu.Lock()
	c.old = append(c.old, kv{name, old})
	c.mu.Unlock()
	return nil
}

// Restore puts back every value Set changed, newest first.
func (c *Changes) Restore() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	for i := len(c.old) - 1; i >= 0; i-- {
		errs = append(errs, c.Root.Set(c.old[i].name, c.old[i].value))
	}
	c.old = nil
	return errors.Join(errs...)
}

// AtLeast raises an integer setting to v if it is lower.
func (c *Changes) AtLeast(name string, v int) error {
	cur, err := c.int(name)
	if err != nil {
		return err
	}
	if cur >= v {
		return nil
	}
	return c.Set(name, strconv.Itoa(v))
}

// AtMost lowers an integer setting to v if it is higher.
func (c *Changes) AtMost(name string, v int) error {
	cur, err := c.int(name)
	if err != nil {
		return err
	}
	if cur <= v {
		return nil
	}
	return c.Set(name, strconv.Itoa(v))
}

// SetBits sets bits in an integer setting, keeping the others.
func (c *Changes) SetBits(name string, bits int) error {
	cur, err := c.int(name)
	if err != nil {
		return err
	}
	return c.Set(name, strconv.Itoa(cur|bits))
}

func (c *Changes) int(name string) (int, error) {
	v, err := c.Root.Get(name)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0, fmt.Errorf("sysctl %s: %q is not a number", name, v)
	}
	return n, nil
}
