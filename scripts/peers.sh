#!/usr/bin/env bash
# scripts/peers.sh — the peers mpvpn is measured against, built from this
# repository and measured on namespaces of their own (issue 11, item 7):
#   direct    kernel TCP over one veth pair (c1 <-> s1)
#   mptcp     kernel MPTCP, two subflows over c1<->s1 and c2<->s2 (mptcpize iperf3)
#   wg        wireguard-go (userspace TUN + crypto) over c1<->s1
#   t2s       tun2socks v2 (gVisor netstack on a TUN) -> SOCKS5 (test/peers/socks5d) over c1<->s1
#   t2s-mptcp the same, tun2socks dialling MPTCP to an MPTCP SOCKS5 listener over both
#             veth pairs: mpvpn's data path without mpvpn's own code
#
#   sudo scripts/peers.sh build     # apt-get what is missing, go build the peers into $PA_WORK/bin
#   sudo scripts/peers.sh           # measure
#
# The versions are pinned by test/peers/go.mod (a module of its own, so
# tun2socks's gVisor never meets mpvpn's). scripts/bench.sh calls this for
# its "peers:" rows.
#
# Env: PA_WORK=/tmp/pa-work  PA_RESULTS=$PA_WORK/results  REPS=3  T=10
#      ONLY="direct mptcp wg t2s t2s-mptcp" (any subset)
#
# Everything runs in namespaces pa-c and pa-s with addresses in
# 10.254.0.0/16 that exist only there; the host is never touched. Every
# process started here is killed by PID and the namespaces are deleted on
# exit (trap), also on failure or Ctrl-C.
#
# Output: $PA_RESULTS/runs.tsv, one line per iperf3 run:
#   name rep dir(fwd|rev) Mbps retr cli_cpu% srv_cpu% host_busy% daemon_cpu%(of one core) path1_MB path2_MB joins
# and $PA_RESULTS/summary.md (medians), also printed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
. scripts/lib.sh
need_root

W=${PA_WORK:-/tmp/pa-work}
BIN=$W/bin
R=${PA_RESULTS:-$W/results}
REPS=${REPS:-3}
T=${T:-10}
ONLY=${ONLY:-"direct mptcp wg t2s t2s-mptcp"}
NSLIST="pa-c pa-s"
PEER_BINS="wireguard tun2socks socks5d"
PIDS=()

log() { echo "[$(date +%T)] $*" >&2; }
die() { log "FATAL: $*"; exit 1; }
want() { [[ " $ONLY " == *" $1 "* ]]; }

build() {
	install_deps
	local missing=()
	command -v wg >/dev/null || missing+=(wireguard-tools) # configures wireguard-go over its UAPI socket
	command -v mptcpize >/dev/null || missing+=(mptcpd)
	if [ ${#missing[@]} -gt 0 ]; then
		log "installing: ${missing[*]}"
		DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${missing[@]}" >/dev/null ||
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
			die "apt-get install ${missing[*]}"
	fi
	mkdir -p "$BIN"
	log "building the peers (test/peers/go.mod) into $BIN"
	(cd test/peers &&
		go build -trimpath -o "$BIN/" golang.zx2c4.com/wireguard github.com/xjasonlyu/tun2socks/v2 &&
		go build -trimpath -o "$BIN/socks5d" ./socks5d) || die "go build of the peers failed"
}

if [ "${1:-}" = build ]; then
	build
else
	install_deps
fi
for b in $PEER_BINS; do [ -x "$BIN/$b" ] || die "missing $BIN/$b (run: $0 build)"; done
for c in wg mptcpize iperf3; do command -v $c >/dev/null || die "missing $c (run: $0 build)"; done
mkdir -p "$R"

cleanup() {
	local p
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
	sleep 0.5
	for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
	for n in $NSLIST; do ip netns del "$n" 2>/dev/null; done
	rm -f /var/run/wireguard/wgpac.sock /var/run/wireguard/wgpas.sock
	log "cleanup done"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

inn() { local n=$1; shift; ip netns exec "$n" "$@"; }
# bg NS NAME CMD…: start CMD in NS; its PID goes to PIDS and to PID_<NAME>.
bg() {
	local n=$1 name=$2
	shift 2
	ip netns exec "$n" "$@" >"$R/$name.out" 2>&1 &
	PIDS+=($!)
	printf -v "PID_${name//-/_}" %s $!
}
stop() { kill "$1" 2>/dev/null; sleep 0.3; kill -9 "$1" 2>/dev/null; wait "$1" 2>/dev/null; }
# wait_port NS PORT: until something listens on TCP PORT in NS (5 s).
wait_port() {
	local i
	for i in $(seq 50); do
		inn "$1" ss -Hltn "sport = :$2" | grep -q . && return 0
		sleep 0.1
	done
	return 1
}

#  pa-c c1 10.254.1.1/24 <-> s1 10.254.1.2/24 pa-s   (path 1)
#  pa-c c2 10.254.2.1/24 <-> s2 10.254.2.2/24 pa-s   (path 2: the second MPTCP subflow)
#  pa-s lo 10.254.9.2/32: a target reached only through tun2socks (pa-c's default route is its TUN)
#  wg:  wgpac 10.254.8.1/24 (pa-c) <-> wgpas 10.254.8.2/24 (pa-s), endpoint 10.254.1.2:51820
topo_up() {
	local n
	for n in $NSLIST; do
		ip netns del "$n" 2>/dev/null
		ip netns add "$n" || die "ip netns add $n"
		ip -n "$n" link set lo up
		inn "$n" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 net.mptcp.enabled=1
	done
	ip -n pa-c link add c1 type veth peer name s1 netns pa-s
	ip -n pa-c link add c2 type veth peer name s2 netns pa-s
	ip -n pa-c addr add 10.254.1.1/24 dev c1
	ip -n pa-s addr add 10.254.1.2/24 dev s1
	ip -n pa-c addr add 10.254.2.1/24 dev c2
	ip -n pa-s addr add 10.254.2.2/24 dev s2
	ip -n pa-s addr add 10.254.9.2/32 dev lo
	ip -n pa-c link set c1 up
	ip -n pa-c link set c2 up
	ip -n pa-s link set s1 up
	ip -n pa-s link set s2 up
	# source routing for the second path, and a subflow endpoint on it
	ip -n pa-c route add default dev c2 table 102
	ip -n pa-c rule add from 10.254.2.1 lookup 102 pref 100
	ip -n pa-s route add default dev s2 table 102
	ip -n pa-s rule add from 10.254.2.2 lookup 102 pref 100
	ip -n pa-c mptcp limits set subflows 8 add_addr_accepted 8
	ip -n pa-s mptcp limits set subflows 8 add_addr_accepted 8
	ip -n pa-c mptcp endpoint add 10.254.2.1 dev c2 subflow
	# tun2socks's TUN, made here so the route can point at it before it runs
	ip -n pa-c tuntap add mode tun dev pa-t2s
	ip -n pa-c addr add 10.254.7.1/24 dev pa-t2s
	ip -n pa-c link set pa-t2s up
	ip -n pa-c route add default dev pa-t2s
	bg pa-s iperf "$(command -v iperf3)" -s -p 5201
	bg pa-s iperfm mptcpize run "$(command -v iperf3)" -s -p 5202
	bg pa-s socks "$BIN/socks5d" -l 0.0.0.0:1080
	bg pa-s socksm "$BIN/socks5d" -l 0.0.0.0:1081 -mptcp
	if want wg; then
		mkdir -p /var/run/wireguard
		local kc ks
		kc=$(wg genkey)
		ks=$(wg genkey)
		bg pa-c wgc env WG_PROCESS_FOREGROUND=1 "$BIN/wireguard" -f wgpac
		bg pa-s wgs env WG_PROCESS_FOREGROUND=1 "$BIN/wireguard" -f wgpas
		local i
		for i in $(seq 50); do
			[ -S /var/run/wireguard/wgpac.sock ] && [ -S /var/run/wireguard/wgpas.sock ] && break
			sleep 0.1
		done
		inn pa-c wg set wgpac private-key <(echo "$kc") listen-port 51821 \
			peer "$(echo "$ks" | wg pubkey)" endpoint 10.254.1.2:51820 allowed-ips 10.254.8.0/24 || die "wg set (client)"
		inn pa-s wg set wgpas private-key <(echo "$ks") listen-port 51820 \
			peer "$(echo "$kc" | wg pubkey)" endpoint 10.254.1.1:51821 allowed-ips 10.254.8.0/24 || die "wg set (server)"
		ip -n pa-c addr add 10.254.8.1/24 dev wgpac
		ip -n pa-c link set wgpac up
		ip -n pa-s addr add 10.254.8.2/24 dev wgpas
		ip -n pa-s link set wgpas up
		inn pa-c ping -c 2 -W 1 10.254.8.2 >/dev/null || die "no ping over wireguard-go"
	fi
	for p in 5201 5202 1080 1081; do wait_port pa-s $p || die "nothing listens on $p in pa-s"; done
	inn pa-c ping -c 1 -W 1 10.254.1.2 >/dev/null || die "no ping over path 1"
	inn pa-c ping -c 1 -W 1 10.254.2.2 >/dev/null || die "no ping over path 2"
}

T2S_PID=""
# start_t2s GODEBUG PROXY [FLAGS…]: (re)start tun2socks on the TUN.
start_t2s() {
	local gd=$1 p=$2
	shift 2
	[ -n "$T2S_PID" ] && stop "$T2S_PID"
	bg pa-c t2s env "GODEBUG=$gd" "$BIN/tun2socks" -device tun://pa-t2s -proxy "socks5://$p" -loglevel warn "$@"
	T2S_PID=$PID_t2s
	# up when a connection to the target goes through it
	local i
	for i in $(seq 50); do
		inn pa-c timeout 1 bash -c 'exec 3<>/dev/tcp/10.254.9.2/1080' 2>/dev/null && return 0
		sleep 0.1
	done
	die "tun2socks did not come up"
}

ticks() { # utime+stime (clock ticks) of PIDs, summed
	local s=0 p
	for p in "$@"; do [ -r "/proc/$p/stat" ] && s=$((s + $(awk '{print $14+$15}' "/proc/$p/stat"))); done
	echo $s
}
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }
ifbytes() { inn "$1" cat "/sys/class/net/$2/statistics/tx_bytes" "/sys/class/net/$2/statistics/rx_bytes" | paste -sd+ | bc; }
joins() { inn pa-c nstat -asz MPTcpExtMPJoinSynAckRx 2>/dev/null | awk '/MPJoin/{print $2}'; }
HZ=$(getconf CLK_TCK)
RES=$R/runs.tsv
echo -e "name\trep\tdir\tMbps\tretr\tcli_cpu%\tsrv_cpu%\thost_busy%\tdaemon_cpu%(of 1 core)\tpath1_MB\tpath2_MB\tjoins" >"$RES"

# run_iperf NAME REP DIR ADDR PORT WRAPPER DAEMON_PIDS…   (the iperf3 client runs in pa-c)
run_iperf() {
	local name=$1 rep=$2 dir=$3 addr=$4 port=$5 wrap=$6
	shift 6
	local flag="" j=$R/$name-$dir-$rep.json b0 t0 b1 t1 d0 d1 p10 p20 p11 p21 m0 m1 s0 s1
	[ "$dir" = rev ] && flag=-R
	read -r b0 t0 < <(busy)
	d0=$(ticks "$@")
	p10=$(ifbytes pa-c c1)
	p20=$(ifbytes pa-c c2)
	m0=$(joins)
	s0=$(date +%s.%N)
	# shellcheck disable=SC2086
	inn pa-c timeout $((T + 15)) $wrap iperf3 -c "$addr" -p "$port" -t "$T" $flag --json >"$j" 2>"$j.err"
	s1=$(date +%s.%N)
	read -r b1 t1 < <(busy)
	d1=$(ticks "$@")
	p11=$(ifbytes pa-c c1)
	p21=$(ifbytes pa-c c2)
	m1=$(joins)
	python3 - "$j" "$name" "$rep" "$dir" "$(((b1 - b0) * 100 / (t1 - t0 + 1)))" \
		"$(echo "scale=1; ($d1-$d0)*100/$HZ/($s1-$s0)" | bc)" "$(((p11 - p10) / 1000000))" "$(((p21 - p20) / 1000000))" \
		"$((${m1:-0} - ${m0:-0}))" >>"$RES" <<'PY'
import json, sys
f, name, rep, d, busy, dcpu, p1, p2, mpj = sys.argv[1:]
try:
    j = json.load(open(f))
    if "error" in j:
        raise Exception(j["error"])
    e = j["end"]
    mb = e["sum_received"]["bits_per_second"] / 1e6
    retr = e.get("sum_sent", {}).get("retransmits", "")
    c = e["cpu_utilization_percent"]
    print(f"{name}\t{rep}\t{d}\t{mb:.1f}\t{retr}\t{c['host_total']:.1f}\t{c['remote_total']:.1f}\t{busy}\t{dcpu}\t{p1}\t{p2}\t{mpj}")
except Exception as x:
    print(f"{name}\t{rep}\t{d}\tFAIL\t{x!r}"[:200])
PY
	tail -1 "$RES" >&2
}

log "versions: $(uname -r); $(iperf3 --version | head -1); $("$BIN/wireguard" --version | head -1); $(go version -m "$BIN/tun2socks" | awk '$1=="mod"{print "tun2socks", $3}'); $(go version)"
topo_up
log "topology up"
for rep in $(seq "$REPS"); do
	for dir in fwd rev; do
		want direct && run_iperf direct "$rep" $dir 10.254.1.2 5201 ""
		want mptcp && run_iperf mptcp "$rep" $dir 10.254.1.2 5202 "mptcpize run"
		want wg && run_iperf wg "$rep" $dir 10.254.8.2 5201 "" "$PID_wgc" "$PID_wgs"
		if want t2s; then
			start_t2s multipathtcp=0 10.254.1.2:1080
			run_iperf t2s "$rep" $dir 10.254.9.2 5201 "" "$T2S_PID" "$PID_socks"
		fi
		if want t2s-mptcp; then
			start_t2s multipathtcp=1 10.254.1.2:1081
			run_iperf t2s-mptcp "$rep" $dir 10.254.9.2 5201 "" "$T2S_PID" "$PID_socksm"
		fi
	done
done

python3 - "$RES" >"$R/summary.md" <<'PY'
import csv, statistics as st, sys, collections
rows = list(csv.reader(open(sys.argv[1]), delimiter="\t"))[1:]
g = collections.OrderedDict()
for r in rows:
    g.setdefault((r[0], r[2]), []).append(r if len(r) >= 12 and r[3] != "FAIL" else None)
fmt = lambda v: f"{v/1000:.2f} Gbit/s" if v >= 1000 else f"{v:.1f} Mbit/s"
print("| peer | dir | throughput median | range | n ok | retr | daemon CPU % of one core | path1 / path2 bytes |")
print("|---|---|---|---|---|---|---|---|")
for (name, d), rs in g.items():
    ok = [r for r in rs if r]
    if not ok:
        print(f"| {name} | {d} | FAIL | | 0/{len(rs)} | | | |")
        continue
    mb = [float(r[3]) for r in ok]
    med = lambda i: st.median(float(r[i] or 0) for r in ok)
    p1 = sum(float(r[9]) for r in ok); p2 = sum(float(r[10]) for r in ok)
    split = f"{100*p1/(p1+p2):.0f} % / {100*p2/(p1+p2):.0f} %" if "mptcp" in name and p1 + p2 > 0 else "-"
    dcpu = "-" if name in ("direct", "mptcp") else f"{med(8):.0f}"
    print(f"| {name} | {d} | {fmt(st.median(mb))} | {fmt(min(mb))} - {fmt(max(mb))} | {len(ok)}/{len(rs)} | {med(4):.0f} | {dcpu} | {split} |")
PY
cat "$R/summary.md"
log "done; results in $R"
