#!/usr/bin/env bash
# scripts/demo.sh — mpvpn's main job on an emulated two-uplink network:
#   uplink A 40 Mbit/s, 20 ms RTT; uplink B 20 Mbit/s, 50 ms RTT.
#   1. one download over uplink A alone, without mpvpn (the baseline);
#   2. the same download through mpvpn: one TCP flow, both uplinks;
#   3. again, and uplink A is cut (blackholed) a third of the way through.
# Everything runs in network namespaces of its own (test/netns/topo), which
# are deleted at the end, also on failure or Ctrl-C. The host's own routes,
# rules, firewall and interfaces are not touched. Run as root:
#   sudo scripts/demo.sh
# Exits non-zero when a download through mpvpn fails or arrives corrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_root
install_deps
preflight

SIZE_MIB=32            # the downloaded file (random, incompressible)
CURL_MAX_TIME=60       # seconds, per download
CONC_PORT=7100         # mpvpn server
BASE_PORT=8080         # the baseline's HTTP server on the concentrator

TMP=$(mktemp -d /tmp/mpvpn-demo.XXXXXX)
PIDS=()
PREFIX=
TOPO=$TMP/mpvpn-topo
MPVPN=$TMP/mpvpn

# cleanup stops what this script started (by PID), deletes its namespaces
# and its temporary directory. It runs on every exit.
# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
	local rc=$? pid i
	trap - EXIT INT TERM
	set +e
	for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
	for pid in "${PIDS[@]}"; do
		for ((i = 0; i < 30; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	if [ -n "$PREFIX" ] && [ -x "$TOPO" ]; then
		"$TOPO" down --prefix "$PREFIX" || echo "demo: mpvpn-topo down --prefix $PREFIX failed" >&2
	fi
	rm -rf "$TMP"
	exit "$rc"
}
trap cleanup EXIT
trap 'echo "demo: line $LINENO: \"$BASH_COMMAND\" failed" >&2; show_logs >&2' ERR
trap 'echo; echo "demo: interrupted" >&2; exit 130' INT
trap 'echo "demo: terminated" >&2; exit 143' TERM

step() { printf '\n=== %s\n' "$*"; }
# calc prints an awk expression with a printf format: calc '%.1f' '1/3'.
calc() { awk "BEGIN { printf \"$1\", $2 }"; }
# nsx runs a command in a namespace.
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
# rx sets RXA and RXB to the bytes received so far on the client's wan0 and
# wan1 (their rx_bytes), read from /proc/PID/net/dev of the mpvpn client,
# which runs in the client namespace: no fork, so the timeline keeps time
# on a busy machine.
rx() {
	local name rest
	RXA=0 RXB=0
	while IFS=: read -r name rest; do
		case ${name// /} in
		wan0) read -r RXA _ <<<"$rest" ;;
		wan1) read -r RXB _ <<<"$rest" ;;
		esac
	done <"/proc/$CLIENT_PID/net/dev"
}

# show_logs prints the tail of every log (on failure).
show_logs() {
	local f
	for f in "$TMP"/*.log; do
		[ -s "$f" ] || continue
		echo "--- tail of $(basename "$f")"
		tail -n 20 "$f"
	done
}
die() { echo "demo: $*" >&2; show_logs >&2; exit 1; }

# start NAME NS CMD... runs CMD in NS in the background, logging to NAME.log.
start() {
	local name=$1 ns=$2; shift 2
	ip netns exec "$ns" "$@" >"$TMP/$name.log" 2>&1 &
	PIDS+=("$!")
}
# wait_listen NS PORT waits (10 s) until something in NS listens on PORT.
wait_listen() {
	local i
	for ((i = 0; i < 100; i++)); do
		if nsx "$1" ss -Hltn "sport = :$2" | grep -q .; then return 0; fi
		sleep 0.1
	done
	die "nothing listens on port $2 in $1"
}

# download NAME CURL-ARGS... fetches into $TMP/NAME.out in the client
# namespace; sets DL_RC, DL_BYTES, DL_SECS. Runs curl in the background so
# that Ctrl-C is handled at once.
download() {
	local name=$1 pid; shift
	rm -f "$TMP/$name.out"
	ip netns exec "$NS_CLI" curl -sS --max-time "$CURL_MAX_TIME" -o "$TMP/$name.out" \
		-w '%{size_download} %{time_total}\n' "$@" >"$TMP/$name.w" 2>"$TMP/curl-$name.log" &
	pid=$!
	PIDS+=("$pid")
	DL_PID=$pid
}
download_wait() {
	local p keep=()
	DL_RC=0
	wait "$DL_PID" || DL_RC=$?
	# Reaped: its PID may be reused, so cleanup must not signal it.
	for p in "${PIDS[@]}"; do [ "$p" = "$DL_PID" ] || keep+=("$p"); done
	PIDS=("${keep[@]}")
	read -r DL_BYTES DL_SECS <"$TMP/$1.w" || { DL_BYTES=0; DL_SECS=0; }
}
mbps() { calc '%.1f' "$1 * 8 / ($2 > 0 ? $2 : 1) / 1e6"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

step "building mpvpn and mpvpn-topo"
go build -o "$MPVPN" ./cmd/mpvpn
go build -o "$TOPO" ./test/netns/cmd/mpvpn-topo
echo "ok ($TMP)"

step "emulated network: uplink A 40 Mbit/s 20 ms RTT, uplink B 20 Mbit/s 50 ms RTT"
# A prefix of our own ("mv" + 4 hex digits, as mpvpn-topo picks), so that
# the clean-up knows it even if up fails half-way.
while :; do
	PREFIX=mv$(od -An -N2 -tx2 /dev/urandom | tr -d ' \n')
	ip netns list | grep -q "^$PREFIX-" || break
done
topo_env=$("$TOPO" up --prefix "$PREFIX" --rate-a 40mbit --delay-a 10ms --rate-b 20mbit --delay-b 25ms)
eval "$topo_env"
printf '%s\n' "$topo_env" | sed 's/^/  /'

step "keys, servers"
umask 077
(umask 077 && "$MPVPN" keygen >"$TMP/server.key" && "$MPVPN" keygen >"$TMP/client.key")
SERVER_PUB=$("$MPVPN" pubkey <"$TMP/server.key")
CLIENT_PUB=$("$MPVPN" pubkey <"$TMP/client.key")
umask 022
mkdir "$TMP/www"
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$TMP/www/blob"
SUM=$(sha "$TMP/www/blob")
SIZE=$((SIZE_MIB << 20))
echo "file: $SIZE_MIB MiB of random bytes, sha256 ${SUM:0:16}…"

start http-inet "$NS_INET" python3 -m http.server --bind "$DEST_ADDR" --directory "$TMP/www" 80
start http-conc "$NS_CONC" python3 -m http.server --bind "$CONC_ADDR" --directory "$TMP/www" "$BASE_PORT"
start server "$NS_CONC" "$MPVPN" server --listen "0.0.0.0:$CONC_PORT" --key "$TMP/server.key" --peer "$CLIENT_PUB" \
	--control "$TMP/server.sock"
wait_listen "$NS_INET" 80
wait_listen "$NS_CONC" "$BASE_PORT"
wait_listen "$NS_CONC" "$CONC_PORT"
echo "web server  http://$DEST_ADDR/blob  (internet host, reachable only through mpvpn)"
echo "mpvpn server $CONC_ADDR:$CONC_PORT  (concentrator)"

# ---------------------------------------------------------------- step 1
step "1. uplink A alone, without mpvpn"
# The concentrator does not forward, so without mpvpn the internet host is
# out of reach: the baseline fetches the same file from the concentrator
# itself over the same emulated uplink A (the concentrator-internet hop it
# skips is an unshaped veth).
echo "curl --interface wan0 http://$CONC_ADDR:$BASE_PORT/blob"
download base --interface wan0 "http://$CONC_ADDR:$BASE_PORT/blob"
download_wait base
[ "$DL_RC" = 0 ] || die "baseline download failed (curl exit $DL_RC): $(cat "$TMP/curl-base.log")"
[ "$(sha "$TMP/base.out")" = "$SUM" ] || die "baseline download: sha256 differs"
BASE_MBPS=$(mbps "$DL_BYTES" "$DL_SECS")
printf '%s MiB in %.1f s: %s Mbit/s\n' "$(calc '%.1f' "$DL_BYTES / 1048576")" "$DL_SECS" "$BASE_MBPS"
rm -f "$TMP/base.out"

# ---------------------------------------------------------------- step 2
step "2. through mpvpn, both uplinks"
start client "$NS_CLI" "$MPVPN" client --server "$CONC_ADDR:$CONC_PORT" --server-key "$SERVER_PUB" \
	--key "$TMP/client.key" --uplink wan0 --uplink wan1 --route "$DEST_NET" --control "$TMP/client.sock" --journal "$TMP/client.journal"
CLIENT_PID=${PIDS[-1]}
for ((i = 0; ; i++)); do
	grep -q 'client up' "$TMP/client.log" && break
	kill -0 "$CLIENT_PID" 2>/dev/null || die "mpvpn client exited before it was up"
	[ "$i" -lt 150 ] || die "mpvpn client not up within 15 s"
	sleep 0.1
done
echo "mpvpn client up: uplinks wan0 wan1, route $DEST_NET"
echo "curl http://$DEST_ADDR/blob"
rx; a0=$RXA b0=$RXB
download mp1 "http://$DEST_ADDR/blob"
download_wait mp1
rx; a1=$RXA b1=$RXB
MP1_OK=no
MP1_SUM=no
[ -f "$TMP/mp1.out" ] && [ "$(sha "$TMP/mp1.out")" = "$SUM" ] && MP1_SUM=yes
[ "$DL_RC" = 0 ] && [ "$MP1_SUM" = yes ] && MP1_OK=yes
MP_MBPS=$(mbps "$DL_BYTES" "$DL_SECS")
RX_A=$((a1 - a0)) RX_B=$((b1 - b0))
SHARE_A=$(calc '%.0f' "100 * $RX_A / ($RX_A + $RX_B + 1)")
SHARE_B=$((100 - SHARE_A))
printf '%s MiB in %.1f s: %s Mbit/s (curl exit %s, sha256 matches: %s)\n' \
	"$(calc '%.1f' "$DL_BYTES / 1048576")" "$DL_SECS" "$MP_MBPS" "$DL_RC" "$MP1_SUM"
printf 'received on wan0 (A): %6.1f MiB  %3s %%\n' "$(calc '%.1f' "$RX_A / 1048576")" "$SHARE_A"
printf 'received on wan1 (B): %6.1f MiB  %3s %%\n' "$(calc '%.1f' "$RX_B / 1048576")" "$SHARE_B"
rm -f "$TMP/mp1.out"
[ "$MP1_OK" = yes ] || { echo "download through mpvpn failed: $(cat "$TMP/curl-mp1.log")"; show_logs; }
echo
echo "mpvpn status (what \`mpvpn status\` shows on the client):"
"$MPVPN" status --socket "$TMP/client.sock" | sed 's/^/  /' || true

# ---------------------------------------------------------------- step 3
step "3. through mpvpn; uplink A is cut a third of the way through"
printf '%7s %9s %11s %11s\n' "time s" "MiB" "wan0 Mbit/s" "wan1 Mbit/s"
rx; a0=$RXA b0=$RXB
pa=$a0 pb=$b0
# Without forks (the machine may be busy): times in microseconds
# (EPOCHREALTIME without its decimal point), integer tenths for printing.
dec() { printf -v "$1" '%d.%d' $(($2 / 10)) $(($2 % 10)); }
t0=${EPOCHREALTIME//[!0-9]/}
pt=$t0 next=$((t0 + 500000))
cut=no
download mp2 "http://$DEST_ADDR/blob"
# Every 0.1 s: cut A once a third has arrived; every 0.5 s: a timeline row.
while :; do
	finished=no
	kill -0 "$DL_PID" 2>/dev/null || finished=yes
	got=$(stat -c %s "$TMP/mp2.out" 2>/dev/null || echo 0)
	now=${EPOCHREALTIME//[!0-9]/}
	if [ "$cut" = no ] && [ "$got" -ge $((SIZE / 3)) ]; then
		"$TOPO" link --prefix "$PREFIX" --uplink a --blackhole on >/dev/null
		cut=yes
		dec T $(((now - t0) / 100000)); dec M $((got * 10 / 1048576))
		printf '%7s %9s   <- uplink A cut (blackhole: the link stays up, nothing gets through)\n' "$T" "$M"
	fi
	if [ "$now" -ge "$next" ] || [ "$finished" = yes ]; then
		rx; ca=$RXA cb=$RXB
		dt=$((now > pt ? now - pt : 1))
		dec T $(((now - t0) / 100000)); dec M $((got * 10 / 1048576))
		dec RA $(((ca - pa) * 80 / dt)); dec RB $(((cb - pb) * 80 / dt))
		printf '%7s %9s %11s %11s\n' "$T" "$M" "$RA" "$RB"
		pa=$ca pb=$cb pt=$now next=$((next + 500000))
	fi
	[ "$finished" = yes ] && break
	sleep 0.1
done
download_wait mp2
rx; a1=$RXA b1=$RXB
MP2_SUM=no
[ -f "$TMP/mp2.out" ] && [ "$(sha "$TMP/mp2.out")" = "$SUM" ] && MP2_SUM=yes
SURVIVED=no
[ "$DL_RC" = 0 ] && [ "$MP2_SUM" = yes ] && SURVIVED=yes
RX2_A=$((a1 - a0)) RX2_B=$((b1 - b0))
SHARE2_A=$(calc '%.0f' "100 * $RX2_A / ($RX2_A + $RX2_B + 1)")
SHARE2_B=$((100 - SHARE2_A))
MP2_MBPS=$(mbps "$DL_BYTES" "$DL_SECS")
echo
printf 'flow survived: %s (curl exit %s, sha256 matches: %s; %s MiB in %.1f s, %s Mbit/s)\n' \
	"$SURVIVED" "$DL_RC" "$MP2_SUM" "$(calc '%.1f' "$DL_BYTES / 1048576")" "$DL_SECS" "$MP2_MBPS"
printf 'received on wan0 (A): %6.1f MiB  %3s %%\n' "$(calc '%.1f' "$RX2_A / 1048576")" "$SHARE2_A"
printf 'received on wan1 (B): %6.1f MiB  %3s %%\n' "$(calc '%.1f' "$RX2_B / 1048576")" "$SHARE2_B"
[ "$SURVIVED" = yes ] || { echo "download through mpvpn failed: $(cat "$TMP/curl-mp2.log")"; show_logs; }

echo
echo "mpvpn status after the cut (A withdrawn: the concentrator no longer answers over it):"
"$MPVPN" status --socket "$TMP/client.sock" | sed 's/^/  /' || true

# ---------------------------------------------------------------- summary
step "summary"
RATIO=$(calc '%.2f' "$MP_MBPS / ($BASE_MBPS > 0 ? $BASE_MBPS : 1)")
printf '  %-42s %s\n' \
	"uplink A alone, no mpvpn" "$BASE_MBPS Mbit/s" \
	"mpvpn, one flow over A+B" "$MP_MBPS Mbit/s  (x$RATIO of A alone; A+B = 60 Mbit/s)" \
	"  share of bytes received, A / B" "$SHARE_A % / $SHARE_B %" \
	"  sha256 matches" "$MP1_SUM" \
	"mpvpn, uplink A cut at 1/3" "$MP2_MBPS Mbit/s" \
	"  share of bytes received, A / B" "$SHARE2_A % / $SHARE2_B %" \
	"  flow survived (curl ok, sha256 matches)" "$SURVIVED"
if [ "$MP1_OK" = yes ] && [ "$SURVIVED" = yes ]; then
	echo
	echo "demo: ok"
	exit 0
fi
echo
echo "demo: FAILED" >&2
exit 1
