//go:build linux

package ui

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/mpvpn/mpvpn/control"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeStatus is a client with two uplinks whose download rate on wan0
// grows by one step a call.
type fakeStatus struct{ calls atomic.Int64 }

func (f *fakeStatus) get() control.Status {
	n := f.calls.Add(1)
	return control.Status{Role: "client", Server: "192.0.2.1:7100", UI: "http://127.0.0.1:1/?token=secret",
		Uplinks: []control.Uplink{
			{Name: "wan0", State: control.StateUp, RxRate: float64(n) * 1e6, TxRate: 2e5, RTT: 21.5, ProbeAlive: true, ProbeRTT: 20.1, Subflows: 1},
			{Name: "wan1", State: control.StateWithdrawn, Reason: "probe: no answer", RxRate: 0},
		},
		Flows:     control.Flows{Active: 1, Total: 3},
		OpenFlows: []control.OpenFlow{{Dst: "<script>alert(1)</script>:80", Since: time.Now(), RxBytes: 100, Paths: []control.FlowPath{{Uplink: "wan0", Subflows: 1, RxBytes: 100}}}},
	}
}

func start(t *testing.T, addr string) (*Server, *fakeStatus) {
	t.Helper()
	f := &fakeStatus{}
	ctx, cancel := context.WithCancel(context.Background())
	s, err := Serve(ctx, Config{Addr: addr, Status: f.get, Interval: 20 * time.Millisecond})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s, f
}

// get sends a GET for path with the Host header and the token given
// ("" for none), and returns the status, the headers and the body.
func get(t *testing.T, c *http.Client, base, path, host, token string, cookie *http.Cookie) (int, http.Header, string) {
	t.Helper()
	u := base + path
	if token != "" {
		u += "?token=" + token
	}
	req, err := http.NewRequest("GET", u, nil)
	if err != nil {
		t.Fatal(err)
	}
	if host != "" {
		req.Host = host
	}
	req.Header.Set("Origin", "http://attacker.example")
	if cookie != nil {
		req.AddCookie(cookie)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, resp.Header, string(b)
}

// Without the token, with a wrong one, or with a foreign Host header
// (DNS rebinding), nothing is served: not the page, not its assets, not
// the events, not the JSON. With it, everything is, a cookie carries the
// token after the first page, and no answer has a CORS header.
func TestGuard(t *testing.T) {
	s, _ := start(t, "127.0.0.1:0")
	base := "http://" + s.Addr().String()
	port := s.Addr().(*net.TCPAddr).Port
	c := &http.Client{Timeout: 5 * time.Second}
	tok := s.Token()
	cookie := &http.Cookie{Name: cookieName, Value: tok}
	// The token with its first digit changed (never the same token).
	wrong := map[bool]string{true: "1", false: "0"}[tok[0] == '0'] + tok[1:]
	tests := []struct {
		name, path, host, token string
		cookie                  *http.Cookie
		want                    int
	}{
		{"page, no token", "/", "", "", nil, http.StatusForbidden},
		{"page, wrong token", "/", "", wrong, nil, http.StatusForbidden},
		{"page, wrong cookie", "/", "", "", &http.Cookie{Name: cookieName, Value: "x"}, http.StatusForbidden},
		{"events, no token", "/events", "", "", nil, http.StatusForbidden},
		{"json, no token", "/status.json", "", "", nil, http.StatusForbidden},
		{"script, no token", "/static/app.js", "", "", nil, http.StatusForbidden},
		{"page, foreign Host", "/", "attacker.example", tok, nil, http.StatusForbidden},
		{"page, foreign Host at the port", "/", "attacker.example:" + strconv.Itoa(port), tok, nil, http.StatusForbidden},
		{"events, foreign Host", "/events", "rebind.attacker.example:" + strconv.Itoa(port), "", cookie, http.StatusForbidden},
		{"page", "/", "", tok, nil, http.StatusOK},
		{"page, localhost", "/", "localhost:" + strconv.Itoa(port), tok, nil, http.StatusOK},
		{"page, cookie", "/", "", "", cookie, http.StatusOK},
		{"script, cookie", "/static/app.js", "", "", cookie, http.StatusOK},
		{"json, cookie", "/status.json", "", "", cookie, http.StatusOK},
		{"no such page", "/admin", "", tok, nil, http.StatusNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, h, body := get(t, c, base, tt.path, tt.host, tt.token, tt.cookie)
			if code != tt.want {
				t.Errorf("%s: %d, want %d: %s", tt.path, code, tt.want, body)
			}
			for k := range h {
				if strings.HasPrefix(strings.ToLower(k), "access-control-") {
					t.Errorf("%s: a CORS header %s: %q", tt.path, k, h.Get(k))
				}
			}
			if h.Get("X-Frame-Options") != "DENY" || !strings.Contains(h.Get("Content-Security-Policy"), "frame-ancestors 'none'") {
				t.Errorf("%s: may be framed: %v", tt.path, h)
			}
			if code != http.StatusOK && strings.Contains(body, "wan0") {
				t.Errorf("%s: refused, but the body shows the status: %s", tt.path, body)
			}
			if tt.token == tok && code == http.StatusOK && !strings.Contains(h.Get("Set-Cookie"), "SameSite=Strict") {
				t.Errorf("%s: Set-Cookie %q, want the token in a SameSite=Strict cookie", tt.path, h.Get("Set-Cookie"))
			}
		})
	}
}

// The page is whole before any script runs: both uplinks with their
// state and rates, the flow with its destination escaped, and not the
// token.
func TestPage(t *testing.T) {
	s, _ := start(t, "127.0.0.1:0")
	c := &http.Client{Timeout: 5 * time.Second}
	code, _, body := get(t, c, "http://"+s.Addr().String(), "/", "", s.Token(), nil)
	if code != http.StatusOK {
		t.Fatalf("%d: %s", code, body)
	}
	for _, want := range []string{
		`<tr data-uplink="wan0" data-state="up">`,
		`<tr data-uplink="wan1" data-state="withdrawn">`, "withdrawn: probe: no answer",
		"&lt;script&gt;alert(1)&lt;/script&gt;:80", "wan0 100% (1)", `src="/static/app.js"`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("the page lacks %q:\n%s", want, body)
		}
	}
	if !regexp.MustCompile(`<td class="rx">[1-9][0-9]*\.[0-9] Mbit/s</td>`).MatchString(body) {
		t.Errorf("the page shows no download rate for wan0:\n%s", body)
	}
	if strings.Contains(body, "<script>alert") || strings.Contains(body, "secret") {
		t.Errorf("the page has an unescaped destination or the status's token:\n%s", body)
	}
}

// The event stream: the first event has the samples kept so far and the
// status, each later one the samples since, as they are taken.
func TestEvents(t *testing.T) {
	s, _ := start(t, "127.0.0.1:0")
	c := &http.Client{Timeout: 5 * time.Second}
	req, _ := http.NewRequest("GET", "http://"+s.Addr().String()+"/events?token="+s.Token(), nil)
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("Content-Type %q", ct)
	}
	r := bufio.NewReader(resp.Body)
	var last int64
	for i := range 4 {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if _, err := r.ReadString('\n'); err != nil { // the blank line
			t.Fatal(err)
		}
		data, ok := strings.CutPrefix(strings.TrimSpace(line), "data: ")
		if !ok {
			t.Fatalf("event %d: %q", i, line)
		}
		var e event
		if err := json.Unmarshal([]byte(data), &e); err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		if e.Status.Role != "client" || len(e.Status.Uplinks) != 2 || e.Status.UI != "" {
			t.Errorf("event %d: status %+v (the token must not be in it)", i, e.Status)
		}
		if len(e.Samples) == 0 {
			t.Fatalf("event %d: no sample", i)
		}
		for _, sm := range e.Samples {
			if sm.T < last || len(sm.Uplinks) != 2 || sm.Uplinks[0].Name != "wan0" || sm.Uplinks[1].State != control.StateWithdrawn {
				t.Errorf("event %d: sample %+v after %d", i, sm, last)
			}
			last = sm.T
		}
		if rx := e.Samples[len(e.Samples)-1].Uplinks[0].Rx; rx <= 0 {
			t.Errorf("event %d: wan0 at %v bit/s", i, rx)
		}
	}
}

// Nothing is served on any address but the one given: not on another
// loopback address at the same port, and an address off the loopback is
// refused at start.
func TestOnlyTheAddressGiven(t *testing.T) {
	s, _ := start(t, "127.0.0.1:0")
	port := s.Addr().(*net.TCPAddr).Port
	for _, other := range []string{"127.0.0.2", "[::1]"} {
		if c, err := net.DialTimeout("tcp", other+":"+strconv.Itoa(port), time.Second); err == nil {
			c.Close()
			t.Errorf("%s:%d answered; the dashboard is on 127.0.0.1 only", other, port)
		}
	}
	for _, addr := range []string{"0.0.0.0:0", "[::]:0", "192.0.2.1:9511", "localhost:9511", ":9511"} {
		if s, err := Serve(context.Background(), Config{Addr: addr, Status: (&fakeStatus{}).get}); err == nil {
			s.Close()
			t.Errorf("Serve(%q) started; want an error (not a loopback address)", addr)
		}
	}
}

// On a unix socket: owner-only, no Host check (no browser reaches it
// but through a proxy of the user's), and still the token.
func TestUnixSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ui.sock")
	s, _ := start(t, "unix:"+path)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600", fi.Mode().Perm())
	}
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}}}
	defer c.CloseIdleConnections()
	if code, _, _ := get(t, c, "http://mpvpn", "/", "", "", nil); code != http.StatusForbidden {
		t.Errorf("no token: %d, want 403", code)
	}
	if code, _, body := get(t, c, "http://mpvpn", "/", "", s.Token(), nil); code != http.StatusOK || !strings.Contains(body, "wan0") {
		t.Errorf("with the token: %d: %s", code, body)
	}
	if !strings.Contains(s.URL(), path) || !strings.Contains(s.URL(), s.Token()) {
		t.Errorf("URL %q names neither the socket nor the token", s.URL())
	}
	// A second dashboard on the same socket is an error, not a theft.
	if s2, err := Serve(context.Background(), Config{Addr: "unix:" + path, Status: (&fakeStatus{}).get}); err == nil {
		s2.Close()
		t.Error("a second Serve on a socket in use started")
	}
	// A file that is not a socket is left alone.
	file := filepath.Join(t.TempDir(), "not-a-socket")
	os.WriteFile(file, []byte("keep"), 0o600)
	if s3, err := Serve(context.Background(), Config{Addr: file, Status: (&fakeStatus{}).get}); err == nil {
		s3.Close()
		t.Errorf("Serve on a regular file started")
	}
	if b, _ := os.ReadFile(file); string(b) != "keep" {
		t.Errorf("Serve replaced a regular file")
	}
}
