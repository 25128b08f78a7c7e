//go:build linux

package control

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/mpvpn/mpvpn/internal/netnstest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func clientStatus() Status {
	return Status{
		Role:    "client",
		Version: "v0.4.0",
		Started: t0,
		Server:  "203.0.113.7:443",
		Uplinks: []Uplink{
			{
				Name: "wlan0", State: StateUp, Addr: "192.168.1.20", Gateway: "192.168.1.1",
				Since: t0.Add(time.Minute), Transitions: 3,
				RxBytes: 3 << 30, TxBytes: 5 << 20, RxRate: 12_500_000, TxRate: 640_000,
				Subflows: 2, RTT: 23.4, Fallbacks: 1, ProbeAlive: true, ProbeRTT: 21.5,
			},
			{
				Name: "wwan0", State: StateDown, Reason: "probe lost", Backup: true,
				Addr: "10.64.1.2", Since: t0.Add(2 * time.Minute), Transitions: 7,
				RxBytes: 1536, TxBytes: 100,
			},
			{Name: "eth1", State: StateWithdrawn, Reason: "no carrier"},
		},
		Flows: Flows{Active: 4, Total: 120, Failed: 2, Rejected: 1, Fallbacks: 3, RxBytes: 3<<30 + 1536, TxBytes: 5<<20 + 100, Ciphers: []string{"aes-256-gcm", "chacha20-poly1305"}, AESGCM: 117},
		Stack: &Stack{InFlight: 6, SYNLimited: 51, TimeWaitRetired: 3},
	}
}

func serverStatus() Status {
	return Status{
		Role:    "server",
		Started: t0,
		Listen:  "0.0.0.0:443",
		Flows:   Flows{Active: 2, Total: 9},
		// Every counter its own value, so that a test can tell which
		// one it sees.
		Handshakes: &Handshakes{
			Accepted: 1234, HalfOpen: 3, Evicted: 5,
			Rejected: Rejected{
				Incomplete: 11, BadMAC: 12, BadHandshake: 13, UnknownPeer: 14,
				BadPayload: 15, BadTime: 16, Replayed: 17, ReplayFull: 18,
			},
			Limited: Limited{Peer: 21, Rate: 22, Server: 23, Files: 24},
		},
		Verdicts: &Verdicts{Connected: 31, Refused: 32, Unreachable: 33, TimedOut: 34, NotAllowed: 35},
		Peers: []Peer{
			{Key: "peerA", ActiveFlows: 2, TotalFlows: 7, LastSeen: t0.Add(time.Hour), Limited: 41, ReplayFull: 42},
			{Key: "peerB", TotalFlows: 2},
		},
	}
}

// serving starts Serve on a socket in a fresh directory and stops it when
// the test ends.
func serving(t *testing.T, get func() Status) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "run", "mpvpn", "client.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Serve(ctx, get, nil) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket file left behind: %v", err)
		}
	})
	return path
}

func TestRoundTrip(t *testing.T) {
	for _, want := range []Status{clientStatus(), serverStatus(), {Role: "client"}} {
		t.Run(want.Role, func(t *testing.T) {
			path := serving(t, func() Status { return want })
			got, err := Fetch(context.Background(), path)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("Fetch = %+v\nwant %+v", got, want)
			}
		})
	}
}

func TestJSONFieldNames(t *testing.T) {
	b, err := json.Marshal(clientStatus())
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{
		`"role"`, `"version"`, `"started"`, `"server"`, `"uplinks"`, `"flows"`,
		`"name"`, `"state"`, `"reason"`, `"backup"`, `"addr"`, `"gateway"`, `"since"`,
		`"transitions"`, `"rx_bytes"`, `"tx_bytes"`, `"rx_bps"`, `"tx_bps"`, `"subflows"`,
		`"rtt_ms"`, `"fallbacks"`, `"probe_alive"`, `"probe_rtt_ms"`,
		`"active"`, `"total"`, `"failed"`, `"rejected"`,
		`"stack"`, `"in_flight"`, `"syn_limited"`,
	} {
		if !strings.Contains(string(b), name+":") {
			t.Errorf("JSON lacks %s: %s", name, b)
		}
	}
	b, err = json.Marshal(serverStatus())
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for _, name := range []string{
		`"listen"`, `"peers"`, `"key"`, `"active_flows"`, `"total_flows"`, `"last_seen"`,
		`"limited"`, `"replay_full"`,
		`"handshakes"`, `"accepted"`, `"half_open"`, `"evicted"`, `"rejected"`,
		`"incomplete"`, `"bad_mac"`, `"bad_handshake"`, `"unknown_peer"`, `"bad_payload"`,
		`"bad_time"`, `"replayed"`, `"peer"`, `"rate"`, `"server"`,
		`"verdicts"`, `"connected"`, `"refused"`, `"unreachable"`, `"timed_out"`, `"not_allowed"`,
	} {
		if !strings.Contains(s, name+":") {
			t.Errorf("JSON lacks %s: %s", name, b)
		}
	}
	// peerB was never seen: no last_seen at all rather than year 1.
	if strings.Count(s, `"last_seen"`) != 1 || strings.Contains(s, `"uplinks"`) || strings.Contains(s, `"stack"`) {
		t.Errorf("server JSON: %s", b)
	}
	b, err = json.Marshal(clientStatus())
	if err != nil {
		t.Fatal(err)
	}
	if s := string(b); strings.Contains(s, `"handshakes"`) || strings.Contains(s, `"verdicts"`) {
		t.Errorf("client JSON has the server's sections: %s", b)
	}
}

// The names Counts gives, which the human output and the metrics' labels
// use, are the JSON's: one vocabulary for the operator.
func TestCountsNamesAreJSONNames(t *testing.T) {
	h := serverStatus().Handshakes
	for _, tt := range []struct {
		name   string
		v      any
		counts []Count
	}{
		{"rejected", h.Rejected, h.Rejected.Counts()},
		{"limited", h.Limited, h.Limited.Counts()},
		{"verdicts", *serverStatus().Verdicts, serverStatus().Verdicts.Counts()},
	} {
		b, err := json.Marshal(tt.v)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]uint64
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		got := make(map[string]uint64)
		for _, c := range tt.counts {
			got[c.Name] = c.Value
		}
		if !reflect.DeepEqual(got, m) || len(tt.counts) != len(m) {
			t.Errorf("%s: Counts %v, JSON %v", tt.name, got, m)
		}
	}
}

func TestSocketMode(t *testing.T) {
	path := serving(t, clientStatus)
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want socket 0600", fi.Mode())
	}
	di, err := os.Stat(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if di.Mode().Perm() != 0o700 {
		t.Errorf("directory mode %v, want 0700", di.Mode())
	}
}

func TestSecondListenFails(t *testing.T) {
	path := serving(t, clientStatus)
	l, err := Listen(path)
	if err == nil {
		l.Close()
		t.Fatal("second Listen on a live socket succeeded")
	}
	if !strings.Contains(err.Error(), "another mpvpn is running") {
		t.Errorf("error %q does not say another mpvpn is running", err)
	}
	// The first one still answers.
	if _, err := Fetch(context.Background(), path); err != nil {
		t.Errorf("first server no longer answers: %v", err)
	}
	// And Serve, the one-call form, fails the same way.
	if err := Serve(context.Background(), path, clientStatus, nil); err == nil {
		t.Error("Serve on a live socket succeeded")
	}
}

func TestStaleSocketReplaced(t *testing.T) {
	path := filepath.Join(t.TempDir(), "client.sock")
	// A socket file nobody listens on, as a crash leaves it.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatal(err)
	}
	if _, err := Fetch(context.Background(), path); err == nil || !strings.Contains(err.Error(), "no mpvpn running") {
		t.Errorf("Fetch on a stale socket: %v", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, path, clientStatus, nil) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	var got Status
	for deadline := time.Now().Add(5 * time.Second); ; {
		got, err = Fetch(context.Background(), path)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	if got.Server != clientStatus().Server {
		t.Errorf("got %+v", got)
	}
}

func TestListenRefusesOtherFiles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "client.sock")
	if err := os.WriteFile(path, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	if l, err := Listen(path); err == nil {
		l.Close()
		t.Fatal("Listen over a regular file succeeded")
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "precious" {
		t.Errorf("regular file touched: %q, %v", b, err)
	}
}

func TestCloseWithoutServe(t *testing.T) {
	path := filepath.Join(t.TempDir(), "client.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket file left behind: %v", err)
	}
}

func TestFetchErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope", "client.sock")
	_, err := Fetch(context.Background(), missing)
	if err == nil || !strings.Contains(err.Error(), "no mpvpn running (no control socket at "+missing+")") {
		t.Errorf("Fetch on a missing socket: %v", err)
	}

	// A server that hangs: Fetch gives up at the context's deadline.
	path := filepath.Join(t.TempDir(), "hang.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer ln.Close()
	wg.Go(func() {
		c, err := ln.Accept()
		if err == nil {
			time.Sleep(500 * time.Millisecond)
			c.Close()
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := Fetch(ctx, path); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Fetch on a hanging server: %v", err)
	}
	if d := time.Since(start); d > 400*time.Millisecond {
		t.Errorf("Fetch took %v past its deadline", d)
	}
}

func TestBadRequests(t *testing.T) {
	path := serving(t, clientStatus)
	tests := []struct {
		name, req, want string
	}{
		{"unknown", "stats\n", `{"error":"unknown request \"stats\""}`},
		{"too long", strings.Repeat("x", 1000) + "\n", ""},
		{"no newline", "status", ""}, // answered by the deadline: nothing
		{"crlf", "status\r\n", `"role":"client"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := net.Dial("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(3 * time.Second))
			c.Write([]byte(tt.req))
			var b strings.Builder
			start := time.Now()
			buf := make([]byte, 4096)
			for {
				n, err := c.Read(buf)
				b.WriteString(string(buf[:n]))
				if err != nil {
					break
				}
			}
			if time.Since(start) > 2*time.Second {
				t.Errorf("connection held %v, past the per-connection deadline", time.Since(start))
			}
			if tt.want == "" && b.Len() != 0 || !strings.Contains(b.String(), tt.want) {
				t.Errorf("answer %q, want %q", b.String(), tt.want)
			}
		})
	}
}

func TestUIDAllowed(t *testing.T) {
	tests := []struct {
		peer uint32
		self int
		want bool
	}{
		{0, 0, true},
		{1000, 0, false},
		{0, 1000, true},
		{1000, 1000, true},
		{1001, 1000, false},
	}
	for _, tt := range tests {
		if got := uidAllowed(tt.peer, tt.self); got != tt.want {
			t.Errorf("uidAllowed(%d, %d) = %v", tt.peer, tt.self, got)
		}
	}
}

// Listen refuses a directory that others could change under it, and a
// symlink where the socket goes, touching nothing; in a directory of its
// own it makes the socket 0600 and leaves no temporary name behind.
func TestListenChecksDirectory(t *testing.T) {
	tests := []struct {
		name string
		// setup makes the directory (and whatever else) under root and
		// returns the socket path.
		setup func(t *testing.T, root string) string
		want  string // in the error; "" for success
	}{
		{
			name:  "happy path, directory created",
			setup: func(t *testing.T, root string) string { return filepath.Join(root, "run", "mpvpn", "s.sock") },
		},
		{
			name: "existing 0755 directory",
			setup: func(t *testing.T, root string) string {
				mkdir(t, filepath.Join(root, "d"), 0o755)
				return filepath.Join(root, "d", "s.sock")
			},
		},
		{
			name: "symlinked directory",
			setup: func(t *testing.T, root string) string {
				mkdir(t, filepath.Join(root, "real"), 0o700)
				symlink(t, filepath.Join(root, "real"), filepath.Join(root, "link"))
				return filepath.Join(root, "link", "s.sock")
			},
			want: "is a symlink",
		},
		{
			name: "group-writable directory",
			setup: func(t *testing.T, root string) string {
				mkdir(t, filepath.Join(root, "d"), 0o770)
				return filepath.Join(root, "d", "s.sock")
			},
			want: "mode 0770",
		},
		{
			name: "world-writable sticky directory, as /tmp",
			setup: func(t *testing.T, root string) string {
				mkdir(t, filepath.Join(root, "d"), 0o777|os.ModeSticky)
				return filepath.Join(root, "d", "s.sock")
			},
			want: "must not be writable by group or others",
		},
		{
			name: "another user's directory",
			setup: func(t *testing.T, root string) string {
				if os.Geteuid() != 0 {
					netnstest.CannotRun(t, "chown needs root")
				}
				d := filepath.Join(root, "d")
				mkdir(t, d, 0o700)
				if err := os.Chown(d, 4242, 4242); err != nil {
					t.Fatal(err)
				}
				return filepath.Join(d, "s.sock")
			},
			want: "belongs to uid 4242",
		},
		{
			name: "symlink planted at the socket path",
			setup: func(t *testing.T, root string) string {
				if err := os.WriteFile(filepath.Join(root, "precious"), []byte("precious"), 0o644); err != nil {
					t.Fatal(err)
				}
				symlink(t, filepath.Join(root, "precious"), filepath.Join(root, "s.sock"))
				return filepath.Join(root, "s.sock")
			},
			want: "is not a socket",
		},
		{
			name: "dangling symlink planted at the socket path",
			setup: func(t *testing.T, root string) string {
				symlink(t, filepath.Join(root, "nowhere"), filepath.Join(root, "s.sock"))
				return filepath.Join(root, "s.sock")
			},
			want: "is not a socket",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			path := tt.setup(t, root)
			before := tree(t, root)
			l, err := Listen(path)
			if tt.want != "" {
				if err == nil {
					l.Close()
					t.Fatalf("Listen(%s) succeeded", path)
				}
				if !strings.Contains(err.Error(), tt.want) {
					t.Errorf("error %q, want it to mention %q", err, tt.want)
				}
				if after := tree(t, root); !reflect.DeepEqual(after, before) {
					t.Errorf("Listen changed the tree:\nbefore %v\nafter  %v", before, after)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			fi, err := os.Lstat(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
				t.Errorf("socket mode %v, want socket 0600", fi.Mode())
			}
			entries, err := os.ReadDir(filepath.Dir(path))
			if err != nil {
				t.Fatal(err)
			}
			if len(entries) != 1 || entries[0].Name() != filepath.Base(path) {
				t.Errorf("directory holds %v, want the socket alone", entries)
			}
			// It answers at its public name.
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- l.Serve(ctx, clientStatus, nil) }()
			if _, err := Fetch(context.Background(), path); err != nil {
				t.Error(err)
			}
			cancel()
			if err := <-done; err != nil {
				t.Error(err)
			}
			if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("socket file left behind: %v", err)
			}
		})
	}
}

// A name taken between the check for a stale socket and the link is not
// replaced.
func TestBindFinishDoesNotReplace(t *testing.T) {
	dir := t.TempDir()
	tmp, path := filepath.Join(dir, "tmp"), filepath.Join(dir, "s.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	symlink(t, filepath.Join(dir, "elsewhere"), path)
	if _, err := bindFinish(tmp, path); err == nil || !strings.Contains(err.Error(), "another mpvpn is starting") {
		t.Errorf("bindFinish over a symlink: %v", err)
	}
	if target, err := os.Readlink(path); err != nil || target != filepath.Join(dir, "elsewhere") {
		t.Errorf("symlink replaced: %q, %v", target, err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "elsewhere")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("symlink followed: %v", err)
	}
}

func TestListenPathTooLong(t *testing.T) {
	root := t.TempDir()
	// A directory with room for a short name, not for the temporary one.
	deep := filepath.Join(root, strings.Repeat("d", maxSocketPath-len(root)-4))
	mkdir(t, deep, 0o700)
	for _, path := range []string{
		filepath.Join(root, strings.Repeat("x", maxSocketPath-len(root))), // 108 bytes
		filepath.Join(deep, "s"),
	} {
		if l, err := Listen(path); err == nil {
			l.Close()
			t.Errorf("Listen(%d-byte path) succeeded", len(path))
		} else if !strings.Contains(err.Error(), "too long") {
			t.Errorf("error %q does not say the path is too long", err)
		}
	}
	if entries, _ := os.ReadDir(deep); len(entries) != 0 {
		t.Errorf("left behind: %v", entries)
	}
	if entries, _ := os.ReadDir(root); len(entries) != 1 {
		t.Errorf("left behind: %v", entries)
	}
}

func mkdir(t *testing.T, dir string, mode os.FileMode) {
	t.Helper()
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	// Chmod, not Mkdir's mode: the umask would take bits away.
	if err := os.Chmod(dir, mode); err != nil {
		t.Fatal(err)
	}
}

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

// tree lists every name under root with its mode and, for a symlink, its
// target.
func tree(t *testing.T, root string) map[string]string {
	t.Helper()
	out := make(map[string]string)
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		v := fi.Mode().String()
		if fi.Mode()&os.ModeSymlink != 0 {
			target, _ := os.Readlink(p)
			v += " -> " + target
		} else if fi.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			v += " " + string(b)
		}
		out[p] = v
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
