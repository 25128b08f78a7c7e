//go:build linux

package sysctl

import (
	"os"
	"path/filepath"
	"testing"
)

func TestChangesRestore(t *testing.T) {
	dir := t.TempDir()
	root := Root(dir)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(dir, "net/mptcp"), 0o755))
	must(os.WriteFile(filepath.Join(dir, "net/mptcp/blackhole_timeout"), []byte("3600\n"), 0o644))
	must(os.WriteFile(filepath.Join(dir, "net/mptcp/enabled"), []byte("1\n"), 0o644))

	c := &Changes{Root: root}
	tests := []struct{ name, value string }{
		{"net.mptcp.blackhole_timeout", "0"},
		{"net.mptcp.blackhole_timeout", "5"}, // second change: the original is still what is restored
		{"net.mptcp.enabled", "1"},           // unchanged: nothing to restore
	}
	for _, tc := range tests {
		must(c.Set(tc.name, tc.value))
		if got, _ := root.Get(tc.name); got != tc.value {
			t.Fatalf("%s = %q after Set, want %q", tc.name, got, tc.value)
		}
	}
	must(c.Restore())
	if got, _ := root.Get("net.mptcp.blackhole_timeout"); got != "3600" {
		t.Errorf("blackhole_timeout restored to %q, want 3600", got)
	}
	if _, err := root.Get("net.mptcp.missing"); err == nil {
		t.Error("Get of a missing setting: no error")
	}
	if err := c.Set("net.mptcp.missing", "1"); err == nil {
		t.Error("Set of a missing setting: no error")
	}
}

// TestChangesJournal: the old value is handed to Journal before the
// setting changes, and a Journal that fails leaves the setting alone.
func TestChangesJournal(t *testing.T) {
	dir := t.TempDir()
	root := Root(dir)
	os.MkdirAll(filepath.Join(dir, "net/mptcp"), 0o755)
	os.WriteFile(filepath.Join(dir, "net/mptcp/stale_loss_cnt"), []byte("4\n"), 0o644)
	var seen []string
	c := &Changes{Root: root, Journal: func(name, before string) error {
		now, _ := root.Get(name)
		seen = append(seen, name+"="+before+" (still "+now+")")
		return nil
	}}
	if err := c.Set("net.mptcp.stale_loss_cnt", "2"); err != nil {
		t.Fatal(err)
	}
	if err := c.Set("net.mptcp.stale_loss_cnt", "2"); err != nil { // no change: not journalled
		t.Fatal(err)
	}
	if len(seen) != 1 || seen[0] != "net.mptcp.stale_loss_cnt=4 (still 4)" {
		t.Fatalf("journalled %q, want the old value once, before the change", seen)
	}
	c.Journal = func(string, string) error { return os.ErrPermission }
	if err := c.Set("net.mptcp.stale_loss_cnt", "1"); err == nil {
		t.Fatal("Set went on although the journal failed")
	}
	if got, _ := root.Get("net.mptcp.stale_loss_cnt"); got != "2" {
		t.Fatalf("setting changed to %q although the journal failed", got)
	}
}

func TestChangesBounds(t *testing.T) {
	dir := t.TempDir()
	root := Root(dir)
	os.MkdirAll(filepath.Join(dir, "n"), 0o755)
	for _, tc := range []struct {
		start string
		op    func(c *Changes) error
		want  string
	}{
		{"4", func(c *Changes) error { return c.AtMost("n.x", 2) }, "2"},
		{"1", func(c *Changes) error { return c.AtMost("n.x", 2) }, "1"},
		{"30", func(c *Changes) error { return c.AtLeast("n.x", 60) }, "60"},
		{"90", func(c *Changes) error { return c.AtLeast("n.x", 60) }, "90"},
		{"2", func(c *Changes) error { return c.SetBits("n.x", 1) }, "3"},
		{"3", func(c *Changes) error { return c.SetBits("n.x", 1) }, "3"},
	} {
		os.WriteFile(filepath.Join(dir, "n/x"), []byte(tc.start+"\n"), 0o644)
		c := &Changes{Root: root}
		if err := tc.op(c); err != nil {
			t.Fatal(err)
		}
		if got, _ := root.Get("n.x"); got != tc.want {
			t.Errorf("from %s: %s, want %s", tc.start, got, tc.want)
		}
		c.Restore()
		if got, _ := root.Get("n.x"); got != tc.start {
			t.Errorf("restored to %s, want %s", got, tc.start)
		}
	}
	os.WriteFile(filepath.Join(dir, "n/x"), []byte("abc\n"), 0o644)
	if err := (&Changes{Root: root}).AtLeast("n.x", 1); err == nil {
		t.Error("a setting that is not a number was raised")
	}
}

// A name in path form reaches an interface whose name holds a dot.
func TestPathForm(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "net/ipv4/conf/eth0.100"), 0o755)
	os.WriteFile(filepath.Join(dir, "net/ipv4/conf/eth0.100/rp_filter"), []byte("1\n"), 0o644)
	if v, err := Root(dir).Get("net/ipv4/conf/eth0.100/rp_filter"); err != nil || v != "1" {
		t.Fatalf("path form: %q, %v", v, err)
	}
}
