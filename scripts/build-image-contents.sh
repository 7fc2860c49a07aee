#!/bin/sh
# build-image-contents.sh OUTDIR: assemble everything the tailderp image
# holds, as a directory tree that becomes the image's root filesystem.
#
# The Dockerfile runs this in its build stage and copies OUTDIR into a
# `scratch` image; the packaging tests (packaging/) run the very same
# script and chroot into OUTDIR as the image's user, so what they check is
# what the image contains, built the same way.
#
# OUTDIR gets exactly:
#   /tailderp                           static binary (CGO_ENABLED=0, -trimpath, version stamped)
#   /etc/ssl/certs/ca-certificates.crt  CA bundle (ACME, control server, admission URL)
#   /etc/passwd, /etc/group             one entry for the image's user (uid/gid 65532)
#   /var/lib/tailderp/                  empty state directory (the volume), mode 0700
#
# Environment:
#   VERSION      version to stamp (tailderp -version); default "dev"
#   TARGETOS     GOOS to build for; default: the Go toolchain's own
#   TARGETARCH   GOARCH to build for; default: the Go toolchain's own
#   TARGETVARIANT  e.g. "v7" for linux/arm/v7 (sets GOARM); optional
#   CA_BUNDLE    CA bundle to copy; default /etc/ssl/certs/ca-certificates.crt
#
# POSIX sh on purpose: it runs in the golang image and on any test host.
set -eu

if [ $# -ne 1 ]; then
	echo "usage: $0 OUTDIR" >&2
	exit 2
fi
out=$1
src=$(cd "$(dirname "$0")/.." && pwd)

# The image's user. The Dockerfile's USER and its --chown of the state
# directory must say the same (packaging/ checks this).
uid=65532
gid=65532

: "${VERSION:=dev}"
: "${TARGETOS:=$(go env GOOS)}"
: "${TARGETARCH:=$(go env GOARCH)}"
: "${CA_BUNDLE:=/etc/ssl/certs/ca-certificates.crt}"
goarm=
if [ "$TARGETARCH" = arm ] && [ -n "${TARGETVARIANT:-}" ]; then
	goarm=${TARGETVARIANT#v}
fi

if [ ! -s "$CA_BUNDLE" ]; then
	echo "$0: no CA bundle at $CA_BUNDLE (install ca-certificates, or set CA_BUNDLE)" >&2
	exit 1
fi

mkdir -p "$out/etc/ssl/certs" "$out/var/lib/tailderp"
chmod 0755 "$out" "$out/etc" "$out/etc/ssl" "$out/etc/ssl/certs" "$out/var" "$out/var/lib"
chmod 0700 "$out/var/lib/tailderp"

# The build: static (no cgo, so no libc and no dynamic loader), paths
# trimmed, no VCS stamping (the Docker context has no .git), version
# stamped for `tailderp -version`.
(
	cd "$src"
	CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH GOARM=$goarm \
		go build -trimpath -buildvcs=false \
		-ldflags "-s -w -X main.version=$VERSION" \
		-o "$out/tailderp" .
)
chmod 0755 "$out/tailderp"

cp "$CA_BUNDLE" "$out/etc/ssl/certs/ca-certificates.crt"
chmod 0644 "$out/etc/ssl/certs/ca-certificates.crt"

printf 'root:x:0:0:root:/:/sbin/nologin\ntailderp:x:%d:%d:tailderp:/var/lib/tailderp:/sbin/nologin\n' "$uid" "$gid" >"$out/etc/passwd"
printf 'root:x:0:\ntailderp:x:%d:\n' "$gid" >"$out/etc/group"
chmod 0644 "$out/etc/passwd" "$out/etc/group"
