package topo

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/mpvpn/mpvpn/test/netns/internal/netns"
)

// Leftovers lists the namespaces whose name starts with prefix + "-".
func Leftovers(prefix string) ([]string, error) {
	ents, err := os.ReadDir(netns.Dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix+"-") {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// Down deletes every namespace of prefix (killing what runs inside) and
// the default run directory. Deleting what is already gone is no error.
func Down(prefix string) error {
	if !prefixRE.MatchString(prefix) {
		return fmt.Errorf("topo: prefix %q: want 1-16 letters, digits or _", prefix)
	}
	names, err := Leftovers(prefix)
	if err != nil {
		return err
	}
	err = deleteNamespaces(names)
	// Files of namespaces already gone (a run killed between the two).
	stale, _ := filepath.Glob(filepath.Join(etcNetns, prefix+"-*"))
	for _, d := range stale {
		if rerr := os.RemoveAll(d); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}
	if len(stale) > 0 {
		os.Remove(etcNetns) // once empty, as in deleteNamespaces
	}
	if rerr := os.RemoveAll(DefaultRunDir(prefix)); rerr != nil {
		err = errors.Join(err, rerr)
	}
	return err
}

// DownAll runs Down for every prefix NewPrefix could have made ("mv" + 4
// hex digits, with one of the topology's roles). Topologies of tests
// running right now go too: for cleaning up after crashed runs.
func DownAll() ([]string, error) {
	ents, err := os.ReadDir(netns.Dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var prefixes []string
	for _, e := range ents {
		if m := autoPrefixRE.FindStringSubmatch(e.Name()); m != nil && !slices.Contains(prefixes, m[1]) {
			prefixes = append(prefixes, m[1])
		}
	}
	sort.Strings(prefixes)
	var errs []error
	for _, p := range prefixes {
		errs = append(errs, Down(p))
	}
	return prefixes, errors.Join(errs...)
}

// deleteNamespaces kills every process inside the namespaces, by PID, then
// deletes them. A process keeps a deleted namespace (and its interfaces)
// alive, hence the order.
func deleteNamespaces(names []string) error {
	var errs []error
	var pids []int
	for _, ns := range names {
		p, err := nsPids(ns)
		if err != nil {
			errs = append(errs, err)
		}
		pids = append(pids, p...)
	}
	if len(pids) > 0 {
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGTERM)
		}
		deadline := time.Now().Add(3 * time.Second)
		for time.Now().Before(deadline) && anyAlive(pids) {
			time.Sleep(20 * time.Millisecond)
		}
		for _, pid := range pids {
			if alive(pid) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	for i := len(names) - 1; i >= 0; i-- {
		ns := names[i]
		if err := os.RemoveAll(etcDir(ns)); err != nil {
			errs = append(errs, err)
		}
		// /etc/netns itself, once empty: SetResolvConf may have made it,
		// and an empty one serves nobody (an error means it holds
		// another namespace's files, or is not there).
		os.Remove(etcNetns)
		if _, err := os.Stat(netns.Path(ns)); errors.Is(err, os.ErrNotExist) {
			continue
		}
		if _, err := run(exec.Command("ip", "netns", "del", ns), nil); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// etcNetns is where `ip netns exec NS` finds files of NS's own to mount
// over /etc's (iproute2's ip-netns(8)): /etc/netns/NS/resolv.conf.
const etcNetns = "/etc/netns"

func etcDir(ns string) string { return filepath.Join(etcNetns, ns) }

// SetResolvConf gives namespace ns a resolv.conf of its own, which
// `ip netns exec` mounts over /etc/resolv.conf for what it runs: the DNS
// tests change that one, never the host's. Deleting the namespace (Close,
// Down) removes it.
func (tp *Topology) SetResolvConf(ns, content string) error {
	if !strings.HasPrefix(ns, tp.Prefix+"-") {
		return fmt.Errorf("topo: %s is not a namespace of this topology", ns)
	}
	if err := os.MkdirAll(etcDir(ns), 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(etcDir(ns), "resolv.conf"), []byte(content), 0o644)
}

// nsPids lists the processes in namespace ns, never this one (a goroutine
// of ours may be visiting ns on its thread; ip netns pids looks at the
// main thread, but be sure).
func nsPids(ns string) ([]int, error) {
	if _, err := os.Stat(netns.Path(ns)); errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	out, err := run(exec.Command("ip", "netns", "pids", ns), nil)
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(out) {
		pid, err := strconv.Atoi(f)
		if err == nil && pid != os.Getpid() && pid > 1 {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// alive reports whether pid still runs (a zombie does not count: it holds
// no namespace).
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name.
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z' && s[i+2] != 'X'
	}
	return true
}

func anyAlive(pids []int) bool {
	return slices.ContainsFunc(pids, alive)
}
