#!/usr/bin/env bash
# Runs every fuzz target for a while (FUZZTIME each, default 30s), one
# after the other: what `go test` alone does not do (it runs only the seed
# corpora and the inputs saved under testdata/fuzz, which the test command,
# scripts/test.sh, already covers). A failing input is saved under the
# package's testdata/fuzz/<Target>/: add it to the commit that fixes it.
# Offline, no network; the targets write only to temporary directories.
#
#   scripts/fuzz.sh                 # every target, 30 s each
#   FUZZTIME=5m scripts/fuzz.sh ./relay
#
# Each package's test binary is built once, with the fuzzing
# instrumentation, and run once per target (as `go test -fuzz` would, with
# the same cache of interesting inputs under $(go env GOCACHE)/fuzz): `go
# test -fuzz` relinks the binary for every target. The first build
# instruments every dependency and takes minutes; later ones come from the
# build cache.
set -euo pipefail
cd "$(dirname "$0")/.."
export TS_NO_LOGS_NO_SUPPORT=true
fuzztime=${FUZZTIME:-30s}
pkgs=("$@")
[ ${#pkgs[@]} -gt 0 ] || pkgs=(./...)
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
cachedir=$(go env GOCACHE)/fuzz
status=0
# The targets, found in the source (listing them with go test -list would
# build every package's tests once more).
while read -r dir importpath; do
	targets=$(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(f \*testing\.F).*/\1/p' "$dir"/*_test.go 2>/dev/null || true)
	[ -n "$targets" ] || continue
	rel=.${dir#"$PWD"}
	test="$bin/$(echo "$importpath" | tr / _).test"
	echo "== $rel: build with fuzzing instrumentation"
	if ! go test -c -fuzz . -o "$test" "$dir"; then
		status=1
		continue
	fi
	for target in $targets; do
		echo "== $rel $target ($fuzztime)"
		# The package's directory, as go test runs it: testdata/fuzz is
		# read, and a failing input written, there.
		if ! (cd "$dir" && "$test" -test.run '^$' -test.fuzz "^$target\$" -test.fuzztime "$fuzztime" \
			-test.fuzzcachedir "$cachedir/$importpath"); then
			status=1
		fi
	done
done < <(go list -f '{{.Dir}} {{.ImportPath}}' "${pkgs[@]}")
exit $status
