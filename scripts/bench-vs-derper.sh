#!/usr/bin/env bash
# Measure tailderp against upstream derper on this machine (docs/PERFORMANCE.md).
#
# Builds tailderp, and tailscale.com/cmd/derper and tailscale.com/cmd/tailscaled
# at the tailscale.com version in go.mod, then runs check/vsderper_test.go
# (build tag derpbench): all servers on loopback with the same self-signed
# certificate, the same load against each (derper; tailderp
# -verify-clients=false; tailderp with admission on against a real
# in-process tailnet; derper --verify-clients --socket=S beside a real
# tailscaled logged in to a tailnet with the same members), ROUNDS rounds in
# rotating order, a fresh process for every run; prints medians and the
# ratios against the first server, and the comparison of tailderp+admission
# with derper+tailscaled.
#
#   scripts/bench-vs-derper.sh                    # 3 rounds, all four servers
#   ROUNDS=5 OUT=/tmp/report.md scripts/bench-vs-derper.sh -idle 2000
#
# Against derper --verify-clients + tailscaled (docs/PERFORMANCE.md, the
# section of that name), the full run (8 minutes of test on 2 cores; derper
# and tailderp without verification are there for reference):
#
#   ROUNDS=3 OUT=/tmp/vs-pair.md scripts/bench-vs-derper.sh \
#       -servers derper+tailscaled,tailderp+admission,derper,tailderp \
#       -idle 2000 -storm 2000 -storm-timeout 120s
#
# and a small smoke run of it:
#
#   ROUNDS=1 scripts/bench-vs-derper.sh -servers derper+tailscaled,tailderp+admission \
#       -idle 100 -storm 200 -parts idle,storm,connect
#
# Connect capacity of the servers' side alone: LOAD_CPUS=0 runs the load
# (the test process) on CPU 0 and -server-cpus 1 every server process on
# CPU 1, so the load generator no longer takes CPU from the relay:
#
#   LOAD_CPUS=0 ROUNDS=3 scripts/bench-vs-derper.sh -server-cpus 1 \
#       -servers derper+tailscaled,tailderp+admission,derper -parts connect -idle 2000 -storm 2000
#
# A change against an earlier tailderp: BASE_REV=REV builds that revision's
# tailderp too (a detached git worktree in the scratch directory, removed
# after the build) and passes it to the test, whose server
# tailderp+admission@base runs it exactly like tailderp+admission (a
# tailnet, ports and state of its own). tailderp+2tailnets is the current
# tailderp with admission and a second tailnet (-tailnets, a second test
# control server with no clients; the load's clients are all in the
# first). Tenant isolation's "single tailnet unchanged" (docs/PERFORMANCE.md):
#
#   BASE_REV=cd0d8ea ROUNDS=5 OUT=/tmp/tenants-bench.md scripts/bench-vs-derper.sh \
#       -servers tailderp+admission@base,tailderp+admission,tailderp+2tailnets \
#       -parts connect,throughput
#
# derper and tailscaled are built only when a server named in -servers
# needs them (all four by default).
#
# Extra arguments go to the test: -rounds, -servers, -parts
# (idle,storm,connect,throughput,stun), -idle, -storm, -storm-timeout,
# -load-duration, -in-flight, -out, -logs DIR (keep the servers' logs),
# -server-cpus LIST.
#
# Network: everything binds and dials 127.0.0.1 only (control, relays,
# tailscaled, the load); building derper and tailscaled the first time
# needs the Go module proxy (modules tailderp does not use). The run itself
# happens, when possible, in a network namespace of its own whose only
# interfaces are loopback and a veth pair leading nowhere (unshare -n;
# NETNS=0 turns that off, NETNS=1 makes it mandatory), so nothing can reach
# beyond this machine even by mistake.
# tailscaled is built with ts_omit_captiveportal: its captive-portal check
# would probe controlplane.tailscale.com and login.tailscale.com.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export GOTOOLCHAIN=local

ROUNDS=${ROUNDS:-3}
OUT=${OUT:-}
NETNS=${NETNS:-auto}
LOAD_CPUS=${LOAD_CPUS:-}
work=$(mktemp -d "${TMPDIR:-/tmp}/tailderp-bench.XXXXXX")
# The BASE_REV worktree is removed right after its build; if that build
# failed, remove it here so the repository keeps no stale worktree.
trap 'if [ -d "$work/base-src" ]; then git -C "$repo" worktree remove --force "$work/base-src" || true; fi; rm -rf "$work"' EXIT

# The servers the test will run (its -servers flag, else its default), so
# that derper and tailscaled are built only when needed.
servers=derper,tailderp,tailderp+admission,derper+tailscaled
prev=
for a in "$@"; do
	case "$prev" in -servers | --servers) servers=$a ;; esac
	case "$a" in -servers=* | --servers=*) servers=${a#*=} ;; esac
	prev=$a
done
need_derper=0 need_tailscaled=0
case ",$servers," in *,derper,* | *,derper+tailscaled,*) need_derper=1 ;; esac
case ",$servers," in *,derper+tailscaled,*) need_tailscaled=1 ;; esac

ver=$(go list -m -f '{{.Version}}' tailscale.com)
echo "== building tailderp ($(git describe --always --dirty 2>/dev/null || echo unknown)) in $work" >&2
go build -o "$work/tailderp" .
env_bins=(TAILDERP_BIN="$work/tailderp")

# BASE_REV: that revision's tailderp, built from a detached worktree of
# this repository (removed at once; the branch checked out here is not
# touched).
if [ -n "${BASE_REV:-}" ]; then
	rev=$(git rev-parse --verify "$BASE_REV^{commit}")
	echo "== building tailderp at BASE_REV=$BASE_REV ($(git log -1 --format='%h %s' "$rev" | cut -c1-80))" >&2
	git worktree add --quiet --detach "$work/base-src" "$rev"
	(cd "$work/base-src" && go build -o "$work/tailderp-base" .)
	git worktree remove --force "$work/base-src"
	env_bins+=(TAILDERP_BASE_BIN="$work/tailderp-base")
fi

if [ "$need_derper" = 1 ]; then
	# derper is a tool dependency in go.mod (its tool block), at the same
	# tailscale.com version as tailderp, so it builds from this module as
	# is; the modules only derper uses (setec, prometheus) are not linked
	# into tailderp (TestDeps).
	echo "== building derper (tailscale.com $ver)" >&2
	go build -o "$work/derper" tailscale.com/cmd/derper
	"$work/derper" -version >&2
	env_bins+=(DERPER_BIN="$work/derper")
fi
if [ "$need_tailscaled" = 1 ]; then
	echo "== building tailscaled (tailscale.com $ver)" >&2
	# tailscaled imports modules tailderp does not, and this script must
	# not touch go.mod: build it in a scratch module that starts from
	# tailderp's go.mod and go.sum, so every module it shares with
	# tailderp is at the same version.
	mkdir "$work/tsdbuild"
	cp go.mod go.sum "$work/tsdbuild/"
	(
		cd "$work/tsdbuild"
		sed -i 's#^module .*#module tsdbuild#' go.mod
		GOFLAGS=-mod=mod go get "tailscale.com/cmd/tailscaled@$ver" 2>&1 | grep -v '^go: downloading' >&2 || true
		go build -tags ts_omit_captiveportal -o "$work/tailscaled" tailscale.com/cmd/tailscaled
	)
	# Say so if resolving it moved any module tailderp uses.
	changed=$(join <(go list -m all | sort) <(cd "$work/tsdbuild" && go list -m all | sort) | awk '$2 != $3 {print $1 ": tailderp " $2 ", tailscaled " $3}')
	if [ -n "$changed" ]; then
		echo "warning: tailscaled is built with other versions of modules tailderp's go.mod also lists:" >&2
		echo "$changed" >&2
	fi
	"$work/tailscaled" -version | head -1 >&2
	env_bins+=(TAILSCALED_BIN="$work/tailscaled")
fi

# The test binary, built here (with the network) and run below (maybe
# without).
go test -c -tags derpbench -o "$work/check.test" ./check/

args=(-test.run '^TestVsDerper$' -test.count=1 -test.v -test.timeout 90m -rounds "$ROUNDS")
if [ -n "$OUT" ]; then
	args+=(-out "$(realpath -m "$OUT")")
fi

# A network namespace of its own, where nothing leads anywhere: loopback,
# and a veth pair whose both ends are inside it. tailscaled and tsnet pause
# their control client while the machine has no interface with a default
# route, so the namespace gets one: bench0 (192.0.2.2/24, a documentation
# address) with a default route via 192.0.2.1, which nothing answers (the
# other end, bench1, has no address): a packet that tried to leave
# loopback would go nowhere.
netns_setup='ip link set lo up &&
	ip link add bench0 type veth peer name bench1 &&
	ip addr add 192.0.2.2/24 dev bench0 &&
	ip link set bench0 up && ip link set bench1 up &&
	ip route add default via 192.0.2.1 dev bench0'
isolate=()
if [ "$NETNS" != 0 ]; then
	if [ "$(id -u)" = 0 ]; then un=(unshare --net); else un=(unshare --user --map-root-user --net); fi
	if "${un[@]}" sh -c "$netns_setup" 2>/dev/null; then
		isolate=("${un[@]}" sh -c "$netns_setup"' && exec "$@"' sh)
		echo "== running in a network namespace of its own: loopback, and a veth pair that leads nowhere (${un[*]})" >&2
	elif [ "$NETNS" = 1 ]; then
		echo "NETNS=1: cannot make a network namespace (unshare --net, ip link)" >&2
		exit 1
	else
		echo "== note: no network namespace available; running in this one (everything binds and dials 127.0.0.1)" >&2
	fi
fi

echo "== $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $(go version | cut -d' ' -f3)" >&2
pin=()
if [ -n "$LOAD_CPUS" ]; then
	pin=(taskset -c "$LOAD_CPUS")
	echo "== the load (test process) on CPUs $LOAD_CPUS" >&2
fi
cd check
env "${env_bins[@]}" TS_NO_LOGS_NO_SUPPORT=true \
	"${isolate[@]}" "${pin[@]}" "$work/check.test" "${args[@]}" "$@"
