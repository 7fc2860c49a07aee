// Package packaging holds no code: its tests check tailderp's deployment
// files (Dockerfile, docker-compose.yml, .env.example, deploy/) against
// the binary they deploy, and run that binary the way the image runs it.
//
// What the tests do, and what they need:
//
//   - TestMain builds the image's root filesystem with
//     scripts/build-image-contents.sh, the script the Dockerfile's build
//     stage runs, so every test looks at the binary the image would hold.
//   - Static binary, Dockerfile, .env.example and seed-name checks need
//     only Go.
//   - The empty-root runs (TestImageRoot*, TestSeedsStart) need root: they
//     put the image's files in a fresh directory, make a network namespace
//     with only loopback in it (so nothing can leave the machine) and
//     net.ipv4.ip_unprivileged_port_start=0 (what Docker sets in every
//     container), and start tailderp there chrooted, as the image's uid,
//     with an empty capability bounding set, no_new_privs and only the
//     environment a .env would give it. That is the container the compose
//     file describes, without a container engine.
//   - `docker-compose config` needs Debian's docker-compose (or the
//     `docker compose` plugin) and python3-yaml, which docker-compose
//     depends on, to read the YAML.
//   - `systemd-analyze verify` needs Debian's systemd.
//
// A test whose tool or privilege is missing is skipped with the reason;
// .ci/run installs the tools and runs as root, so in CI all of them run.
package packaging
