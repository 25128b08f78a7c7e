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
// 0700) if missing and making the socket mode 0600. If a socket file is
// already there and something answers on it, Listen fails: another mpvpn
// is running. If nothing answers, the file is left over and is replaced.
// Any other file at path is an error, not something to delete.
func Listen(path string) (*Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("control socket directory: %w", err)
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	// bind fails with EADDRINUSE if the file appeared since removeStale,
	// so two mpvpns starting together cannot both own the path.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	// We remove the file ourselves, and only if it is still ours.
	ln.SetUnlinkOnClose(false)
	// Until this chmod the mode is 0777 &^ umask; peerAllowed covers that
	// instant.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		os.Remove(path)
		return nil, fmt.Errorf("control socket: %w", err)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return &Listener{path: path, ln: ln, fi: fi}, nil
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
