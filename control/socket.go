//go:build linux

package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	// maxRequest bounds a request line, newline included.
	maxRequest = 64
	// connTimeout bounds one connection, request and answer together.
	connTimeout = time.Second
	// maxConns bounds the connections answered at once; more are closed
	// unanswered. `mpvpn status --watch` needs one.
	maxConns = 16
	// maxResponse bounds what Fetch reads: a concentrator with many peers
	// answers a few hundred bytes each.
	maxResponse = 16 << 20
	// probeTimeout is how long Listen waits for an existing socket to
	// answer before calling it stale.
	probeTimeout = 500 * time.Millisecond
	// fetchTimeout applies when Fetch's context has no deadline.
	fetchTimeout = 5 * time.Second
	// maxSocketPath is the longest path bind takes: Linux's sun_path is
	// 108 bytes, its terminating NUL included.
	maxSocketPath = 107
)

// RequestStatus is the one request the socket understands.
const RequestStatus = "status"

// Listener is a bound status socket, not yet answering.
type Listener struct {
	path string
	ln   *net.UnixListener
	fi   os.FileInfo // the socket file we created, to remove only that one

	closeOnce sync.Once
	closeErr  error
}

// Listen binds the status socket at path, creating its directory (mode
// 0700) if missing, with the socket mode 0600. The directory must be a
// real directory (not a symlink), owned by root or by us, and writable by
// nobody else: otherwise whoever can write to it could swap the socket
// for their own, or plant a symlink where we create it. If a socket file
// is already at path and something answers on it, Listen fails: another
// mpvpn is running. If nothing answers, the file is left over and is
// replaced. Any other file at path is an error, not something to delete.
func Listen(path string) (*Listener, error) {
	if len(path) > maxSocketPath {
		// bindPrivate would bind, but nobody could connect.
		return nil, fmt.Errorf("control socket path %s is too long: a unix socket path has at most %d bytes", path, maxSocketPath)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("control socket directory: %w", err)
	}
	if err := checkDir(dir); err != nil {
		return nil, err
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	return bindPrivate(path)
}

// checkDir refuses a directory that someone other than root and us could
// change: a symlink (its target is someone's choice), another user's, or
// one that group or others may write to. Sticky /tmp is refused too: its
// other users cannot remove our socket, but they can take its name first.
func checkDir(dir string) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("control socket directory: %w", err)
	}
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		return fmt.Errorf("control socket directory %s is a symlink; give a path in a real directory (e.g. /run/mpvpn)", dir)
	case !fi.IsDir():
		return fmt.Errorf("control socket directory %s is not a directory", dir)
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("control socket directory %s has mode %04o: it must not be writable by group or others (chmod go-w %s, or use another directory)", dir, fi.Mode().Perm(), dir)
	}
	if uid, ok := fileOwner(fi); ok && !uidAllowed(uid, os.Geteuid()) {
		return fmt.Errorf("control socket directory %s belongs to uid %d, not to root or to us (uid %d)", dir, uid, os.Geteuid())
	}
	return nil
}

// bindPrivate binds the socket in a private directory of its own, makes it
// 0600 there, and links it into place.
//
// Why not the alternatives (checked 2026-12-01, issue 8): binding at path
// and then chmod, as before, follows a symlink swapped in after bind and
// changes its target's mode. fchmod on the socket's fd changes the
// socket's own inode, not the file bind made. fchmodat with
// AT_SYMLINK_NOFOLLOW is fchmodat2, Linux 6.6; before it x/sys answers
// EOPNOTSUPP, and Debian 12 (6.1) and Ubuntu 22.04 (5.15) are older. A
// umask around bind is process-wide: a file or directory another
// goroutine creates meanwhile would get it too, and no mutex of ours
// stops other packages. In a 0700 directory of our
// own no one but root can reach the socket while its mode is still
// 0777&^umask, so its chmod is safe; link(2) then gives it its name, with
// its mode already 0600. link never follows a symlink at the new name and
// fails if the name is taken, so, as bind did, it keeps two mpvpns
// starting together from both owning the path.
func bindPrivate(path string) (*Listener, error) {
	tmpDir, err := os.MkdirTemp(filepath.Dir(path), ".mpvpn-")
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	// Only the socket is ever in tmpDir; on every return it is removed,
	// along with the name the socket had there.
	defer os.RemoveAll(tmpDir)
	tmp := filepath.Join(tmpDir, "s")
	if len(tmp) > maxSocketPath {
		return nil, fmt.Errorf("control socket path %s is too long: binding needs a temporary name of %d bytes in its directory, and a unix socket path has at most %d", path, len(tmp), maxSocketPath)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	// We remove the file ourselves, by its public name and only if it is
	// still ours; the temporary name goes with tmpDir.
	ln.SetUnlinkOnClose(false)
	fi, err := bindFinish(tmp, path)
	if err != nil {
		ln.Close()
		return nil, err
	}
	return &Listener{path: path, ln: ln, fi: fi}, nil
}

// bindFinish makes the socket file at tmp 0600 and links it at path.
func bindFinish(tmp, path string) (os.FileInfo, error) {
	if err := os.Chmod(tmp, 0o600); err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	fi, err := os.Lstat(tmp)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Link(tmp, path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("control socket %s appeared while binding: another mpvpn is starting", path)
		}
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return fi, nil
}

// removeStale removes a socket file at path that nothing answers on.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("control socket: %s exists and is not a socket", path)
	}
	c, err := net.DialTimeout("unix", path, probeTimeout)
	if err == nil {
		c.Close()
		return fmt.Errorf("another mpvpn is running: its control socket %s answers", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		// A timeout (a live but busy listener), EACCES: not provably stale.
		return fmt.Errorf("control socket %s exists and cannot be checked: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing stale control socket: %w", err)
	}
	return nil
}

// Path is where the socket is bound.
func (l *Listener) Path() string { return l.path }

// Close stops listening and removes the socket file, unless another process
// has replaced it since. Serve calls it on return; call it yourself when
// Serve is never reached.
func (l *Listener) Close() error {
	l.closeOnce.Do(func() {
		if err := l.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			l.closeErr = err
		}
		if fi, err := os.Lstat(l.path); err == nil && os.SameFile(fi, l.fi) {
			if err := os.Remove(l.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
				l.closeErr = errors.Join(l.closeErr, err)
			}
		}
	})
	return l.closeErr
}

// Serve answers status requests with get() until ctx is done, then closes
// the listener, waits for the connections in progress (each is bounded by
// connTimeout) and returns nil. get is called once per request, from
// several goroutines at once if requests overlap. A nil log discards.
func (l *Listener) Serve(ctx context.Context, get func() Status, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer l.Close()
	stop := context.AfterFunc(ctx, func() { l.ln.Close() })
	defer stop()

	sem := make(chan struct{}, maxConns)
	backoff := 5 * time.Millisecond
	for {
		c, err := l.ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("control socket closed: %w", err)
			}
			// EMFILE and the like: wait and try again, as net/http does.
			log.Warn("control socket accept", "err", err)
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return nil
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		select {
		case sem <- struct{}{}:
		default:
			log.Debug("control socket busy, connection dropped")
			c.Close()
			continue
		}
		wg.Go(func() {
			defer func() { <-sem }()
			handle(c, get, log)
		})
	}
}

// handle answers one connection.
func handle(c *net.UnixConn, get func() Status, log *slog.Logger) {
	defer c.Close()
	if err := peerAllowed(c); err != nil {
		log.Warn("control socket: connection refused", "err", err)
		return
	}
	c.SetDeadline(time.Now().Add(connTimeout))
	req, err := bufio.NewReaderSize(io.LimitReader(c, maxRequest), maxRequest).ReadString('\n')
	if err != nil {
		log.Debug("control socket: bad request", "err", err)
		return
	}
	enc := json.NewEncoder(c)
	switch req = strings.TrimRight(req, "\r\n"); req {
	case RequestStatus:
		err = enc.Encode(get())
	default:
		err = enc.Encode(errorReply{Error: fmt.Sprintf("unknown request %q", req)})
	}
	if err != nil {
		log.Debug("control socket: answer", "err", err)
	}
}

type errorReply struct {
	Error string `json:"error"`
}

// Fetch asks the mpvpn listening at path for its Status. Without a deadline
// in ctx it gives up after a few seconds.
func Fetch(ctx context.Context, path string) (Status, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, fetchTimeout)
		defer cancel()
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return Status{}, fmt.Errorf("no mpvpn running (no control socket at %s)", path)
	case errors.Is(err, syscall.ECONNREFUSED):
		return Status{}, fmt.Errorf("no mpvpn running (nothing answers on the control socket at %s)", path)
	case errors.Is(err, fs.ErrPermission):
		return Status{}, fmt.Errorf("mpvpn status needs root (permission denied on %s)", path)
	case err != nil:
		return Status{}, fmt.Errorf("control socket: %w", err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	if _, err := io.WriteString(c, RequestStatus+"\n"); err != nil {
		return Status{}, fetchErr(ctx, path, err)
	}
	body, err := io.ReadAll(io.LimitReader(c, maxResponse+1))
	if err != nil {
		return Status{}, fetchErr(ctx, path, err)
	}
	if len(body) > maxResponse {
		return Status{}, fmt.Errorf("control socket %s: answer longer than %d bytes", path, maxResponse)
	}
	if len(body) == 0 {
		// The server closes without a word when it refuses our credentials.
		return Status{}, fmt.Errorf("control socket %s: closed without an answer (mpvpn status needs root)", path)
	}
	var reply struct {
		Status
		errorReply
	}
	if err := json.Unmarshal(body, &reply); err != nil {
		return Status{}, fmt.Errorf("control socket %s: bad answer: %w", path, err)
	}
	if reply.Error != "" {
		return Status{}, fmt.Errorf("control socket %s: %s", path, reply.Error)
	}
	return reply.Status, nil
}

func fetchErr(ctx context.Context, path string, err error) error {
	if ctx.Err() != nil {
		err = ctx.Err()
	}
	return fmt.Errorf("control socket %s: %w", path, err)
}

// Serve is Listen followed by Serve, for a caller that has nothing to do in
// between.
func Serve(ctx context.Context, path string, get func() Status, log *slog.Logger) error {
	l, err := Listen(path)
	if err != nil {
		return err
	}
	return l.Serve(ctx, get, log)
}

// uidAllowed is the rule peerAllowed applies: root, or the user we run as.
func uidAllowed(peer uint32, self int) bool {
	return peer == 0 || int64(peer) == int64(self)
}
