# tailderp: a DERP relay for one tailnet, with its own tailnet node built in.
#
#   docker build --build-arg VERSION=$(git describe --tags --always --dirty) -t tailderp .
#   docker compose up -d          # see docker-compose.yml, .env.example, docs/DEPLOY.md
#
# The image is `scratch` plus a static binary, a CA bundle and a passwd
# entry: no shell, no package manager, no tailscaled, no socket to mount.
# It runs as uid 65532 and binds 443, 80 and 3478 inside its own network
# namespace without any capability: Docker (20.10+) sets
# net.ipv4.ip_unprivileged_port_start=0 in every container that has its own
# network namespace, and docker-compose.yml sets it explicitly. Without that
# sysctl (a very old engine, some other runtimes) start it with
# `--sysctl net.ipv4.ip_unprivileged_port_start=0`; see docs/DEPLOY.md.
#
# Base image: pinned by exact tag (Go must match go.mod's `go` line; a test
# checks). It is not pinned by digest because digests could not be looked
# up where this file was written (no registry access). To pin:
#   docker buildx imagetools inspect golang:1.26.8-bookworm   # copy "Digest:"
# and build with --build-arg GO_IMAGE=golang:1.26.8-bookworm@sha256:<digest>.
ARG GO_IMAGE=golang:1.26.8-bookworm

# Build on the builder's own platform and cross-compile (no emulation):
# BuildKit (the default builder since Docker 23, and Compose v2) sets
# BUILDPLATFORM, TARGETOS and TARGETARCH, e.g. for
#   docker buildx build --platform linux/amd64,linux/arm64 .
# The legacy builder (Docker 20.10, which Debian 12's docker-compose 1.29
# uses for `docker-compose build`) sets none of them: it builds for
# linux/amd64. On an arm64 host with that builder, enable BuildKit:
#   DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1 docker-compose build
FROM --platform=${BUILDPLATFORM:-linux/amd64} ${GO_IMAGE} AS build
WORKDIR /src
# Modules first, so a source change does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG TARGETOS
ARG TARGETARCH
ARG TARGETVARIANT
ARG VERSION=dev
# The same script the packaging tests run: static binary (CGO_ENABLED=0,
# -trimpath, -X main.version=$VERSION), CA bundle, passwd, state dir.
RUN sh scripts/build-image-contents.sh /rootfs

FROM scratch
COPY --from=build /rootfs/ /
# The state directory belongs to the runtime user, so a fresh named volume
# mounted there starts out writable by it (Docker copies the ownership).
# Copying /var/lib/ (not /var/lib/tailderp, whose contents are empty) is
# what makes --chown reach the directory itself.
COPY --from=build --chown=65532:65532 /rootfs/var/lib/ /var/lib/
USER 65532:65532
# The working directory is the state volume: whatever the tailnet node's
# libraries keep beside their state (Tailscale's log-ID and socket-stats
# files, when no $HOME or $STATE_DIRECTORY points elsewhere) lands there
# too, not on the read-only root, where tsnet would find no place and stop.
WORKDIR /var/lib/tailderp
# Everything that must survive a restart: DERP key, certificates, and the
# tailnet node's login (without it every restart would register a new node).
VOLUME ["/var/lib/tailderp"]
# 443/tcp DERP over HTTPS; 80/tcp ACME HTTP-01, captive-portal checks and
# redirect; 3478/udp STUN.
EXPOSE 80/tcp 443/tcp 3478/udp
# Readiness, checked from inside with the server's own settings (the same
# flags and environment), no curl needed: HTTPS /generate_204 and a STUN
# binding answer, and the relay does its job as it publishes it
# (serving.json): every tailnet admits its members (from the known-peers
# cache: passes, with a warning), the admission URL answers when admission
# fails closed, clients accept the certificate, it is not draining. So
# the container shows "unhealthy" when its tailnet would refuse every
# member (say, its node cannot log in), not only when it is down. Docker
# itself restarts nothing for "unhealthy" (restart policies act on exits
# only); an orchestrator or monitor acting on it should not restart it
# either: a restart does not fix a dead control server (docs/DEPLOY.md,
# "Probes: readiness and liveness"; `check -local -liveness` is the
# restart-worthy question). The start period covers the first
# certificate from Let's Encrypt.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["/tailderp", "check", "-local", "-timeout", "5s"]
ENTRYPOINT ["/tailderp"]
ARG VERSION=dev
LABEL org.opencontainers.image.title="tailderp" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.description="DERP relay for one tailnet, with its own tailnet node: no tailscaled, no socket, no privileges" \
      org.opencontainers.image.source="https://github.com/tailderp/tailderp"
