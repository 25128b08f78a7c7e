package e2e

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// browser is Debian's Chromium, headless, in a namespace, driven over the
// DevTools protocol on a pipe (--remote-debugging-pipe: NUL-terminated
// JSON, commands on its fd 3, answers and events on its fd 4), as
// Puppeteer drives it: no debugging port is opened, no library needed.
type browser struct {
	t       *testing.T
	cmd     *exec.Cmd
	toB     *os.File
	fromB   *os.File
	r       *bufio.Reader
	id      int
	session string
	log     string
}

// chromiumFlags keep Chromium to the page it is given: no first-run
// work, no background fetches (updates, sync, safe browsing), and every
// host name unresolvable, so that it sends nothing anywhere but to the
// loopback address it is told.
var chromiumFlags = []string{
	"--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
	"--disable-background-networking", "--disable-component-update", "--disable-sync",
	"--disable-default-apps", "--disable-extensions", "--no-pings", "--disable-domain-reliability",
	"--disable-breakpad", "--mute-audio", "--hide-scrollbars", "--window-size=1400,1100",
	"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
}

// needChromium fails (CI=true) or skips without Chromium.
func needChromium(t *testing.T) {
	t.Helper()
	topo.Require(t, "chromium")
}

// dumpDOM loads url in a fresh headless Chromium in ns and returns the
// DOM it rendered (chromium --dump-dom: at the page's load).
func dumpDOM(t *testing.T, tp *topo.Topology, ns, url string) string {
	t.Helper()
	args := append([]string{"chromium"}, chromiumFlags...)
	args = append(args, "--user-data-dir="+t.TempDir(), "--dump-dom", url)
	cmd := tp.Cmd(ns, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("chromium --dump-dom: %v\n%s", err, tail(errb.String(), 20))
		}
	case <-time.After(time.Minute):
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		t.Fatalf("chromium --dump-dom: no page after a minute\n%s", tail(errb.String(), 20))
	}
	return out.String()
}

// startBrowser starts Chromium in ns; it is killed when the test ends.
func startBrowser(t *testing.T, tp *topo.Topology, ns string) *browser {
	t.Helper()
	b := &browser{t: t, log: filepath.Join(t.TempDir(), "chromium.log")}
	// Two pipes: ours to its fd 3, its fd 4 to ours.
	cmdR, cmdW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	evR, evW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(b.log)
	if err != nil {
		t.Fatal(err)
	}
	args := append([]string{"chromium"}, chromiumFlags...)
	args = append(args, "--user-data-dir="+t.TempDir(), "--remote-debugging-pipe", "about:blank")
	b.cmd = tp.Cmd(ns, args...)
	b.cmd.ExtraFiles = []*os.File{cmdR, evW} // fds 3 and 4
	b.cmd.Stdout, b.cmd.Stderr = logf, logf
	b.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	err = b.cmd.Start()
	cmdR.Close()
	evW.Close()
	logf.Close()
	if err != nil {
		t.Fatal(err)
	}
	b.toB, b.fromB, b.r = cmdW, evR, bufio.NewReader(evR)
	waited := make(chan struct{})
	go func() { b.cmd.Wait(); close(waited) }()
	t.Cleanup(func() {
		syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL)
		<-waited
		b.toB.Close()
		b.fromB.Close()
		if t.Failed() {
			if l, err := os.ReadFile(b.log); err == nil {
				t.Logf("--- chromium ---\n%s", tail(string(l), 30))
			}
		}
	})
	return b
}

// call sends one command (to the page once open has attached to it) and
// returns its result, skipping the events between.
func (b *browser) call(method string, params any) json.RawMessage {
	b.t.Helper()
	b.id++
	msg := map[string]any{"id": b.id, "method": method, "params": params}
	if b.session != "" {
		msg["sessionId"] = b.session
	}
	req, err := json.Marshal(msg)
	if err != nil {
		b.t.Fatal(err)
	}
	if _, err := b.toB.Write(append(req, 0)); err != nil {
		b.t.Fatalf("chromium: %s: %v", method, err)
	}
	b.fromB.SetReadDeadline(time.Now().Add(30 * time.Second))
	for {
		raw, err := b.r.ReadBytes(0)
		if err != nil {
			b.t.Fatalf("chromium: %s: no answer: %v", method, err)
		}
		var ans struct {
			ID     int             `json:"id"`
			Result json.RawMessage `json:"result"`
			Error  *struct {
				Message string `json:"message"`
			} `json:"error"`
		}
		if err := json.Unmarshal(raw[:len(raw)-1], &ans); err != nil {
			b.t.Fatalf("chromium: %s: %v: %q", method, err, raw)
		}
		if ans.ID != b.id {
			continue // an event
		}
		if ans.Error != nil {
			b.t.Fatalf("chromium: %s: %s", method, ans.Error.Message)
		}
		return ans.Result
	}
}

// open opens url in a new page and attaches to it.
func (b *browser) open(url string) {
	b.t.Helper()
	var target struct {
		TargetID string `json:"targetId"`
	}
	json.Unmarshal(b.call("Target.createTarget", map[string]any{"url": "about:blank"}), &target)
	var att struct {
		SessionID string `json:"sessionId"`
	}
	json.Unmarshal(b.call("Target.attachToTarget", map[string]any{"targetId": target.TargetID, "flatten": true}), &att)
	if att.SessionID == "" {
		b.t.Fatal("chromium: no page session")
	}
	b.session = att.SessionID
	b.call("Page.navigate", map[string]any{"url": url})
}

// eval returns the value of a JavaScript expression in the page.
func (b *browser) eval(expr string) json.RawMessage {
	b.t.Helper()
	v, err := b.try(expr)
	if err != nil {
		b.t.Fatal(err)
	}
	return v
}

// try is eval with the exception returned.
func (b *browser) try(expr string) (json.RawMessage, error) {
	b.t.Helper()
	var r struct {
		Result struct {
			Value json.RawMessage `json:"value"`
		} `json:"result"`
		ExceptionDetails *struct {
			Text      string `json:"text"`
			Exception struct {
				Description string `json:"description"`
			} `json:"exception"`
		} `json:"exceptionDetails"`
	}
	json.Unmarshal(b.call("Runtime.evaluate", map[string]any{"expression": expr, "returnByValue": true}), &r)
	if x := r.ExceptionDetails; x != nil {
		return nil, fmt.Errorf("chromium: %s: %s %s", expr, x.Text, x.Exception.Description)
	}
	return r.Result.Value, nil
}

// waitFor waits until the expression is true in the page (an exception,
// as while the page loads, counts as not yet), and fails the test with
// what the page shows if it does not become so in time.
func (b *browser) waitFor(what, expr string, timeout time.Duration) {
	b.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		v, err := b.try("Boolean(" + expr + ")")
		if err == nil && string(v) == "true" {
			return
		}
		if time.Now().After(deadline) {
			b.t.Fatalf("the dashboard did not show %s within %v (%v); it shows:\n%s", what, timeout, err, b.text())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// dom is the page's DOM as it is now (what --dump-dom would print).
func (b *browser) dom() string {
	b.t.Helper()
	var s string
	json.Unmarshal(b.eval("document.documentElement.outerHTML"), &s)
	return s
}

// text is the page's visible text.
func (b *browser) text() string {
	b.t.Helper()
	var s string
	json.Unmarshal(b.eval("document.body ? document.body.innerText : ''"), &s)
	return s
}

// screenshot saves the page as a PNG in the artefacts directory and
// returns its path.
func (b *browser) screenshot(name string) string {
	b.t.Helper()
	var r struct {
		Data string `json:"data"`
	}
	json.Unmarshal(b.call("Page.captureScreenshot", map[string]any{"format": "png", "captureBeyondViewport": true}), &r)
	png, err := base64.StdEncoding.DecodeString(r.Data)
	if err != nil || !bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")) {
		b.t.Fatalf("screenshot %s: not a PNG (%d bytes, %v)", name, len(png), err)
	}
	path := filepath.Join(artefactDir(b.t), name)
	if err := os.WriteFile(path, png, 0o644); err != nil {
		b.t.Fatal(err)
	}
	return path
}

// artefactDir is where tests leave what a person may want to look at
// (screenshots): $ARTIFACTS (scripts/test.sh sets it to artifacts/ at
// the repository's root), else artifacts/ there.
func artefactDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("ARTIFACTS")
	if dir == "" {
		root, err := filepath.Abs("../../..")
		if err != nil {
			t.Fatal(err)
		}
		dir = filepath.Join(root, "artifacts")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}
