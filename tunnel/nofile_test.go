//go:build linux

package tunnel

import (
	"context"
	"errors"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// TestOutOfFilesAnsweredLimited: with no descriptor left for accept, the
// server gives up a spare one for the connection and answers Limited
// in the handshake: the client's app hears "a limit" at once, not a
// timeout that looks like an unreachable concentrator. Then the spare is
// back, and the next flow works.
func TestOutOfFilesAnsweredLimited(t *testing.T) {
	ln := listenMPTCP(t, false)
	p := newPair(t, ServerConfig{}, ClientConfig{Server: lnAddr(ln), HandshakeTimeout: 5 * time.Second, PoolSize: -1})
	serve(t, p.srv, ln, echoAccept)
	if err := echoOnce(t, p.cli); err != nil { // Serve holds its spare by now
		t.Fatal(err)
	}
	waitFor(t, "that flow closed on both ends", func() bool { return p.srv.Stats().Active == 0 && p.cli.Stats().Active == 0 })
	time.Sleep(100 * time.Millisecond) // its sockets' descriptors too
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	// The limit bounds descriptor numbers, and a new descriptor takes the
	// lowest free one: allow exactly the lowest free number, for the
	// client's socket, and none for the server's accept. Every hole
	// below the server's highest spare is filled first: a free number
	// below the spares would leave them all above the limit, where
	// freeing one gives accept nothing (unlike a process that ran out,
	// whose spares are all below its limit).
	for top := p.srv.files.highest(); ; {
		free := lowestFreeFD(t)
		if free > top {
			break
		}
		f, err := os.Open(os.DevNull)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
	}
	free := lowestFreeFD(t)
	lim := old
	lim.Cur = uint64(free + 1)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	_, err := p.cli.DialTCP(context.Background(), testDst)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	ve, ok := errors.AsType[*VerdictError](err)
	if !ok || ve.Verdict != Limited || !errors.Is(err, syscall.EAGAIN) {
		t.Fatalf("dial with the server out of descriptors: %v, want the verdict Limited", err)
	}
	if n := p.srv.Stats().NoFiles; n != 1 {
		t.Errorf("NoFiles = %d, want 1", n)
	}
	waitFor(t, "the next flow", func() bool { return echoOnce(t, p.cli) == nil })
}

// highest is the reserve's highest descriptor number (-1: none).
func (r *fdReserve) highest() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	top := -1
	for _, f := range r.files {
		top = max(top, int(f.Fd()))
	}
	return top
}

// lowestFreeFD is the descriptor number the next open would get.
func lowestFreeFD(t *testing.T) int {
	t.Helper()
	dir, err := os.Open("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	names, err := dir.Readdirnames(-1)
	self := int(dir.Fd())
	dir.Close()
	if err != nil {
		t.Fatal(err)
	}
	used := map[int]bool{}
	for _, n := range names {
		if fd, err := strconv.Atoi(n); err == nil && fd != self {
			used[fd] = true
		}
	}
	free := 0
	for used[free] {
		free++
	}
	return free
}

// TestFilesScarce: the reserve reports scarcity while a spare it gave up
// cannot be opened again (the process at its open-file limit), so the
// concentrator dials nothing then, and is full again as soon as a
// descriptor is free.
func TestFilesScarce(t *testing.T) {
	var s Server
	defer s.files.close()
	if !s.files.refill() || s.FilesScarce() {
		t.Fatal("a fresh reserve is not full")
	}
	if !s.files.release() {
		t.Fatal("release from a full reserve failed")
	}
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	lim := old
	lim.Cur = uint64(lowestFreeFD(t)) // every number below it is taken
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	scarce := s.FilesScarce()
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	if !scarce {
		t.Error("FilesScarce = false at the open-file limit with a spare missing")
	}
	if s.FilesScarce() {
		t.Error("FilesScarce = true with descriptors free again")
	}
	s.files.mu.Lock()
	n := len(s.files.files)
	s.files.mu.Unlock()
	if n != reserveFiles {
		t.Errorf("reserve holds %d, want %d", n, reserveFiles)
	}
}
