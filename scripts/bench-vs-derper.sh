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
# -in-flight, -out. Everything binds 127.0.0.1 only; building derper the
# first time needs the Go module proxy (two modules tailderp does not use).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
OUT=${OUT:-}
work=$(mktemp -d "${TMPDIR:-/tmp}/tailderp-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

ver=$(go list -m -f '{{.Version}}' tailscale.com)
echo "== building tailderp ($(git describe --always --dirty 2>/dev/null || echo unknown)) and derper (tailscale.com $ver) in $work" >&2
go build -o "$work/tailderp" .

# derper imports modules tailderp does not (setec, prometheus), so this
# module's go.sum cannot build it as is, and this script must not touch
# go.mod. Build it in a scratch module that starts from tailderp's go.mod
# and go.sum: every module both binaries use is then at the same version.
mkdir "$work/derperbuild"
cp go.mod go.sum "$work/derperbuild/"
(
	cd "$work/derperbuild"
	sed -i 's#^module .*#module derperbuild#' go.mod
	GOFLAGS=-mod=mod go get "tailscale.com/cmd/derper@$ver" 2>&1 | grep -v '^go: downloading' >&2 || true
	go build -o "$work/derper" tailscale.com/cmd/derper
)
# Say so if resolving derper moved any module tailderp uses.
changed=$(join <(go list -m all | sort) <(cd "$work/derperbuild" && go list -m all | sort) | awk '$2 != $3 {print $1 ": tailderp " $2 ", derper " $3}')
if [ -n "$changed" ]; then
	echo "warning: derper is built with other versions of modules both use:" >&2
	echo "$changed" >&2
fi
"$work/derper" -version >&2

args=(-rounds "$ROUNDS")
if [ -n "$OUT" ]; then
	args+=(-out "$(realpath -m "$OUT")")
fi
echo "== $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(go version | cut -d' ' -f3)" >&2
TAILDERP_BIN="$work/tailderp" DERPER_BIN="$work/derper" TS_NO_LOGS_NO_SUPPORT=true \
	go test -tags derpbench -run '^TestVsDerper$' -count=1 -v -timeout 90m ./check/ -args "${args[@]}" "$@"
