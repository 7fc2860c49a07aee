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
# -p 4, twice the default on two cores: the slowest packages (e2e, the
# binary's, relay) mostly wait on timers and the network, and with the
# default the two of them that run hold both slots while the other
# packages' test binaries wait to be linked.
go test -race -count=1 -p 4 -timeout 20m ./...
# Only the packages that have benchmarks: with -run '^$' every other
# package would still be built and run its TestMain (packaging and e2e
# build the binary there).
mapfile -t bench < <(grep -rl --include='*_test.go' '^func Benchmark' . | xargs -r -n1 dirname | sort -u)
if [ ${#bench[@]} -gt 0 ]; then
	go test -run '^$' -bench . -benchtime 100x -timeout 10m "${bench[@]}"
fi
