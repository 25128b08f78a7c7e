//go:build linux

package linkemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"
)

// The control protocol: one request per line on a unix stream socket, one
// JSON reply per line. Requests:
//
//	set <up|down|both> key=value ...   change only the keys given (Params.Set)
//	get                                parameters and counters of both directions
//	ping                               liveness
//
// Every reply is {"ok":true, "up":{"params":"rate=...","stats":{...}},
// "down":{...}} or {"ok":false,"error":"..."}. A person can drive it with
// `socat - UNIX-CONNECT:/run/mpvpn-test/P/la.sock`.

// Controller is what the control protocol drives; *Wire implements it.
type Controller interface {
	Params(Dir) Params
	Set(Dir, Params) error
	Stats(Dir) Stats
}

// Reply is one control reply.
type Reply struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
	Up    *State `json:"up,omitempty"`
	Down  *State `json:"down,omitempty"`
}

// State is one direction's parameters (in Params.String form) and counters.
type State struct {
	Params string `json:"params"`
	Stats  Stats  `json:"stats"`
}

// Serve answers control connections on ln until ctx is done, then closes ln
// and waits for the connections it was serving.
func Serve(ctx context.Context, ln net.Listener, c Controller, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]struct{}{}
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		mu.Lock()
		for conn := range conns {
			conn.Close()
		}
		mu.Unlock()
	})
	defer stop()
	for {
		conn, err := ln.Accept()
		if err != nil {
			wg.Wait()
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("linkemu: control: %w", err)
		}
		mu.Lock()
		conns[conn] = struct{}{}
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			serveConn(conn, c, log)
			mu.Lock()
			delete(conns, conn)
			mu.Unlock()
			conn.Close()
		}()
	}
}

// idleTimeout closes control connections a client forgot about.
const idleTimeout = time.Minute

func serveConn(conn net.Conn, c Controller, log *slog.Logger) {
	r := bufio.NewReader(conn)
	enc := json.NewEncoder(conn)
	for {
		conn.SetReadDeadline(time.Now().Add(idleTimeout))
		line, err := r.ReadString('\n')
		if strings.TrimSpace(line) != "" {
			reply := handle(strings.TrimSpace(line), c)
			if !reply.OK {
				log.Warn("control", "request", strings.TrimSpace(line), "err", reply.Error)
			}
			conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
			if enc.Encode(reply) != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func handle(line string, c Controller) Reply {
	f := strings.Fields(line)
	switch strings.ToLower(f[0]) {
	case "ping":
		return Reply{OK: true}
	case "get", "stats", "status":
		return state(c)
	case "set":
		if len(f) < 2 {
			return Reply{Error: "set: want set <up|down|both> key=value ..."}
		}
		d, err := ParseDir(f[1])
		if err != nil {
			return Reply{Error: err.Error()}
		}
		// Validate every direction before changing any.
		kv := strings.Join(f[2:], " ")
		ps := map[Dir]Params{}
		for _, dd := range d.dirs() {
			p := c.Params(dd)
			if err := p.Set(kv); err != nil {
				return Reply{Error: err.Error()}
			}
			ps[dd] = p
		}
		for _, dd := range d.dirs() {
			if err := c.Set(dd, ps[dd]); err != nil {
				return Reply{Error: err.Error()}
			}
		}
		return state(c)
	}
	return Reply{Error: fmt.Sprintf("unknown request %q (want set, get or ping)", f[0])}
}

func state(c Controller) Reply {
	r := Reply{OK: true}
	for _, d := range []Dir{Up, Down} {
		s := &State{Params: c.Params(d).String(), Stats: c.Stats(d)}
		if d == Up {
			r.Up = s
		} else {
			r.Down = s
		}
	}
	return r
}

// Client talks to a wire's control socket. Each call is one short
// connection, so a Client needs no closing.
type Client struct {
	Path    string
	Timeout time.Duration // per call; default 5 s
}

// Do sends one raw request line and returns the reply; a reply with ok
// false comes back as an error.
func (c Client) Do(ctx context.Context, request string) (Reply, error) {
	timeout := c.Timeout
	if timeout == 0 {
		timeout = 5 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.Path)
	if err != nil {
		return Reply{}, fmt.Errorf("linkemu: control %s: %w", c.Path, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	if _, err := conn.Write([]byte(strings.TrimSpace(request) + "\n")); err != nil {
		return Reply{}, fmt.Errorf("linkemu: control %s: %w", c.Path, err)
	}
	var r Reply
	if err := json.NewDecoder(bufio.NewReader(conn)).Decode(&r); err != nil {
		return Reply{}, fmt.Errorf("linkemu: control %s: reply: %w", c.Path, err)
	}
	if !r.OK {
		return r, fmt.Errorf("linkemu: control %s: %s", c.Path, r.Error)
	}
	return r, nil
}

// Set replaces the parameters of d.
func (c Client) Set(ctx context.Context, d Dir, p Params) error {
	_, err := c.Do(ctx, "set "+d.String()+" "+p.String())
	return err
}

// Update changes only the keys in kv ("rate=20mbit loss=1%") on d.
func (c Client) Update(ctx context.Context, d Dir, kv string) error {
	_, err := c.Do(ctx, "set "+d.String()+" "+kv)
	return err
}

// Status returns the parameters and counters of both directions.
func (c Client) Status(ctx context.Context) (up, down Status, err error) {
	r, err := c.Do(ctx, "get")
	if err != nil {
		return up, down, err
	}
	if r.Up == nil || r.Down == nil {
		return up, down, errors.New("linkemu: control: reply without state")
	}
	if up, err = r.Up.parse(); err != nil {
		return up, down, err
	}
	down, err = r.Down.parse()
	return up, down, err
}

// Status is a direction's state as a Client returns it.
type Status struct {
	Params Params
	Stats  Stats
}

func (s State) parse() (Status, error) {
	p, err := ParseParams(s.Params)
	return Status{Params: p, Stats: s.Stats}, err
}
