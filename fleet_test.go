package main

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/internal/testutil"
)

// writeFile writes content to a new file in a test directory.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

const testMeshKey = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// TestFleetSettingsErrors: a wrong fleet or bootstrap DNS setting stops
// tailderp before it serves, with exit status 2 and one error line naming
// the setting and what to do.
func TestFleetSettingsErrors(t *testing.T) {
	good := writeFile(t, "mesh.key", testMeshKey+"\n")
	empty := writeFile(t, "empty.key", "\n")
	short := writeFile(t, "short.key", "abcd")
	zero := writeFile(t, "zero.key", strings.Repeat("0", 64))
	var many []string
	for range 33 {
		many = append(many, "n.example.com")
	}
	for i := range many {
		many[i] = strings.Replace(many[i], "n.", "n"+string(rune('a'+i%26))+string(rune('a'+i/26))+".", 1)
	}
	tests := []struct {
		name string
		args []string
		want []string
	}{
		{"mesh-with without mesh-psk-file", []string{"-mesh-with", "derp2.example.com"},
			[]string{"-mesh-with (MESH_WITH)", "needs -mesh-psk-file (MESH_PSK_FILE)", "openssl rand -hex 32"}},
		{"mesh-with bad host", []string{"-mesh-with", "derp2.example.com,derp_3.example.com", "-mesh-psk-file", good},
			[]string{"-mesh-with (MESH_WITH)", `"derp_3.example.com"`, "neither a DNS name nor an IP address"}},
		{"mesh-with URL", []string{"-mesh-with", "https://derp2.example.com/derp", "-mesh-psk-file", good},
			[]string{"-mesh-with (MESH_WITH)", "not a URL"}},
		{"mesh-with bad port", []string{"-mesh-with", "derp2.example.com:70000", "-mesh-psk-file", good},
			[]string{"-mesh-with (MESH_WITH)", `port "70000"`}},
		{"mesh-with twice", []string{"-mesh-with", "derp2.example.com,derp2.example.com:443", "-mesh-psk-file", good},
			[]string{"-mesh-with (MESH_WITH)", "derp2.example.com is listed twice"}},
		{"mesh-with derper dial name", []string{"-mesh-with", "derp2.example.com/derp2.internal", "-mesh-psk-file", good},
			[]string{"-mesh-with (MESH_WITH)", "must be an IP address"}},
		{"empty mesh key file", []string{"-mesh-psk-file", empty},
			[]string{"-mesh-psk-file (MESH_PSK_FILE)", empty, "is empty", "openssl rand -hex 32"}},
		{"malformed mesh key", []string{"-mesh-psk-file", short},
			[]string{"-mesh-psk-file (MESH_PSK_FILE)", short, "64 hex digits"}},
		{"all-zero mesh key", []string{"-mesh-psk-file", zero},
			[]string{"-mesh-psk-file (MESH_PSK_FILE)", "all zeros"}},
		{"missing mesh key file", []string{"-mesh-psk-file", "/nonexistent/mesh.key"},
			[]string{"-mesh-psk-file (MESH_PSK_FILE)", "/nonexistent/mesh.key"}},
		{"mesh-ca-bundle missing", []string{"-mesh-with", "derp2.example.com", "-mesh-psk-file", good, "-mesh-ca-bundle", "/nonexistent/ca.pem"},
			[]string{"-mesh-ca-bundle (MESH_CA_BUNDLE)", "/nonexistent/ca.pem"}},
		{"bootstrap name is a URL", []string{"-bootstrap-dns-names", "https://hs.example.com"},
			[]string{"-bootstrap-dns-names (BOOTSTRAP_DNS_NAMES)", `"https://hs.example.com"`, "not a DNS name"}},
		{"bootstrap name with a port", []string{"-bootstrap-dns-names", "hs.example.com:8080"},
			[]string{"-bootstrap-dns-names (BOOTSTRAP_DNS_NAMES)", "not a DNS name"}},
		{"unpublished rollout percentage", []string{"-unpublished-bootstrap-dns-names", "hs.example.com/rollout.example.com"},
			[]string{"-unpublished-bootstrap-dns-names (UNPUBLISHED_BOOTSTRAP_DNS_NAMES)", "not supported"}},
		{"too many bootstrap names", []string{"-bootstrap-dns-names", strings.Join(many, ",")},
			[]string{"-bootstrap-dns-names (BOOTSTRAP_DNS_NAMES)", "33 names", "at most 32"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			state := filepath.Join(t.TempDir(), "state")
			args := append([]string{"-a", "127.0.0.1:0", "-http-port", "-1", "-stun=false", "-state-dir", state,
				"-hostname", "127.0.0.1", "-certmode", "manual", "-verify-clients=false"}, tt.args...)
			code, _, stderr := runMain(t, nil, args...)
			if code != 2 {
				t.Fatalf("exit %d, want 2; stderr:\n%s", code, stderr)
			}
			lines := errorLines(code, stderr)
			if len(lines) != 1 {
				t.Fatalf("%d error lines, want one:\n%s", len(lines), stderr)
			}
			for _, w := range tt.want {
				if !strings.Contains(lines[0], w) {
					t.Errorf("error line does not say %q:\n%s", w, lines[0])
				}
			}
			if _, err := os.Stat(state); err == nil {
				t.Errorf("the state directory was created before the settings were checked")
			}
		})
	}
}

// TestMeshSelfSkipped: every relay of a fleet can be given the same
// -mesh-with; the entry for -hostname at the port of -a is this relay and
// is not dialed.
func TestMeshSelfSkipped(t *testing.T) {
	key := writeFile(t, "mesh.key", testMeshKey)
	list := "derp1.example.com,DERP2.example.com.,derp2.example.com:8443"
	for _, tc := range []struct {
		hostname, addr string
		want           []string
	}{
		{"derp1.example.com", ":443", []string{"derp2.example.com", "derp2.example.com:8443"}},
		{"derp2.example.com", ":443", []string{"derp1.example.com", "derp2.example.com:8443"}},
		{"derp2.example.com", ":8443", []string{"derp1.example.com", "derp2.example.com"}},
		{"derp3.example.com", ":443", []string{"derp1.example.com", "derp2.example.com", "derp2.example.com:8443"}},
	} {
		var stderr testutil.Buffer
		cfg, err := loadConfig("tailderp", []string{"-hostname", tc.hostname, "-a", tc.addr, "-mesh-with", list, "-mesh-psk-file", key, "-verify-clients=false"}, envFrom(nil), &stderr)
		if err != nil {
			t.Fatalf("%s: %v", tc.hostname, err)
		}
		var got []string
		for _, p := range cfg.MeshPeers() {
			got = append(got, p.String())
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("-hostname %s -a %s: peers %q, want %q", tc.hostname, tc.addr, got, tc.want)
		}
	}
}

// TestUnpublishedBootstrapDefault: with its tailnet node, a relay answers
// /bootstrap-dns?q= for its control server's host name unless told
// otherwise; the name is never listed.
func TestUnpublishedBootstrapDefault(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  map[string]string
		args []string
		want []string
	}{
		{"Tailscale", map[string]string{"TAILSCALE_AUTH_KEY": fakeAuthKey}, nil, []string{"controlplane.tailscale.com"}},
		{"Headscale", map[string]string{"TAILSCALE_AUTH_KEY": fakeAuthKey, "TAILSCALE_CONTROL_URL": "https://HS.example.com:8080/"}, nil, []string{"hs.example.com"}},
		{"control by IP", map[string]string{"TAILSCALE_AUTH_KEY": fakeAuthKey, "TAILSCALE_CONTROL_URL": "http://127.0.0.1:1"}, nil, nil},
		{"no node", nil, []string{"-verify-clients=false"}, nil},
		{"turned off", map[string]string{"TAILSCALE_AUTH_KEY": fakeAuthKey, "UNPUBLISHED_BOOTSTRAP_DNS_NAMES": "none"}, nil, nil},
		{"given", map[string]string{"TAILSCALE_AUTH_KEY": fakeAuthKey}, []string{"-unpublished-bootstrap-dns-names", "a.example.com, b.example.com"}, []string{"a.example.com", "b.example.com"}},
	} {
		var stderr testutil.Buffer
		cfg, err := loadConfig("tailderp", append([]string{"-hostname", "derp.example.com"}, tc.args...), envFrom(tc.env), &stderr)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := cfg.UnpublishedBootstrapNames(); !slices.Equal(got, tc.want) {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}

// TestDERPMapFleet: with -mesh-with, `tailderp derpmap` prints the fleet's
// region: a node per relay in the list's order, this relay's where its
// entry stands, each peer with what its entry says.
func TestDERPMapFleet(t *testing.T) {
	pin := "sha256-raw:" + strings.Repeat("ab", 32)
	code, stdout, stderr := runMain(t, nil, "derpmap", "-hostname", "derp2.example.com", "-stun-port", "3479",
		"-state-dir", t.TempDir(),
		"-mesh-with", "derp1.example.com,derp2.example.com,derp3.example.com:8443/10.0.0.3,"+pin+"@203.0.113.9")
	if code != 0 {
		t.Fatalf("exit %d:\n%s", code, stderr)
	}
	r := testutil.DERPMapFleetRegion(t, stdout)
	if r.RegionID != 900 || len(r.Nodes) != 4 {
		t.Fatalf("region 900: %s", stdout)
	}
	want := []tailcfg.DERPNode{
		{Name: "900a", RegionID: 900, HostName: "derp1.example.com", STUNPort: 3479},
		{Name: "900b", RegionID: 900, HostName: "derp2.example.com", STUNPort: 3479},
		// The address to dial (a private one) is the relays' business.
		{Name: "900c", RegionID: 900, HostName: "derp3.example.com", DERPPort: 8443, STUNPort: 3479},
		{Name: "900d", RegionID: 900, HostName: "203.0.113.9", IPv4: "203.0.113.9", CertName: pin, STUNPort: 3479},
	}
	for i, w := range want {
		if *r.Nodes[i] != w {
			t.Errorf("node %d: %+v, want %+v", i, *r.Nodes[i], w)
		}
	}
	if !strings.Contains(stderr, "3 peers of -mesh-with") {
		t.Errorf("stderr does not say it printed the fleet:\n%s", stderr)
	}
}
