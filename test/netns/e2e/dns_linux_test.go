//go:build linux

package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// The DNS tests' names, answered by dnsmasq on the internet host.
const (
	dnsName    = "www.mpvpn.test"
	dnsBigName = "big.mpvpn.test" // TXT records too large for one UDP answer
	dnsBigTXT  = 12               // records of 200 bytes: about 2.5 KB
)

// startDNS runs dnsmasq on DestAddr:53 (UDP and TCP), authoritative for
// nothing but the test's names and forwarding nowhere, logging every
// query with its source.
func (e *env) startDNS(t *testing.T) *topo.Proc {
	t.Helper()
	needTools(t, "dnsmasq", "dig")
	args := []string{"dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--no-poll", "--bind-interfaces",
		"--listen-address", topo.DestAddr.String(), "--port", "53", "--user=root", "--pid-file=",
		"--log-queries=extra", "--log-facility=-",
		"--address=/" + dnsName + "/" + topo.DestAddr.String(), "--address=/" + dnsName + "/" + dest6.String()}
	for i := range dnsBigTXT {
		args = append(args, fmt.Sprintf("--txt-record=%s,%02d%s", dnsBigName, i, strings.Repeat("x", 198)))
	}
	p := e.tp.Start(e.tp.Inet, "dnsmasq", args...)
	p.WaitListen(netip.AddrPortFrom(topo.DestAddr, 53).String())
	return p
}

// dig runs dig in the client namespace and returns its output.
func (e *env) dig(t *testing.T, args ...string) string {
	t.Helper()
	code, out, _ := e.run(t, append([]string{"dig", "+time=5", "+tries=1"}, args...)...)
	if code != 0 {
		t.Fatalf("dig %s: exit %d\n%s", strings.Join(args, " "), code, out)
	}
	return out
}

// answers are the records of dig's ANSWER SECTION, as lines.
func answers(out string) []string {
	var a []string
	in := false
	for _, l := range strings.Split(out, "\n") {
		switch {
		case strings.HasPrefix(l, ";; ANSWER SECTION"):
			in = true
		case in && strings.TrimSpace(l) == "":
			in = false
		case in:
			a = append(a, l)
		}
	}
	return a
}

// isDNS: a packet to port 53, UDP or TCP, either family.
var isDNS = regexp.MustCompile(` > \S+[.:]53: `)

// TestDNS: with --route-all the system resolver points at mpvpn's, which
// answers over UDP and TCP, on IPv4 and IPv6, by forwarding through the
// tunnel to the concentrator's resolver (a real dnsmasq); an answer too
// big for UDP comes back truncated and whole over TCP; no query leaves an
// uplink in clear text; and the namespace's resolv.conf is put back byte
// for byte on stop, and after kill -9 by the next start or `mpvpn down`.
func TestDNS(t *testing.T) {
	e := newSysEnv(t, options{topo: shaped()})
	tp := e.tp
	dns := e.startDNS(t)
	resolvConf := func() string { return tp.Output(tp.Client, "cat", "/etc/resolv.conf") }
	if got := resolvConf(); got != clientResolvConf {
		t.Fatalf("the client namespace's resolv.conf is not its own:\n%s", got)
	}
	e.noRoute = true
	args := []string{"--route-all", "--kill-switch", "--allow-lan"}
	e.startClient(t, e.key(), args...)

	t.Run("hook", func(t *testing.T) {
		got := resolvConf()
		if !strings.Contains(got, "nameserver 10.77.77.53\n") || !strings.Contains(got, "nameserver fd6d:7076::53\n") || strings.Contains(got, "192.0.2.1") {
			t.Errorf("resolv.conf while the client runs:\n%s\nwant mpvpn's two resolver addresses only", got)
		}
	})

	cap := e.startCapture(t)
	t.Run("lookups", func(t *testing.T) {
		for _, tt := range []struct {
			name string
			args []string
			want string
		}{
			{"UDP, the system's resolver", []string{dnsName, "A"}, topo.DestAddr.String()},
			{"TCP, the system's resolver", []string{"+tcp", dnsName, "A"}, topo.DestAddr.String()},
			{"UDP to the IPv6 resolver address, AAAA", []string{"@fd6d:7076::53", dnsName, "AAAA"}, dest6.String()},
			{"TCP to the IPv6 resolver address", []string{"+tcp", "@fd6d:7076::53", dnsName, "A"}, topo.DestAddr.String()},
		} {
			out := e.dig(t, tt.args...)
			a := answers(out)
			if len(a) != 1 || !strings.HasSuffix(strings.TrimSpace(a[0]), tt.want) {
				t.Errorf("%s: answers %q, want %s\n%s", tt.name, a, tt.want, out)
			}
		}
		// glibc's resolver, through the hook, as every program uses it.
		if code, out, _ := e.run(t, "getent", "ahostsv4", dnsName); code != 0 || !strings.Contains(out, topo.DestAddr.String()) {
			t.Errorf("getent ahostsv4 %s: exit %d\n%s", dnsName, code, out)
		}
	})

	t.Run("answer too big for UDP", func(t *testing.T) {
		// dig asks over UDP (EDNS 1232), is told to retry over TCP
		// (TC), and then gets every record.
		out := e.dig(t, dnsBigName, "TXT")
		if !strings.Contains(out, "Truncated, retrying in TCP mode") {
			t.Errorf("the big answer was not truncated over UDP:\n%s", out)
		}
		if a := answers(out); len(a) != dnsBigTXT {
			t.Errorf("%d TXT records, want %d:\n%s", len(a), dnsBigTXT, out)
		}
		out = e.dig(t, "+notcp", "+ignore", "+bufsize=4096", dnsBigName, "TXT")
		if a := answers(out); len(a) != dnsBigTXT || strings.Contains(out, "flags: qr tc") {
			t.Errorf("with EDNS 4096 over UDP: %d TXT records, want %d, not truncated:\n%s", len(a), dnsBigTXT, out)
		}
	})

	t.Run("no clear-text DNS on the uplinks", func(t *testing.T) {
		pkts := cap.stop(t)
		var tunnel int
		for _, p := range pkts {
			if isDNS.MatchString(p.line) {
				t.Errorf("DNS in clear on an uplink: %s", p)
			}
			if p.toPort(topo.ConcAddr, 7100) {
				tunnel++
			}
		}
		// The positive control: the capture saw the tunnel carry them.
		if tunnel == 0 {
			t.Errorf("the capture saw no tunnel packet either (%d packets): it proves nothing", len(pkts))
		}
		// The queries reached dnsmasq from the concentrator.
		log := dns.Log()
		if !strings.Contains(log, "query[A] "+dnsName+" from "+topo.ConcAddr.String()) {
			t.Errorf("dnsmasq did not see the query from the concentrator (%s):\n%s", topo.ConcAddr, tail(log, 20))
		}
		t.Logf("%d packets left the uplinks during the lookups, %d of them the tunnel's, none DNS", len(pkts), tunnel)
	})

	t.Run("clean stop restores resolv.conf", func(t *testing.T) {
		e.stopClient(t)
		if got := resolvConf(); got != clientResolvConf {
			t.Errorf("resolv.conf after the client stopped:\n%s\nwant, byte for byte:\n%s", got, clientResolvConf)
		}
	})

	for _, then := range []string{"next start", "mpvpn down"} {
		t.Run("kill -9, then "+then, func(t *testing.T) {
			e.startClient(t, e.key(), args...)
			e.killClient(t)
			if got := resolvConf(); !strings.Contains(got, "nameserver 10.77.77.53") {
				t.Fatalf("after kill -9 resolv.conf is not mpvpn's (the test would prove nothing):\n%s", got)
			}
			switch then {
			case "next start":
				e.startClient(t, e.key(), args...)
				if out := e.dig(t, dnsName, "A"); len(answers(out)) != 1 {
					t.Errorf("the restarted client does not resolve:\n%s", out)
				}
				e.stopClient(t)
			case "mpvpn down":
				out, err := tp.Cmd(tp.Client, bin.mpvpn, "down", "--journal", e.clientJournal()).CombinedOutput()
				if err != nil {
					t.Fatalf("mpvpn down: %v\n%s", err, out)
				}
				if !strings.Contains(string(out), "resolv.conf") {
					t.Errorf("mpvpn down does not say it restored resolv.conf:\n%s", out)
				}
			}
			if got := resolvConf(); got != clientResolvConf {
				t.Errorf("resolv.conf after kill -9 and %s:\n%s\nwant, byte for byte:\n%s", then, got, clientResolvConf)
			}
		})
	}
	if _, err := os.Stat("/etc/netns/" + tp.Client + "/resolv.conf"); err != nil {
		t.Errorf("the namespace's resolv.conf is gone: %v", err)
	}
}

// TestDNSSplit: without --route-all the DNS hook is off (the system's
// resolver is left alone), but mpvpn's resolver answers on its address,
// which is routed into the TUN, and --dns-address adds one of the user's.
func TestDNSSplit(t *testing.T) {
	e := newSysEnv(t, options{topo: topo.Options{NoEmu: true}})
	tp := e.tp
	e.startDNS(t)
	e.startClient(t, e.key(), "--dns-address", "10.99.0.53")
	if got := tp.Output(tp.Client, "cat", "/etc/resolv.conf"); got != clientResolvConf {
		t.Errorf("split mode changed resolv.conf:\n%s", got)
	}
	for _, server := range []string{"@10.99.0.53"} {
		if out := e.dig(t, server, dnsName, "A"); len(answers(out)) != 1 {
			t.Errorf("dig %s: no answer:\n%s", server, out)
		}
	}
	// The default address is not served when --dns-address names others.
	if code, out, _ := e.run(t, "dig", "+time=2", "+tries=1", "@10.77.77.53", dnsName); code == 0 && len(answers(out)) > 0 {
		t.Errorf("10.77.77.53 answered although --dns-address replaced it:\n%s", out)
	}
	// Another port of the resolver address: refused at once.
	if code, out, took := e.run(t, "dig", "+time=5", "+tries=1", "-p", "5353", "@10.99.0.53", dnsName); code == 0 || took > atOnce {
		t.Errorf("UDP to the resolver address's port 5353: exit %d after %v, want a quick failure\n%s", code, took, out)
	}
}
