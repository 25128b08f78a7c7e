#!/usr/bin/env bash
# scripts/test.sh — everything CI runs: format, vet, unit tests, fuzz targets
# (bounded), and the network-namespace integration tests. Run as root:
#   sudo scripts/test.sh
# Env: FUZZTIME (per fuzz target, default 50000x: a count, not a duration; see below), RUN (go test -run filter for
# the netns tests), SHORT=1 (skip fuzzing and the netns tests; for a quick loop).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_root
install_deps chromium # headless, for TestDashboard
preflight
export CI=${CI:-}
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

step "all tests passed"
