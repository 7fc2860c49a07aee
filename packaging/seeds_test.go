package packaging

import (
	"slices"
	"strings"
	"testing"

	"github.com/tailderp/tailderp/internal/testutil"
)

// The seeds: environment files users of the popular derper images already
// have, which must keep their meaning with tailderp.

// tijjjyEnv is tijjjy/Tailscale-DERP-Docker's .env as its repository ships
// it (commit 4eb3414), quotes included.
const tijjjyEnv = `TAILSCALE_DERP_HOSTNAME=derp.example.com
TAILSCALE_DERP_VERIFY_CLIENTS=true
TAILSCALE_DERP_CERTMODE=letsencrypt
TAILSCALE_AUTH_KEY="ENTER YOUR TAILSCALE AUTH KEY HERE"
`

// camlliaEnv is the camllia/derper environment its README shows (the
// image's README shows them with -e, all at derper's defaults but the
// cert mode). camllia/derper takes the hostname from HOSTNAME, which
// tailderp cannot read (Docker sets HOSTNAME to the container ID), so the
// hostname comes from tailderp's own name.
var camlliaEnv = []string{"CERTMODE=manual", "ADDR=:443", "STUN_PORT=3478", "VERIFY_CLIENTS=true"}

// seedGaps are seed variables tailderp does not read yet, with why they
// still keep their meaning in the seed as shipped. The test fails when
// one becomes a real setting, so this list stays true.
var seedGaps = map[string]string{}

// TestSeedNames: every variable of the seeds is read by tailderp with the
// meaning derper gave it, shown with `tailderp derpmap` (what clients are
// told) and the configuration checks, which need no network.
func TestSeedNames(t *testing.T) {
	names := map[string]bool{}
	for _, s := range settings(t) {
		names[s.env] = true
		for _, a := range s.aliases {
			names[a] = true
		}
	}
	tijjjy := parseEnvFile(tijjjyEnv, false)
	for _, l := range tijjjy {
		_, gap := seedGaps[l.name]
		switch {
		case names[l.name] && gap:
			t.Errorf("%s is now a setting: remove it from seedGaps", l.name)
		case !names[l.name] && !gap:
			t.Errorf("tijjjy/Tailscale-DERP-Docker's %s is not a tailderp setting", l.name)
		case gap:
			t.Logf("known gap: tijjjy's %s (%s)", l.name, seedGaps[l.name])
		}
	}
	for _, kv := range camlliaEnv {
		if name, _, _ := strings.Cut(kv, "="); !names[name] {
			t.Errorf("camllia/derper's %s is not a tailderp setting", name)
		}
	}

	t.Run("tijjjy", func(t *testing.T) {
		code, stdout, stderr := runBinary(t, envList(tijjjy), "derpmap")
		if code != 0 {
			t.Fatalf("tailderp derpmap with tijjjy's .env: exit %d\n%s", code, stderr)
		}
		n := *testutil.DERPMapRegion(t, stdout).Nodes[0]
		if n.HostName != "derp.example.com" || publicDERPPort(n) != 443 || publicSTUNPort(n) != 3478 || n.CertName != "" {
			t.Errorf("derpMap node %+v: want derp.example.com on 443, STUN 3478, a CA certificate (no pin)", n)
		}
		// Verification on (TAILSCALE_DERP_VERIFY_CLIENTS=true) needs the
		// node's key: without one, tailderp refuses to start instead of
		// running an open relay.
		env := slices.DeleteFunc(envList(tijjjy), func(kv string) bool { return strings.HasPrefix(kv, "TAILSCALE_AUTH_KEY=") })
		code, _, stderr = runBinary(t, append(env, "STATE_DIR="+t.TempDir()))
		if code != 2 || !strings.Contains(stderr, "TAILSCALE_AUTH_KEY is not set") {
			t.Errorf("tijjjy's .env without a key: exit %d, want 2 and an error naming TAILSCALE_AUTH_KEY:\n%s", code, stderr)
		}
	})

	t.Run("camllia", func(t *testing.T) {
		env := append(slices.Clone(camlliaEnv), "TAILSCALE_DERP_HOSTNAME=derp.example.com")
		code, stdout, stderr := runBinary(t, env, "derpmap")
		if code != 0 {
			t.Fatalf("tailderp derpmap with camllia's env: exit %d\n%s", code, stderr)
		}
		n := *testutil.DERPMapRegion(t, stdout).Nodes[0]
		if n.HostName != "derp.example.com" || publicDERPPort(n) != 443 || publicSTUNPort(n) != 3478 {
			t.Errorf("derpMap node %+v: want derp.example.com on 443, STUN 3478", n)
		}
		// The same names with values other than the defaults: they are
		// read, not merely equal to what tailderp would do anyway.
		moved := []string{"CERTMODE=manual", "ADDR=:8443", "STUN_PORT=3479", "TAILSCALE_DERP_HOSTNAME=derp.example.com"}
		code, stdout, stderr = runBinary(t, moved, "derpmap")
		if code != 0 {
			t.Fatalf("tailderp derpmap: exit %d\n%s", code, stderr)
		}
		if n := *testutil.DERPMapRegion(t, stdout).Nodes[0]; publicDERPPort(n) != 8443 || publicSTUNPort(n) != 3479 {
			t.Errorf("ADDR=:8443 STUN_PORT=3479: derpMap node %+v, want DERPPort 8443, STUNPort 3479", n)
		}
		code, _, stderr = runBinary(t, []string{"CERTMODE=bogus", "TAILSCALE_DERP_HOSTNAME=derp.example.com", "VERIFY_CLIENTS=false"}, "derpmap")
		if code == 0 || !strings.Contains(stderr, "CERTMODE") {
			t.Errorf("CERTMODE=bogus: exit %d, want an error naming CERTMODE:\n%s", code, stderr)
		}
	})
}
