//go:build linux

package e2e

import (
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mpvpn/mpvpn/test/netns/topo"
)

// udpServer runs on the internet host: an echo on DestAddr:7; on
// DestAddr:5000 a datagram is answered from dest2:6000 instead (a second
// address and port the client never sent to), with the address it came
// from; and a silent socket on 5001 that only counts.
const udpServer = `import socket, sys, threading
dst, other = sys.argv[1], sys.argv[2]
def echo():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((dst, 7))
    while True:
        b, a = s.recvfrom(65535)
        s.sendto(b, a)
def third_party():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((dst, 5000))
    o = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    o.bind((other, 6000))
    while True:
        b, a = s.recvfrom(65535)
        o.sendto(("seen from %s:%d" % a).encode(), a)
threading.Thread(target=echo, daemon=True).start()
threading.Thread(target=third_party, daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
`

// udpEcho is the client's side: n datagrams of sizes cycling from 0 to
// max bytes, each numbered and filled with a pattern, to DestAddr:7, at
// most window in flight; it prints how many came back intact, how many
// changed, and how many were lost.
const udpEcho = `import socket, sys, os
dst, n, mx, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.connect((dst, 7))
s.settimeout(3)
def payload(i):
    size = (i * 7919) % (mx + 1)
    head = i.to_bytes(4, "big")
    body = bytes((i + j) & 0xff for j in range(size))
    return (head + body)[:size] if size < 4 else head + body[4:]
ok = bad = lost = 0
sent = 0
pending = {}
while sent < n or pending:
    while sent < n and len(pending) < window:
        p = payload(sent)
        pending[sent] = p
        s.send(p)
        sent += 1
    try:
        b = s.recv(65535)
    except socket.timeout:
        lost += len(pending)
        pending.clear()
        continue
    if len(b) < 4:
        # a datagram too short to carry its number: match by content
        k = next((k for k, v in pending.items() if v == b), None)
    else:
        k = int.from_bytes(b[:4], "big")
    if k in pending and pending[k] == b:
        ok += 1
        del pending[k]
    else:
        bad += 1
print("ok %d bad %d lost %d" % (ok, bad, lost))
`

var echoResult = regexp.MustCompile(`ok (\d+) bad (\d+) lost (\d+)`)

// udpDenied is in the routed network but refused by the concentrator
// (--deny).
var udpDenied = netip.MustParseAddr("198.51.100.99")

// pathMTUPayload is the largest UDP payload that crosses the emulated
// network's 1500-byte links unfragmented.
const pathMTUPayload = 1500 - 20 - 8

// TestUDP: datagrams of every size up to the path MTU come back intact,
// boundaries kept, none lost on clean links; iperf3 -u runs to
// completion; a reply from a second address and port reaches the app
// (endpoint-independent mapping and filtering); QUIC gets a port
// unreachable at once; a destination the concentrator's policy refuses is
// refused at once; the concentrator counts what it carried.
func TestUDP(t *testing.T) {
	for _, tr := range udpTransports {
		t.Run(tr, func(t *testing.T) { testUDP(t, tr) })
	}
}

// udpTransports are --udp-transport's two values: every UDP test runs
// over both.
var udpTransports = []string{"stream", "uplinks"}

func testUDP(t *testing.T, transport string) {
	e := newSysEnv(t, options{topo: topo.Options{NoEmu: true}, serverArgs: []string{"--deny", udpDenied.String() + "/32"}})
	tp := e.tp
	tp.Exec(tp.Inet, "ip", "addr", "add", netip.PrefixFrom(dest2, 32).String(), "dev", "lo")
	srv := tp.Start(tp.Inet, "udp-server", "python3", "-c", udpServer, topo.DestAddr.String(), dest2.String())
	e.waitLog(t, srv, "listening", 10*time.Second)
	iperf := tp.Start(tp.Inet, "iperf3-server", "iperf3", "-s", "-B", topo.DestAddr.String(), "-p", "5201")
	iperf.WaitListen(netip.AddrPortFrom(topo.DestAddr, 5201).String())
	e.startClient(t, e.key(), "--udp-transport", transport)

	t.Run("10000 datagrams of mixed sizes, intact", func(t *testing.T) {
		code, out, _ := e.run(t, "python3", "-c", udpEcho, topo.DestAddr.String(), "10000", strconv.Itoa(pathMTUPayload), "32")
		m := echoResult.FindStringSubmatch(out)
		if code != 0 || m == nil {
			t.Fatalf("udp echo: exit %d\n%s", code, out)
		}
		if m[1] != "10000" || m[2] != "0" || m[3] != "0" {
			t.Errorf("udp echo: %s, want all 10000 back intact", m[0])
		}
		t.Logf("udp echo: %s", m[0])
	})

	t.Run("iperf3 -u", func(t *testing.T) {
		code, out, _ := e.run(t, "iperf3", "-u", "-c", topo.DestAddr.String(), "-p", "5201", "-b", "20M", "-t", "3", "-l", "1200")
		if code != 0 {
			t.Fatalf("iperf3 -u: exit %d\n%s", code, out)
		}
		loss := regexp.MustCompile(`(\d+)/(\d+) \(([\d.e+-]+)%\)\s+receiver`).FindStringSubmatch(out)
		if loss == nil {
			t.Fatalf("iperf3 -u: no receiver line:\n%s", out)
		}
		t.Logf("iperf3 -u at 20 Mbit/s for 3 s through the tunnel: %s/%s lost (%s%%)", loss[1], loss[2], loss[3])
		if total, _ := strconv.Atoi(loss[2]); total < 1000 {
			t.Errorf("iperf3 -u: only %d datagrams reached the server", total)
		}
	})

	t.Run("reply from a second address and port", func(t *testing.T) {
		script := `import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"hello", (sys.argv[1], 5000))
b, a = s.recvfrom(2048)
print("reply %s from %s:%d" % (b.decode(), a[0], a[1]))`
		code, out, _ := e.run(t, "python3", "-c", script, topo.DestAddr.String())
		if code != 0 || !strings.Contains(out, "from "+dest2.String()+":6000") {
			t.Fatalf("no reply from %s:6000 (exit %d):\n%s", dest2, code, out)
		}
		if !strings.Contains(out, "seen from "+topo.ConcAddr.String()+":") {
			t.Errorf("the server did not see the concentrator's address:\n%s", out)
		}
		t.Log(strings.TrimSpace(out))
	})

	// A connected socket learns of an ICMP error on its next call.
	refusedScript := `import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect((sys.argv[1], int(sys.argv[2])))
t0 = time.monotonic()
s.send(b"x")
try:
    s.recv(100)
    print("answered")
except socket.timeout:
    print("timeout")
except OSError as e:
    print("error %s after %.3f s" % (e.strerror, time.monotonic() - t0))`
	t.Run("QUIC blocked", func(t *testing.T) {
		code, out, _ := e.run(t, "python3", "-c", refusedScript, topo.DestAddr.String(), "443")
		if code != 0 || !strings.Contains(out, "error Connection refused") {
			t.Fatalf("UDP to port 443: want connection refused at once (exit %d):\n%s", code, out)
		}
		t.Log(strings.TrimSpace(out))
	})
	t.Run("refused by the concentrator's policy", func(t *testing.T) {
		// Administratively prohibited: EHOSTUNREACH over IPv4.
		code, out, _ := e.run(t, "python3", "-c", refusedScript, udpDenied.String(), "9")
		if code != 0 || !strings.Contains(out, "error No route to host") {
			t.Fatalf("UDP to a destination the concentrator denies: want it refused at once (exit %d):\n%s", code, out)
		}
		t.Log(strings.TrimSpace(out))
	})

	t.Run("a closed port's ICMP error reaches the app", func(t *testing.T) {
		// The destination answers port unreachable to the concentrator,
		// which passes it on: ECONNREFUSED, after one round trip.
		code, out, _ := e.run(t, "python3", "-c", refusedScript, topo.DestAddr.String(), "9999")
		if code != 0 || !strings.Contains(out, "error Connection refused") {
			t.Fatalf("UDP to a closed port of the destination: want connection refused (exit %d):\n%s", code, out)
		}
		t.Log(strings.TrimSpace(out))
	})

	t.Run("counted", func(t *testing.T) {
		st, raw := e.status(t, "--socket", e.serverSocket())
		// Unreachable: the closed port's ICMP error came from the
		// destination, through the concentrator, not from this side.
		if st.UDP == nil || st.UDP.Up < 10000 || st.UDP.Down < 10000 || st.UDP.Refused < 1 || st.UDP.Streams < 1 || st.UDP.Unreachable < 1 {
			t.Errorf("the concentrator's UDP counters do not show the traffic:\n%s", raw)
		}
		cst, craw := e.status(t, "--socket", e.clientSocket())
		if cst.UDP == nil || cst.UDP.Up < 10000 || cst.UDP.Flows < 1 {
			t.Errorf("the client's UDP counters do not show the traffic:\n%s", craw)
		}
		// Over the uplinks, nearly everything went as packets on the
		// paths (the first datagrams ride the stream that opens the
		// session); in the stream, nothing did.
		onPaths := cst.UDP != nil && cst.UDP.PathOut > cst.UDP.Up*9/10 && cst.UDP.PathIn > cst.UDP.Down*9/10
		if (transport == "uplinks") != onPaths {
			t.Errorf("--udp-transport %s, but the client's path counters say otherwise:\n%s", transport, craw)
		}
	})
}

// TestQUICTunnel: with --quic tunnel, UDP to port 443 is relayed.
func TestQUICTunnel(t *testing.T) {
	e := newSysEnv(t, options{topo: topo.Options{NoEmu: true}})
	tp := e.tp
	script := `import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 443))
print("listening", flush=True)
while True:
    b, a = s.recvfrom(2048)
    s.sendto(b"quic " + b, a)`
	srv := tp.Start(tp.Inet, "quic-server", "python3", "-c", script, topo.DestAddr.String())
	e.waitLog(t, srv, "listening", 10*time.Second)
	e.startClient(t, e.key(), "--quic", "tunnel")
	client := `import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect((sys.argv[1], 443))
s.send(b"initial")
print(s.recv(100).decode())`
	code, out, _ := e.run(t, "python3", "-c", client, topo.DestAddr.String())
	if code != 0 || !strings.Contains(out, "quic initial") {
		t.Fatalf("UDP/443 with --quic tunnel: exit %d\n%s", code, out)
	}
}

// TestUDPOutage: a 50-datagram-a-second stream survives an outage of
// uplink A in which the link stays up and nothing gets through: its
// datagrams keep coming back (over B) during the outage.
func TestUDPOutage(t *testing.T) {
	for _, tr := range udpTransports {
		t.Run(tr, func(t *testing.T) { testUDPOutage(t, tr) })
	}
}

func testUDPOutage(t *testing.T, transport string) {
	e := newSysEnv(t, options{topo: shaped()})
	tp := e.tp
	srv := tp.Start(tp.Inet, "udp-server", "python3", "-c", udpServer, topo.DestAddr.String(), topo.DestAddr.String())
	e.waitLog(t, srv, "listening", 10*time.Second)
	e.startClient(t, e.key(), "--udp-transport", transport)
	// 50 a second for 8 s; it prints, per second, how many replies came.
	stream := `import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 7))
s.setblocking(False)
start = time.monotonic()
per = [0] * 9
i = 0
while time.monotonic() - start < 8.5:
    now = time.monotonic() - start
    if i < 400 and now >= i * 0.02:
        s.send(i.to_bytes(4, "big") + b"v" * 156)
        i += 1
    try:
        b = s.recv(2048)
        per[int((time.monotonic() - start))] += 1
    except BlockingIOError:
        time.sleep(0.002)
print("per-second", " ".join(map(str, per)), flush=True)`
	p := tp.Start(tp.Client, "udp-stream", "python3", "-c", stream, topo.DestAddr.String())
	time.Sleep(2 * time.Second)
	tp.Blackhole(topo.A, true)
	time.Sleep(4 * time.Second)
	tp.Blackhole(topo.A, false)
	if err := p.Wait(15 * time.Second); err != nil {
		t.Fatalf("the stream did not finish: %v\n%s", err, p.Log())
	}
	m := regexp.MustCompile(`per-second ([\d ]+)`).FindStringSubmatch(p.Log())
	if m == nil {
		t.Fatalf("no result:\n%s", p.Log())
	}
	var per []int
	for _, f := range strings.Fields(m[1]) {
		n, _ := strconv.Atoi(f)
		per = append(per, n)
	}
	t.Logf("replies per second (A dark from 2 s to 6 s): %v", per)
	// The outage's first second is the probe's dead time and MPTCP's
	// retransmission; from its second second on, datagrams come over B.
	for s := 3; s <= 5; s++ {
		if per[s] < 25 {
			t.Errorf("second %d of the stream (A dark): %d replies, want most of 50: the flow did not move to B", s, per[s])
		}
	}
	total := 0
	for _, n := range per {
		total += n
	}
	if total < 300 {
		t.Errorf("%d of 400 replies in all", total)
	}
}

// TestPing: ping through the tunnel gets the destination's own answer,
// with the real round trip (the links' delay, not the TUN's), IPv4 and
// IPv6; an address with no host gets no answer, and neither does one the
// concentrator's policy refuses.
func TestPing(t *testing.T) {
	needTools(t, "ping")
	e := newSysEnv(t, options{topo: shaped(), serverArgs: []string{"--deny", udpDenied.String() + "/32"}})
	e.addIPv6Internet(t)
	e.noRoute = true
	e.startClient(t, e.key(), "--route-all")
	rtt := regexp.MustCompile(`rtt min/avg/max/mdev = ([\d.]+)/`)
	for _, tt := range []struct {
		name string
		args []string
	}{
		{"IPv4", []string{"-c", "3", "-i", "0.3", "-W", "3", topo.DestAddr.String()}},
		{"IPv6", []string{"-6", "-c", "3", "-i", "0.3", "-W", "3", dest6.String()}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, out, _ := e.run(t, append([]string{"ping", "-n"}, tt.args...)...)
			if code != 0 || !strings.Contains(out, "3 received") {
				t.Fatalf("ping: exit %d\n%s", code, out)
			}
			m := rtt.FindStringSubmatch(out)
			if m == nil {
				t.Fatalf("no rtt line:\n%s", out)
			}
			// A's round trip is 20 ms (10 ms each way): an answer any
			// faster came from this side of the links.
			if min, _ := strconv.ParseFloat(m[1], 64); min < 15 {
				t.Errorf("ping's fastest round trip %s ms: faster than the links, so not the destination's answer\n%s", m[1], out)
			}
			t.Logf("ping %s: rtt min %s ms", tt.name, m[1])
		})
	}
	for _, tt := range []struct{ name, addr string }{
		{"no host there", "198.51.100.77"},
		{"refused by the concentrator", udpDenied.String()},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, out, _ := e.run(t, "ping", "-n", "-c", "2", "-i", "0.3", "-W", "2", tt.addr)
			if code == 0 || !strings.Contains(out, " 0 received") {
				t.Errorf("ping %s: exit %d, want no answer\n%s", tt.addr, code, out)
			}
		})
	}
	st, raw := e.status(t, "--socket", e.serverSocket())
	if st.UDP == nil || st.UDP.Pings < 6 || st.UDP.Echoes < 6 {
		t.Errorf("the concentrator's ping counters:\n%s", raw)
	}
}
