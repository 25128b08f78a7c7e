#!/usr/bin/env bash
# scripts/bench.sh — mpvpn's performance table (issue 3), measured side by
# side in one run on the test topology of test/netns (mpvpn-topo). Run as root:
#   sudo scripts/bench.sh
#
# Env:
#   T=10           seconds per iperf3 run
#   REPS=1         repetitions of every iperf3/throughput case (the table shows medians)
#   ONLY="agg unshaped setup flood memory outage"   sections to run (any subset);
#                  outage runs scripts/bench_outage.sh (issue 4's table; RUNS, OUTAGE_FOR there)
#   SKIP_PEERS=1   do not run the peer anchors (peers.sh) in the unshaped section
#   PEERS=path     the peers' script (default scripts/peers.sh, the repository's own: it
#                  builds wireguard-go, tun2socks and socks5d from test/peers/go.mod into
#                  PA_WORK, default /tmp/pa-work, on first use)
#   CURLS=10       curl samples per set-up case (medians)
#   FLOWS="1000 10000 30000"  idle-flow counts of the memory section (cumulative)
#   (ecmp: issue 12's one flow over 4 equal-cost paths with --subflows 1/2/4/8,
#    beside kernel MPTCP alone over the same endpoints; fleet: new flows a second
#    through the VIP of 3 concentrators, ECMP anycast and hash DNAT, against the
#    VIP in front of one; AB_N, AB_C as for flowrate)
#   KEEP=1         keep the work directory (logs, iperf3 JSON); it is printed either way
#   PLOTS=plots    where the figures go (PLOTS= for none): bench-rows.png, the agg and
#                  unshaped rows against the peers, and from the outage section
#                  outage-<kind>.png, each outage's timeline, mpvpn beside kernel MPTCP
#                  (scripts/plots.py, gnuplot); PLOTS=docs/bench renews the README's
#
# Output: progress on stderr; on stdout a few context lines, then ONE markdown
# table with the columns
#   | section | measurement | value | relative | target / note |
# and these rows (up = client→internet, iperf3 default; down = iperf3 -R):
#   agg       uplink A alone / uplink B alone (plain TCP, iperf3 -B <wan addr> to
#             the concentrator's address), up and down        Mbit/s
#   agg       ceiling = A + B, up and down                     Mbit/s
#   agg       kernel MPTCP (mptcpize iperf3, endpoints from the running mpvpn
#             client's pathmgr) up/down   Mbit/s | % of ceiling | joins, bytes per uplink
#   agg       mpvpn, one TCP flow to 198.51.100.10 up/down
#             Mbit/s | % of ceiling | target ≥96 % and ≥ kernel MPTCP: met / NOT met
#   unshaped  direct kernel TCP (client→concentrator over wan0) up/down  Mbit/s or Gbit/s
#   unshaped  mpvpn, one flow up/down | % of direct | CPU-s per Gbit (client, server),
#             the cipher its flows used (--cipher auto), and again with
#             --cipher chacha20-poly1305 on both ends
#   unshaped  peers.sh anchors (own namespaces pa-*): wireguard-go, tun2socks up/down
#             | % of peers' direct | CPU-s per Gbit of the daemons
#   setup     time_connect / time_starttransfer of a small HTTP reply, median of
#             CURLS, direct TCP vs mpvpn (server default = no Fast Open) vs mpvpn
#             with `mpvpn server --fast-open`            ms | in RTTs (ping over wan0)
#   setup     the first flow after a client start (median of FIRST_FLOWS=5
#             starts), a burst of BURST=20 new flows at once (median and p90,
#             median of BURSTS=5 bursts) direct and through mpvpn, and the
#             same with `--pool 0` (every flow dials afresh, as before issue 11)
#   setup     DNS lookup time (dig's query time, median of CURLS) through mpvpn's
#             resolver vs straight to the concentrator's resolver (dnsmasq on the
#             concentrator), UDP and TCP, and mpvpn's first lookup
#                                                         ms | in RTTs
#   udp       issue 10's transport choice, on the shaped links with 1 % loss on A:
#             a voice-like stream (voicebench: 50 datagrams/s of 160 bytes, echoed)
#             with A lossy, during a 5 s outage of A (blackhole: carrier up) and
#             after it, for --udp-transport stream, uplinks, and uplinks with
#             --udp-duplicate: p50 / p99 round trip in ms | loss %; and iperf3 -u
#             at a fixed offered rate: received Mbit/s | loss %
#   flood     the real client's new flows (newflows: connect → first byte of a
#             small HTTP reply through the TUN), without and during a handshake
#             flood (hsflood: 64 source addresses, silent and garbage
#             connections, more in all than the concentrator's half-open table)
#             success % | p50 / p90 first byte in ms | the concentrator's evictions, RSS
#   agg, unshaped  the mpvpn rows again with the client as a system VPN
#             (--route-all --kill-switch, two per-app rules)   | % of the plain client's
#   memory    VmRSS of mpvpn client and server idle, with each FLOWS count of idle
#             flows open                                  MiB | KiB per flow over idle
# A measurement that failed shows FAIL and why in the note column.
#
# Topologies: "agg" and "setup" share one built with
#   mpvpn-topo up --rate-a 40mbit --delay-a 10ms --rate-b 20mbit --delay-b 25ms
# (uplink A 20 ms RTT, B 50 ms RTT; userspace link emulator linkemu on both).
# "unshaped" and "memory" share one built with `mpvpn-topo up --no-emu`: plain
# veths to the ISPs, no link emulator in the path (with the emulator and no
# rate flags, linkemu itself would be the bottleneck). Every process started
# here is killed by PID and every topology torn down on exit (trap), also on
# failure or Ctrl-C.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
. scripts/lib.sh
need_root
install_deps
preflight

T=${T:-10}
REPS=${REPS:-1}
ONLY=${ONLY:-"agg unshaped setup flowrate probes flood memory outage udp ecmp fleet"}
SKIP_PEERS=${SKIP_PEERS:-}
CURLS=${CURLS:-10}
FIRST_FLOWS=${FIRST_FLOWS:-5}
BURST=${BURST:-20}
BURSTS=${BURSTS:-5}
FLOWS=${FLOWS:-"1000 10000 30000"}
PEERS=${PEERS:-scripts/peers.sh}
PA_WORK=${PA_WORK:-/tmp/pa-work}
PLOTS=${PLOTS-plots}
export PLOTS
T0=$(date +%s)

apt_install() {
	echo "installing: $*" >&2
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq "$@" >/dev/null ||
		{ apt-get -o DPkg::Lock::Timeout=300 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq "$@" >/dev/null; }
}
command -v mptcpize >/dev/null || apt_install mptcpd
command -v jq >/dev/null || apt_install jq
command -v ping >/dev/null || apt_install iputils-ping
command -v ab >/dev/null || apt_install apache2-utils
command -v socat >/dev/null || apt_install socat # the flow-rate rows' relay
[ -z "$PLOTS" ] || command -v gnuplot >/dev/null || apt_install gnuplot-nox # the figures
if ! command -v nginx >/dev/null; then
	# The web server of the set-up and flow-rate rows. Debian starts and
	# enables it on install; it is wanted only inside the namespaces.
	apt_install nginx-light
	systemctl disable --now nginx >/dev/null 2>&1 || true
fi
for c in mptcpize jq ping iperf3 curl python3 nginx ab socat; do
	command -v $c >/dev/null || { echo "$0: $c is missing" >&2; exit 1; }
done

# Many idle flows need many descriptors (the server holds two per flow).
ulimit -Hn 1048576 2>/dev/null || true
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true

WORK=$(mktemp -d /tmp/mpvpn-bench.XXXXXX)
BIN=$WORK/bin
mkdir -p "$BIN" "$WORK/www"
PY=$(command -v python3)
HZ=$(getconf CLK_TCK)
PIDS=()
PREFIXES=()
ROWS=$WORK/rows.md
: >"$ROWS"

log() { echo "[$(date +%T)] $*" >&2; }
die() { log "FATAL: $*"; exit 1; }

cleanup() {
	local rc=$? p
	trap - EXIT INT TERM
	for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
	for _ in $(seq 30); do
		local any=0
		for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && any=1; done
		[ $any = 0 ] && break
		sleep 0.1
	done
	for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
	for p in "${PREFIXES[@]}"; do "$BIN/mpvpn-topo" down --prefix "$p" >&2 || log "down $p failed"; done
	print_table
	log "total $(($(date +%s) - T0)) s; exit $rc"
	if [ "${KEEP:-}" = 1 ] || [ $rc != 0 ]; then
		log "work directory (logs, JSON): $WORK"
	else
		rm -rf "$WORK"
	fi
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

want() { [[ " $ONLY " == *" $1 "* ]]; }

# row SECTION MEASUREMENT VALUE RELATIVE NOTE
row() { printf '| %s | %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" "$5" >>"$ROWS"; }

# plotval CHART LABEL DIR VALUE: a bar of bench-rows.png (scripts/plots.py),
# the same number as its row; NaN when the measurement failed.
plotval() {
	local v=$4
	isnum "$v" || v=NaN
	printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$v" >>"$WORK/plot.tsv"
}
# share A B: A as a percentage of B, a bare number (NaN when either failed).
share() { isnum "$1" && isnum "$2" && [ "$(calc "$2 > 0" %d)" = 1 ] && calc "100*$1/$2" %.1f || echo NaN; }

print_table() {
	[ -s "$ROWS" ] || [ -s "$WORK/outage.md" ] || return 0
	echo
	echo "mpvpn bench $(date -u +%Y-%m-%dT%H:%MZ): $(uname -r), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); T=${T}s, REPS=$REPS; $(git rev-parse --short HEAD 2>/dev/null)"
	echo
	echo "| section | measurement | value | relative | target / note |"
	echo "| --- | --- | --- | --- | --- |"
	cat "$ROWS"
	if [ -s "$WORK/outage.md" ]; then
		echo
		cat "$WORK/outage.md"
	fi
}

# bg NAME NS CMD... starts CMD in NS, output to $WORK/NAME.log; BGPID is its
# PID (ip netns exec execs the command).
bg() {
	local name=$1 ns=$2
	shift 2
	ip netns exec "$ns" "$@" >"$WORK/$name.log" 2>&1 &
	BGPID=$!
	PIDS+=("$BGPID")
}

# web NAME NS ADDR PORT: nginx serving $WORK/www, one process in the
# foreground (so stop_pid ends it), with a listen backlog that a burst of
# new flows does not overflow (python's http.server has 5: a burst of 20
# then waits for SYN retransmissions, directly as through mpvpn).
web() {
	local name=$1 ns=$2 addr=$3 port=$4 d=$WORK/nginx-$1
	mkdir -p "$d"
	cat >"$d/nginx.conf" <<-EOF
		daemon off;
		master_process off;
		user root;
		pid $d/nginx.pid;
		error_log stderr;
		events { worker_connections 16384; }
		http {
			access_log off;
			client_body_temp_path $d/body;
			proxy_temp_path $d/proxy;
			fastcgi_temp_path $d/fastcgi;
			uwsgi_temp_path $d/uwsgi;
			scgi_temp_path $d/scgi;
			server {
				listen $addr:$port backlog=4096;
				root $WORK/www;
			}
		}
	EOF
	bg "$name" "$ns" nginx -p "$d" -c "$d/nginx.conf" -e stderr
}

stop_pid() {
	local p=$1
	kill -TERM "$p" 2>/dev/null || return 0
	for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
	kill -KILL "$p" 2>/dev/null
	wait "$p" 2>/dev/null
	return 0
}

# wait_listen NS PORT [SECONDS]
wait_listen() {
	local ns=$1 port=$2
	for _ in $(seq $((${3:-10} * 10))); do
		[ -n "$(ip netns exec "$ns" ss -Hltn "sport = :$port" 2>/dev/null)" ] && return 0
		sleep 0.1
	done
	return 1
}

# wait_log FILE REGEX SECONDS [PID]: 0 when a line matches; 1 on timeout or
# when PID exited.
wait_log() {
	local f=$1 re=$2 secs=$3 pid=${4:-}
	for _ in $(seq $((secs * 10))); do
		grep -qE "$re" "$f" 2>/dev/null && return 0
		[ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null && { grep -qE "$re" "$f" 2>/dev/null; return; }
		sleep 0.1
	done
	return 1
}

median() {
	printf '%s\n' "$@" | grep -E '^[0-9]+(\.[0-9]+)?$' | sort -g |
		awk '{a[NR]=$1} END{if(NR==0){print "FAIL"; exit} if(NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'
}

isnum() { [[ $1 =~ ^[0-9]+(\.[0-9]+)?$ ]]; }

# calc EXPR → result with awk (printf format in $2, default %.1f)
calc() { awk "BEGIN{printf \"${2:-%.1f}\", ($1)}"; }

# rate MBIT → "38.2 Mbit/s" / "1.23 Gbit/s"
rate() {
	isnum "$1" || { echo "FAIL"; return; }
	awk -v m="$1" 'BEGIN{ if (m >= 1000) printf "%.2f Gbit/s", m/1000; else printf "%.1f Mbit/s", m }'
}

pct() { isnum "$1" && isnum "$2" && [ "$(calc "$2 > 0" %d)" = 1 ] && echo "$(calc "100*$1/$2" %.0f) %" || echo "-"; }

ticks() { # utime+stime (clock ticks) of PIDs, summed
	local s=0 p
	for p in "$@"; do
		[ -r "/proc/$p/stat" ] && s=$((s + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12+$13}')))
	done
	echo $s
}

ticksc() { # ticks of PIDs with their waited-for children's (a forking relay)
	local s=0 p
	for p in "$@"; do
		[ -r "/proc/$p/stat" ] && s=$((s + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12+$13+$14+$15}')))
	done
	echo $s
}

rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$1/status" 2>/dev/null || echo FAIL; }

ifbytes() { # NS IFACE → rx+tx bytes
	ip netns exec "$1" cat "/sys/class/net/$2/statistics/rx_bytes" "/sys/class/net/$2/statistics/tx_bytes" 2>/dev/null | awk '{s+=$1} END{print s+0}'
}

joins() { ip netns exec "$1" nstat -asz MPTcpExtMPJoinSynAckRx 2>/dev/null | awk '/MPJoin/{print $2}'; }

# iperf DIR NS ADDR PORT [WRAPPER...] -- [IPERF ARGS...] sets IPERF_V to the
# received Mbit/s or FAIL:<reason>, and IPERF_SECS to the run's wall time.
IPERF_N=0
iperf() {
	local dir=$1 ns=$2 addr=$3 port=$4
	shift 4
	local wrap=()
	while [ $# -gt 0 ] && [ "$1" != -- ]; do wrap+=("$1"); shift; done
	[ $# -gt 0 ] && shift
	IPERF_N=$((IPERF_N + 1))
	local j=$WORK/iperf-$IPERF_N.json r=() s0 s1
	[ "$dir" = down ] && r=(-R)
	s0=$(date +%s.%N)
	ip netns exec "$ns" timeout $((T + 30)) "${wrap[@]}" iperf3 -c "$addr" -p "$port" -t "$T" -J "${r[@]}" "$@" >"$j" 2>"$j.err"
	s1=$(date +%s.%N)
	IPERF_SECS=$(calc "$s1 - $s0" %.3f)
	IPERF_V=$(jq -r 'if .error then "FAIL:" + .error else (.end.sum_received.bits_per_second / 1e6 * 100 | round / 100 | tostring) end' "$j" 2>/dev/null)
	[ -n "$IPERF_V" ] || IPERF_V="FAIL:$(head -c 100 "$j.err" | tr '\n|' '  ')"
	IPERF_V=${IPERF_V// /_}
}

# ------------------------------------------------------------------ build
log "building mpvpn, mpvpn-topo, bench-idleflows into $BIN"
go build -o "$BIN/mpvpn" ./cmd/mpvpn || die "go build ./cmd/mpvpn"
go build -o "$BIN/mpvpn-topo" ./test/netns/cmd/mpvpn-topo || die "go build mpvpn-topo"
go build -o "$BIN/bench-idleflows" ./test/netns/cmd/bench-idleflows || die "go build bench-idleflows"
go build -o "$BIN/hsflood" ./test/netns/cmd/hsflood || die "go build hsflood"
go build -o "$BIN/newflows" ./test/netns/cmd/newflows || die "go build newflows"
go build -o "$BIN/voicebench" ./test/netns/cmd/voicebench || die "go build voicebench"
MPVPN=$BIN/mpvpn
(umask 077 && "$MPVPN" keygen >"$WORK/server.key" && "$MPVPN" keygen >"$WORK/client.key") || die "mpvpn keygen"
chmod 600 "$WORK"/*.key
SERVER_PUB=$("$MPVPN" pubkey <"$WORK/server.key")
CLIENT_PUB=$("$MPVPN" pubkey <"$WORK/client.key")
echo hello >"$WORK/www/hello"

# topo_up ARGS...: builds a topology with a prefix of ours (mb + 4 hex digits,
# so `mpvpn-topo down --all` of others leaves it alone) and sets its
# variables (NS_CLI, NS_CONC, NS_INET, WAN0_ADDR, ...).
topo_up() {
	local p env
	p=$(printf 'mb%04x' $((RANDOM * 2 % 65536 + RANDOM % 2)))
	PREFIXES+=("$p")
	env=$("$BIN/mpvpn-topo" up --prefix "$p" "$@" 2>"$WORK/topo-$p.log") || { cat "$WORK/topo-$p.log" >&2; return 1; }
	eval "$env"
	log "topology $p up ($*)"
}

topo_down() {
	local p=$1 keep=() q
	"$BIN/mpvpn-topo" down --prefix "$p" >&2 || log "down $p failed"
	for q in "${PREFIXES[@]}"; do [ "$q" != "$p" ] && keep+=("$q"); done
	PREFIXES=("${keep[@]}")
}

# start_server [EXTRA...] / start_client [EXTRA...]: SERVER_PID, CLIENT_PID;
# the client on CLIENT_UPLINKS (default "$WAN0 $WAN1").
SERVER_N=0
start_server() {
	SERVER_N=$((SERVER_N + 1))
	bg "server-$PREFIX-$SERVER_N" "$NS_CONC" "$MPVPN" server --listen 0.0.0.0:7100 --key "$WORK/server.key" --peer "$CLIENT_PUB" --log-level "${SERVER_LOG_LEVEL:-info}" \
		--control "$WORK/server-$SERVER_N.sock" --max-flows-per-client 40000 --max-flows 40000 --handshake-rate 20000 --handshake-burst 20000 \
		--dns-upstream "$CONC_ADDR:53" "$@"
	SERVER_PID=$BGPID
	wait_listen "$NS_CONC" 7100 10 || { tail -20 "$WORK/server-$PREFIX-$SERVER_N.log" >&2; return 1; }
}
CLIENT_N=0
start_client() {
	CLIENT_N=$((CLIENT_N + 1))
	local l=$WORK/client-$PREFIX-$CLIENT_N.log
	local u ups=()
	for u in ${CLIENT_UPLINKS:-$WAN0 $WAN1}; do ups+=(--uplink "$u"); done
	bg "client-$PREFIX-$CLIENT_N" "$NS_CLI" "$MPVPN" client --server "$CONC_ADDR:7100" --server-key "$SERVER_PUB" \
		--key "$WORK/client.key" "${ups[@]}" --route "$DEST_NET" --log-level "${CLIENT_LOG_LEVEL:-info}" \
		--control "$WORK/client-$CLIENT_N.sock" --journal "$WORK/client-$CLIENT_N.journal" "$@"
	CLIENT_PID=$BGPID
	wait_log "$l" "client up" 20 "$CLIENT_PID" || { tail -20 "$l" >&2; return 1; }
}

# SYSVPN is the client as a system VPN (issue 9): everything through it,
# the kill switch on, and two per-app rules (for users the benchmark does
# not run as, so they cost the lookup and change nothing). Route-all must
# cost nothing on the data path: its rows stand beside the plain client's.
SYSVPN=(--route-all --kill-switch --rule uid:60001=direct --rule uid:60002=block)

# sysvpn_rows SECTION NOTE: runs the mpvpn iperf3 cases up and down again
# with a client started with SYSVPN (then puts the plain client back), and
# adds a row per direction; PLAIN_UP/PLAIN_DOWN are the plain client's
# medians, for the relative column.
sysvpn_rows() {
	local section=$1 note=$2 dir rep v
	declare -A S
	stop_pid "$CLIENT_PID"
	if ! start_client "${SYSVPN[@]}"; then
		row "$section" "mpvpn ${SYSVPN[*]}" "FAIL" "-" "client did not come up"
		start_client || die "mpvpn client did not come up again"
		return
	fi
	for rep in $(seq "$REPS"); do
		for dir in up down; do
			log "$section rep $rep $dir: mpvpn as a system VPN"
			iperf $dir "$NS_CLI" "$DEST_ADDR" 5201 --; v=$IPERF_V; S[$dir]+=" $v"; log "  $v"
		done
	done
	stop_pid "$CLIENT_PID"
	start_client || die "mpvpn client did not come up again"
	local p base
	for dir in up down; do
		# shellcheck disable=SC2086
		p=$(median ${S[$dir]})
		base=$PLAIN_UP
		[ $dir = down ] && base=$PLAIN_DOWN
		row "$section" "mpvpn --route-all --kill-switch, 2 per-app rules, $dir" "$(rate "$p")" "$(pct "$p" "$base") of the plain client's" "$note"
	done
}

# ------------------------------------------------------------------ 1 + 3: shaped topology
shaped() {
	topo_up --rate-a 40mbit --delay-a 10ms --rate-b 20mbit --delay-b 25ms || die "mpvpn-topo up (shaped)"
	bg iperf-conc "$NS_CONC" iperf3 -s -B "$CONC_ADDR" -p 5201
	bg iperfm-conc "$NS_CONC" mptcpize run iperf3 -s -B "$CONC_ADDR" -p 5202
	bg iperf-inet "$NS_INET" iperf3 -s -B "$DEST_ADDR" -p 5201
	web http-conc "$NS_CONC" "$CONC_ADDR" 8080
	web http-inet "$NS_INET" "$DEST_ADDR" 80
	# The concentrator's resolver (its --dns-upstream), answering at once
	# for the one name the set-up rows look up: a lookup then costs the
	# path to it and nothing else, through mpvpn or directly.
	bg dnsmasq-conc "$NS_CONC" dnsmasq --no-daemon --no-resolv --no-hosts --no-poll --bind-interfaces --user=root --pid-file= \
		--listen-address "$CONC_ADDR" --port 53 --address=/bench.mpvpn.test/"$DEST_ADDR"
	for x in "$NS_CONC 5201" "$NS_CONC 5202" "$NS_INET 5201" "$NS_CONC 8080" "$NS_INET 80" "$NS_CONC 53"; do
		# shellcheck disable=SC2086
		wait_listen $x 10 || die "no listener: $x"
	done
	start_server || die "mpvpn server did not start"
	# debug: the client logs why a flow's tunnel handshake failed (setup).
	CLIENT_LOG_LEVEL=debug start_client || die "mpvpn client did not come up"
	ip netns exec "$NS_CLI" ip mptcp endpoint show >"$WORK/endpoints.txt" 2>&1
	log "client MPTCP endpoints: $(tr '\n' ';' <"$WORK/endpoints.txt")"

	want agg && aggregation
	want flood && flood
	want setup && setup_latency
	want flowrate && flow_rate
	want probes && probe_cost
	stop_pid "$CLIENT_PID"
	stop_pid "$SERVER_PID"
	topo_down "$PREFIX"
}

aggregation() {
	declare -A V
	local rep dir c v j0 j1 a0 a1 b0 b1
	for rep in $(seq "$REPS"); do
		for dir in up down; do
			log "agg rep $rep $dir: A alone"
			iperf $dir "$NS_CLI" "$CONC_ADDR" 5201 -- -B "$WAN0_ADDR"; v=$IPERF_V; V[A.$dir]+=" $v"; log "  $v"
			log "agg rep $rep $dir: B alone"
			iperf $dir "$NS_CLI" "$CONC_ADDR" 5201 -- -B "$WAN1_ADDR"; v=$IPERF_V; V[B.$dir]+=" $v"; log "  $v"
			log "agg rep $rep $dir: kernel MPTCP"
			j0=$(joins "$NS_CLI"); a0=$(ifbytes "$NS_CLI" "$WAN0"); b0=$(ifbytes "$NS_CLI" "$WAN1")
			iperf $dir "$NS_CLI" "$CONC_ADDR" 5202 mptcpize run --; v=$IPERF_V; V[M.$dir]+=" $v"
			j1=$(joins "$NS_CLI"); a1=$(ifbytes "$NS_CLI" "$WAN0"); b1=$(ifbytes "$NS_CLI" "$WAN1")
			V[Mj.$dir]="$((${j1:-0} - ${j0:-0}))"; V[Ma.$dir]=$((a1 - a0)); V[Mb.$dir]=$((b1 - b0))
			log "  $v (joins ${V[Mj.$dir]}, wan0 $((a1 - a0)) B, wan1 $((b1 - b0)) B)"
			log "agg rep $rep $dir: mpvpn"
			j0=$(joins "$NS_CLI"); a0=$(ifbytes "$NS_CLI" "$WAN0"); b0=$(ifbytes "$NS_CLI" "$WAN1")
			iperf $dir "$NS_CLI" "$DEST_ADDR" 5201 --; v=$IPERF_V; V[P.$dir]+=" $v"
			j1=$(joins "$NS_CLI"); a1=$(ifbytes "$NS_CLI" "$WAN0"); b1=$(ifbytes "$NS_CLI" "$WAN1")
			V[Pj.$dir]="$((${j1:-0} - ${j0:-0}))"; V[Pa.$dir]=$((a1 - a0)); V[Pb.$dir]=$((b1 - b0))
			log "  $v (joins ${V[Pj.$dir]}, wan0 $((a1 - a0)) B, wan1 $((b1 - b0)) B)"
		done
	done
	local a b m p ceil note split
	fails() { local x; for x in $1; do [[ $x == FAIL* ]] && { echo "${x:0:120}"; return; }; done; }
	for dir in up down; do
		# shellcheck disable=SC2086
		{ a=$(median ${V[A.$dir]}); b=$(median ${V[B.$dir]}); m=$(median ${V[M.$dir]}); p=$(median ${V[P.$dir]}); }
		ceil=FAIL
		isnum "$a" && isnum "$b" && ceil=$(calc "$a + $b" %.2f)
		row agg "uplink A alone, plain TCP, $dir" "$(rate "$a")" "-" "40 Mbit/s, 20 ms RTT; iperf3 -B $WAN0_ADDR $(fails "${V[A.$dir]}")"
		row agg "uplink B alone, plain TCP, $dir" "$(rate "$b")" "-" "20 Mbit/s, 50 ms RTT (CGNAT); iperf3 -B $WAN1_ADDR $(fails "${V[B.$dir]}")"
		row agg "ceiling A + B, $dir" "$(rate "$ceil")" "100 %" "sum of the two rows above"
		split=$(pct "${V[Ma.$dir]}" "$(( ${V[Ma.$dir]} + ${V[Mb.$dir]} ))")
		row agg "kernel MPTCP (mptcpize iperf3), $dir" "$(rate "$m")" "$(pct "$m" "$ceil") of ceiling" \
			"joins ${V[Mj.$dir]}; wan0 $split of bytes (last rep) $(fails "${V[M.$dir]}")"
		note="target ≥96 % and ≥ kernel MPTCP:"
		if isnum "$p" && isnum "$ceil" && isnum "$m"; then
			if [ "$(calc "$p >= 0.96*$ceil && $p >= $m" %d)" = 1 ]; then note+=" met"; else note+=" NOT met"; fi
		else
			note+=" FAIL $(fails "${V[P.$dir]}")"
		fi
		split=$(pct "${V[Pa.$dir]}" "$(( ${V[Pa.$dir]} + ${V[Pb.$dir]} ))")
		row agg "**mpvpn, 1 TCP flow, $dir**" "**$(rate "$p")**" "**$(pct "$p" "$ceil") of ceiling**" "$note; joins ${V[Pj.$dir]}; wan0 $split of bytes (last rep)"
		plotval agg "uplink A alone" $dir "$a"
		plotval agg "uplink B alone" $dir "$b"
		plotval agg "A + B" $dir "$ceil"
		plotval agg "kernel MPTCP" $dir "$m"
		plotval agg "mpvpn" $dir "$p"
		[ $dir = up ] && PLAIN_UP=$p || PLAIN_DOWN=$p
	done
	sysvpn_rows agg "the same links, in the same run; target: the plain client's rate"
}

setup_latency() {
	local rtt
	rtt=$(ip netns exec "$NS_CLI" ping -n -q -c 10 -i 0.2 -I "$WAN0_ADDR" "$CONC_ADDR" 2>/dev/null | awk -F/ '/^rtt|^round-trip/{print $5}')
	isnum "${rtt:-x}" || rtt=20
	log "setup: RTT over wan0 ${rtt} ms"
	# curl_case NAME URL: median time_connect / time_starttransfer in ms.
	curl_case() {
		local name=$1 url=$2 out c=() s=() bad=0
		for _ in $(seq "$CURLS"); do
			out=$(ip netns exec "$NS_CLI" curl -s -o /dev/null --max-time 5 -w '%{time_connect} %{time_starttransfer} %{http_code}' "$url")
			set -- $out
			if [ "${3:-}" = 200 ]; then c+=("$(calc "$1*1000" %.2f)"); s+=("$(calc "$2*1000" %.2f)"); else bad=$((bad + 1)); fi
			# Three failures and no success: the case is broken, not slow.
			[ $bad -ge 3 ] && [ ${#c[@]} = 0 ] && break
			sleep 0.1
		done
		local mc ms
		mc=$(median "${c[@]}"); ms=$(median "${s[@]}")
		local n="median of ${#c[@]}; RTT over wan0 $rtt ms (ping)"
		if [ $bad -gt 0 ]; then
			n+="; **$bad of $((${#c[@]} + bad)) got no reply within 5 s**"
			local na
			sleep 6 # the client gives up on a tunnel handshake after 10 s
			na=$(grep -c 'no answer within' "$WORK/client-$PREFIX-$CLIENT_N.log")
			[ "$na" -gt 0 ] && n+=" (client log: $na× tunnel handshake \"no answer within 10s\")"
		fi
		log "setup $name: connect $mc ms, first byte $ms ms"
		if isnum "$mc"; then
			row setup "$name: time_connect" "$mc ms" "$(calc "$mc/$rtt" %.2f) RTT" "$n"
			row setup "$name: time_starttransfer" "$ms ms" "$(calc "$ms/$rtt" %.2f) RTT" "$n"
		else
			row setup "$name" "FAIL" "-" "$n"
		fi
	}
	curl_case "direct TCP (client→concentrator)" "http://$CONC_ADDR:8080/hello"
	curl_case "mpvpn, server default (no Fast Open)" "http://$DEST_ADDR/hello"
	# The first flow after a start: the client fills its pool before it
	# routes anything into the TUN, so this flow should cost no more.
	local i out f=()
	for i in $(seq "$FIRST_FLOWS"); do
		stop_pid "$CLIENT_PID"
		start_client || die "mpvpn client did not come up again"
		out=$(ip netns exec "$NS_CLI" curl -s -o /dev/null --max-time 5 -w '%{time_starttransfer} %{http_code}' "http://$DEST_ADDR/hello")
		# shellcheck disable=SC2086
		set -- $out
		[ "${2:-}" = 200 ] && f+=("$(calc "$1*1000" %.2f)")
	done
	local mf
	mf=$(median "${f[@]}")
	if isnum "$mf"; then
		row setup "mpvpn, first flow after the client starts: time_starttransfer" "$mf ms" "$(calc "$mf/$rtt" %.2f) RTT" "median of ${#f[@]} starts of $FIRST_FLOWS"
	else
		row setup "mpvpn, first flow after the client starts" "FAIL" "-" "no reply in $FIRST_FLOWS starts"
	fi
	# A page load: BURST new flows at once, directly and through mpvpn.
	burst_case() {
		local name=$1 url=$2 j=$WORK/burst-$3.json r p50 p90 ok
		r=()
		for i in $(seq "$BURSTS"); do
			ip netns exec "$NS_CLI" "$BIN/newflows" -url "$url" -n "$BURST" -parallel "$BURST" -timeout 5s >"$j.$i" 2>"$j.$i.err"
			sleep 0.5
		done
		# The medians and p90s of each burst, then their medians.
		p50=$(median $(for i in $(seq "$BURSTS"); do jq -r .first_byte.p50_ms "$j.$i" 2>/dev/null; done))
		p90=$(median $(for i in $(seq "$BURSTS"); do jq -r .first_byte.p90_ms "$j.$i" 2>/dev/null; done))
		ok=$(for i in $(seq "$BURSTS"); do jq -r .ok "$j.$i" 2>/dev/null; done | paste -sd+ | bc)
		local n="$BURSTS bursts; $ok of $((BURST * BURSTS)) flows answered; each burst's own median and p90, then their median"
		if isnum "${p50:-x}"; then
			row setup "$name, burst of $BURST at once, median: time_starttransfer" "$p50 ms" "$(calc "$p50/$rtt" %.2f) RTT" "$n"
			row setup "$name, burst of $BURST at once, p90: time_starttransfer" "$p90 ms" "$(calc "$p90/$rtt" %.2f) RTT" "$n"
		else
			row setup "$name, burst of $BURST at once" "FAIL" "-" "$(head -c 200 "$j.1.err" 2>/dev/null)"
		fi
	}
	burst_case "direct TCP" "http://$CONC_ADDR:8080/hello" direct
	burst_case "mpvpn" "http://$DEST_ADDR/hello" mpvpn
	# Before the pool, in the same run: every flow dials afresh, with its
	# destination in msg1 as before issue 12 (--early-destination) and,
	# as today's default for a flow that finds no pooled connection,
	# after the handshake (one round trip more, forward secret).
	stop_pid "$CLIENT_PID"
	if start_client --pool 0 --early-destination; then
		curl_case "mpvpn --pool 0 --early-destination (every flow dials afresh)" "http://$DEST_ADDR/hello"
		burst_case "mpvpn --pool 0 --early-destination" "http://$DEST_ADDR/hello" nopool
	else
		row setup "mpvpn --pool 0 --early-destination" "FAIL" "-" "client did not come up"
	fi
	stop_pid "$CLIENT_PID"
	if start_client --pool 0; then
		curl_case "mpvpn --pool 0 (afresh, destination after the handshake)" "http://$DEST_ADDR/hello"
	else
		row setup "mpvpn --pool 0" "FAIL" "-" "client did not come up"
	fi
	stop_pid "$CLIENT_PID"
	start_client || die "mpvpn client did not come up again"
	# dns_case NAME SERVER [DIG ARGS]: median of dig's query time (ms).
	dns_case() {
		local name=$1 server=$2 q=() t bad=0
		shift 2
		for _ in $(seq "$CURLS"); do
			t=$(ip netns exec "$NS_CLI" dig +time=5 +tries=1 "@$server" "$@" bench.mpvpn.test A | awk '/^;; Query time:/{print $4}')
			if isnum "${t:-x}"; then q+=("$t"); else bad=$((bad + 1)); fi
			sleep 0.1
		done
		local m n="median of ${#q[@]}; RTT over wan0 $rtt ms (ping)"
		m=$(median "${q[@]}")
		[ $bad -gt 0 ] && n+="; **$bad without an answer**"
		log "setup $name: $m ms"
		if isnum "$m"; then row setup "$name" "$m ms" "$(calc "$m/$rtt" %.2f) RTT" "$n"; else row setup "$name" "FAIL" "-" "$n"; fi
	}
	# The first lookup opens the client's DNS flow to the concentrator.
	local first
	first=$(ip netns exec "$NS_CLI" dig +time=5 +tries=1 @10.77.77.53 bench.mpvpn.test A | awk '/^;; Query time:/{print $4}')
	if isnum "${first:-x}"; then
		row setup "DNS through mpvpn, first lookup (opens its tunnel flow)" "$first ms" "$(calc "$first/$rtt" %.2f) RTT" "one sample"
	else
		row setup "DNS through mpvpn, first lookup" "FAIL" "-" "no answer"
	fi
	dns_case "DNS direct, UDP (client→concentrator's resolver)" "$CONC_ADDR"
	dns_case "DNS through mpvpn, UDP (10.77.77.53)" 10.77.77.53
	dns_case "DNS direct, TCP" "$CONC_ADDR" +tcp
	dns_case "DNS through mpvpn, TCP" 10.77.77.53 +tcp
	stop_pid "$SERVER_PID"
	if start_server --fast-open; then
		# The first flows fetch the Fast Open cookie.
		for _ in 1 2 3; do ip netns exec "$NS_CLI" curl -s -o /dev/null --max-time 5 "http://$DEST_ADDR/hello"; done
		curl_case "mpvpn, server --fast-open" "http://$DEST_ADDR/hello"
		# On Linux 6.18 a flow whose SYN carried data stalls server→client
		# once the second subflow joins (README, Decisions): the handshake
		# answer never arrives.
	else
		row setup "mpvpn, server --fast-open" "FAIL" "-" "server did not start"
	fi
	# The sections after this one measure the server's default.
	stop_pid "$SERVER_PID"
	start_server || die "mpvpn server did not start again"
	stop_pid "$CLIENT_PID"
	start_client || die "mpvpn client did not come up again"
}

# flowrate: new flows a second, one small GET each (ApacheBench, no
# keep-alive: every request a new TCP flow), through mpvpn and through a
# userspace relay over kernel MPTCP on the same links (socat under
# mptcpize at both ends: the client's listens on loopback, dials the
# concentrator's over MPTCP, which dials the destination), with the CPU
# each end spent per flow.
AB_N=${AB_N:-3000}
AB_C=${AB_C:-50}
# ab_case NAME URL CLIENT_PIDS SERVER_PIDS
ab_case() {
	local name=$1 url=$2 cp=$3 sp=$4 out rps fails c0 s0 c1 s1 t
	c0=$(ticksc $cp); s0=$(ticksc $sp)
	out=$(ip netns exec "$NS_CLI" ab -q -n "$AB_N" -c "$AB_C" -s 10 "$url" 2>&1)
	c1=$(ticksc $cp); s1=$(ticksc $sp)
	rps=$(awk '/^Requests per second:/{print $4}' <<<"$out")
	fails=$(awk '/^Failed requests:/{print $3}' <<<"$out")
	t=$(awk '/^Complete requests:/{print $3}' <<<"$out")
	log "flowrate $name: $rps/s, $t complete, $fails failed"
	if isnum "${rps:-x}"; then
		local n="ab -n $AB_N -c $AB_C; $t complete, ${fails:-?} failed; CPU per flow: client $(calc "($c1-$c0)*1000/$HZ/$AB_N" %.2f) ms, concentrator $(calc "($s1-$s0)*1000/$HZ/$AB_N" %.2f) ms"
		row "${AB_SECTION:-flowrate}" "$name" "$rps flows/s" "${REL:--}" "$n"
		RPS=$rps
	else
		row "${AB_SECTION:-flowrate}" "$name" "FAIL" "-" "$(tail -1 <<<"$out" | head -c 160)"
		RPS=
	fi
}

flow_rate() {
	ip netns exec "$NS_CONC" mptcpize run socat "TCP-LISTEN:8090,bind=$CONC_ADDR,fork,reuseaddr,backlog=1024" "TCP:$DEST_ADDR:80" >"$WORK/socat-conc.log" 2>&1 &
	local sc=$!
	PIDS+=("$sc")
	ip netns exec "$NS_CLI" mptcpize run socat "TCP-LISTEN:8091,bind=127.0.0.1,fork,reuseaddr,backlog=1024" "TCP:$CONC_ADDR:8090" >"$WORK/socat-cli.log" 2>&1 &
	local scl=$!
	PIDS+=("$scl")
	wait_listen "$NS_CONC" 8090 10 && wait_listen "$NS_CLI" 8091 10 || { row flowrate "relay" "FAIL" "-" "socat did not listen"; return; }
	# socat forks a process per flow: its CPU is counted from the
	# children's share in the parent's (cutime+cstime) too.
	REL="100 %" ab_case "relay: socat over kernel MPTCP (mptcpize, both ends)" "http://127.0.0.1:8091/hello" "$scl" "$sc"
	local relay=$RPS rel
	REL=- ab_case "mpvpn" "http://$DEST_ADDR/hello" "$CLIENT_PID" "$SERVER_PID"
	if isnum "${RPS:-x}" && isnum "${relay:-x}"; then
		rel=$(pct "$RPS" "$relay")
		log "flowrate: mpvpn at $rel of the relay's rate"
		row flowrate "mpvpn relative to the relay" "$rel" "-" "target ≥ 100 % of the relay, ≤ 0.5 ms CPU per flow on each end"
	fi
	# The same with connection reuse off: every flow takes a pooled
	# connection that has done its own handshake, none is handed back.
	stop_pid "$CLIENT_PID"
	if start_client --reuse=false; then
		REL=- ab_case "mpvpn --reuse=false" "http://$DEST_ADDR/hello" "$CLIENT_PID" "$SERVER_PID"
		if isnum "${RPS:-x}" && isnum "${relay:-x}"; then
			row flowrate "mpvpn --reuse=false relative to the relay" "$(pct "$RPS" "$relay")" "-" "each flow pays a Noise handshake and an MPTCP dial (the pool's), as before reuse"
		fi
		stop_pid "$CLIENT_PID"
	else
		row flowrate "mpvpn --reuse=false" "FAIL" "-" "client did not come up"
	fi
	start_client || die "mpvpn client did not come up again"
	stop_pid "$scl"
	stop_pid "$sc"
}

# probes: what the liveness probes cost an uplink, counted from the
# client's own status (probes_sent) over PROBE_WINDOW seconds with no flow
# open, then with one held open; a probe is a 40-byte UDP payload each way
# (68 bytes with IPv4 and UDP headers), so a day costs count/window ×
# 86400 × 68 bytes each way.
PROBE_WINDOW=${PROBE_WINDOW:-30}
probe_cost() {
	sent() { "$MPVPN" status --json --socket "$WORK/client-$CLIENT_N.sock" | jq -r --arg u "$1" '.uplinks[] | select(.name == $u) | .probes_sent'; }
	probe_row() { # NAME
		local a0 b0 a1 b1 u n
		a0=$(sent "$WAN0"); b0=$(sent "$WAN1")
		sleep "$PROBE_WINDOW"
		a1=$(sent "$WAN0"); b1=$(sent "$WAN1")
		for u in "$WAN0 $a0 $a1" "$WAN1 $b0 $b1"; do
			# shellcheck disable=SC2086
			set -- $u
			if isnum "${2:-x}" && isnum "${3:-x}"; then
				n=$(calc "($3-$2)/$PROBE_WINDOW" %.2f)
				row probes "$1, $name" "$n probes/s" "$(calc "$n*86400*68/1e6" %.1f) MB a day each way" "status --json probes_sent over ${PROBE_WINDOW} s; 40-byte UDP payloads"
			else
				row probes "$1, $name" "FAIL" "-" "no probes_sent in the status"
			fi
		done
	}
	sleep 3 # the last section's flows have closed
	local name="no flow open"
	probe_row
	ip netns exec "$NS_CLI" bash -c "exec 3<>/dev/tcp/$DEST_ADDR/80; sleep $((PROBE_WINDOW + 5))" &
	local hold=$!
	PIDS+=("$hold")
	sleep 1
	name="one flow open"
	probe_row
	stop_pid "$hold"
}

# flood: issue 8's row. The real client opens FLOOD_FLOWS new flows through
# its TUN (two at a time) without a flood, then during one: hsflood in the
# internet namespace, from 64 addresses of the destination network put on
# its loopback, keeps 80 connections per address open (silent or sending
# 148 bytes of garbage, the size of a real first message) and replaces
# every one the concentrator closes, at up to 3000 new connections a
# second: 5120 held at once if it could, more than the whole half-open
# table (4096).
FLOOD_FLOWS=${FLOOD_FLOWS:-200}
flood() {
	local first=198.51.100.100 i batch=$WORK/flood-addrs
	: >"$batch"
	for i in $(seq 0 63); do echo "address add 198.51.100.$((100 + i))/32 dev lo" >>"$batch"; done
	ip netns exec "$NS_INET" ip -batch "$batch" || { row flood "handshake flood" "FAIL" "-" "could not add the flood's addresses"; return; }
	newflows_row() { # LABEL NOTE → a row from one newflows run
		local j=$WORK/newflows-$1.json
		ip netns exec "$NS_CLI" "$BIN/newflows" -url "http://$DEST_ADDR/hello" -n "$FLOOD_FLOWS" -parallel 2 -timeout 15s >"$j" 2>"$j.err"
		local ok tried p50 p90 errs
		ok=$(jq -r .ok "$j" 2>/dev/null); tried=$(jq -r .tried "$j" 2>/dev/null)
		p50=$(jq -r .first_byte.p50_ms "$j" 2>/dev/null); p90=$(jq -r .first_byte.p90_ms "$j" 2>/dev/null)
		errs=$(jq -r '(.errors // [])[0] // ""' "$j" 2>/dev/null | tr '|' ' ' | head -c 100)
		if ! isnum "${ok:-x}" || ! isnum "${tried:-x}" || [ "$tried" = 0 ]; then
			row flood "real client's new flows, $1" "FAIL" "-" "newflows: $(head -c 100 "$j.err" | tr '|\n' '  ')"
			return
		fi
		log "flood: $1: $ok/$tried flows, first byte p50 $p50 ms, p90 $p90 ms"
		row flood "**real client's new flows, $1**" "**$(calc "100*$ok/$tried") % ($ok/$tried)**" "first byte p50 $p50 ms, p90 $p90 ms" "$2${errs:+; first error: $errs}"
	}
	newflows_row "no flood" "connect → first byte of a small HTTP reply through the TUN, 2 at a time; RTT 20 ms over wan0"
	local sock=$WORK/server-$SERVER_N.sock s0 ev0
	ev0=$("$MPVPN" status --json --socket "$sock" 2>/dev/null | jq -r '.handshakes.evicted // 0')
	s0=$(rss_kib "$SERVER_PID")
	bg hsflood "$NS_INET" "$BIN/hsflood" -target "$CONC_ADDR:7100" -src "$first" -sources 64 -conns 80 -mode mixed -rate 3000 -duration 120s
	local fp=$BGPID half=0 h
	for _ in $(seq 150); do
		h=$("$MPVPN" status --json --socket "$sock" 2>/dev/null | jq -r '.handshakes.half_open // 0')
		isnum "${h:-x}" && [ "$h" -ge 1800 ] && break
		sleep 0.2
	done
	half=$h
	local rss_max=0 r
	( while kill -0 "$fp" 2>/dev/null; do rss_kib "$SERVER_PID"; sleep 0.5; done ) >"$WORK/flood-rss" &
	local sampler=$!
	newflows_row "during a handshake flood" "target ≥ 95 %; hsflood: 64 addresses × 80 silent or garbage connections, ≤ 3000 new/s; $half half-open when measuring began"
	local ev1 st
	st=$("$MPVPN" status --json --socket "$sock" 2>/dev/null)
	ev1=$(echo "$st" | jq -r '.handshakes.evicted // 0')
	kill -INT "$fp" 2>/dev/null
	for _ in $(seq 100); do kill -0 "$fp" 2>/dev/null || break; sleep 0.1; done
	wait "$sampler" 2>/dev/null
	rss_max=$(sort -n "$WORK/flood-rss" | tail -1)
	local fl opened closed held
	fl=$(grep '^{' "$WORK/hsflood.log" | tail -1)
	opened=$(echo "$fl" | jq -r .opened 2>/dev/null); closed=$(echo "$fl" | jq -r .closed_by_server 2>/dev/null)
	held=$(echo "$fl" | jq -r ".held_median_ms | round" 2>/dev/null)
	row flood "concentrator during the flood" "$(calc "${rss_max:-0}/1024") MiB RSS" "idle $(calc "$s0/1024") MiB" 		"$((ev1 - ev0)) half-open connections evicted; the flood opened ${opened:-?}, the server closed ${closed:-?} (held ${held:-?} ms median)"
}

# ------------------------------------------------------------------ 2 + 4: unshaped topology
unshaped_topo() {
	topo_up --no-emu || die "mpvpn-topo up --no-emu"
	want unshaped && unshaped
	want memory && memory
	topo_down "$PREFIX"
}

unshaped() {
	bg iperf-conc-u "$NS_CONC" iperf3 -s -B "$CONC_ADDR" -p 5201
	local ip1=$BGPID
	bg iperf-inet-u "$NS_INET" iperf3 -s -B "$DEST_ADDR" -p 5201
	local ip2=$BGPID
	wait_listen "$NS_CONC" 5201 && wait_listen "$NS_INET" 5201 || die "iperf3 servers (unshaped)"
	start_server || die "mpvpn server did not start (unshaped)"
	start_client || die "mpvpn client did not come up (unshaped)"
	declare -A V
	local rep dir v
	for rep in $(seq "$REPS"); do
		for dir in up down; do
			log "unshaped rep $rep $dir: direct kernel TCP"
			iperf $dir "$NS_CLI" "$CONC_ADDR" 5201 -- -B "$WAN0_ADDR"; v=$IPERF_V; V[D.$dir]+=" $v"; log "  $v"
			log "unshaped rep $rep $dir: mpvpn"
			mpvpn_iperf V P $dir
		done
	done
	local cipher
	cipher=$(flows_cipher)
	local d p
	for dir in up down; do
		# shellcheck disable=SC2086
		{ d=$(median ${V[D.$dir]}); p=$(median ${V[P.$dir]}); }
		row unshaped "direct kernel TCP (client→concentrator over wan0), $dir" "$(rate "$d")" "100 %" "mpvpn-topo up --no-emu: veths, no link emulator, no shaping; 2 routed hops"
		row unshaped "**mpvpn, 1 TCP flow, $dir**" "**$(rate "$p")**" "**$(pct "$p" "$d") of direct**" "$(cpu_note V P $dir); --cipher auto: $cipher"
		plotval unshaped "mpvpn, auto: $cipher" $dir "$(share "$p" "$d")"
		[ $dir = up ] && PLAIN_UP=$p || PLAIN_DOWN=$p
	done
	# The other cipher, in the same run: what the choice is worth here.
	stop_pid "$CLIENT_PID"
	stop_pid "$SERVER_PID"
	if start_server --cipher chacha20-poly1305 && start_client --cipher chacha20-poly1305; then
		for rep in $(seq "$REPS"); do
			for dir in up down; do
				log "unshaped rep $rep $dir: mpvpn --cipher chacha20-poly1305"
				mpvpn_iperf V C $dir
			done
		done
		cipher=$(flows_cipher)
		for dir in up down; do
			# shellcheck disable=SC2086
			{ d=$(median ${V[D.$dir]}); p=$(median ${V[C.$dir]}); }
			row unshaped "mpvpn --cipher chacha20-poly1305 (both ends), $dir" "$(rate "$p")" "$(pct "$p" "$d") of direct" "$(cpu_note V C $dir); flows on $cipher"
			plotval unshaped "mpvpn, chacha20-poly1305" $dir "$(share "$p" "$d")"
		done
	else
		row unshaped "mpvpn --cipher chacha20-poly1305 (both ends)" "FAIL" "-" "did not start"
	fi
	stop_pid "$CLIENT_PID"
	stop_pid "$SERVER_PID"
	start_server || die "mpvpn server did not start (unshaped)"
	start_client || die "mpvpn client did not come up (unshaped)"
	sysvpn_rows unshaped "the same veths, in the same run; target: the plain client's rate"
	stop_pid "$CLIENT_PID"
	stop_pid "$SERVER_PID"
	stop_pid "$ip1"
	stop_pid "$ip2"
	want_peers && peers
}

# mpvpn_iperf ARRAY KEY DIR: one iperf3 run through the running client to
# the internet host; appends the rate to ARRAY[KEY.DIR] and the client's and
# server's CPU to ARRAY[KEYc.DIR] etc. (CPU-s per Gbit, cores busy).
mpvpn_iperf() {
	local -n A=$1
	local k=$2 dir=$3 v c0 s0 c1 s1 secs
	c0=$(ticks "$CLIENT_PID"); s0=$(ticks "$SERVER_PID")
	iperf $dir "$NS_CLI" "$DEST_ADDR" 5201 --; v=$IPERF_V
	c1=$(ticks "$CLIENT_PID"); s1=$(ticks "$SERVER_PID")
	secs=$IPERF_SECS
	A[$k.$dir]+=" $v"
	if isnum "$v"; then
		# CPU-seconds per second, per Gbit/s
		A[${k}c.$dir]+=" $(calc "($c1-$c0)/$HZ/$secs/($v/1000)" %.3f)"
		A[${k}s.$dir]+=" $(calc "($s1-$s0)/$HZ/$secs/($v/1000)" %.3f)"
		A[${k}cc.$dir]+=" $(calc "($c1-$c0)/$HZ/$secs" %.2f)"
		A[${k}sc.$dir]+=" $(calc "($s1-$s0)/$HZ/$secs" %.2f)"
	fi
	log "  $v (client $(((c1 - c0) * 100 / HZ)) cs, server $(((s1 - s0) * 100 / HZ)) cs CPU in ${secs}s)"
}

# cpu_note ARRAY KEY DIR: the medians mpvpn_iperf collected, as a note.
cpu_note() {
	local -n A=$1
	local k=$2 dir=$3
	# shellcheck disable=SC2086
	echo "CPU-s per Gbit: client $(median ${A[${k}c.$dir]:-}), server $(median ${A[${k}s.$dir]:-}) (busy: client $(median ${A[${k}cc.$dir]:-}), server $(median ${A[${k}sc.$dir]:-}) cores)"
}

# flows_cipher: which cipher the running client's flows were sealed with,
# from its status (every flow on one, or a mix).
flows_cipher() {
	"$MPVPN" status --json --socket "$WORK/client-$CLIENT_N.sock" |
		jq -r 'if .flows.total == 0 then "no flows" elif .flows.aes_gcm == .flows.total then "aes-256-gcm" elif .flows.aes_gcm == 0 then "chacha20-poly1305" else "\(.flows.aes_gcm) of \(.flows.total) on aes-256-gcm" end' 2>/dev/null || echo "status failed"
}

want_peers() { [ "$SKIP_PEERS" != 1 ]; }

peers() {
	if [ ! -f "$PEERS" ]; then
		row unshaped "peers (peers.sh)" "-" "-" "skipped: $PEERS not found (set PEERS=)"
		return
	fi
	local arg=() b
	for b in wireguard tun2socks socks5d; do [ -x "$PA_WORK/bin/$b" ] || arg=(build); done
	log "peers: $PEERS ${arg[*]} (ONLY=\"direct wg t2s\" REPS=$REPS T=$T; namespaces pa-*; log $WORK/peers.log)"
	mkdir -p "$WORK/peers"
	PA_WORK=$PA_WORK PA_RESULTS=$WORK/peers ONLY="direct wg t2s" REPS=$REPS T=$T \
		bash "$PEERS" "${arg[@]}" >"$WORK/peers.log" 2>&1 &
	local pp=$!
	PIDS+=("$pp")
	wait "$pp"
	local rc=$?
	local tsv=$WORK/peers/runs.tsv
	if [ ! -s "$tsv" ] || [ "$(wc -l <"$tsv")" -lt 2 ]; then
		row unshaped "peers (peers.sh)" "FAIL" "-" "exit $rc; see peers.log: $(grep -v '^\[' "$WORK/peers.log" | tail -1 | tr '|' ' ' | head -c 120)"
		return
	fi
	# name rep dir Mbps retr cli_cpu srv_cpu busy daemon_cpu%(of 1 core) ...
	local name dir d v cpu label
	for name in direct wg t2s; do
		case $name in
		direct) label="peers: direct kernel TCP (1 veth)" ;;
		wg) label="peers: wireguard-go" ;;
		t2s) label="peers: tun2socks v2 → SOCKS5" ;;
		esac
		for dir in fwd rev; do
			local dd=up
			[ $dir = rev ] && dd=down
			# shellcheck disable=SC2046
			v=$(median $(awk -F'\t' -v n=$name -v d=$dir '$1==n && $3==d {print $4}' "$tsv"))
			# shellcheck disable=SC2046
			d=$(median $(awk -F'\t' -v d=$dir '$1=="direct" && $3==d {print $4}' "$tsv"))
			if [ $name = direct ]; then
				row unshaped "$label, $dd" "$(rate "$v")" "100 %" "peers.sh, own namespaces pa-*"
			else
				# shellcheck disable=SC2046
				cpu=$(median $(awk -F'\t' -v n=$name -v d=$dir '$1==n && $3==d && $4+0>0 {printf "%.3f\n", $9/100/($4/1000)}' "$tsv"))
				row unshaped "$label, $dd" "$(rate "$v")" "$(pct "$v" "$d") of peers' direct" "CPU-s per Gbit of its daemons: $cpu"
				plotval unshaped "${label#peers: }" $dd "$(share "$v" "$d")"
			fi
		done
	done
}

# goruntime NS ADDR: "stack_inuse heap_inuse heap_live goroutines" from a
# process's /metrics (nothing when it does not answer: a process out of
# descriptors cannot accept the request).
goruntime() {
	ip netns exec "$1" curl -s --max-time 5 "http://$2/metrics" | awk '
		/^go_memstats_stack_inuse_bytes /{s=$2} /^go_memstats_heap_inuse_bytes /{h=$2}
		/^go_gc_heap_live_bytes /{l=$2} /^go_goroutines /{g=$2}
		END{if (g != "") printf "%.0f %.0f %.0f %.0f\n", s, h, l, g}'
}
# goruntime_delta BEFORE AFTER FLOWS: where a flow's memory goes, per flow.
goruntime_delta() {
	local a b
	read -r -a a <<<"$1"
	read -r -a b <<<"$2"
	[ ${#a[@]} = 4 ] && [ ${#b[@]} = 4 ] && [ "$3" -gt 0 ] || { echo "no runtime metrics"; return; }
	echo "per flow: Go stacks $(calc "(${b[0]}-${a[0]})/1024/$3" %.1f) KiB, heap in use $(calc "(${b[1]}-${a[1]})/1024/$3" %.1f) KiB (live at the last GC $(calc "(${b[2]}-${a[2]})/1024/$3" %.1f)), $(calc "(${b[3]}-${a[3]})/$3" %.2f) goroutines"
}

memory() {
	# debug: the server says why it refuses a flow (e.g. over MaxFlowsPerPeer).
	# 30 000 flows to one destination port from one address need more
	# than the default 28 232 ephemeral ports (the app's, the tunnel's,
	# the concentrator's own dials): these namespaces' own sysctl.
	local ns
	for ns in "$NS_CLI" "$NS_CONC"; do ip netns exec "$ns" sysctl -qw net.ipv4.ip_local_port_range="10000 65000"; done
	SERVER_LOG_LEVEL=debug start_server --metrics 127.0.0.1:9532 || die "mpvpn server did not start (memory)"
	start_client --metrics 127.0.0.1:9531 || die "mpvpn client did not come up (memory)"
	bg idle-serve "$NS_INET" "$BIN/bench-idleflows" serve -listen "$DEST_ADDR:9100"
	local sp=$BGPID
	wait_listen "$NS_INET" 9100 || die "bench-idleflows serve"
	sleep 2
	local c0 s0
	c0=$(rss_kib "$CLIENT_PID"); s0=$(rss_kib "$SERVER_PID")
	local cg0 sg0
	cg0=$(goruntime "$NS_CLI" 127.0.0.1:9531); sg0=$(goruntime "$NS_CONC" 127.0.0.1:9532)
	row memory "mpvpn client VmRSS, idle" "$(calc "$c0/1024") MiB" "-" "fresh client on --no-emu topology, no flow yet"
	row memory "mpvpn server VmRSS, idle" "$(calc "$s0/1024") MiB" "-" "fresh server"
	local stages
	stages=$(echo $FLOWS | tr ' ' ',')
	bg idle-dial "$NS_CLI" "$BIN/bench-idleflows" dial -addr "$DEST_ADDR:9100" -n "$stages" -batch 500
	local dp=$BGPID n got c s note
	for n in $FLOWS; do
		log "memory: opening up to $n idle flows"
		if ! wait_log "$WORK/idle-dial.log" "^(ready $n |stuck )" 600 "$dp"; then
			note="dialer did not finish: $(tail -1 "$WORK/idle-dial.log")"
			row memory "$n idle flows" "FAIL" "-" "$note"
			log "memory: $note"
			break
		fi
		sleep 3
		got=$(grep -E '^(ready|stuck) ' "$WORK/idle-dial.log" | tail -1 | awk '{print $2}' | tr -d :)
		c=$(rss_kib "$CLIENT_PID"); s=$(rss_kib "$SERVER_PID")
		note="held at the listener: $(grep '^held' "$WORK/idle-serve.log" | tail -1 | awk '{print $2}')"
		if grep -q '^stuck' "$WORK/idle-dial.log"; then
			note="**stuck at $got of $n**: $(grep '^stuck' "$WORK/idle-dial.log" | head -1 | cut -d: -f2- | tr '|' ' ' | head -c 160)"
			local lim sl=$WORK/server-$PREFIX-$SERVER_N.log
			lim=$(grep -ciE 'limit|over max' "$sl")
			[ "$lim" -gt 0 ] && note+="; server log: $lim× \"$(grep -iE 'limit|over max' "$sl" | head -1 | sed 's/.*msg=//; s/ peer=.*//' | tr -d '"|' | head -c 100)\""
		fi
		kill -0 "$CLIENT_PID" 2>/dev/null || note+="; client DIED"
		kill -0 "$SERVER_PID" 2>/dev/null || note+="; server DIED"
		row memory "mpvpn client VmRSS, $got idle flows" "$(calc "$c/1024") MiB" "$(calc "($c-$c0)/$got" %.1f) KiB/flow" "$note; $(goruntime_delta "$cg0" "$(goruntime "$NS_CLI" 127.0.0.1:9531)" "$got")"
		row memory "mpvpn server VmRSS, $got idle flows" "$(calc "$s/1024") MiB" "$(calc "($s-$s0)/$got" %.1f) KiB/flow" "over idle; $(goruntime_delta "$sg0" "$(goruntime "$NS_CONC" 127.0.0.1:9532)" "$got")"
		log "memory: $got flows: client $c KiB, server $s KiB ($note)"
		grep -q '^stuck' "$WORK/idle-dial.log" && break
		kill -USR1 "$dp" 2>/dev/null
	done
	stop_pid "$dp"
	stop_pid "$sp"
	stop_pid "$CLIENT_PID"
	stop_pid "$SERVER_PID"
}

# ------------------------------------------------------------------ udp: the datagram transport
VOICE_RATE=${VOICE_RATE:-20M}
udp_section() {
	topo_up --rate-a 40mbit --delay-a 10ms --loss-a 1% --rate-b 20mbit --delay-b 25ms || { row udp "topology" "FAIL" "-" "mpvpn-topo up"; return; }
	bg voice-inet "$NS_INET" "$BIN/voicebench" -listen "$DEST_ADDR:7007"
	bg iperfu-inet "$NS_INET" iperf3 -s -B "$DEST_ADDR" -p 5201
	wait_listen "$NS_INET" 5201 10 || die "no iperf3 server"
	start_server || die "mpvpn server did not start"
	local name args out l
	for name in "stream" "uplinks" "uplinks, duplicated"; do
		case $name in
		stream) args=(--udp-transport stream) ;;
		uplinks) args=(--udp-transport uplinks) ;;
		*) args=(--udp-transport uplinks --udp-duplicate 400) ;;
		esac
		start_client "${args[@]}" || { row udp "$name" "FAIL" "-" "client did not come up"; continue; }
		# Warm: the datagram stream and its session.
		ip netns exec "$NS_CLI" "$BIN/voicebench" -to "$DEST_ADDR:7007" -duration 2s >/dev/null 2>&1
		log "udp $name: voice 30 s, A lossy (1 %), dark from 10 s to 15 s"
		out=$WORK/voice-$CLIENT_N.json
		ip netns exec "$NS_CLI" "$BIN/voicebench" -to "$DEST_ADDR:7007" -duration 30s -phases "A 1% loss:0-10,A dark:10-15,after:15-30" >"$out" 2>&1 &
		local vp=$!
		sleep 10
		"$BIN/mpvpn-topo" link --prefix "$PREFIX" --uplink a --blackhole on >&2
		sleep 5
		"$BIN/mpvpn-topo" link --prefix "$PREFIX" --uplink a --blackhole off >&2
		wait $vp
		while read -r l; do
			local ph p50 p99 loss
			ph=$(echo "$l" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(d["phase"])' 2>/dev/null) || continue
			read -r p50 p99 loss < <(echo "$l" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print("%.1f %.1f %.1f" % (d["p50_ms"], d["p99_ms"], d["loss_pct"]))')
			log "  $ph: p50 $p50 ms, p99 $p99 ms, loss $loss %"
			row udp "voice, $name: $ph" "p50 $p50 ms, p99 $p99 ms" "loss $loss %" "50/s × 160 B; RTT A 20 ms, B 50 ms"
		done <"$out"
		log "udp $name: iperf3 -u -b $VOICE_RATE, A lossy"
		local j=$WORK/iperfu-$CLIENT_N.json
		if ip netns exec "$NS_CLI" iperf3 -u -c "$DEST_ADDR" -p 5201 -b "$VOICE_RATE" -l 1200 -t "$T" -J >"$j" 2>/dev/null; then
			read -r mbps lossp < <("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1]))["end"]["sum"]; print("%.1f %.2f" % (d["bits_per_second"]*(1-d["lost_percent"]/100)/1e6, d["lost_percent"]))' "$j")
			row udp "iperf3 -u at $VOICE_RATE, $name" "$mbps Mbit/s received" "loss $lossp %" "1200-byte datagrams, $T s; A 1 % loss"
		else
			row udp "iperf3 -u at $VOICE_RATE, $name" "FAIL" "-" "iperf3 failed"
		fi
		stop_pid "$CLIENT_PID"
	done
	stop_pid "$SERVER_PID"
	topo_down "$PREFIX"
}

# ecmp_section (issue 12): one flow over four equal-cost paths (ISP A to the
# concentrator, 20 Mbit/s each, L4 hashing: `mpvpn-topo up --ecmp 4`) from
# one uplink, with --subflows 1, 2, 4 and 8 against the server's seven
# --ports, beside kernel MPTCP alone (mptcpize iperf3) over the endpoints
# and limits the same client set; the share is of four times one path's
# plain TCP rate. Each --subflows value is a fresh client, so a fresh pool
# of connections and fresh source ports: the hash differs between rows.
ecmp_section() {
	# reno at both ends, as the test (ecmp_linux_test.go) and for its
	# reason: BBR, this sandbox's default, starves a pooled connection
	# spread over 8 subflows (README, "Over equal-cost paths").
	topo_up --ecmp 4 --ecmp-rate 20mbit --cc "${ECMP_CC:-reno}" || die "mpvpn-topo up --ecmp 4"
	bg iperf-conc-e "$NS_CONC" iperf3 -s -B "$CONC_ADDR" -p 5201
	bg iperfm-conc-e "$NS_CONC" mptcpize run iperf3 -s -B "$CONC_ADDR" -p 5202
	bg iperf-inet-e "$NS_INET" iperf3 -s -B "$DEST_ADDR" -p 5201
	for x in "$NS_CONC 5201" "$NS_CONC 5202" "$NS_INET 5201"; do
		# shellcheck disable=SC2086
		wait_listen $x 10 || die "no listener: $x"
	done
	start_server --listen "$CONC_ADDR:7100" --ports 7101-7107 || die "mpvpn server did not start (ecmp)"
	declare -A V
	local rep dir n v one ceil m p note
	for rep in $(seq "$REPS"); do
		for dir in up down; do
			log "ecmp rep $rep $dir: one path, plain TCP"
			iperf $dir "$NS_CLI" "$CONC_ADDR" 5201 -- -B "$WAN0_ADDR"; v=$IPERF_V; V[one.$dir]+=" $v"; log "  $v"
		done
	done
	for n in 1 2 4 8; do
		if ! CLIENT_UPLINKS=$WAN0 start_client --subflows "$n"; then
			row ecmp "mpvpn --subflows $n" "FAIL" "-" "client did not come up"
			continue
		fi
		sleep 2 # the pool's connections joined their subflows
		for rep in $(seq "$REPS"); do
			for dir in up down; do
				log "ecmp rep $rep $dir: mpvpn --subflows $n"
				iperf $dir "$NS_CLI" "$DEST_ADDR" 5201 --; v=$IPERF_V; V[P$n.$dir]+=" $v"; log "  $v"
				log "ecmp rep $rep $dir: kernel MPTCP, the same endpoints"
				iperf $dir "$NS_CLI" "$CONC_ADDR" 5202 mptcpize run --; v=$IPERF_V; V[M$n.$dir]+=" $v"; log "  $v"
			done
		done
		stop_pid "$CLIENT_PID"
	done
	for dir in up down; do
		# shellcheck disable=SC2086
		one=$(median ${V[one.$dir]})
		ceil=FAIL
		isnum "$one" && ceil=$(calc "4 * $one" %.2f)
		row ecmp "one path, plain TCP, $dir" "$(rate "$one")" "25 % of 4 paths" "4 equal-cost paths of 20 Mbit/s, L4 hashing, ${ECMP_CC:-reno} at both ends; iperf3 -B $WAN0_ADDR"
		for n in 1 2 4 8; do
			# shellcheck disable=SC2086
			{ p=$(median ${V[P$n.$dir]:-}); m=$(median ${V[M$n.$dir]:-}); }
			note="kernel MPTCP alone, the same endpoints: $(rate "$m") ($(pct "$m" "$ceil"))"
			if [ $n = 8 ]; then
				if isnum "$p" && isnum "$one" && [ "$(calc "$p >= 2.5*$one" %d)" = 1 ]; then note+="; target ≥ 2.5× one path: met"; else note+="; target ≥ 2.5× one path: NOT met"; fi
			fi
			row ecmp "mpvpn --subflows $n, 1 TCP flow, $dir" "$(rate "$p")" "$(pct "$p" "$ceil") of 4 paths" "$note"
		done
	done
	stop_pid "$SERVER_PID"
	topo_down "$PREFIX"
}

# fleet: new flows a second one client opens (ab, as flowrate) through the
# VIP of three concentrators (mpvpn-topo up --fleet 3, on the links of
# "agg"), spread by ECMP anycast and by an nftables hash DNAT, against the
# same VIP in front of one member alone. The members share one config file
# (key, peers, limits) and each announces its own address (--vip,
# --announce), so the client's joins reach the member that holds the
# connection.
fleet_section() {
	topo_up --fleet 3 --rate-a 40mbit --delay-a 10ms --rate-b 20mbit --delay-b 25ms || die "mpvpn-topo up --fleet 3"
	web http-inet-f "$NS_INET" "$DEST_ADDR" 80
	wait_listen "$NS_INET" 80 10 || die "no listener: $NS_INET 80"
	cat >"$WORK/fleet.toml" <<-EOF
		key = "$WORK/server.key"
		peer = ["$CLIENT_PUB"]
		no-dns = true
		log-level = "${SERVER_LOG_LEVEL:-info}"
		max-flows-per-client = 40000
		max-flows = 40000
		handshake-rate = 20000
		handshake-burst = 20000
	EOF
	local i ns addr members=() single mode
	for i in 1 2 3; do
		ns=NS_C$i addr=C${i}_ADDR
		bg "member-$PREFIX-$i" "${!ns}" "$MPVPN" server --config "$WORK/fleet.toml" --listen 0.0.0.0:7100 \
			--vip "$CONC_ADDR" --announce "${!addr}" --control "$WORK/member-$i.sock"
		members+=("$BGPID")
		wait_listen "${!ns}" 7100 10 || die "fleet member $i did not start"
	done
	sleep 1.2 # past the members' replay horizon
	for mode in "anycast 1" "anycast 1,2,3" "hash-dnat 1,2,3"; do
		# shellcheck disable=SC2086
		set -- $mode
		"$BIN/mpvpn-topo" balance --prefix "$PREFIX" --mode "$1" --members "$2" || die "mpvpn-topo balance $mode"
		if ! start_client; then
			row fleet "$mode" "FAIL" "-" "client did not come up"
			continue
		fi
		sleep 2 # the pool filled
		if [ "$2" = 1 ]; then
			AB_SECTION=fleet REL="100 %" ab_case "one concentrator behind the VIP" "http://$DEST_ADDR/hello" "$CLIENT_PID" "${members[*]}"
			single=$RPS
		else
			AB_SECTION=fleet REL=- ab_case "3 concentrators behind the VIP, $1" "http://$DEST_ADDR/hello" "$CLIENT_PID" "${members[*]}"
			if isnum "${RPS:-x}" && isnum "${single:-x}"; then
				row fleet "3 concentrators, $1, relative to one" "$(pct "$RPS" "$single")" "-" "one client; the concentrator CPU is the three members' sum"
			fi
		fi
		stop_pid "$CLIENT_PID"
	done
	for i in "${members[@]}"; do stop_pid "$i"; done
	topo_down "$PREFIX"
}

# ------------------------------------------------------------------ main
log "work directory $WORK; T=$T REPS=$REPS ONLY=\"$ONLY\" SKIP_PEERS=$SKIP_PEERS"
if want agg || want setup || want flood || want flowrate || want probes; then shaped; fi
if want unshaped || want memory; then unshaped_topo; fi
if want udp; then udp_section; fi
if want ecmp; then ecmp_section; fi
if want fleet; then fleet_section; fi
if want outage; then
	log "outage: scripts/bench_outage.sh (RUNS=${RUNS:-3})"
	bash scripts/bench_outage.sh >"$WORK/outage.md" || log "outage bench failed (exit $?)"
fi
if [ -n "$PLOTS" ] && [ -s "$WORK/plot.tsv" ]; then
	if made=$(python3 scripts/plots.py rows "$WORK/plot.tsv" "$PLOTS"); then
		for f in $made; do log "chart: $f"; done
	else
		log "the chart of the rows could not be drawn"
	fi
fi
log "done"
