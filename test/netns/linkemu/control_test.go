//go:build linux

package linkemu

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"go.uber.org/goleak"
)

// fakeWire is a Controller without sockets.
type fakeWire struct {
	mu sync.Mutex
	p  [2]Params
	st [2]Stats
}

func (f *fakeWire) Params(d Dir) Params {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.p[d.one()]
}

func (f *fakeWire) Set(d Dir, p Params) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, dd := range d.dirs() {
		f.p[dd] = p
	}
	return nil
}

func (f *fakeWire) Stats(d Dir) Stats {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.st[d.one()]
}

func TestControl(t *testing.T) {
	defer goleak.VerifyNone(t)
	path := filepath.Join(t.TempDir(), "ctl.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	w := &fakeWire{}
	w.st[Down].TxFrames = 42
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, ln, w, nil) }()
	defer func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	c := Client{Path: path}
	bg := context.Background()

	// An idle connection left open must not keep Serve from returning.
	idle, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()

	if _, err := c.Do(bg, "ping"); err != nil {
		t.Fatal(err)
	}
	want := Params{Rate: 40e6, Delay: 10 * ms}
	if err := c.Set(bg, Both, want); err != nil {
		t.Fatal(err)
	}
	if err := c.Update(bg, Up, "loss=1% blackhole=on"); err != nil {
		t.Fatal(err)
	}
	up, down, err := c.Status(bg)
	if err != nil {
		t.Fatal(err)
	}
	wantUp := want
	wantUp.Loss, wantUp.Blackhole = 0.01, true
	if up.Params != wantUp || down.Params != want {
		t.Errorf("status up %+v down %+v; want %+v, %+v", up.Params, down.Params, wantUp, want)
	}
	if down.Stats.TxFrames != 42 {
		t.Errorf("down stats %+v", down.Stats)
	}

	// A bad update changes nothing, in either direction.
	if err := c.Update(bg, Both, "rate=20mbit loss=2"); err == nil || !strings.Contains(err.Error(), "loss") {
		t.Errorf("bad update: %v", err)
	}
	if w.Params(Down) != want {
		t.Errorf("bad update changed down to %+v", w.Params(Down))
	}
	for _, bad := range []string{"frobnicate", "set", "set sideways rate=1mbit"} {
		if _, err := c.Do(bg, bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}
