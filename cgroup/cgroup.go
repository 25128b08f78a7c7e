//go:build linux

// Package cgroup finds the cgroup v2 hierarchy, resolves a cgroup's path to
// the id and level the kernel's nftables `socket cgroupv2` match compares,
// and keeps mpvpn's own subtree: the three cgroups `mpvpn exec --tunnel |
// --direct | --block` puts a program into, so that the firewall package can
// route its sockets.
//
// # Where the hierarchy is
//
// The cgroup2 mount is read from /proc/self/mountinfo (fstype "cgroup2"),
// never assumed: on a unified host it is /sys/fs/cgroup, on a hybrid one
// (systemd's "hybrid" mode, cgroup v1 controllers plus a controller-less v2
// tree) it is usually /sys/fs/cgroup/unified, and a container may put it
// anywhere. Matching sockets by cgroup v2 needs no controller, so the hybrid
// tree works as well as the unified one.
//
// # What the kernel compares
//
// `socket cgroupv2 level N <id>` takes the cgroup the socket was created
// in (the creating task's cgroup, fixed at socket creation), walks up to its
// ancestor at level N (the root is level 0) and compares that ancestor's id
// with <id> (net/netfilter/nft_socket.c, nft_sock_get_eval_cgroupv2; read
// 2026-12, Linux 6.18). So one rule matches a cgroup and everything below
// it, and the id must be that of a cgroup that exists when the rule is
// added: a cgroup removed and created again under the same path has a new
// id, and the old rule no longer matches it. The id is the kernfs node id,
// which name_to_handle_at(2) returns as the file handle of the cgroup's
// directory (and which is also its inode number on 64-bit kernels since
// Linux 5.5).
//
// Since "netfilter: nft_socket: make cgroupsv2 matching work with
// namespaces" (7f3287db6543, Linux 6.12, backported to 6.1+ stable, 2024-09)
// the level is counted from the root of the cgroup namespace of whoever adds
// the rule, i.e. from the top of the mount as that process sees it. A mount
// of a subtree (mountinfo root other than "/") would make the levels wrong,
// so Mount refuses one.
//
// # mpvpn's own subtree, and why at the root
//
// Tree.Setup creates <cgroup2 mount>/mpvpn/{tunnel,direct,block}. It lives
// at the top of the hierarchy, not under systemd's slices or mpvpn's own
// service cgroup, because:
//
//   - The programs in it must outlive the client. Under mpvpn.service (even
//     with Delegate=yes) they would be part of that unit: `systemctl stop` or
//     a restart of the client would kill every program started with `mpvpn
//     exec` (KillMode=control-group), and the unit would never stop while one
//     runs. A crash of the client must not kill them either.
//   - Its paths must be stable and known to `mpvpn exec` without asking
//     systemd: systemd says its mapping of units to cgroup paths is not public
//     API (docs/CGROUP_DELEGATION.md, "Some Don'ts" 5, 2018-04-20), and
//     hosts without systemd (containers, minimal VMs) have no slices at all.
//   - Processes of every user and session join it, which no one user's
//     slice can hold.
//
// The price is that systemd's documentation forbids it: "don't create your
// own cgroups below the root cgroup" (CGROUP_DELEGATION.md, "Some Don'ts"
// 1), as a breach of cgroup v2's single-writer rule. What systemd does with
// a top-level cgroup it did not create, as far as its sources show (read
// 2026-12): it moves processes only into and between its own units'
// cgroups, and it removes ("trims") empty cgroups below its root only when
// the manager itself exits (manager_shutdown_cgroup → cg_trim in
// src/core/cgroup.c), which for PID 1 is at shutdown. It does write the
// root's cgroup.subtree_control for its own slices; mpvpn's cgroups enable
// no controller, so there is nothing for the two to fight over. Not
// verified on a running systemd here: the test host is a hybrid VM without
// systemd. What an
// administrator sees: systemd-cgls lists /mpvpn outside every unit, and a
// program moved there by `mpvpn exec` from inside a service leaves that
// service's cgroup, so the service's resource limits no longer apply to it
// and `systemctl stop` of that service no longer kills it. The
// systemd-sanctioned alternative, a transient scope with Delegate=yes
// created over D-Bus ("i-like-continents"), is left for when mpvpn talks to
// systemd anyway.
//
// # What survives, and cleanup
//
// The cgroups are kernel state and outlive a crash of the client, like the
// firewall tables that match them. Cleanup removes them only when empty: a
// cgroup with processes cannot be removed (rmdir fails with EBUSY), and
// Cleanup moves nothing of anybody's out of it; it says what it kept and
// why. An existing subtree is reused by Setup as it is, so the ids of
// cgroups that were kept stay valid.
package cgroup

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Mountinfo is where the kernel lists this process's mounts.
const Mountinfo = "/proc/self/mountinfo"

// Mount returns where the cgroup v2 hierarchy is mounted, as listed in
// /proc/self/mountinfo.
func Mount() (string, error) {
	f, err := os.Open(Mountinfo)
	if err != nil {
		return "", fmt.Errorf("cgroup: %w", err)
	}
	defer f.Close()
	m, err := parseMountinfo(f)
	if err != nil {
		return "", fmt.Errorf("cgroup: %s: %w", Mountinfo, err)
	}
	return m, nil
}

// ErrNoCgroup2 says that no cgroup v2 hierarchy is mounted.
var ErrNoCgroup2 = errors.New("no cgroup2 file system is mounted (a cgroup v1-only host cannot match sockets by cgroup v2)")

// parseMountinfo returns the mount point of the first cgroup2 mount of the
// whole hierarchy (root "/"). The format is proc(5)'s: ID parent major:minor
// root mountpoint options [optional fields...] - fstype source superoptions,
// with spaces, tabs, newlines and backslashes in paths written as octal
// escapes.
func parseMountinfo(r io.Reader) (string, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	var subtree string
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		sep := slices.Index(fields, "-")
		if sep < 6 || sep+1 >= len(fields) {
			continue
		}
		if fields[sep+1] != "cgroup2" {
			continue
		}
		root, mnt := unescapeMountinfo(fields[3]), unescapeMountinfo(fields[4])
		if root != "/" {
			if subtree == "" {
				subtree = fmt.Sprintf("cgroup2 at %s holds only the subtree %s", mnt, root)
			}
			continue
		}
		return mnt, nil
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	if subtree != "" {
		return "", fmt.Errorf("%s: the levels nftables counts would be wrong there; mount the whole cgroup2 hierarchy", subtree)
	}
	return "", ErrNoCgroup2
}

// unescapeMountinfo undoes the kernel's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Cgroup is a cgroup v2 as the nftables `socket cgroupv2` match needs it.
type Cgroup struct {
	Path  string // relative to the cgroup2 mount, e.g. "/system.slice/backup.service"
	Dir   string // the directory, e.g. "/sys/fs/cgroup/system.slice/backup.service"
	ID    uint64 // the kernel's cgroup id (kernfs node id)
	Level uint32 // depth below the root: "/" is 0, "/a" is 1, "/a/b" is 2
}

// MaxLevel is the deepest level nft_socket accepts (it stores it in a u8).
const MaxLevel = 255

// cgroup2Magic is CGROUP2_SUPER_MAGIC ("cgrp").
const cgroup2Magic = 0x63677270

// CleanPath checks a cgroup path given relative to the cgroup2 mount and
// returns it in canonical form ("/a/b"). It refuses "..": the path names a
// place in the hierarchy, not a way through the file system.
func CleanPath(p string) (string, error) {
	if !strings.HasPrefix(p, "/") {
		return "", fmt.Errorf("cgroup path %q must start with / (it is relative to the cgroup2 mount, e.g. /system.slice/backup.service)", p)
	}
	for _, el := range strings.Split(p, "/") {
		if el == ".." {
			return "", fmt.Errorf("cgroup path %q must not contain ..", p)
		}
	}
	return path.Clean(p), nil
}

// Resolve returns the id and level of the cgroup at p (relative to the
// cgroup2 mount at mount). It fails, wrapping fs.ErrNotExist, when there is
// no such cgroup.
func Resolve(mount, p string) (Cgroup, error) {
	clean, err := CleanPath(p)
	if err != nil {
		return Cgroup{}, err
	}
	dir := filepath.Join(mount, filepath.FromSlash(clean))
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return Cgroup{}, fmt.Errorf("cgroup %s does not exist (%s): %w", clean, dir, fs.ErrNotExist)
		}
		return Cgroup{}, fmt.Errorf("cgroup %s: %w", clean, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return Cgroup{}, fmt.Errorf("cgroup %s: %s is not a directory", clean, dir)
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err != nil {
		return Cgroup{}, fmt.Errorf("cgroup %s: statfs %s: %w", clean, dir, err)
	}
	if sfs.Type != cgroup2Magic {
		return Cgroup{}, fmt.Errorf("cgroup %s: %s is not on a cgroup2 file system", clean, dir)
	}
	id, err := cgroupID(dir, st.Ino)
	if err != nil {
		return Cgroup{}, fmt.Errorf("cgroup %s: %w", clean, err)
	}
	level := 0
	if clean != "/" {
		level = strings.Count(clean, "/")
	}
	if level > MaxLevel {
		return Cgroup{}, fmt.Errorf("cgroup %s is %d levels deep; nftables matches at most %d", clean, level, MaxLevel)
	}
	return Cgroup{Path: clean, Dir: dir, ID: id, Level: uint32(level)}, nil
}

// cgroupID returns the kernfs node id of a cgroup directory: the 8 bytes
// of its file handle (FILEID_KERNFS, native byte order). Where file handles
// are not supported it falls back to the inode number, which equals the id
// on 64-bit kernels.
func cgroupID(dir string, ino uint64) (uint64, error) {
	h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, dir, 0)
	if err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
			return ino, nil
		}
		return 0, fmt.Errorf("name_to_handle_at %s: %w", dir, err)
	}
	b := h.Bytes()
	if len(b) != 8 {
		return 0, fmt.Errorf("name_to_handle_at %s: a %d-byte handle, want the 8-byte cgroup id", dir, len(b))
	}
	return binary.NativeEndian.Uint64(b), nil
}

// Kind is one of mpvpn's own cgroups: what `mpvpn exec` does with a program.
type Kind string

// The kinds, named as the `mpvpn exec` flags.
const (
	KindTunnel Kind = "tunnel"
	KindDirect Kind = "direct"
	KindBlock  Kind = "block"
)

// Kinds lists every kind, in the order Setup creates them.
var Kinds = []Kind{KindTunnel, KindDirect, KindBlock}

func (k Kind) check() error {
	if !slices.Contains(Kinds, k) {
		return fmt.Errorf("unknown cgroup kind %q: want tunnel, direct or block", string(k))
	}
	return nil
}

// DefaultName is the top-level cgroup mpvpn owns.
const DefaultName = "mpvpn"

// Tree is mpvpn's subtree: <Mount>/<Name>/{tunnel,direct,block}.
type Tree struct {
	Mount string // the cgroup2 mount, from Mount()
	Name  string // the top-level cgroup, DefaultName (tests use their own)
}

// DefaultTree is <cgroup2 mount>/mpvpn.
func DefaultTree() (Tree, error) {
	m, err := Mount()
	if err != nil {
		return Tree{}, err
	}
	return Tree{Mount: m, Name: DefaultName}, nil
}

func (t Tree) check() error {
	if t.Mount == "" {
		return fmt.Errorf("cgroup: no cgroup2 mount given")
	}
	// One plain directory name; "cgroup." names would collide with the
	// kernel's interface files.
	if t.Name == "" || t.Name == "." || t.Name == ".." || strings.ContainsAny(t.Name, "/\x00") || strings.HasPrefix(t.Name, "cgroup.") {
		return fmt.Errorf("cgroup: %q cannot name a top-level cgroup", t.Name)
	}
	return nil
}

// Root is the directory of the subtree's top, e.g. /sys/fs/cgroup/mpvpn.
func (t Tree) Root() string { return filepath.Join(t.Mount, t.Name) }

// Path is the cgroup of kind k relative to the cgroup2 mount, as firewall
// rules name it: "/mpvpn/tunnel".
func (t Tree) Path(k Kind) string { return "/" + t.Name + "/" + string(k) }

// Dir is the directory of the cgroup of kind k.
func (t Tree) Dir(k Kind) string { return filepath.Join(t.Root(), string(k)) }

// Setup creates the subtree, reusing whatever part of it exists (a cgroup
// kept by an earlier Cleanup because programs still ran in it keeps its id,
// so the rules that match it stay right). It returns one line per cgroup it
// created. It enables no controller: matching sockets needs none.
func (t Tree) Setup() ([]string, error) {
	if err := t.check(); err != nil {
		return nil, err
	}
	var made []string
	for _, dir := range append([]string{t.Root()}, t.dirs()...) {
		err := os.Mkdir(dir, 0o755)
		switch {
		case err == nil:
			made = append(made, "cgroup "+dir)
		case errors.Is(err, fs.ErrExist):
		default:
			return made, fmt.Errorf("cgroup: create %s: %w", dir, err)
		}
	}
	return made, nil
}

func (t Tree) dirs() []string {
	var out []string
	for _, k := range Kinds {
		out = append(out, t.Dir(k))
	}
	return out
}

// ErrNotRunning says that mpvpn's cgroups do not exist: no client set them
// up.
var ErrNotRunning = errors.New("no mpvpn client is running")

// Join moves process pid (all its threads) into the cgroup of kind k, as
// `echo PID > cgroup.procs` does. Only sockets the process creates from then
// on are matched by that cgroup's rule: a socket keeps the cgroup it was
// created in.
//
// The kernel lets a process be moved only by someone who may write the
// cgroup.procs of both the target and the closest common ancestor of the
// source and target cgroups, which for the top-level mpvpn subtree is the
// root cgroup: in practice, root.
func (t Tree) Join(k Kind, pid int) error {
	if err := t.check(); err != nil {
		return err
	}
	if err := k.check(); err != nil {
		return fmt.Errorf("cgroup: %w", err)
	}
	if pid <= 0 {
		return fmt.Errorf("cgroup: pid %d: want a process id", pid)
	}
	dir := t.Dir(k)
	if _, err := os.Stat(dir); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("%w (cgroup %s does not exist)", ErrNotRunning, dir)
		}
		return fmt.Errorf("cgroup: %w", err)
	}
	procs := filepath.Join(dir, "cgroup.procs")
	f, err := os.OpenFile(procs, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("cgroup: move process %d into %s: %w", pid, dir, permissionHint(err))
	}
	// One write of the decimal pid, as the kernel parses it.
	_, werr := f.Write([]byte(strconv.Itoa(pid)))
	cerr := f.Close()
	if werr != nil {
		return fmt.Errorf("cgroup: move process %d into %s: %w", pid, dir, permissionHint(werr))
	}
	if cerr != nil {
		return fmt.Errorf("cgroup: move process %d into %s: %w", pid, dir, cerr)
	}
	return nil
}

type hinted struct {
	err  error
	hint string
}

func (h hinted) Error() string { return h.err.Error() + " (" + h.hint + ")" }
func (h hinted) Unwrap() error { return h.err }

func permissionHint(err error) error {
	switch {
	case errors.Is(err, fs.ErrPermission):
		return hinted{err, "moving a process into mpvpn's cgroups needs write access to cgroup.procs of the root cgroup: run as root"}
	case errors.Is(err, unix.ESRCH):
		return hinted{err, "no such process"}
	}
	return err
}

// Exec moves the calling process into the cgroup of kind k of the default
// tree and replaces it with argv (looked up in PATH), keeping the
// environment: the code behind `mpvpn exec --tunnel|--direct|--block --
// CMD ARGS...`. It returns only on failure; when no client has set up the
// cgroups it fails with ErrNotRunning.
func Exec(k Kind, argv []string) error {
	t, err := DefaultTree()
	if err != nil {
		return err
	}
	return t.Exec(k, argv)
}

// Exec is the package's Exec on tree t.
//
// The new program's sockets are all created after the move, so all of them
// are matched; descriptors it inherits (a socket opened by its parent, or
// handed over by systemd's socket activation) keep the cgroup they were
// created in.
func (t Tree) Exec(k Kind, argv []string) error {
	if len(argv) == 0 || argv[0] == "" {
		return fmt.Errorf("cgroup: exec: no command given")
	}
	if err := k.check(); err != nil {
		return fmt.Errorf("cgroup: %w", err)
	}
	if err := t.check(); err != nil {
		return err
	}
	// Check before the move, so a typo leaves the caller where it was.
	prog, err := exec.LookPath(argv[0])
	if err != nil {
		return fmt.Errorf("cgroup: exec: %w", err)
	}
	if err := t.Join(k, os.Getpid()); err != nil {
		return err
	}
	if err := syscall.Exec(prog, argv, os.Environ()); err != nil {
		return fmt.Errorf("cgroup: exec %s: %w", prog, err)
	}
	return nil // not reached
}

// Cleanup removes the subtree, each cgroup only if it is empty, and returns
// one line per cgroup removed or kept. It moves no process and removes no
// cgroup it did not create: a cgroup that still holds processes is kept (the
// kernel refuses to remove it), and so is one with child cgroups somebody
// else made, and the lines say so. Neither is an error. A missing subtree
// is nothing to do.
func (t Tree) Cleanup() ([]string, error) {
	if err := t.check(); err != nil {
		return nil, err
	}
	var lines []string
	var errs []error
	kept := false
	for _, dir := range t.dirs() {
		line, gone, err := removeCgroup(dir)
		if line != "" {
			lines = append(lines, line)
		}
		if err != nil {
			errs = append(errs, err)
		}
		kept = kept || !gone
	}
	root := t.Root()
	switch {
	case kept:
		if _, err := os.Stat(root); err == nil {
			lines = append(lines, fmt.Sprintf("cgroup %s kept: it still holds cgroups that could not be removed", root))
		}
	default:
		line, _, err := removeCgroup(root)
		if line != "" {
			lines = append(lines, line)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return lines, fmt.Errorf("cgroup: cleanup: %w", err)
	}
	return lines, nil
}

// removeCgroup removes one cgroup directory if it is empty. gone reports
// whether it no longer exists; line describes what happened (empty when
// there was nothing).
func removeCgroup(dir string) (line string, gone bool, err error) {
	err = unix.Rmdir(dir)
	switch {
	case err == nil:
		return "cgroup " + dir, true, nil
	case errors.Is(err, unix.ENOENT):
		return "", true, nil
	case errors.Is(err, unix.EBUSY), errors.Is(err, unix.ENOTEMPTY):
		return "cgroup " + dir + " kept: " + whyBusy(dir), false, nil
	default:
		return "", false, fmt.Errorf("remove %s: %w", dir, err)
	}
}

// whyBusy says what keeps a cgroup from being removed: its processes (of
// the cgroup itself or below it), or child cgroups.
func whyBusy(dir string) string {
	var why []string
	if b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs")); err == nil {
		pids := strings.Fields(string(b))
		if len(pids) > 0 {
			shown := pids
			if len(shown) > 10 {
				shown = shown[:10]
			}
			more := ""
			if len(pids) > len(shown) {
				more = fmt.Sprintf(" and %d more", len(pids)-len(shown))
			}
			noun := "processes"
			if len(pids) == 1 {
				noun = "process"
			}
			why = append(why, fmt.Sprintf("%d %s still in it (pid %s%s); they keep running, and mpvpn no longer routes them", len(pids), noun, strings.Join(shown, " "), more))
		}
	}
	if ents, err := os.ReadDir(dir); err == nil {
		var kids []string
		for _, e := range ents {
			if e.IsDir() {
				kids = append(kids, e.Name())
			}
		}
		if len(kids) > 0 {
			why = append(why, "it has child cgroups mpvpn did not create ("+strings.Join(kids, ", ")+")")
		}
	}
	if len(why) == 0 {
		if populated(dir) {
			return "processes are still in it"
		}
		return "the kernel refused to remove it (busy)"
	}
	return strings.Join(why, "; ")
}

// populated reads cgroup.events: "populated 1" when the cgroup or any
// cgroup below it has a live process.
func populated(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		if l == "populated 1" {
			return true
		}
	}
	return false
}
