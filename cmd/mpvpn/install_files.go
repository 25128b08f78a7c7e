//go:build linux

package main

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// A change is one file install writes: content with a mode, or a symlink.
type change struct {
	path string      // in the installed system
	data []byte      // content, for a regular file
	mode fs.FileMode // its permissions
	link string      // the target, for a symlink
	note string      // what to say when it is written
}

// state of a path before install: whether it is there, whether install
// wrote it, and whether it already is what install would write.
type state struct {
	exists, ours, same bool
}

// stateOf looks at what is at p (in the tree) now; ours decides whether an
// existing regular file's content is install's.
func stateOf(p string, ch change, ours func([]byte) bool) (state, error) {
	fi, err := os.Lstat(p)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
		return state{}, nil // (ENOTDIR: a parent is a file, which mkdirs reports)
	}
	if err != nil {
		return state{}, err
	}
	st := state{exists: true}
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		target, err := os.Readlink(p)
		if err != nil {
			return state{}, err
		}
		// A symlink is install's when it is the one install makes.
		st.ours = ch.link != "" && target == ch.link
		st.same = st.ours
	case fi.Mode().IsRegular():
		b, err := os.ReadFile(p)
		if err != nil {
			return state{}, err
		}
		st.ours = ours(b)
		st.same = ch.link == "" && bytes.Equal(b, ch.data) && fi.Mode().Perm() == ch.mode
	}
	return st, nil
}

// rollback undoes, newest first, what a failed install did so far.
type rollback []func() error

func (r *rollback) add(f func() error) { *r = append(*r, f) }

func (r rollback) run() error {
	var errs []error
	for i := len(r) - 1; i >= 0; i-- {
		errs = append(errs, r[i]())
	}
	return errors.Join(errs...)
}

// mkdirs makes dir and its missing parents with mode (whatever the umask),
// and remembers to remove the ones it made.
func mkdirs(dir string, mode fs.FileMode, undo *rollback) error {
	if fi, err := os.Stat(dir); err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("%s: not a directory", dir)
		}
		return nil
	}
	if err := mkdirs(filepath.Dir(dir), 0o755, undo); err != nil {
		return err
	}
	if err := os.Mkdir(dir, mode); err != nil {
		return err
	}
	undo.add(func() error { return os.Remove(dir) })
	return os.Chmod(dir, mode)
}

// put writes ch at p atomically (a temporary file renamed over it, so a
// crash leaves the old file or the new one, never half of one), and
// remembers how to put back what was there.
func put(p string, ch change, undo *rollback) error {
	restore, err := saved(p)
	if err != nil {
		return err
	}
	tmp := p + ".mpvpn-install"
	os.Remove(tmp)
	if ch.link != "" {
		err = os.Symlink(ch.link, tmp)
	} else {
		err = writeSynced(tmp, ch.data, ch.mode)
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	undo.add(restore)
	return syncDir(filepath.Dir(p))
}

// saved returns what puts back p as it is now: its content and mode, its
// symlink, or its absence.
func saved(p string) (func() error, error) {
	fi, err := os.Lstat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return func() error { return os.Remove(p) }, nil
	}
	if err != nil {
		return nil, err
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		target, err := os.Readlink(p)
		if err != nil {
			return nil, err
		}
		return func() error { return put(p, change{link: target}, &rollback{}) }, nil
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file", p)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	return func() error { return put(p, change{data: b, mode: fi.Mode().Perm()}, &rollback{}) }, nil
}

func writeSynced(p string, data []byte, mode fs.FileMode) error {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode) // not what the umask left of it
	}
	if err == nil {
		err = f.Sync()
	}
	return errors.Join(err, f.Close())
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	return errors.Join(d.Sync(), d.Close())
}
