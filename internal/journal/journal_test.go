//go:build linux

package journal

import (
	"bufio"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestJournal(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "client.journal")
	j, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	want := []Entry{
		{Kind: "sysctl", Name: "net.mptcp.blackhole_timeout", Before: "3600"},
		{Kind: "routing", Data: json.RawMessage(`{"table":7200}`)},
	}
	for _, e := range want {
		if err := j.Record(e); err != nil {
			t.Fatal(err)
		}
	}
	if err := j.Record(Entry{}); err == nil {
		t.Error("an entry without a kind was recorded")
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("journal mode %v, %v; want 0600", fi.Mode(), err)
	}
	if di, _ := os.Stat(filepath.Dir(path)); di.Mode().Perm() != 0o700 {
		t.Errorf("journal directory mode %v, want 0700", di.Mode())
	}

	st, err := Inspect(path)
	if err != nil {
		t.Fatal(err)
	}
	if !st.Exists || !st.Live || st.PID != os.Getpid() || st.Torn {
		t.Fatalf("Inspect of a live journal: %+v", st)
	}
	if len(st.Entries) != 2 || st.Entries[0].Name != want[0].Name || string(st.Entries[1].Data) != string(want[1].Data) {
		t.Fatalf("entries %+v, want %+v", st.Entries, want)
	}
	if _, err := Open(path); !errors.Is(err, ErrLocked) {
		t.Fatalf("a second Open of a live journal: %v, want ErrLocked", err)
	}
	if err := Remove(path); !errors.Is(err, ErrLocked) {
		t.Fatalf("Remove of a live journal: %v, want ErrLocked", err)
	}

	if err := j.Discard(); err != nil {
		t.Fatal(err)
	}
	if st, _ := Inspect(path); st.Exists {
		t.Fatal("the journal is still there after Discard")
	}
	if err := j.Record(Entry{Kind: "x"}); err == nil {
		t.Error("Record after Discard succeeded")
	}
}

// TestJournalKept: a journal kept (or left by a crash) is not live; a new
// Open refuses to append to it until it has been removed.
func TestJournalKept(t *testing.T) {
	path := filepath.Join(t.TempDir(), "client.journal")
	j, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	j.Record(Entry{Kind: "sysctl", Name: "a", Before: "1"})
	if err := j.Keep(); err != nil {
		t.Fatal(err)
	}
	st, err := Inspect(path)
	if err != nil || !st.Exists || st.Live || len(st.Entries) != 1 {
		t.Fatalf("Inspect of a kept journal: %+v, %v", st, err)
	}
	if _, err := Open(path); err == nil || errors.Is(err, ErrLocked) {
		t.Fatalf("Open over a kept journal: %v, want an error that is not ErrLocked", err)
	}
	if err := Remove(path); err != nil {
		t.Fatal(err)
	}
	j2, err := Open(path)
	if err != nil {
		t.Fatalf("Open after Remove: %v", err)
	}
	j2.Discard()
}

// TestJournalTorn: a last line cut short by a crash is left out, and
// said so; a line that is not an entry is an error.
func TestJournalTorn(t *testing.T) {
	dir := t.TempDir()
	torn := filepath.Join(dir, "torn")
	os.WriteFile(torn, []byte(`{"kind":"owner","data":{"pid":1}}`+"\n"+`{"kind":"sysctl","name":"a","before":"1"}`+"\n"+`{"kind":"sys`), 0o600)
	st, err := Inspect(torn)
	if err != nil || !st.Torn || len(st.Entries) != 1 || st.PID != 1 {
		t.Fatalf("torn journal: %+v, %v", st, err)
	}
	bad := filepath.Join(dir, "bad")
	os.WriteFile(bad, []byte("not json\n"), 0o600)
	if _, err := Inspect(bad); err == nil {
		t.Fatal("a journal of garbage was read")
	}
	if st, err := Inspect(filepath.Join(dir, "none")); err != nil || st.Exists {
		t.Fatalf("a missing journal: %+v, %v", st, err)
	}
}

// TestJournalAfterKill: a process killed with SIGKILL leaves its journal
// complete up to its last Record, and no longer live.
func TestJournalAfterKill(t *testing.T) {
	if os.Getenv("JOURNAL_CHILD") != "" {
		j, err := Open(os.Getenv("JOURNAL_CHILD"))
		if err != nil {
			os.Exit(2)
		}
		j.Record(Entry{Kind: "sysctl", Name: "net.mptcp.stale_loss_cnt", Before: "4"})
		os.Stdout.WriteString("recorded\n")
		time.Sleep(time.Minute)
		return
	}
	path := filepath.Join(t.TempDir(), "client.journal")
	cmd := exec.Command(os.Args[0], "-test.run=^TestJournalAfterKill$")
	cmd.Env = append(os.Environ(), "JOURNAL_CHILD="+path)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(out).ReadString('\n')
	if !strings.HasPrefix(line, "recorded") {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("child said %q", line)
	}
	if st, _ := Inspect(path); !st.Live || st.PID != cmd.Process.Pid {
		t.Fatalf("the child's journal while it runs: %+v", st)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	st, err := Inspect(path)
	if err != nil || !st.Exists || st.Live || len(st.Entries) != 1 || st.Entries[0].Before != "4" {
		t.Fatalf("the journal after kill -9: %+v, %v", st, err)
	}
}
