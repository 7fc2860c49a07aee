#!/usr/bin/env bash
# Measure tailderp against upstream derper on this machine (docs/PERFORMANCE.md).
#
# Builds tailderp and tailscale.com/cmd/derper at the tailscale.com version
# in go.mod, then runs check/vsderper_test.go (build tag derpbench): both
# servers on loopback with the same self-signed certificate, the same load
# against each in turn (derper, tailderp -verify-clients=false, tailderp
# with admission on against a real in-process tailnet), ROUNDS rounds in
# rotating order, a fresh process for every run; prints medians and the
# ratios tailderp/derper.
#
#   scripts/bench-vs-derper.sh                    # 3 rounds
#   ROUNDS=5 OUT=/tmp/report.md scripts/bench-vs-derper.sh -idle 2000
#
# Extra arguments go to the test: -rounds, -servers, -idle, -load-duration,
# -in-flight, -out. Everything binds 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
OUT=${OUT:-}
work=$(mktemp -d "${TMPDIR:-/tmp}/tailderp-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

ver=$(go list -m -f '{{.Version}}' tailscale.com)
echo "== building tailderp ($(git describe --always --dirty 2>/dev/null || echo unknown)) and derper (tailscale.com $ver) in $work" >&2
go build -o "$work/tailderp" .

# derper is a tool dependency in go.mod (its tool block), at the same
# tailscale.com version as tailderp, so it builds from this module as is;
# the modules only derper uses (setec, prometheus) are not linked into
# tailderp (TestDeps).
go build -o "$work/derper" tailscale.com/cmd/derper
"$work/derper" -version >&2

args=(-rounds "$ROUNDS")
if [ -n "$OUT" ]; then
	args+=(-out "$(realpath -m "$OUT")")
fi
echo "== $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(go version | cut -d' ' -f3)" >&2
TAILDERP_BIN="$work/tailderp" DERPER_BIN="$work/derper" TS_NO_LOGS_NO_SUPPORT=true \
	go test -tags derpbench -run '^TestVsDerper$' -count=1 -v -timeout 90m ./check/ -args "${args[@]}" "$@"
