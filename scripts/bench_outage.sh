#!/usr/bin/env bash
# scripts/bench_outage.sh — issue 4's outage table: for each of the four ways
# uplink A can fail during a download over A+B, the app-level stall (longest
# time the application received nothing) and the recovery time (A back → A
# carries at least a fair share of the flow: ≥ 200 kB in 200 ms), through
# mpvpn and with kernel MPTCP alone on the same links. Run as root:
#   sudo scripts/bench_outage.sh
#
# Env:
#   RUNS=3          runs of every (mode, outage) pair; the table shows medians
#   OUTAGE_FOR=5s   how long A stays out (issue 4 measured 20 s; 5 s keeps the run short)
#   SIZE=100663296  bytes downloaded per run (96 MiB: outlasts outage + 20 s of recovery)
#   MODES=all       mpvpn, kernel or all
#   OUTAGES=all     comma-separated subset of link-down,blackhole,addr-same,addr-new
#   KEEP=1          keep the work directory (binaries, JSON lines, per-run logs)
#   PLOTS=plots     where the timelines go (outage-<kind>.png, run 1 of each mode;
#                   scripts/plots.py draws them with gnuplot); PLOTS= for none
#
# Network (package test/netns/topo, a fresh topology per run): A and B at
# 20 Mbit/s each, A 10 ms one-way delay, B 25 ms and behind CGNAT, userspace
# link emulator on both. The download starts, a fifth of the file arrives,
# A is cut, OUTAGE_FOR later it is healed, and the download runs to its end
# (test/netns/cmd/outagebench has the details). Modes:
#   mpvpn   mpvpn server + mpvpn client (wan0, wan1); a plain TCP download of
#           http://198.51.100.10/ through the tunnel
#   kernel  no mpvpn: pathmgr.Start once (endpoints, per-uplink tables and
#           rules, nothing follows the outage); an MPTCP download from wan0's
#           address straight from an MPTCP HTTP server on the concentrator
#
# Output: progress on stderr; on stdout a context line and ONE markdown table
#   | outage of A | mpvpn stall | mpvpn recovery | kernel MPTCP stall | kernel MPTCP recovery | target |
# with the median of the runs (each run's value in brackets), "never" when A
# did not carry a fair share within 20 s of the heal (or before the download
# ended), and FAIL notes for runs whose bytes were not intact or that failed.
# Every namespace and process is removed after each run, also on failure or
# Ctrl-C.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
. scripts/lib.sh
need_root
PLOTS=${PLOTS-plots}
install_deps ${PLOTS:+gnuplot:gnuplot-nox}
preflight

RUNS=${RUNS:-3}
OUTAGE_FOR=${OUTAGE_FOR:-5s}
SIZE=${SIZE:-100663296}
MODES=${MODES:-all}
OUTAGES=${OUTAGES:-all}
T0=$(date +%s)

log() { echo "[$(date +%T)] $*" >&2; }

WORK=$(mktemp -d /tmp/mpvpn-outage.XXXXXX)
BIN=$WORK/bin
RESULTS=$WORK/results.jsonl
mkdir -p "$BIN"
: >"$RESULTS"
PID=

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
		# outagebench tears its topology down on SIGTERM.
		kill -TERM "$PID" 2>/dev/null
		for _ in $(seq 150); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$PID" 2>/dev/null
		wait "$PID" 2>/dev/null
	fi
	log "total $(($(date +%s) - T0)) s; exit $rc"
	if [ "${KEEP:-}" = 1 ] || [ $rc != 0 ]; then
		log "work directory (binaries, JSON lines): $WORK"
	else
		rm -rf "$WORK"
	fi
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "building into $BIN"
for p in mpvpn:./cmd/mpvpn mpvpn-topo:./test/netns/cmd/mpvpn-topo outagebench:./test/netns/cmd/outagebench; do
	go build -o "$BIN/${p%%:*}" "${p#*:}" || { log "FATAL: go build ${p#*:} failed"; exit 1; }
done

args=(--topo-bin "$BIN/mpvpn-topo" --mpvpn-bin "$BIN/mpvpn" --mode "$MODES" --outage "$OUTAGES"
	--runs "$RUNS" --outage-for "$OUTAGE_FOR" --size "$SIZE" --out "$RESULTS")
[ "${KEEP:-}" = 1 ] && args+=(--keep)
log "outagebench ${args[*]}"
# In the background so that a TERM to this script reaches it (trap above);
# its JSON lines on stdout are in $RESULTS already.
"$BIN/outagebench" "${args[@]}" >/dev/null &
PID=$!
wait "$PID"
brc=$?
PID=
[ $brc = 0 ] || log "outagebench exited $brc (a run failed; see the table's notes)"

echo
echo "mpvpn outage bench $(date -u +%Y-%m-%dT%H:%MZ): $(uname -r), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); A and B 20 Mbit/s (10 ms / 25 ms one-way, B behind CGNAT), A out for $OUTAGE_FOR during a $((SIZE >> 20)) MiB download, RUNS=$RUNS; $(git rev-parse --short HEAD 2>/dev/null)"
echo
python3 - "$RESULTS" "$RUNS" <<'EOF'
import json, math, sys

path, runs = sys.argv[1], int(sys.argv[2])
rows = [("link-down", "link down, then up"),
        ("blackhole", "ISP drops everything, carrier up"),
        ("addr-same", "address removed, the same one back"),
        ("addr-new", "address removed, a new one")]
res = {}
with open(path) as f:
    for line in f:
        line = line.strip()
        if line:
            r = json.loads(line)
            res.setdefault((r["mode"], r["outage"]), []).append(r)

def median(xs):
    xs = sorted(xs)
    n = len(xs)
    if n == 0:
        return None
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2

def fmt(v):
    if v is None:
        return "-"
    if math.isinf(v):
        return "never"
    return "%.2f s" % (v / 1000)

def cell(rs, key):
    """median (each run) of key over the runs that measured something"""
    ok = [r for r in rs if not r.get("error")]
    vals = []
    for r in ok:
        v = r[key]
        vals.append(math.inf if key == "recovery_ms" and v < 0 else v)
    if not vals:
        return "FAIL" if rs else "-", None
    m = median(vals)
    s = fmt(m)
    if len(vals) > 1:
        s += " (" + ", ".join(fmt(v).replace(" s", "") for v in vals) + ")"
    return s, m

print("| outage of A | mpvpn stall | mpvpn recovery | kernel MPTCP stall | kernel MPTCP recovery | target |")
print("| --- | --- | --- | --- | --- | --- |")
for key, name in rows:
    mp, kn = res.get(("mpvpn", key), []), res.get(("kernel", key), [])
    if not mp and not kn:
        continue
    ms, mstall = cell(mp, "stall_ms")
    mr, mrec = cell(mp, "recovery_ms")
    ks, _ = cell(kn, "stall_ms")
    kr, _ = cell(kn, "recovery_ms")
    note = "stall < 0.5 s, recovery < 1 s"
    if mstall is not None and mrec is not None:
        miss = []
        if mstall >= 500:
            miss.append("stall")
        if math.isinf(mrec) or mrec >= 1000:
            miss.append("recovery")
        note += ": met" if not miss else ": NOT met (" + ", ".join(miss) + ")"
    fails = []
    for mode, rs in (("mpvpn", mp), ("kernel MPTCP", kn)):
        for r in rs:
            if r.get("error"):
                fails.append("%s run %d failed: %s" % (mode, r["run"], r["error"].splitlines()[0][:120]))
            elif not r["intact"]:
                fails.append("%s run %d not intact" % (mode, r["run"]))
            elif mode == "kernel MPTCP" and not r.get("mptcp", True):
                fails.append("kernel run %d fell back to plain TCP" % r["run"])
        if len(rs) < runs:
            fails.append("%s: %d of %d runs" % (mode, len(rs), runs))
    if fails:
        note += "; FAIL: " + "; ".join(fails)
    print("| %s | %s | %s | %s | %s | %s |" % (name, ms, mr, ks, kr, note.replace("|", "/")))
print()
print("stall: longest time the app received nothing, from the cut to the end of the download; "
      "recovery: from the heal until A received >= 200 kB within 200 ms (8 Mbit/s, 40 % of its rate); "
      "never: not within 20 s of the heal, or not before the download ended. Medians, each run in brackets.")
EOF
if [ -n "$PLOTS" ]; then
	if made=$(python3 scripts/plots.py outage "$RESULTS" "$PLOTS"); then
		for f in $made; do log "timeline: $f"; done
	else
		log "the timelines could not be drawn"
		brc=1
	fi
fi
exit $brc
