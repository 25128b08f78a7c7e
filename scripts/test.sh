#!/usr/bin/env bash
# scripts/test.sh — everything CI runs: format, vet, unit tests, fuzz targets
# (bounded), the network-namespace integration tests, and a short bench run
# whose figures must be whole images. Run as root:
#   sudo scripts/test.sh
# Env: FUZZTIME (per fuzz target, default 50000x: a count, not a duration; see below), RUN (go test -run filter for
# the netns tests; the short bench run is left out then), SHORT=1 (skip fuzzing, the netns tests and the bench run;
# for a quick loop), ARTIFACTS (default artifacts/: screenshots, the short run's table and figures).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_root
install_deps chromium # headless, for TestDashboard
preflight
export CI=${CI:-}
# What tests leave for a person to look at (the dashboard's screenshots,
# the short bench run's figures).
export ARTIFACTS=${ARTIFACTS:-$PWD/artifacts}
mkdir -p "$ARTIFACTS"
# A count of executions, not a wall-clock budget: with a duration, Go's fuzz
# coordinator (up to Go 1.26; golang/go#75804, fixed in 1.27) can report a
# bare "context deadline exceeded" failure at the deadline on a loaded
# machine, with no failing input. A count has no deadline to race.
FUZZTIME=${FUZZTIME:-50000x}

step() { printf '\n=== %s\n' "$*"; }

step "gofmt"
bad=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$bad" ]; then echo "not gofmt'ed: $bad"; exit 1; fi

step "go vet"
go vet ./...

step "another OS: one clear error"
# mpvpn is Linux-only: every file is constrained to Linux but one, which
# fails the build elsewhere with a message naming why. A file that lost
# its constraint would show up here as a second, confusing error.
if out=$(GOOS=darwin go vet ./... 2>&1); then
	echo "GOOS=darwin go vet ./... passed; it must fail with the Linux-only message"
	exit 1
fi
errs=$(printf '%s\n' "$out" | grep -v '^#')
if [ "$(printf '%s\n' "$errs" | grep -c .)" != 1 ] || ! printf '%s\n' "$errs" | grep -q 'undefined: mpvpn_runs_on_Linux_only'; then
	echo "GOOS=darwin go vet ./... did not fail with exactly the Linux-only message:"
	echo "$out"
	exit 1
fi
echo "$errs"

step "unit tests (-race)"
# The netns integration tests get their own serial pass below: they build
# whole topologies and would fight over 2 cores if run in parallel.
units=$(go list ./... | grep -v '/test/netns')
# With the race detector: the relays, the path manager's snapshots and the
# half-open table are all shared between goroutines.
go test -race -count=1 -timeout 15m $units

if [ "${SHORT:-}" != 1 ]; then
	step "fuzz targets (${FUZZTIME} each)"
	# Every Fuzz function in the tree, run for a bounded time.
	while IFS=: read -r file fn; do
		pkg=./$(dirname "$file")
		echo "--- $pkg $fn"
		go test -run '^$' -fuzz "^${fn}\$" -fuzztime "$FUZZTIME" "$pkg"
	done < <(grep -rHo --include='*_test.go' '^func Fuzz[A-Za-z0-9_]*' . | sed 's|^\./||; s|:func |:|')

	step "network-namespace integration tests"
	go build -o /dev/null ./cmd/mpvpn
	log=$(mktemp /tmp/mpvpn-netns-test.XXXXXX.log)
	rc=0
	go test -count=1 -p 1 -timeout 25m -v ${RUN:+-run "$RUN"} ./test/netns/... >"$log" 2>&1 || rc=$?
	# The verdict lines, then the whole log only if something failed.
	grep -E '^(--- |ok|FAIL|panic)|^\s+\S+_test\.go:[0-9]+:' "$log" || true
	if [ $rc != 0 ]; then
		echo "netns tests failed (exit $rc); full log follows"
		cat "$log"
		exit 1
	fi
fi
if [ "${SHORT:-}" != 1 ] && [ -z "${RUN:-}" ]; then
	step "the benchmark's figures: a short bench run"
	# Small sizes, one run each: the figures are drawn from real runs and
	# are whole images, not measurements to keep (scripts/bench.sh makes
	# those). What it printed and drew is left in $ARTIFACTS.
	plots=$ARTIFACTS/plots
	rm -rf "$plots"
	brc=0
	ONLY="agg unshaped outage" T=2 REPS=1 RUNS=1 OUTAGE_FOR=1s SIZE=25165824 PLOTS=$plots \
		bash scripts/bench.sh >"$ARTIFACTS/bench-short.md" 2>"$ARTIFACTS/bench-short.log" || brc=$?
	cat "$ARTIFACTS/bench-short.md"
	if [ $brc != 0 ]; then
		echo "the short bench run failed (exit $brc); its log follows"
		tail -50 "$ARTIFACTS/bench-short.log"
		exit 1
	fi
	python3 scripts/plots.py check "$plots/bench-rows.png" "$plots"/outage-{link-down,blackhole,addr-same,addr-new}.png
fi

step "all tests passed"
