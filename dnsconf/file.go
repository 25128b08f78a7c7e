//go:build linux

package dnsconf

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// header is the first line of the file mpvpn writes, for whoever finds it.
const header = "# written by mpvpn; restored when it stops (mpvpn down)\n"

// glibcMaxNS is how many nameserver lines glibc's resolver reads (MAXNS);
// the rest are ignored.
const glibcMaxNS = 3

// render is the resolv.conf mpvpn writes: its servers and nothing else.
// No search domains, as mpvpn has none to give; edns0 because mpvpn's
// resolver takes answers larger than 512 bytes.
func render(servers []netip.Addr) []byte {
	var b bytes.Buffer
	b.WriteString(header)
	for _, a := range servers {
		fmt.Fprintf(&b, "nameserver %s\n", a) // a zone (fe80::1%tun0) is kept: glibc reads it
	}
	b.WriteString("options edns0\n")
	return b.Bytes()
}

// snapshot is what is at a path: nothing, a symlink, a regular file, or
// something else (a directory...) that mpvpn will not touch.
type snapshot struct {
	exists  bool
	other   bool // neither a regular file nor a symlink
	symlink string
	content []byte
	perm    uint32
	uid     int
	gid     int
}

// look reads what is at path without following a symlink. A regular file
// is read through the descriptor it was checked on, so that its content
// and mode belong to the same file even if it is renamed over meanwhile.
func look(path string) (snapshot, error) {
	// O_NONBLOCK: a FIFO put there would otherwise block the open.
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, unix.ENOENT):
		return snapshot{}, nil
	case errors.Is(err, unix.ELOOP):
		target, err := os.Readlink(path)
		if err != nil {
			return snapshot{}, fmt.Errorf("dnsconf: %w", err)
		}
		return snapshot{exists: true, symlink: target}, nil
	case err != nil:
		return snapshot{}, fmt.Errorf("dnsconf: open %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return snapshot{}, fmt.Errorf("dnsconf: stat %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return snapshot{exists: true, other: true}, nil
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return snapshot{}, fmt.Errorf("dnsconf: read %s: %w", path, err)
	}
	return snapshot{exists: true, content: b, perm: st.Mode & 0o7777, uid: int(st.Uid), gid: int(st.Gid)}, nil
}

// isOriginal says whether s is what st recorded as there before.
func (s snapshot) isOriginal(st State) bool {
	switch {
	case !st.Existed:
		return !s.exists
	case st.Symlink != "":
		return s.symlink == st.Symlink
	default:
		return s.exists && !s.other && s.symlink == "" && bytes.Equal(s.content, st.Before)
	}
}

// isMpvpns says whether s is the file Apply wrote.
func (s snapshot) isMpvpns(st State) bool {
	return s.exists && !s.other && s.symlink == "" && bytes.Equal(s.content, st.Wrote)
}

func prepareFile(path string, servers []netip.Addr, log *slog.Logger) (State, error) {
	now, err := look(path)
	if err != nil {
		return State{}, err
	}
	if now.other {
		return State{}, fmt.Errorf("dnsconf: %s is neither a regular file nor a symlink; not touching it", path)
	}
	if len(servers) > glibcMaxNS {
		log.Warn("dnsconf: glibc reads only the first nameservers of resolv.conf", "max", glibcMaxNS, "servers", servers)
	}
	if bytes.HasPrefix(now.content, []byte(header)) {
		// A run whose journal was lost left its file behind. It is
		// recorded as the original all the same: guessing what was
		// there before would be worse.
		log.Warn("dnsconf: resolv.conf already holds a file mpvpn wrote; it will be put back as it is", "path", path)
	}
	return State{
		Backend: File,
		Servers: servers,
		Path:    path,
		Existed: now.exists,
		Symlink: now.symlink,
		Before:  now.content,
		Perm:    now.perm,
		UID:     now.uid,
		GID:     now.gid,
		Wrote:   render(servers),
	}, nil
}

func applyFile(st State, log *slog.Logger) error {
	if st.Path == "" || len(st.Wrote) == 0 {
		return errors.New("dnsconf: apply: the state names no resolv.conf path or content")
	}
	now, err := look(st.Path)
	if err != nil {
		return err
	}
	switch {
	case now.isMpvpns(st):
		return nil // Apply again, after an error further on
	case !now.isOriginal(st):
		// The journal holds another original than the one there now:
		// Undo would not give back what this overwrote.
		return fmt.Errorf("dnsconf: %s changed since it was read; prepare again", st.Path)
	}
	// 0644: every program resolving names reads the file, whatever mode
	// the original had; the original's mode comes back with it.
	how, err := put(st.Path, st.Wrote, 0o644, -1, -1, true)
	if err != nil {
		return err
	}
	log.Info("dnsconf: resolv.conf sends DNS to mpvpn", "path", st.Path, "servers", st.Servers, "how", how)
	return nil
}

func undoFile(st State, log *slog.Logger) (string, error) {
	if st.Path == "" {
		return "", errors.New("dnsconf: undo: the state names no resolv.conf path")
	}
	now, err := look(st.Path)
	if err != nil {
		return "", err
	}
	// Between this look and the rename below a DHCP client could still
	// write its own file, and lose it; no file API closes that window.
	switch {
	case now.isOriginal(st):
		return fmt.Sprintf("%s is as it was before mpvpn; nothing to undo", st.Path), nil
	case !now.exists:
		return fmt.Sprintf("%s was removed by someone else since; left as it is", st.Path), nil
	case !now.isMpvpns(st):
		return fmt.Sprintf("%s was rewritten by someone else since; left as it is", st.Path), nil
	}

	switch {
	case !st.Existed:
		if err := os.Remove(st.Path); err != nil {
			return "", fmt.Errorf("dnsconf: remove %s, which mpvpn created: %w", st.Path, err)
		}
		if err := syncDir(filepath.Dir(st.Path)); err != nil {
			return "", err
		}
		return fmt.Sprintf("removed %s, which mpvpn had created", st.Path), nil
	case st.Symlink != "":
		if err := replaceWith(st.Path, func(tmp string) error { return os.Symlink(st.Symlink, tmp) }); err != nil {
			return "", err
		}
		return fmt.Sprintf("restored %s (a symlink to %s)", st.Path, st.Symlink), nil
	}
	how, err := put(st.Path, st.Before, st.Perm, st.UID, st.GID, true)
	if err != nil {
		return "", err
	}
	log.Debug("dnsconf: resolv.conf restored", "path", st.Path, "how", how)
	return fmt.Sprintf("restored %s", st.Path), nil
}

// put makes path a regular file holding data, and says how. Normally a
// temporary file in the same directory is renamed over it, so that
// readers see the old file or the new one, never half of one; this also
// replaces a symlink by a file, leaving the symlink's target alone. A path
// that is a mount point (`ip netns exec` bind-mounts
// /etc/netns/NAME/resolv.conf over /etc/resolv.conf; containers do the
// same) cannot be renamed over (EBUSY), so it is written in place and
// keeps its mode and owner. detectMount off leaves that to the EBUSY
// (tests use it to reach that path).
//
// uid or gid -1 leaves the new file's owner as this process.
func put(path string, data []byte, perm uint32, uid, gid int, detectMount bool) (string, error) {
	if detectMount && isMountPoint(path) {
		return "in place (a mount point)", writeInPlace(path, data)
	}
	err := replaceWith(path, func(tmp string) error { return writeNew(tmp, data, perm, uid, gid) })
	if errors.Is(err, unix.EBUSY) {
		return "in place (rename: busy)", writeInPlace(path, data)
	}
	return "renamed over", err
}

// isMountPoint says whether path (not followed if a symlink) is on another
// mount than its directory: a bind mount of a file within one file system
// keeps st_dev, so the mount ID is compared, and st_dev only where statx
// has no mount ID. An error is no: then the rename's EBUSY decides.
func isMountPoint(path string) bool {
	var p, d unix.Statx_t
	if unix.Statx(unix.AT_FDCWD, path, unix.AT_SYMLINK_NOFOLLOW, unix.STATX_MNT_ID, &p) != nil ||
		unix.Statx(unix.AT_FDCWD, filepath.Dir(path), 0, unix.STATX_MNT_ID, &d) != nil {
		return false
	}
	if p.Mask&d.Mask&unix.STATX_MNT_ID != 0 {
		return p.Mnt_id != d.Mnt_id
	}
	return p.Dev_major != d.Dev_major || p.Dev_minor != d.Dev_minor
}

// writeInPlace overwrites the file at path (it must exist) with data and
// syncs it. A crash in the middle leaves a partial file: the journal
// still holds the original.
func writeInPlace(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return fmt.Errorf("dnsconf: write %s in place: %w", path, err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("dnsconf: write %s in place: %w", path, err)
	}
	return nil
}

// writeNew creates the file tmp (which must not exist) with data, mode
// perm and the given owner, and syncs it.
func writeNew(tmp string, data []byte, perm uint32, uid, gid int) error {
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = func() error {
		// Fchmod, not the open's mode: the umask must not change it, and
		// setuid/setgid/sticky bits, should a file have them, come back too.
		if err := unix.Fchmod(int(f.Fd()), perm); err != nil {
			return err
		}
		if uid >= 0 && gid >= 0 {
			fi, err := f.Stat()
			if err != nil {
				return err
			}
			if st, ok := fi.Sys().(*unix.Stat_t); !ok || int(st.Uid) != uid || int(st.Gid) != gid {
				if err := f.Chown(uid, gid); err != nil {
					return err
				}
			}
		}
		if _, err := f.Write(data); err != nil {
			return err
		}
		return f.Sync()
	}()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// replaceWith makes a new entry with create at a fresh name beside path
// and renames it over path, then syncs the directory so the rename
// survives a power cut. The error wraps the rename's errno (EBUSY for a
// mount point).
func replaceWith(path string, create func(tmp string) error) error {
	dir := filepath.Dir(path)
	tmp := ""
	for range 10 {
		name := filepath.Join(dir, "."+filepath.Base(path)+".mpvpn-"+randomHex())
		err := create(name)
		if err == nil {
			tmp = name
			break
		}
		if !errors.Is(err, os.ErrExist) {
			os.Remove(name) // a partial entry of our own; never someone's existing one
			return fmt.Errorf("dnsconf: write %s: %w", name, err)
		}
	}
	if tmp == "" {
		return fmt.Errorf("dnsconf: no free temporary name in %s", dir)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("dnsconf: replace %s: %w", path, err)
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("dnsconf: sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("dnsconf: sync %s: %w", dir, err)
	}
	return nil
}

func randomHex() string {
	var b [8]byte
	rand.Read(b[:]) // never fails (crypto/rand, Go ≥ 1.24)
	return hex.EncodeToString(b[:])
}
