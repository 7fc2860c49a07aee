#!/usr/bin/env bash
# The project's test command (README: Testing). Every test is offline and
# binds loopback only. `go test -race` runs every package's tests, and with
# them every fuzz target's seed corpus and the inputs saved under
# testdata/fuzz; then each benchmark runs briefly as a smoke test, never as
# a timed assertion. Fuzzing for a while is scripts/fuzz.sh, on its own:
# its instrumented build of every dependency takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export TS_NO_LOGS_NO_SUPPORT=true
go test -race -count=1 -timeout 20m ./...
# Only the packages that have benchmarks: with -run '^$' every other
# package would still be built and run its TestMain (packaging and e2e
# build the binary there).
mapfile -t bench < <(grep -rl --include='*_test.go' '^func Benchmark' . | xargs -r -n1 dirname | sort -u)
if [ ${#bench[@]} -gt 0 ]; then
	go test -run '^$' -bench . -benchtime 100x -timeout 10m "${bench[@]}"
fi
