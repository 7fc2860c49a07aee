package e2e

import (
	"crypto/tls"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/relay"
)

// A fleet in these tests: tailderp binaries on 127.0.0.1 whose
// certificates a private CA signs (as relay/mesh_fleet_test.go does
// in-process). The relays trust it for their mesh links through
// -mesh-ca-bundle, the test's DERP clients through their TLS config:
// every certificate is really verified, none is pinned.

// loopbackCA is the fleet's private certificate authority.
type loopbackCA struct {
	ca      *testutil.Cert
	pemPath string // the CA certificate, for -mesh-ca-bundle
}

func newLoopbackCA(t *testing.T) *loopbackCA {
	t.Helper()
	ca := testutil.NewCert(t, testutil.CertOptions{CommonName: "tailderp e2e fleet CA", IsCA: true})
	path := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(path, ca.CertPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	return &loopbackCA{ca: ca, pemPath: path}
}

// tlsConfig is a DERP client's TLS config trusting the fleet CA alone.
func (ca *loopbackCA) tlsConfig() *tls.Config { return &tls.Config{RootCAs: ca.ca.Pool()} }

// caSignedRelay prepares an open tailderp (-verify-clients=false: these
// tests are about connections, admission is tested elsewhere) on
// 127.0.0.1 with a CA-signed certificate in manual mode and its DERP key
// made up front, so a client can tell which relay it is on by the
// server's key. args are added to the command line.
func caSignedRelay(t *testing.T, ca *loopbackCA, args ...string) (*relayProc, key.NodePublic) {
	t.Helper()
	p := &relayProc{t: t, HTTPSPort: testutil.FreePort(t, "tcp"), HTTPPort: -1, STUNPort: -1, StateDir: t.TempDir(), CertName: "127.0.0.1"}
	crt, keyPath := relay.CertPaths(filepath.Join(p.StateDir, "certs"), "127.0.0.1")
	testutil.NewCert(t, testutil.CertOptions{Names: []string{"127.0.0.1"}, CA: ca.ca}).WriteFiles(t, crt, keyPath)
	priv, err := relay.LoadOrCreateKey(filepath.Join(p.StateDir, "derp.key"))
	if err != nil {
		t.Fatal(err)
	}
	base := []string{
		"-hostname", "127.0.0.1", "-certmode", "manual",
		"-a", fmt.Sprintf("127.0.0.1:%d", p.HTTPSPort),
		"-http-port", "-1", "-stun=false",
		"-state-dir", p.StateDir,
		"-verify-clients=false",
		"-log-level", "debug",
	}
	p.cmd = exec.Command(binary, append(base, args...)...)
	p.cmd.Env = append(os.Environ(), "TS_NO_LOGS_NO_SUPPORT=true")
	return p, priv.Public()
}

// restart starts p again after it exited: the same command line, so the
// same port, state directory and DERP key.
func (p *relayProc) restart() {
	p.t.Helper()
	if p.proc != nil && !p.proc.Exited() {
		p.t.Fatalf("restart: the relay on %d still runs", p.HTTPSPort)
	}
	cmd := exec.Command(p.cmd.Path, p.cmd.Args[1:]...)
	cmd.Env = p.cmd.Env
	p.cmd = cmd
	p.start()
}

// regionOf is a derpMap region of the relays, in the order given:
// derphttp dials a region's nodes in order and stays on the first that
// accepts the TCP connection, so the first is a client's home.
func regionOf(relays ...*relayProc) *tailcfg.DERPRegion {
	r := &tailcfg.DERPRegion{RegionID: 900, RegionCode: "fleet", RegionName: "fleet"}
	for i, p := range relays {
		r.Nodes = append(r.Nodes, &tailcfg.DERPNode{
			Name: fmt.Sprintf("900%c", 'a'+i), RegionID: 900, HostName: "127.0.0.1",
			IPv4: "127.0.0.1", IPv6: "none", DERPPort: p.HTTPSPort, STUNPort: -1,
		})
	}
	return r
}

// newRegionClient is a DERP client of region, as magicsock makes them.
func newRegionClient(ca *loopbackCA, priv key.NodePrivate, region *tailcfg.DERPRegion) *derphttp.Client {
	c := derphttp.NewRegionClient(priv, logger.Discard, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	c.TLSConfig = ca.tlsConfig()
	return c
}

// fleetMeshArgs are the flags meshing a relay with the fleet: one list for
// all, each relay skips its own entry.
func fleetMeshArgs(ca *loopbackCA, meshKeyFile string, ports ...int) []string {
	var with []string
	for _, port := range ports {
		with = append(with, fmt.Sprintf("127.0.0.1:%d", port))
	}
	return []string{"-mesh-psk-file", meshKeyFile, "-mesh-with", strings.Join(with, ","), "-mesh-ca-bundle", ca.pemPath}
}

// newMeshKeyFile writes a new mesh key to a file and returns its path.
func newMeshKeyFile(t *testing.T) string {
	t.Helper()
	_, k := testutil.NewMeshKey(t)
	path := filepath.Join(t.TempDir(), "mesh.key")
	if err := os.WriteFile(path, []byte(k.String()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// pollFor polls cond every 10 ms for at most d.
func pollFor(d time.Duration, cond func() bool) bool {
	return testutil.Poll(d, 10*time.Millisecond, nil, cond)
}
