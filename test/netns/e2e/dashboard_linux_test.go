package e2e

import (
	"context"
	"fmt"
	"html"
	"net/netip"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/control"
	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// The dashboard (issue 13), client and concentrator with --ui, during a
// download over both uplinks: Chromium renders both uplinks with a rate
// (at load, --dump-dom, and live from the event stream), then A as
// withdrawn once A goes dark, with a screenshot of each as an artefact;
// without the token or with a foreign Host header the page and the event
// stream are refused; nothing listens but on the address given.
func TestDashboard(t *testing.T) {
	needChromium(t)
	const clientUI, serverUI = "127.0.0.1:9511", "127.0.0.1:9512"
	e := newEnv(t, options{topo: outageNet(), clientArgs: []string{"--ui", clientUI}, serverArgs: []string{"--ui", serverUI}})
	tp := e.tp

	// The URL, with its token, in the log and in `mpvpn status`.
	st := e.fetchStatus(t, e.clientSocket())
	tokenRE := regexp.MustCompile(`^http://` + regexp.QuoteMeta(clientUI) + `/\?token=([0-9a-f]{32})$`)
	m := tokenRE.FindStringSubmatch(st.UI)
	if m == nil {
		t.Fatalf("client status: dashboard %q, want http://%s/?token=<32 hex digits>", st.UI, clientUI)
	}
	url, token := st.UI, m[1]
	if !strings.Contains(e.client.Log(), url) {
		t.Errorf("the client's log does not print the dashboard's URL %s", url)
	}
	if out := tp.Output(tp.Client, bin.mpvpn, "status", "--socket", e.clientSocket()); !strings.Contains(out, "dashboard: "+url+"\n") {
		t.Errorf("mpvpn status does not show the dashboard:\n%s", out)
	}

	// Refused: no token, a wrong one, a foreign Host (DNS rebinding).
	base := "http://" + clientUI
	for _, c := range []struct {
		what string
		args []string
		want string
	}{
		{"the page without the token", []string{base + "/"}, "403"},
		{"the event stream without the token", []string{base + "/events"}, "403"},
		{"the page with a wrong token", []string{base + "/?token=" + strings.Repeat("0", 32)}, "403"},
		{"the page for a foreign Host", []string{"-H", "Host: attacker.example:9511", url}, "403"},
		{"the event stream for a foreign Host", []string{"-H", "Host: attacker.example", base + "/events?token=" + token}, "403"},
		{"the page with the token", []string{url}, "200"},
	} {
		args := append([]string{"curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5"}, c.args...)
		if out, err := tp.Run(tp.Client, args...); strings.TrimSpace(out) != c.want {
			t.Errorf("%s: HTTP %q (%v), want %s", c.what, out, err, c.want)
		}
	}
	// Nothing served on any address but the one given.
	for _, l := range []struct{ ns, pid, addr string }{
		{tp.Client, fmt.Sprint(e.client.Pid()), clientUI},
		{tp.Conc, fmt.Sprint(e.server.Pid()), serverUI},
	} {
		port := l.addr[strings.LastIndex(l.addr, ":"):]
		for _, line := range strings.Split(strings.TrimSpace(tp.Output(l.ns, "ss", "-Htlnp")), "\n") {
			f := strings.Fields(line)
			if len(f) < 4 || !strings.Contains(line, "pid="+l.pid+",") {
				continue
			}
			if strings.HasSuffix(f[3], port) && f[3] != l.addr {
				t.Errorf("%s: the dashboard's port is open on %s too, not only %s: %s", l.ns, f[3], l.addr, line)
			}
		}
	}

	// A download over both uplinks.
	const size = 48 << 20
	e.randomFile(t, "big", size)
	out := filepath.Join(t.TempDir(), "big")
	dl := tp.Start(tp.Client, "curl", "curl", "-sS", "-m", "120", "-o", out, destURL("big"))
	defer dl.Stop()
	waitSize(t, dl, out, size/8)
	deadline := time.Now().Add(20 * time.Second)
	for {
		st = e.fetchStatus(t, e.clientSocket())
		if len(st.Uplinks) == 2 && st.Uplinks[0].RxRate > 0 && st.Uplinks[1].RxRate > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the download is not on both uplinks: %+v", st.Uplinks)
		}
		time.Sleep(250 * time.Millisecond)
	}

	// The per-flow view, in the terminal: the download, with both
	// uplinks' shares.
	flowRE := regexp.MustCompile(`(?m)^  to ` + regexp.QuoteMeta(netip.AddrPortFrom(topo.DestAddr, 80).String()) + `  for \S+  down [0-9.]+ MiB \([0-9.]+ Mbit/s\)  up .*  wan0 [1-9][0-9]?% \(1 subflow\), wan1 [1-9][0-9]?% \(1 subflow\)$`)
	if out := tp.Output(tp.Client, bin.mpvpn, "status", "--flows", "--socket", e.clientSocket()); !flowRE.MatchString(out) {
		t.Errorf("mpvpn status --flows does not list the download on both uplinks:\n%s", out)
	} else {
		t.Logf("mpvpn status --flows: %s", flowRE.FindString(out))
	}

	// At load: the page the server rendered.
	dom := dumpDOM(t, tp, tp.Client, url)
	for _, name := range []string{"wan0", "wan1"} {
		if !uplinkRowRE(name, "up").MatchString(dom) {
			t.Errorf("chromium --dump-dom: no row for %s up with a non-zero download rate:\n%s", name, dom)
		}
	}
	// Live: the script on the event stream keeps it so.
	b := startBrowser(t, tp, tp.Client)
	b.open(url)
	const bothUp = `document.body.dataset.live === "1" && ["wan0", "wan1"].every(n => {
		const r = document.querySelector('#uplinks tr[data-uplink="' + n + '"]');
		return r && r.dataset.state === "up" && !/^0 bit/.test(r.querySelector(".rx").textContent);
	}) && document.querySelector("#flows tbody tr") !== null`
	b.waitFor("both uplinks up with a download rate, live", bothUp, 30*time.Second)
	dom = b.dom()
	for _, name := range []string{"wan0", "wan1"} {
		if !uplinkRowRE(name, "up").MatchString(dom) {
			t.Errorf("live: no row for %s up with a non-zero download rate:\n%s", name, dom)
		}
	}
	if !strings.Contains(dom, netip.AddrPortFrom(topo.DestAddr, 80).String()) {
		t.Errorf("live: the download's flow is not listed:\n%s", dom)
	}
	t.Logf("screenshot: %s", b.screenshot("dashboard-both-uplinks.png"))

	// A goes dark with its link up: the probes withdraw it.
	tp.Blackhole(topo.A, true)
	defer tp.Blackhole(topo.A, false)
	b.waitFor("wan0 withdrawn, in the table and among the transitions", `document.querySelector('#uplinks tr[data-uplink="wan0"]').dataset.state === "withdrawn" &&
		[...document.querySelectorAll('#transitions li[data-uplink="wan0"]')].some(li => li.textContent.includes("up → withdrawn ("))`, 15*time.Second)
	dom = b.dom()
	if !regexp.MustCompile(`<tr data-uplink="wan0" data-state="withdrawn">`).MatchString(dom) || !uplinkRowRE("wan1", "up").MatchString(dom) {
		t.Errorf("after A went dark: want wan0 withdrawn, wan1 up and downloading:\n%s", dom)
	}
	t.Logf("screenshot: %s", b.screenshot("dashboard-a-withdrawn.png"))

	// The concentrator's dashboard: its token from its status, the flow
	// and the client listed.
	sst := e.fetchStatus(t, e.serverSocket())
	if !strings.HasPrefix(sst.UI, "http://"+serverUI+"/?token=") {
		t.Fatalf("server status: dashboard %q", sst.UI)
	}
	page, err := tp.Run(tp.Conc, "curl", "-sS", "-m", "5", sst.UI)
	if err != nil || !strings.Contains(html.UnescapeString(page), e.clientPub) || !strings.Contains(page, netip.AddrPortFrom(topo.DestAddr, 80).String()) {
		t.Errorf("the concentrator's dashboard (%v) lacks the client's key or the flow:\n%s", err, page)
	}
	// The flow's bytes by the client's addresses: B's (its CGNAT's) at
	// least, which carries the download now.
	if !regexp.MustCompile(`<span class="path">` + regexp.QuoteMeta(tp.Uplinks[topo.B].Public.String()) + ` [1-9][0-9]?% \(1\)</span>`).MatchString(page) {
		t.Errorf("the concentrator's dashboard does not show the flow's bytes from B's address %s:\n%s", tp.Uplinks[topo.B].Public, page)
	}
	if out, _ := tp.Run(tp.Conc, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5", "http://"+serverUI+"/events"); strings.TrimSpace(out) != "403" {
		t.Errorf("the concentrator's event stream without the token: HTTP %q, want 403", out)
	}
}

// uplinkRowRE matches an uplink's row in state with a download rate
// that is not zero.
func uplinkRowRE(name, state string) *regexp.Regexp {
	return regexp.MustCompile(`<tr data-uplink="` + name + `" data-state="` + state + `">.*?<td class="rx">[1-9][0-9.]* [kMG]bit/s</td>`)
}

func (e *env) fetchStatus(t *testing.T, socket string) control.Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := control.Fetch(ctx, socket)
	if err != nil {
		t.Fatalf("status %s: %v", socket, err)
	}
	return st
}
