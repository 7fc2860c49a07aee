#!/usr/bin/env bash
# Runs every fuzz target for a while (FUZZTIME each, default 30s), one
# after the other: what `go test` alone does not do (it runs only the seed
# corpora and the inputs saved under testdata/fuzz, which the test command
# already covers). A failing input is saved under the package's
# testdata/fuzz/<Target>/: add it to the commit that fixes it. Offline, no
# network; the targets write only to temporary directories.
#
#   scripts/fuzz.sh                 # every target, 30 s each
#   FUZZTIME=5m scripts/fuzz.sh ./relay
set -euo pipefail
cd "$(dirname "$0")/.."
export TS_NO_LOGS_NO_SUPPORT=true
fuzztime=${FUZZTIME:-30s}
pkgs=("$@")
[ ${#pkgs[@]} -gt 0 ] || pkgs=(./...)
status=0
# The targets, found in the source (listing them with go test -list would
# build every package's tests once more).
for dir in $(go list -f '{{.Dir}}' "${pkgs[@]}"); do
	targets=$(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(f \*testing\.F).*/\1/p' "$dir"/*_test.go 2>/dev/null || true)
	for target in $targets; do
		rel=.${dir#"$PWD"}
		echo "== $rel $target ($fuzztime)"
		if ! go test -run '^$' -fuzz "^$target\$" -fuzztime "$fuzztime" "$dir"; then
			status=1
		fi
	done
done
exit $status
