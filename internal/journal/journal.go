//go:build linux

// Package journal is the write-ahead record of what a running mpvpn
// changes on its host: each change is written down, and on disk, before
// it is made, so that a clean stop, `mpvpn down` and the next start can
// undo exactly what a run did (a crash or kill -9 included) and nothing
// of anybody else's.
//
// A journal is a file of JSON lines, one Entry each, the first naming the
// process that owns it. The owner holds an exclusive flock(2) on the file
// while it runs, so whoever finds the file can tell a live client from a
// crashed one: Open refuses a journal that is locked, and Inspect reports
// it. What an entry means and how it is undone is the caller's (package
// client); the journal only keeps entries in order and durable.
//
// Undo is newest first and must be idempotent: a change is recorded before
// it is attempted, so the last entries of a crashed run may name changes
// that never happened.
package journal

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// Entry is one change to the host. Kind says what it is; the other fields
// are the kind's own (Data is free-form JSON for kinds with more state).
type Entry struct {
	Kind   string          `json:"kind"`
	Name   string          `json:"name,omitempty"`
	Before string          `json:"before,omitempty"`
	Data   json.RawMessage `json:"data,omitempty"`
}

// KindOwner is the first entry of every journal: who wrote it, and when.
const KindOwner = "owner"

type owner struct {
	PID     int       `json:"pid"`
	Started time.Time `json:"started"`
}

// Journal is an open journal that this process owns.
type Journal struct {
	path string
	mu   sync.Mutex
	f    *os.File
	n    int // entries written, the owner's included
}

// ErrLocked is returned (wrapped) when another live process owns the
// journal.
var ErrLocked = errors.New("journal: held by a running process")

// Open creates the journal at path (its directory 0700, the file 0600)
// and takes its lock. A journal already there must first be dealt with by
// the caller (Inspect, undo, Remove): Open fails rather than append to
// another run's record. A journal locked by a live process is ErrLocked.
func Open(path string) (*Journal, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			if st, ierr := Inspect(path); ierr == nil && st.Live {
				return nil, fmt.Errorf("%w (pid %d, %s)", ErrLocked, st.PID, path)
			}
			return nil, fmt.Errorf("journal: %s is left by an earlier run; undo it first: %w", path, err)
		}
		return nil, fmt.Errorf("journal: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("journal: lock %s: %w", path, err)
	}
	j := &Journal{path: path, f: f}
	b, _ := json.Marshal(owner{PID: os.Getpid(), Started: time.Now()})
	if err := j.Record(Entry{Kind: KindOwner, Data: b}); err != nil {
		j.f.Close()
		os.Remove(path)
		return nil, err
	}
	// The directory entry itself must reach the disk too, or a power
	// cut could leave the changes without their journal.
	syncDir(filepath.Dir(path))
	return j, nil
}

// Path is where the journal is.
func (j *Journal) Path() string { return j.path }

// Record appends e and waits for it to be on disk: call it before making
// the change it describes.
func (j *Journal) Record(e Entry) error {
	if e.Kind == "" {
		return errors.New("journal: an entry without a kind")
	}
	b, err := json.Marshal(e)
	if err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.f == nil {
		return errors.New("journal: closed")
	}
	if _, err := j.f.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("journal: write %s: %w", j.path, err)
	}
	if err := j.f.Sync(); err != nil {
		return fmt.Errorf("journal: sync %s: %w", j.path, err)
	}
	j.n++
	return nil
}

// Discard removes the journal: everything it recorded has been undone
// (a clean stop). The lock goes with the file.
func (j *Journal) Discard() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.f == nil {
		return nil
	}
	err := os.Remove(j.path)
	syncDir(filepath.Dir(j.path))
	j.f.Close()
	j.f = nil
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("journal: %w", err)
	}
	return nil
}

// Keep closes the journal and leaves it on disk (and unlocked), for the
// next start or `mpvpn down` to undo: what a run does when it could not
// undo everything.
func (j *Journal) Keep() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.f == nil {
		return nil
	}
	err := j.f.Close()
	j.f = nil
	return err
}

// State is what Inspect found.
type State struct {
	Exists  bool
	Live    bool // a running process holds the lock
	PID     int
	Started time.Time
	Entries []Entry // the owner entry excluded, oldest first
	// Torn is true if the last line was cut short (a crash while it was
	// written); that entry is left out.
	Torn bool
}

// Inspect reads the journal at path without taking it over.
func Inspect(path string) (State, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return State{}, nil
	}
	if err != nil {
		return State{}, fmt.Errorf("journal: %w", err)
	}
	defer f.Close()
	st := State{Exists: true}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB); err != nil {
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			return State{}, fmt.Errorf("journal: lock %s: %w", path, err)
		}
		st.Live = true
	} else {
		defer syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	}
	r := bufio.NewReader(f)
	first := true
	for {
		line, err := r.ReadBytes('\n')
		if len(line) > 0 && line[len(line)-1] != '\n' {
			// The writer died in the middle of this line.
			st.Torn = true
			break
		}
		if len(line) > 0 {
			var e Entry
			if jerr := json.Unmarshal(line, &e); jerr != nil {
				return st, fmt.Errorf("journal: %s: a line is not an entry: %w", path, jerr)
			}
			if first && e.Kind == KindOwner {
				var o owner
				json.Unmarshal(e.Data, &o)
				st.PID, st.Started = o.PID, o.Started
			} else {
				st.Entries = append(st.Entries, e)
			}
			first = false
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return st, fmt.Errorf("journal: read %s: %w", path, err)
		}
	}
	return st, nil
}

// Remove deletes a journal that is not live, once what it lists has been
// undone.
func Remove(path string) error {
	st, err := Inspect(path)
	if err != nil {
		return err
	}
	if st.Live {
		return fmt.Errorf("%w (pid %d, %s)", ErrLocked, st.PID, path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("journal: %w", err)
	}
	syncDir(filepath.Dir(path))
	return nil
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}
