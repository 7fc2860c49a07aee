#!/usr/bin/env bash
# The project's test command (README: Testing). Every test is offline and
# binds loopback only; benchmarks run briefly as a smoke test, never as
# timed assertions; every fuzz target fuzzes for FUZZTIME (3 s here; the
# seed corpora and saved failures already ran with the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
export TS_NO_LOGS_NO_SUPPORT=true
go test -race -count=1 -timeout 20m ./...
go test -run '^$' -bench . -benchtime 100x -timeout 10m ./...
FUZZTIME=${FUZZTIME:-3s} bash scripts/fuzz.sh
