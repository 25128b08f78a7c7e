//go:build linux

package cgroup

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/internal/netnstest"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

// helperEnv makes the test binary a helper process instead of running the
// tests: "exec" calls Tree.Exec, "cgroup" prints /proc/self/cgroup, "wait"
// blocks until its stdin closes.
const helperEnv = "MPVPN_CGROUP_TEST_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
	case "exec":
		tree := Tree{Mount: os.Getenv("TREE_MOUNT"), Name: os.Getenv("TREE_NAME")}
		self, _ := os.Executable()
		os.Setenv(helperEnv, "cgroup")
		err := tree.Exec(Kind(os.Getenv("TREE_KIND")), []string{self})
		fmt.Fprintln(os.Stderr, "exec returned:", err)
		os.Exit(3)
	case "cgroup":
		b, err := os.ReadFile("/proc/self/cgroup")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Stdout.Write(b)
		os.Exit(0)
	case "wait":
		fmt.Println("ready")
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	default:
		fmt.Fprintln(os.Stderr, "unknown helper", os.Getenv(helperEnv))
		os.Exit(2)
	}
	goleak.VerifyTestMain(m)
}

func TestParseMountinfo(t *testing.T) {
	for _, tc := range []struct {
		name, in, want string
		err            string
	}{
		{
			name: "unified",
			in: `22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
`,
			want: "/sys/fs/cgroup",
		},
		{
			name: "hybrid (this project's test VM)",
			in: `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`,
			want: "/sys/fs/cgroup/unified",
		},
		{
			name: "optional fields and an escaped space",
			in:   `41 31 0:38 / /run/my\040cgroups rw,relatime shared:9 master:3 - cgroup2 none rw` + "\n",
			want: "/run/my cgroups",
		},
		{
			name: "a bind mount of a subtree first, then the whole tree",
			in: `50 31 0:38 /system.slice /mnt/slice rw,relatime - cgroup2 cgroup2 rw
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`,
			want: "/sys/fs/cgroup/unified",
		},
		{
			name: "only a subtree",
			in:   `50 31 0:38 /system.slice /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw` + "\n",
			err:  "holds only the subtree /system.slice",
		},
		{
			name: "cgroup v1 only",
			in:   `32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu` + "\n",
			err:  "no cgroup2 file system is mounted",
		},
		{name: "garbage", in: "not a mountinfo line\n\n- - -\n", err: "no cgroup2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseMountinfo(strings.NewReader(tc.in))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("got %q, %v; want an error containing %q", got, err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func TestCleanPath(t *testing.T) {
	for in, want := range map[string]string{
		"/":                              "/",
		"/system.slice/backup.service":   "/system.slice/backup.service",
		"/system.slice//backup.service/": "/system.slice/backup.service",
		"/a/./b":                         "/a/b",
	} {
		if got, err := CleanPath(in); err != nil || got != want {
			t.Errorf("CleanPath(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "system.slice", "/a/../b", "/.."} {
		if got, err := CleanPath(bad); err == nil {
			t.Errorf("CleanPath(%q) = %q, want an error", bad, got)
		}
	}
}

// testMount returns the host's cgroup2 mount, or fails/skips (see
// netnstest.CannotRun) when tests cannot make cgroups in it.
func testMount(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		netnstest.CannotRun(t, "needs root to create cgroups")
	}
	m, err := Mount()
	if err != nil {
		netnstest.CannotRun(t, "no cgroup2 hierarchy: %v", err)
	}
	return m
}

// testTree is a subtree of this test's own, <mount>/mpvpn-test-<random>,
// removed when the test ends (failed or not): processes left in it are
// killed through its cgroup.kill, which reaches that subtree only. Nothing
// else in the hierarchy is touched.
func testTree(t *testing.T) Tree {
	t.Helper()
	m := testMount(t)
	b := make([]byte, 6)
	rand.Read(b)
	tree := Tree{Mount: m, Name: "mpvpn-test-" + hex.EncodeToString(b)}
	t.Cleanup(func() { removeTestTree(t, tree) })
	return tree
}

func removeTestTree(t *testing.T, tree Tree) {
	t.Helper()
	if !strings.HasPrefix(tree.Name, "mpvpn-test-") {
		t.Fatalf("refusing to remove %s: not a test subtree", tree.Root())
	}
	root := tree.Root()
	if _, err := os.Stat(root); errors.Is(err, fs.ErrNotExist) {
		return
	}
	if populated(root) {
		if err := os.WriteFile(filepath.Join(root, "cgroup.kill"), []byte("1"), 0); err != nil {
			t.Errorf("kill the processes left in %s: %v", root, err)
		}
		for deadline := time.Now().Add(5 * time.Second); populated(root) && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
		}
	}
	// Deepest first: cgroupfs removes one empty directory at a time.
	var dirs []string
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	slices.SortFunc(dirs, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	for _, d := range dirs {
		if err := unix.Rmdir(d); err != nil && !errors.Is(err, unix.ENOENT) {
			t.Errorf("remove test cgroup %s: %v", d, err)
		}
	}
}

func TestMountIsCgroup2(t *testing.T) {
	m := testMount(t)
	var sfs unix.Statfs_t
	if err := unix.Statfs(m, &sfs); err != nil {
		t.Fatal(err)
	}
	if sfs.Type != cgroup2Magic {
		t.Fatalf("%s has f_type %#x, want CGROUP2_SUPER_MAGIC", m, sfs.Type)
	}
	t.Logf("cgroup2 is mounted at %s", m)
}

func TestResolve(t *testing.T) {
	tree := testTree(t)
	if _, err := tree.Setup(); err != nil {
		t.Fatal(err)
	}
	c, err := Resolve(tree.Mount, tree.Path(KindDirect))
	if err != nil {
		t.Fatal(err)
	}
	if c.Level != 2 || c.Path != tree.Path(KindDirect) || c.Dir != tree.Dir(KindDirect) {
		t.Errorf("Resolve = %+v, want level 2 at %s", c, tree.Dir(KindDirect))
	}
	var st unix.Stat_t
	if err := unix.Stat(tree.Dir(KindDirect), &st); err != nil {
		t.Fatal(err)
	}
	// On 64-bit kernels the cgroup id is the inode number.
	if unix.SizeofPtr == 8 && c.ID != st.Ino {
		t.Errorf("id %d, but the directory's inode is %d", c.ID, st.Ino)
	}
	top, err := Resolve(tree.Mount, "/"+tree.Name+"/")
	if err != nil || top.Level != 1 {
		t.Errorf("Resolve(top) = %+v, %v; want level 1", top, err)
	}
	root, err := Resolve(tree.Mount, "/")
	if err != nil || root.Level != 0 {
		t.Errorf("Resolve(/) = %+v, %v; want level 0", root, err)
	}
	if _, err := Resolve(tree.Mount, "/"+tree.Name+"/nope"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a missing cgroup: %v, want fs.ErrNotExist", err)
	}
	if _, err := Resolve(tree.Mount, "/"+tree.Name+"/tunnel/cgroup.procs"); err == nil {
		t.Errorf("a file resolved as a cgroup")
	}
	if _, err := Resolve(os.TempDir(), "/"); err == nil {
		t.Errorf("%s resolved as a cgroup2 mount", os.TempDir())
	}
}

func TestSetupCleanup(t *testing.T) {
	tree := testTree(t)
	made, err := tree.Setup()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"cgroup " + tree.Root(), "cgroup " + tree.Dir(KindTunnel), "cgroup " + tree.Dir(KindDirect), "cgroup " + tree.Dir(KindBlock)}
	if !slices.Equal(made, want) {
		t.Errorf("Setup made %q, want %q", made, want)
	}
	id1, err := Resolve(tree.Mount, tree.Path(KindTunnel))
	if err != nil {
		t.Fatal(err)
	}
	// Again: everything is there already, and is reused as it is.
	made, err = tree.Setup()
	if err != nil || len(made) != 0 {
		t.Errorf("second Setup: %q, %v; want nothing made", made, err)
	}
	id2, _ := Resolve(tree.Mount, tree.Path(KindTunnel))
	if id1.ID != id2.ID {
		t.Errorf("Setup replaced an existing cgroup (id %d, then %d)", id1.ID, id2.ID)
	}
	// Nothing enabled: mpvpn's cgroups need no controller.
	if b, err := os.ReadFile(filepath.Join(tree.Root(), "cgroup.subtree_control")); err != nil || strings.TrimSpace(string(b)) != "" {
		t.Errorf("cgroup.subtree_control of %s: %q, %v; want empty", tree.Root(), b, err)
	}
	removed, err := tree.Cleanup()
	if err != nil {
		t.Fatal(err)
	}
	wantRemoved := []string{"cgroup " + tree.Dir(KindTunnel), "cgroup " + tree.Dir(KindDirect), "cgroup " + tree.Dir(KindBlock), "cgroup " + tree.Root()}
	if !slices.Equal(removed, wantRemoved) {
		t.Errorf("Cleanup: %q, want %q", removed, wantRemoved)
	}
	if _, err := os.Stat(tree.Root()); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s is still there: %v", tree.Root(), err)
	}
	if again, err := tree.Cleanup(); err != nil || len(again) != 0 {
		t.Errorf("Cleanup of nothing: %q, %v; want nothing", again, err)
	}
}

// startWaiter starts a helper process that runs until the returned stop
// is called.
func startWaiter(t *testing.T) (*exec.Cmd, func()) {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"=wait")
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			in.Close()
			cmd.Wait()
		}
	}
	t.Cleanup(stop)
	line := make([]byte, 6)
	if _, err := io.ReadFull(out, line); err != nil || string(line) != "ready\n" {
		t.Fatalf("helper did not start: %q, %v", line, err)
	}
	return cmd, stop
}

// cgroupOf returns a process's cgroup v2 path (the "0::" line).
func cgroupOf(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok {
			return p
		}
	}
	t.Fatalf("no cgroup v2 line in /proc/%d/cgroup: %q", pid, b)
	return ""
}

func TestJoinAndCleanupKeepsBusy(t *testing.T) {
	tree := testTree(t)
	if _, err := tree.Setup(); err != nil {
		t.Fatal(err)
	}
	cmd, stop := startWaiter(t)
	pid := cmd.Process.Pid
	if err := tree.Join(KindDirect, pid); err != nil {
		t.Fatal(err)
	}
	if got := cgroupOf(t, pid); got != tree.Path(KindDirect) {
		t.Fatalf("after Join the helper is in %q, want %q", got, tree.Path(KindDirect))
	}
	lines, err := tree.Cleanup()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Cleanup with a process inside:\n  %s", strings.Join(lines, "\n  "))
	wantPrefix := []string{
		"cgroup " + tree.Dir(KindTunnel),
		fmt.Sprintf("cgroup %s kept: 1 process still in it (pid %d)", tree.Dir(KindDirect), pid),
		"cgroup " + tree.Dir(KindBlock),
		"cgroup " + tree.Root() + " kept:",
	}
	if len(lines) != len(wantPrefix) {
		t.Fatalf("Cleanup: %q, want %d lines like %q", lines, len(wantPrefix), wantPrefix)
	}
	for i := range lines {
		if !strings.HasPrefix(lines[i], wantPrefix[i]) {
			t.Errorf("line %d: %q, want it to start with %q", i, lines[i], wantPrefix[i])
		}
	}
	// The process was not moved, and its cgroup is still there.
	if got := cgroupOf(t, pid); got != tree.Path(KindDirect) {
		t.Errorf("Cleanup moved the process to %q", got)
	}
	if _, err := os.Stat(tree.Dir(KindDirect)); err != nil {
		t.Errorf("the busy cgroup went away: %v", err)
	}
	// Setup again reuses what was kept.
	if made, err := tree.Setup(); err != nil || len(made) != 2 {
		t.Errorf("Setup after a partial cleanup: %q, %v; want tunnel and block made again", made, err)
	}
	stop()
	lines, err = tree.Cleanup()
	if err != nil || len(lines) != 4 || strings.Contains(strings.Join(lines, " "), "kept") {
		t.Errorf("Cleanup once empty: %q, %v; want 4 removals", lines, err)
	}
}

func TestCleanupKeepsForeignChild(t *testing.T) {
	tree := testTree(t)
	if _, err := tree.Setup(); err != nil {
		t.Fatal(err)
	}
	foreign := filepath.Join(tree.Dir(KindTunnel), "somebody-else")
	if err := os.Mkdir(foreign, 0o755); err != nil {
		t.Fatal(err)
	}
	lines, err := tree.Cleanup()
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(lines, "\n")
	if !strings.Contains(joined, "cgroup "+tree.Dir(KindTunnel)+" kept: it has child cgroups mpvpn did not create (somebody-else)") {
		t.Errorf("Cleanup did not say why it kept tunnel:\n%s", joined)
	}
	if _, err := os.Stat(foreign); err != nil {
		t.Errorf("Cleanup removed a cgroup it did not create: %v", err)
	}
}

func TestExec(t *testing.T) {
	tree := testTree(t)
	if _, err := tree.Setup(); err != nil {
		t.Fatal(err)
	}
	for _, k := range Kinds {
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), helperEnv+"=exec", "TREE_MOUNT="+tree.Mount, "TREE_NAME="+tree.Name, "TREE_KIND="+string(k))
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s: %v: %s", k, err, stderr.Bytes())
		}
		if !strings.Contains(string(out), "0::"+tree.Path(k)+"\n") {
			t.Errorf("%s: the exec'd program is not in %s:\n%s", k, tree.Path(k), out)
		}
	}
}

func TestExecNoClient(t *testing.T) {
	m := testMount(t)
	tree := Tree{Mount: m, Name: "mpvpn-test-absent"}
	before := cgroupOf(t, os.Getpid())
	err := tree.Exec(KindTunnel, []string{os.Args[0]})
	if !errors.Is(err, ErrNotRunning) {
		t.Fatalf("Exec with no cgroups: %v, want ErrNotRunning", err)
	}
	want := "no mpvpn client is running (cgroup " + tree.Dir(KindTunnel) + " does not exist)"
	if err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
	if got := cgroupOf(t, os.Getpid()); got != before {
		t.Errorf("a failed Exec moved the test process from %s to %s", before, got)
	}
}

func TestExecBadCommand(t *testing.T) {
	tree := testTree(t)
	if _, err := tree.Setup(); err != nil {
		t.Fatal(err)
	}
	before := cgroupOf(t, os.Getpid())
	if err := tree.Exec(KindBlock, []string{"/nonexistent/mpvpn-test-command"}); err == nil {
		t.Fatal("Exec of a missing command returned nil")
	}
	if got := cgroupOf(t, os.Getpid()); got != before {
		t.Errorf("a failed Exec moved the test process from %s to %s", before, got)
	}
	if err := tree.Exec(KindBlock, nil); err == nil {
		t.Error("Exec with no argv returned nil")
	}
	if err := tree.Exec("sideways", []string{"true"}); err == nil {
		t.Error("Exec of an unknown kind returned nil")
	}
}

func TestJoinErrors(t *testing.T) {
	tree := testTree(t)
	if _, err := tree.Setup(); err != nil {
		t.Fatal(err)
	}
	if err := tree.Join("sideways", os.Getpid()); err == nil {
		t.Error("Join of an unknown kind returned nil")
	}
	if err := tree.Join(KindTunnel, 0); err == nil {
		t.Error("Join of pid 0 returned nil")
	}
	// A pid that does not exist: the kernel says ESRCH.
	if err := tree.Join(KindTunnel, 1<<22+12345); !errors.Is(err, unix.ESRCH) {
		t.Errorf("Join of a missing pid: %v, want ESRCH", err)
	}
	for _, name := range []string{"", "a/b", "cgroup.procs", ".."} {
		if _, err := (Tree{Mount: tree.Mount, Name: name}).Setup(); err == nil {
			t.Errorf("Setup with name %q returned nil", name)
		}
	}
}
