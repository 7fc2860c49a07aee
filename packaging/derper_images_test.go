package packaging

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/internal/testutil"
)

// Moving from derper: the whole environment of each popular derper image,
// and derper's command line, fed to the binary. Every name is one of:
// a tailderp setting (its own name or an alias with the same meaning),
// which must take effect; a name tailderp does not read, which must be
// said in exactly one line with what to use instead; or a name left alone
// on purpose (unreadOnPurpose).

// derperImage is a derper image as its repository ships it.
type derperImage struct {
	name   string
	source string // where the names and defaults are from
	// env is every variable the image reads, NAME=value as its Dockerfile
	// sets it (empty when it sets none: unset).
	env string
	// shippedExit and shippedWant are what `tailderp derpmap` does with
	// env as it is: its exit status and what its stderr says.
	shippedExit int
	shippedWant []string
	// run changes env so tailderp serves on loopback ports, open (the
	// key path is refused below), every name that is not tailderp's set so
	// that its line must show. $https, $http, $stun (free ports), $dead (a
	// port where nothing listens), $state, $certs, $psk (a mesh key file)
	// and $empty (an empty file) are filled in.
	run map[string]string
	// check looks at the running relay for the effect of the image's
	// aliases.
	check func(t *testing.T, r *runningRelay)
	// stunSwitch is the image's variable that turns STUN on and off, set
	// to true in run: set to false, the relay must serve no STUN.
	stunSwitch string
	// refused are changes to run's environment that tailderp must refuse
	// at start (exit 2) with a line containing each of want: the names read
	// with their meaning where a value cannot be served.
	refused []refusal
}

type refusal struct {
	env  map[string]string
	want []string
}

// foreignHints are the names of derper images that tailderp does not
// read, each with a word its one line must hold: what to use instead.
var foreignHints = map[string]string{
	"CONFIG_PATH":      "derp.key",
	"DERP_CONFIG":      "derp.key",
	"VERSION_FLAG":     "tailderp -version",
	"RUN_DERP":         "always serves DERP",
	"SOCKET":           "TAILSCALE_AUTH_KEY",
	"SECRETS_URL":      "MESH_PSK_FILE",
	"SECRET_PREFIX":    "MESH_PSK_FILE",
	"SECRETS_PREFIX":   "MESH_PSK_FILE",
	"SECRETS_CACHEDIR": "MESH_PSK_FILE",

	"TAILSCALE_DERPER_MESH_KEY": "MESH_PSK_FILE",
	"DERP_ACE":                  "ACE",
	"DERP_ACE_ALLOWED_TARGET":   "ACE",
	"TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_MAX_AGE_MS": "derpserver",

	"DERP_PORT_HTTPS":     "ADDR=:<port>",
	"DERP_ENABLE_HTTP":    "HTTP_PORT=-1",
	"DERP_ACME_EABKID":    "ACME_DIRECTORY_URL",
	"DERP_ACME_EABKEY":    "ACME_DIRECTORY_URL",
	"ACME_SH_EMAIL":       "ACME_EMAIL",
	"ACME_SH_DNSAPI":      "CERTMODE=letsencrypt",
	"ACME_SH_CA":          "ACME_DIRECTORY_URL",
	"ACME_SH_FORCE_RENEW": "CERTMODE=letsencrypt",
	"PUID":                "65532",
	"PGID":                "65532",
}

// unreadOnPurpose are names of the images that tailderp neither reads nor
// mentions, and why.
var unreadOnPurpose = map[string]string{
	"HOSTNAME": "Docker sets it to the container's ID; camllia/derper reads the public name from it. Mentioned only when it looks like a name and no -hostname was given (TestDerperImages, as shipped)",
	"TZ":       "the linuxserver base image's time zone, not derper's; Go reads it (tailderp's image has no zone database: UTC)",
	// derpserver reads it itself (checked against its source below), so it
	// has the same effect under tailderp.
	"TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH": "read by tailscale.com/derp/derpserver, which tailderp runs",
}

// derperImages are the images, their environment copied from their
// repositories.
func derperImages() []derperImage {
	return []derperImage{
		{
			name: "camllia/derper",
			// github.com/XavierAlpha/derper (the camllia/derper image),
			// Dockerfile: its ENV list, each passed by its CMD to the derper
			// flag its README's table names. Its earlier Dockerfile (commit
			// 119bc9e5) spells SECRETS_PREFIX as SECRET_PREFIX; both are
			// here.
			source: "github.com/XavierAlpha/derper Dockerfile",
			env: `DEV=false
VERSION_FLAG=false
ADDR=":443"
HTTP_PORT=80
STUN_PORT=3478
CONFIG_PATH=""
CERT_MODE="manual"
CERT_DIR="derper-certs"
HOSTNAME="127.0.0.1"
RUN_STUN=true
RUN_DERP=true
FLAGHOME=""
MESH_PSKFILE=""
MESH_WITH=""
SECRETS_URL=""
SECRETS_PREFIX="prod/derp"
SECRET_PREFIX="prod/derp"
SECRETS_CACHEDIR="derper-secrets"
BOOTSTRAP_DNS=""
UNPUBLISHED_DNS=""
VERIFY_CLIENTS=true
VERIFY_CLIENT_URL=""
VERIFY_FAIL_OPEN=true
SOCKET=""
ACCEPT_CONNECTION_LIMIT="+Inf"
ACCEPT_CONNECTION_BURST=9223372036854775807
TCP_KEEPALIVE_TIME="10m0s"
TCP_USER_TIMEOUT="15s"
TCP_WRITE_TIMEOUT="2s"
`,
			// The public name is in HOSTNAME, which tailderp never reads: the
			// error says where it was.
			shippedExit: 2,
			shippedWant: []string{"-hostname (TAILSCALE_DERP_HOSTNAME) is required", "HOSTNAME=127.0.0.1 is not read"},
			run: map[string]string{
				"TAILSCALE_DERP_HOSTNAME": "127.0.0.1",
				"STATE_DIR":               "$state",
				"ADDR":                    "127.0.0.1:$https",
				"HTTP_PORT":               "$http",
				"STUN_PORT":               "$stun",
				"CONFIG_PATH":             "/var/lib/derper/derper.key",
				"CERT_DIR":                "$certs",
				"FLAGHOME":                "https://home.example.com/derp",
				"MESH_PSKFILE":            "$psk",
				"MESH_WITH":               "127.0.0.1:$dead",
				"SECRETS_URL":             "https://setec.example.com",
				"BOOTSTRAP_DNS":           "localhost",
				"VERIFY_CLIENTS":          "false",
				"VERIFY_CLIENT_URL":       "http://127.0.0.1:$dead/verify",
				"SOCKET":                  "/var/run/tailscale/tailscaled.sock",
			},
			check: func(t *testing.T, r *runningRelay) {
				r.checkAddrs(t, true, true)
				r.checkCertIn(t, r.certs)                                         // CERT_DIR, CERT_MODE=manual
				r.checkHome(t, http.StatusFound, "https://home.example.com/derp") // FLAGHOME
				r.checkBootstrap(t, "", "localhost")                              // BOOTSTRAP_DNS
				r.checkFleet(t, 2)                                                // MESH_WITH, with MESH_PSKFILE's key
				r.checkLog(t, "admission fails open while the admission URL is unreachable", "the admission URL alone decides")
				r.checkNoLog(t, "HOSTNAME=127.0.0.1 is not read") // a -hostname was given
			},
			stunSwitch: "RUN_STUN",
			refused: []refusal{
				// VERIFY_CLIENTS=true as shipped: no open relay without a key.
				{map[string]string{"VERIFY_CLIENTS": "true"}, []string{"TAILSCALE_AUTH_KEY is not set"}},
				// derper's rollout syntax.
				{map[string]string{"UNPUBLISHED_DNS": "hs.example.com/rollout.example.com"}, []string{"-unpublished-bootstrap-dns-names", "not supported"}},
				{map[string]string{"MESH_PSKFILE": "$empty"}, []string{"-mesh-psk-file", "is empty"}},
				{map[string]string{"CERT_MODE": "gcp"}, []string{"-certmode", `"gcp"`, "-acme-directory-url"}},
			},
		},
		{
			name: "ghcr.io/kaaanata/derper",
			// github.com/kaaanata/derper-docker, Dockerfile (ENV) and
			// entrypoint.sh, which passes each to the derper flag of the
			// same name; fredliang44/derper-docker's README documents these
			// names for this image.
			source: "github.com/kaaanata/derper-docker Dockerfile",
			env: `DERP_DOMAIN=your-hostname.com
DERP_CERT_MODE=letsencrypt
DERP_CERT_DIR=/app/certs
DERP_ADDR=:443
DERP_STUN=true
DERP_STUN_PORT=3478
DERP_HTTP_PORT=80
DERP_VERIFY_CLIENTS=false
DERP_VERIFY_CLIENT_URL=""
DERP_VERIFY_CLIENT_URL_FAIL_OPEN=true
`,
			shippedExit: 0,
			run: map[string]string{
				"STATE_DIR":              "$state",
				"DERP_DOMAIN":            "127.0.0.1",
				"DERP_CERT_MODE":         "manual",
				"DERP_CERT_DIR":          "$certs",
				"DERP_ADDR":              "127.0.0.1:$https",
				"DERP_STUN_PORT":         "$stun",
				"DERP_HTTP_PORT":         "$http",
				"DERP_VERIFY_CLIENT_URL": "http://127.0.0.1:$dead/verify",
			},
			check: func(t *testing.T, r *runningRelay) {
				r.checkAddrs(t, true, true) // DERP_DOMAIN, DERP_ADDR, DERP_HTTP_PORT, DERP_STUN(_PORT)
				r.checkCertIn(t, r.certs)   // DERP_CERT_DIR, DERP_CERT_MODE
				// DERP_VERIFY_CLIENTS=false with DERP_VERIFY_CLIENT_URL, failing
				// open as DERP_VERIFY_CLIENT_URL_FAIL_OPEN=true says.
				r.checkLog(t, "admission fails open while the admission URL is unreachable", "the admission URL alone decides")
			},
			stunSwitch: "DERP_STUN",
			refused: []refusal{
				{map[string]string{"DERP_VERIFY_CLIENTS": "true"}, []string{"TAILSCALE_AUTH_KEY is not set"}},
				{map[string]string{"DERP_CERT_MODE": "bogus"}, []string{"-certmode", `"bogus"`}},
			},
		},
		{
			name: "docker.horse/oss-images/derper",
			// docker.horse/oss-images/derper (derived from
			// kaaanata/derper-docker): its Dockerfile's ENV, src/entrypoint.sh
			// (DERP_MESH_PSK_FILE) and its README's tables (the mesh key
			// variable, the send-queue tuning). Its source repository is not
			// named there; the files are in the search index under that image.
			source: "docker.horse/oss-images/derper Dockerfile, src/entrypoint.sh, README.md",
			env: `DERP_DOMAIN=""
DERP_CONFIG=/var/lib/derper/derper.key
DERP_CERT_MODE=letsencrypt
DERP_CERT_DIR=/var/lib/derper/certs
DERP_ACME_EMAIL=""
DERP_ADDR=:443
DERP_STUN=true
DERP_STUN_PORT=3478
DERP_HTTP_PORT=80
DERP_HOME=""
DERP_BOOTSTRAP_DNS_NAMES=""
DERP_UNPUBLISHED_BOOTSTRAP_DNS_NAMES=""
DERP_VERIFY_CLIENTS=false
DERP_VERIFY_CLIENT_URL=""
DERP_VERIFY_CLIENT_URL_FAIL_OPEN=true
DERP_MESH_WITH=""
DERP_ACE=false
DERP_ACE_ALLOWED_TARGET=controlplane.tailscale.com
DERP_MESH_PSK_FILE=
TAILSCALE_DERPER_MESH_KEY=
TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH=
TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_MAX_AGE_MS=
`,
			shippedExit: 2,
			shippedWant: []string{"-hostname (TAILSCALE_DERP_HOSTNAME) is required"},
			run: map[string]string{
				"STATE_DIR":                            "$state",
				"DERP_DOMAIN":                          "127.0.0.1",
				"DERP_CERT_MODE":                       "manual",
				"DERP_CERT_DIR":                        "$certs",
				"DERP_ACME_EMAIL":                      "ops@example.com",
				"DERP_ADDR":                            "127.0.0.1:$https",
				"DERP_STUN":                            "false",
				"DERP_HTTP_PORT":                       "-1",
				"DERP_HOME":                            "blank",
				"DERP_UNPUBLISHED_BOOTSTRAP_DNS_NAMES": "localhost",
				"DERP_MESH_PSK_FILE":                   "$psk",
				"TAILSCALE_DERPER_MESH_KEY":            strings.Repeat("5a", 32),
				"DERP_MESH_WITH":                       "127.0.0.1:$dead",
				"DERP_ACE":                             "true",
				"TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH":      "256",
				"TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_MAX_AGE_MS": "5",
			},
			check: func(t *testing.T, r *runningRelay) {
				r.checkAddrs(t, false, false)               // DERP_DOMAIN, DERP_ADDR; DERP_STUN=false, DERP_HTTP_PORT=-1
				r.checkCertIn(t, r.certs)                   // DERP_CERT_DIR, DERP_CERT_MODE
				r.checkHome(t, http.StatusOK, "")           // DERP_HOME=blank
				r.checkBootstrap(t, "localhost", "")        // DERP_UNPUBLISHED_BOOTSTRAP_DNS_NAMES
				r.checkFleet(t, 2)                          // DERP_MESH_WITH, with DERP_MESH_PSK_FILE's key
				r.checkLog(t, "client verification is off") // DERP_VERIFY_CLIENTS=false, no admission URL
			},
			refused: []refusal{
				{map[string]string{"DERP_BOOTSTRAP_DNS_NAMES": "https://hs.example.com"}, []string{"-bootstrap-dns-names", "not a DNS name"}},
				{map[string]string{"DERP_MESH_PSK_FILE": "$empty"}, []string{"-mesh-psk-file", "is empty"}},
				{map[string]string{"DERP_MESH_WITH": "https://derp2.example.com"}, []string{"-mesh-with", "not a URL"}},
			},
		},
		{
			name: "ngc7331/derper",
			// github.com/ngc7331/docker-derper: Dockerfile (ENV) and
			// root/etc/s6-overlay/s6-rc.d/svc-derper/run, which turns them
			// into derper's flags (DERP_ACME_EMAIL and the EAB pair come from
			// there and the README, DERP_CERTMODE=acme.sh is handled by
			// init-cert/run with the ACME_SH_* variables).
			source: "github.com/ngc7331/docker-derper Dockerfile, svc-derper/run",
			env: `PUID=1000
PGID=1000
TZ=Asia/Shanghai
DERP_CERTMODE=acme.sh
DERP_HOSTNAME=
DERP_PORT_HTTP=80
DERP_PORT_HTTPS=443
DERP_PORT_STUN=3478
DERP_ENABLE_HTTP=true
DERP_ENABLE_STUN=true
DERP_VERIFY_CLIENTS=false
ACME_SH_EMAIL=
ACME_SH_DNSAPI=
ACME_SH_CA=letsencrypt
DERP_ACME_EMAIL=
DERP_ACME_EABKID=
DERP_ACME_EABKEY=
ACME_SH_FORCE_RENEW=
`,
			shippedExit: 2,
			shippedWant: []string{"-hostname (TAILSCALE_DERP_HOSTNAME) is required"},
			run: map[string]string{
				"STATE_DIR":           "$state",
				"CERTDIR":             "$certs", // the image's is fixed: /data/cert
				"ADDR":                "127.0.0.1:$https",
				"DERP_CERTMODE":       "manual",
				"DERP_HOSTNAME":       "127.0.0.1",
				"DERP_PORT_HTTP":      "$http",
				"DERP_PORT_HTTPS":     "$https",
				"DERP_PORT_STUN":      "$stun",
				"DERP_ACME_EMAIL":     "ops@example.com",
				"DERP_ACME_EABKID":    "kid-1",
				"DERP_ACME_EABKEY":    "c2VjcmV0",
				"ACME_SH_EMAIL":       "ops@example.com",
				"ACME_SH_DNSAPI":      "dns_cf",
				"ACME_SH_FORCE_RENEW": "false",
			},
			check: func(t *testing.T, r *runningRelay) {
				r.checkAddrs(t, true, true)                 // DERP_HOSTNAME, DERP_PORT_HTTP, DERP_PORT_STUN
				r.checkCertIn(t, r.certs)                   // DERP_CERTMODE=manual
				r.checkLog(t, "client verification is off") // DERP_VERIFY_CLIENTS=false
			},
			stunSwitch: "DERP_ENABLE_STUN",
			refused: []refusal{
				{map[string]string{"DERP_CERTMODE": "acme.sh"}, []string{"-certmode", `"acme.sh"`, "no acme.sh"}},
				// ngc7331 takes anything but "true" as false; tailderp wants
				// a boolean and says which variable.
				{map[string]string{"DERP_ENABLE_STUN": "no"}, []string{"DERP_ENABLE_STUN", `"no"`}},
			},
		},
		{
			name: "tijjjy/Tailscale-DERP-Docker",
			// Its .env (tijjjyEnv); init.sh passes them to derper and
			// tailscale up.
			source:      "github.com/tijjjy/Tailscale-DERP-Docker .env",
			env:         tijjjyEnv,
			shippedExit: 0,
			run: map[string]string{
				"STATE_DIR":                     "$state",
				"CERTDIR":                       "$certs",
				"ADDR":                          "127.0.0.1:$https",
				"HTTP_PORT":                     "$http",
				"STUN_PORT":                     "$stun",
				"TAILSCALE_DERP_HOSTNAME":       "127.0.0.1",
				"TAILSCALE_DERP_CERTMODE":       "manual",
				"TAILSCALE_DERP_VERIFY_CLIENTS": "false",
			},
			check: func(t *testing.T, r *runningRelay) {
				r.checkAddrs(t, true, true)
				r.checkCertIn(t, r.certs)                   // TAILSCALE_DERP_CERTMODE=manual
				r.checkLog(t, "client verification is off") // TAILSCALE_DERP_VERIFY_CLIENTS=false
			},
			refused: []refusal{
				// The key as shipped is a placeholder.
				{map[string]string{"TAILSCALE_DERP_VERIFY_CLIENTS": "true"}, []string{"TAILSCALE_AUTH_KEY", "placeholder"}},
			},
		},
	}
}

// TestDerperImages feeds each image's environment to the binary: as
// shipped, to `tailderp derpmap`; set to serve on loopback, to the server.
// Every name is classified; each alias takes effect on the running relay;
// each name tailderp does not read is one warning line with what to use
// instead, and nothing else is.
func TestDerperImages(t *testing.T) {
	settingNames := map[string]string{} // name → setting's primary name
	for _, s := range settings(t) {
		settingNames[s.env] = s.env
		for _, a := range s.aliases {
			settingNames[a] = s.env
		}
	}
	for name := range foreignHints {
		if settingNames[name] != "" {
			t.Errorf("%s is a setting (of %s) and in foreignHints: it cannot be both", name, settingNames[name])
		}
	}
	for _, img := range derperImages() {
		t.Run(strings.ReplaceAll(img.name, "/", "_"), func(t *testing.T) {
			shipped := parseEnvFile(img.env, false)
			if len(shipped) == 0 {
				t.Fatalf("%s: no variables", img.name)
			}
			// Every name is a setting, a name with its hint, or left alone
			// on purpose.
			names := map[string]bool{}
			for _, l := range shipped {
				names[l.name] = true
			}
			for n := range img.run {
				names[n] = true
			}
			for _, n := range sortedKeys(names) {
				_, hint := foreignHints[n]
				_, alone := unreadOnPurpose[n]
				classes := 0
				for _, in := range []bool{settingNames[n] != "", hint, alone} {
					if in {
						classes++
					}
				}
				if classes != 1 {
					t.Errorf("%s's %s: a setting (of %q), a name with a hint (%v), left alone on purpose (%v): want exactly one", img.source, n, settingNames[n], hint, alone)
				}
			}

			t.Run("as shipped", func(t *testing.T) {
				env := envList(shipped)
				code, stdout, stderr := runBinary(t, append(env, "STATE_DIR="+t.TempDir()), "derpmap")
				if code != img.shippedExit {
					t.Fatalf("tailderp derpmap: exit %d, want %d\n%s", code, img.shippedExit, stderr)
				}
				for _, w := range img.shippedWant {
					if !strings.Contains(stderr, w) {
						t.Errorf("tailderp derpmap's stderr does not say %q:\n%s", w, stderr)
					}
				}
				if code == 0 {
					n := *testutil.DERPMapRegion(t, stdout).Nodes[0]
					if publicDERPPort(n) != 443 || publicSTUNPort(n) != 3478 || n.CertName != "" {
						t.Errorf("derpMap node %+v: want 443, STUN 3478, a CA's certificate (no pin)", n)
					}
				}
				checkHintLines(t, hintLinesIn(stderr, derpmapHintRE), setForeign(env))
			})

			t.Run("serving", func(t *testing.T) {
				f := newFiller(t)
				env := f.env(shipped, img.run)
				r := startRelay(t, env)
				r.certs = f.certs
				checkHintLines(t, hintLinesIn(r.p.Output.String(), serverHintRE), setForeign(env))
				img.check(t, r)
				if err := r.p.Stop(15 * time.Second); err != nil {
					t.Errorf("after SIGTERM: %v", err)
				}
				if img.stunSwitch == "" {
					return
				}
				if v := img.run[img.stunSwitch]; v != "" && v != "true" || !strings.Contains(img.env, img.stunSwitch+"=true") {
					t.Fatalf("%s is not true in run", img.stunSwitch)
				}
				r = startRelay(t, f.env(parseEnvFile(strings.Join(env, "\n"), false), map[string]string{img.stunSwitch: "false"}))
				if r.serving.STUNAddr != "" || r.serving.Region.Nodes[0].STUNPort != -1 {
					t.Errorf("%s=false: STUN on %q, derpMap STUNPort %d; want it off", img.stunSwitch, r.serving.STUNAddr, r.serving.Region.Nodes[0].STUNPort)
				}
				if err := r.p.Stop(15 * time.Second); err != nil {
					t.Errorf("after SIGTERM: %v", err)
				}
			})

			for _, ref := range img.refused {
				t.Run(fmt.Sprintf("refuses %v", ref.env), func(t *testing.T) {
					f := newFiller(t)
					env := f.env(shipped, img.run)
					env = f.env(parseEnvFile(strings.Join(env, "\n"), false), ref.env)
					// A refusal is at once: a relay still running after 15 s
					// took the value.
					ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
					defer cancel()
					cmd := exec.CommandContext(ctx, binary)
					cmd.Env = env
					var out bytes.Buffer
					cmd.Stdout, cmd.Stderr = &out, &out
					cmd.Run()
					stderr := out.String()
					lines := strings.Split(strings.TrimSpace(stderr), "\n")
					if code := cmd.ProcessState.ExitCode(); code != 2 {
						t.Fatalf("exit %d, want 2 (-1: still running after 15 s):\n%s", code, stderr)
					}
					last := lines[len(lines)-1]
					for _, w := range ref.want {
						if !strings.Contains(last, w) {
							t.Errorf("%q does not say %q", last, w)
						}
					}
				})
			}
		})
	}
}

// TestDerperCommandLine: each of derper's flags (read from derper.go in
// the module cache, the version tailderp is built on) is tailderp's, with
// the same name, or refused with one line saying what to use instead. A
// compose command: line made for derper gives one line per thing to
// change, and once changed, derper's flags take effect.
func TestDerperCommandLine(t *testing.T) {
	src := readModuleFile(t, "cmd/derper/derper.go")
	flagRE := regexp.MustCompile(`flag\.(String|Bool|Int|Float64|Duration)\("([a-z0-9-]+)"`)
	var derperFlags []string
	isBool := map[string]bool{}
	for _, m := range flagRE.FindAllStringSubmatch(src, -1) {
		derperFlags = append(derperFlags, m[2])
		isBool[m[2]] = m[1] == "Bool"
	}
	if len(derperFlags) < 30 {
		t.Fatalf("found %d flags in derper.go; has its form changed?", len(derperFlags))
	}
	tailderpFlags := map[string]bool{}
	for _, s := range settings(t) {
		tailderpFlags[s.flag] = s.flag != ""
	}
	var shared, foreign []string
	for _, name := range derperFlags {
		if tailderpFlags[name] {
			shared = append(shared, name)
			continue
		}
		foreign = append(foreign, name)
		arg := "-" + name + "=x"
		if isBool[name] {
			arg = "-" + name
		}
		code, stdout, stderr := runBinary(t, nil, "-hostname", "derp.example.com", arg)
		lines := strings.Split(strings.TrimSpace(stderr), "\n")
		want := "tailderp: -" + name + " is derper's and not tailderp's: "
		if code != 2 || len(lines) != 1 || stdout != "" || !strings.HasPrefix(lines[0], want) || len(lines[0]) < len(want)+10 {
			t.Errorf("tailderp %s: exit %d, %q; want 2 and one line %q…", arg, code, stderr, want)
		}
	}
	t.Logf("derper's flags tailderp has: %s", strings.Join(shared, " "))
	t.Logf("derper's flags tailderp refuses with a hint: %s", strings.Join(foreign, " "))

	f := newFiller(t)
	// As people's compose files have it: the program, then the flags.
	derper := strings.Fields(f.fill("derper -hostname 127.0.0.1 -a 127.0.0.1:$https -c /var/lib/derper/derper.key " +
		"-verify-clients -socket /var/run/tailscale/tailscaled.sock -certmode manual -certdir $certs -http-port $http " +
		"-stun-port $stun -mesh-psk-file $psk -mesh-with 127.0.0.1:$dead,127.0.0.1:$https --derp=true " +
		"-verify-client-url http://127.0.0.1:$dead/verify -verify-client-url-fail-open " +
		"-bootstrap-dns-names localhost -home blank -tcp-write-timeout 3s -accept-connection-limit +Inf"))
	code, _, stderr := runBinary(t, nil, derper...)
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	want := []string{`the command line starts with "derper"`, "-c is derper's", "-socket is derper's", "-derp is derper's"}
	if code != 2 || len(lines) != len(want) {
		t.Fatalf("derper's command line: exit %d with %d lines, want 2 and %d:\n%s", code, len(lines), len(want), stderr)
	}
	for i, w := range want {
		if !strings.HasPrefix(lines[i], "tailderp: "+w) {
			t.Errorf("line %d: %q, want %q…", i+1, lines[i], "tailderp: "+w)
		}
	}

	// Changed as the lines say (and open: -verify-clients needs the
	// auth key, shown refused above and in TestDerperImages).
	var args []string
	for i := 1; i < len(derper); i++ {
		switch derper[i] {
		case "-c", "-socket":
			i++
		case "--derp=true":
		case "-verify-clients":
			args = append(args, "-verify-clients=false")
		default:
			args = append(args, derper[i])
		}
	}
	r := startRelayArgs(t, []string{"STATE_DIR=" + f.state}, args...)
	r.certs = f.certs
	r.checkAddrs(t, true, true)
	r.checkCertIn(t, f.certs)
	r.checkHome(t, http.StatusOK, "")
	r.checkBootstrap(t, "", "localhost")
	r.checkFleet(t, 2) // its own entry skipped
	r.checkLog(t, "admission fails open while the admission URL is unreachable", "the admission URL alone decides",
		"mesh: this relay's own entry in -mesh-with is skipped")
	if err := r.p.Stop(15 * time.Second); err != nil {
		t.Errorf("after SIGTERM: %v", err)
	}
}

// TestDerpserverReadsSendQueueDepth backs unreadOnPurpose's claim:
// derpserver reads TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH itself, so
// an image's value keeps its effect.
func TestDerpserverReadsSendQueueDepth(t *testing.T) {
	src := readModuleFile(t, "derp/derpserver/derpserver.go")
	if !strings.Contains(src, `envknob.LookupInt("TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH")`) {
		t.Errorf("derpserver no longer reads TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH: give it a hint in migrate.go")
	}
}

// readModuleFile reads a file of the tailscale.com module tailderp builds
// with, from the module cache.
func readModuleFile(t *testing.T, name string) string {
	t.Helper()
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "tailscale.com")
	cmd.Dir = repoRoot
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list -m tailscale.com: %v", err)
	}
	b, err := os.ReadFile(filepath.Join(strings.TrimSpace(string(out)), name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// setForeign returns the names of env that tailderp must say it does not
// read: those of foreignHints with a value.
func setForeign(env []string) []string {
	var out []string
	for _, kv := range env {
		n, v, _ := strings.Cut(kv, "=")
		if _, ok := foreignHints[n]; ok && v != "" {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}

var (
	serverHintRE  = regexp.MustCompile(`(?m)^time=\S+ level=WARN msg="([A-Z0-9_]+) is set but is not a tailderp setting: (.*)"$`)
	derpmapHintRE = regexp.MustCompile(`(?m)^tailderp derpmap: ([A-Z0-9_]+) is set but is not a tailderp setting: (.*)$`)
	// anyHintRE finds such a line in any form, to count them all.
	anyHintRE = regexp.MustCompile(`(?m)\b([A-Z0-9_]+) is set but is not a tailderp setting: `)
)

// hintLinesIn returns, by name, the hints of the lines re matches in out;
// any other line saying a name is not a setting counts under "?".
func hintLinesIn(out string, re *regexp.Regexp) map[string][]string {
	got := map[string][]string{}
	for _, m := range re.FindAllStringSubmatch(out, -1) {
		got[m[1]] = append(got[m[1]], m[2])
	}
	if n := len(anyHintRE.FindAllString(out, -1)); n != len(re.FindAllString(out, -1)) {
		got["?"] = append(got["?"], fmt.Sprintf("%d lines of another form", n-len(re.FindAllString(out, -1))))
	}
	return got
}

// checkHintLines checks that got has exactly one line for each of want,
// saying what to use instead, and none for any other name.
func checkHintLines(t *testing.T, got map[string][]string, want []string) {
	t.Helper()
	for _, n := range want {
		switch hints := got[n]; {
		case len(hints) != 1:
			t.Errorf("%s: %d lines saying it is not read, want 1: %q", n, len(hints), hints)
		case !strings.Contains(hints[0], foreignHints[n]):
			t.Errorf("%s's line %q does not name %q", n, hints[0], foreignHints[n])
		}
	}
	for _, n := range sortedKeys(got) {
		if !slices.Contains(want, n) {
			t.Errorf("%s: %q, want no line", n, got[n])
		}
	}
}

// filler makes the ports, directories and files an image's run needs and
// fills them into its values.
type filler struct {
	https, http, stun, dead  int
	state, certs, psk, empty string
}

func newFiller(t *testing.T) *filler {
	dir := t.TempDir()
	f := &filler{
		https: testutil.FreePort(t, "tcp"),
		http:  testutil.FreePort(t, "tcp"),
		stun:  testutil.FreePort(t, "udp"),
		dead:  testutil.FreePort(t, "tcp"),
		state: filepath.Join(dir, "state"),
		certs: filepath.Join(dir, "certs"),
		psk:   filepath.Join(dir, "mesh.key"),
		empty: filepath.Join(dir, "empty"),
	}
	if err := os.WriteFile(f.psk, []byte(strings.Repeat("3c", 32)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *filler) fill(s string) string {
	return strings.NewReplacer("$https", strconv.Itoa(f.https), "$http", strconv.Itoa(f.http), "$stun", strconv.Itoa(f.stun),
		"$dead", strconv.Itoa(f.dead), "$state", f.state, "$certs", f.certs, "$psk", f.psk, "$empty", f.empty).Replace(s)
}

// env is lines with changes applied (filled in), in lines' order, new
// names after.
func (f *filler) env(lines []envLine, changes map[string]string) []string {
	var env []string
	seen := map[string]bool{}
	for _, l := range lines {
		v, ok := changes[l.name]
		if !ok {
			v = l.value
		}
		seen[l.name] = true
		env = append(env, l.name+"="+f.fill(v))
	}
	for _, n := range slices.Sorted(maps.Keys(changes)) {
		if !seen[n] {
			env = append(env, n+"="+f.fill(changes[n]))
		}
	}
	return env
}

// runningRelay is the binary serving, with what its serving.json says.
type runningRelay struct {
	p       *testutil.Process
	serving struct {
		HTTPSAddr  string              `json:"https_addr"`
		STUNAddr   string              `json:"stun_addr"`
		ServerName string              `json:"server_name"`
		Region     *tailcfg.DERPRegion `json:"region"`
	}
	state, certs string
}

func startRelay(t *testing.T, env []string) *runningRelay {
	return startRelayArgs(t, env)
}

// startRelayArgs starts the binary with exactly env and args, and waits
// until it serves (its serving.json).
func startRelayArgs(t *testing.T, env []string, args ...string) *runningRelay {
	t.Helper()
	r := &runningRelay{}
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "STATE_DIR="); ok {
			r.state = v
		}
	}
	for i, a := range args {
		if a == "-state-dir" && i+1 < len(args) {
			r.state = args[i+1]
		}
	}
	if r.state == "" {
		t.Fatal("startRelay: no STATE_DIR")
	}
	cmd := exec.Command(binary, args...)
	cmd.Env = append([]string{}, env...)
	r.p = testutil.StartProcess(t, cmd, testutil.ProcessOptions{Name: "tailderp", StopGrace: 15 * time.Second})
	serving := func() bool {
		b, err := os.ReadFile(filepath.Join(r.state, "serving.json"))
		return err == nil && json.Unmarshal(b, &r.serving) == nil
	}
	if !testutil.Poll(30*time.Second, 20*time.Millisecond, r.p.Done(), serving) {
		t.Fatalf("tailderp did not serve (exited: %v):\n%s", r.p.Exited(), r.p.Output.String())
	}
	r.p.WaitOutput(t, "\n---\n", 10*time.Second) // the whole snippet
	return r
}

// checkAddrs checks the server name and addresses the relay serves on:
// 127.0.0.1 on the filled-in ports, plain HTTP and STUN on or off.
func (r *runningRelay) checkAddrs(t *testing.T, httpOn, stunOn bool) {
	t.Helper()
	if r.serving.ServerName != "127.0.0.1" {
		t.Errorf("server name %q, want 127.0.0.1", r.serving.ServerName)
	}
	line := regexp.MustCompile(`msg="relay: serving DERP over HTTPS" addr=(\S+) http=(\S+)`).FindStringSubmatch(r.p.Output.String())
	if line == nil {
		t.Fatalf("no line saying where it serves:\n%s", r.p.Output.String())
	}
	httpsPort := portOf(t, r.serving.HTTPSAddr)
	if line[1] != r.serving.HTTPSAddr || !strings.HasPrefix(r.serving.HTTPSAddr, "127.0.0.1:") {
		t.Errorf("HTTPS on %s (log: %s), want 127.0.0.1", r.serving.HTTPSAddr, line[1])
	}
	if n := r.serving.Region.Nodes[0]; n.DERPPort != httpsPort {
		t.Errorf("derpMap node's DERPPort %d, serving on %d", n.DERPPort, httpsPort)
	}
	switch {
	case httpOn && line[2] == `""`:
		t.Errorf("plain HTTP is off, want it on")
	case httpOn:
		resp, err := (&http.Client{Timeout: 10 * time.Second}).Get("http://" + line[2] + "/generate_204")
		if err != nil {
			t.Errorf("plain HTTP on %s: %v", line[2], err)
		} else if resp.Body.Close(); resp.StatusCode != http.StatusNoContent {
			t.Errorf("http://%s/generate_204: %s", line[2], resp.Status)
		}
	case line[2] != `""`:
		t.Errorf("plain HTTP on %s, want it off", line[2])
	}
	if !stunOn {
		if r.serving.STUNAddr != "" || r.serving.Region.Nodes[0].STUNPort != -1 {
			t.Errorf("STUN on %q (derpMap STUNPort %d), want it off", r.serving.STUNAddr, r.serving.Region.Nodes[0].STUNPort)
		}
		return
	}
	if _, _, err := testutil.STUNBinding("udp4", "127.0.0.1:0", r.serving.STUNAddr, 10*time.Second); err != nil {
		t.Errorf("STUN on %q: %v", r.serving.STUNAddr, err)
	}
	if n := r.serving.Region.Nodes[0]; n.STUNPort != portOf(t, r.serving.STUNAddr) {
		t.Errorf("derpMap node's STUNPort %d, serving on %s", n.STUNPort, r.serving.STUNAddr)
	}
}

// checkCertIn checks that the relay serves the certificate in dir, and
// that the derpMap pins it.
func (r *runningRelay) checkCertIn(t *testing.T, dir string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, r.serving.ServerName+".crt"))
	if err != nil {
		t.Errorf("no certificate in %s: %v", dir, err)
		return
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM", dir)
	}
	_, cs := r.get(t, "/")
	if !bytes.Equal(cs.PeerCertificates[0].Raw, blk.Bytes) {
		t.Errorf("the relay serves another certificate than the one in %s", dir)
	}
	if _, err := os.Stat(filepath.Join(r.state, "certs")); err == nil && dir != filepath.Join(r.state, "certs") {
		t.Errorf("certificates written to %s/certs too", r.state)
	}
	if !strings.HasPrefix(r.serving.Region.Nodes[0].CertName, "sha256-raw:") {
		t.Errorf("derpMap node has no CertName pin: %+v", r.serving.Region.Nodes[0])
	}
}

// checkHome checks what "/" answers: status, and the redirect's target or
// an empty page.
func (r *runningRelay) checkHome(t *testing.T, status int, location string) {
	t.Helper()
	resp, _ := r.get(t, "/")
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != status || resp.Header.Get("Location") != location || (status == http.StatusOK && len(body) != 0) {
		t.Errorf("GET /: %s, Location %q, %d bytes; want %d, Location %q, and a blank page if 200", resp.Status, resp.Header.Get("Location"), len(body), status, location)
	}
}

// checkBootstrap checks /bootstrap-dns: unpublished answered to ?q= and
// not listed, published listed.
func (r *runningRelay) checkBootstrap(t *testing.T, unpublished, published string) {
	t.Helper()
	answer := func(path string) map[string][]string {
		resp, _ := r.get(t, path)
		var m map[string][]string
		if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		return m
	}
	list := answer("/bootstrap-dns")
	for name, listed := range map[string]bool{unpublished: false, published: true} {
		if name == "" {
			continue
		}
		if _, ok := list[name]; ok != listed {
			t.Errorf("/bootstrap-dns lists %s: %v, want %v (%v)", name, ok, listed, list)
		}
		if q := answer("/bootstrap-dns?q=" + name); len(q[name]) == 0 {
			t.Errorf("/bootstrap-dns?q=%s: %v, want its addresses", name, q)
		}
	}
}

// checkFleet checks the region the relay printed at start.
func (r *runningRelay) checkFleet(t *testing.T, nodes int) {
	t.Helper()
	if got := testutil.DERPMapFleetRegion(t, r.p.Output.String()); len(got.Nodes) != nodes {
		t.Errorf("printed region has %d nodes, want %d (this relay and its -mesh-with peers)", len(got.Nodes), nodes)
	}
}

// checkLog checks that the output holds each of lines.
func (r *runningRelay) checkLog(t *testing.T, lines ...string) {
	t.Helper()
	for _, l := range lines {
		if !strings.Contains(r.p.Output.String(), l) {
			t.Errorf("the log does not say %q", l)
		}
	}
}

// checkNoLog checks that the output holds none of lines.
func (r *runningRelay) checkNoLog(t *testing.T, lines ...string) {
	t.Helper()
	for _, l := range lines {
		if strings.Contains(r.p.Output.String(), l) {
			t.Errorf("the log says %q", l)
		}
	}
}

// get GETs path from the relay over HTTPS. The certificate is checked by
// checkCertIn, not here.
func (r *runningRelay) get(t *testing.T, path string) (*http.Response, *tls.ConnectionState) {
	t.Helper()
	c := &http.Client{
		Timeout:       10 * time.Second,
		Transport:     &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	req, _ := http.NewRequestWithContext(ctx, "GET", "https://"+r.serving.HTTPSAddr+path, nil)
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp, resp.TLS
}

func portOf(t *testing.T, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%q: %v", addr, err)
	}
	n, _ := strconv.Atoi(p)
	return n
}
