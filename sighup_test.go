package main

import (
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tailderp/tailderp/internal/testacme"
	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/relay"
)

// alive fails the test if p has exited.
func (p *process) alive(t *testing.T, when string) {
	t.Helper()
	if p.Exited() {
		t.Fatalf("%s: tailderp exited (%v):\n%s", when, p.Err(), p.Output.String())
	}
}

// TestBinarySIGHUP: SIGHUP no longer ends the process (it did: status
// 129, no log, and systemd's Restart=on-failure does not restart after a
// signal); it reloads the manual certificate files and the rate config,
// says so, keeps serving, and keeps the old state when the new files are
// bad. SIGTERM still exits 0.
func TestBinarySIGHUP(t *testing.T) {
	bin := buildTailderp(t)
	state := filepath.Join(t.TempDir(), "state")
	const host = "derp.example.com"
	certDir := filepath.Join(state, "certs")
	writeTestPair(t, certDir, host, host, false)
	rate := filepath.Join(t.TempDir(), "rate.json")
	if err := os.WriteFile(rate, []byte(`{"PerClientRateLimitBytesPerSec": 100000}`), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startTailderp(t, bin, "-hostname", host, "-certmode", "manual", "-state-dir", state, "-rate-config", rate,
		"-a", "127.0.0.1:0", "-http-port", "-1", "-stun-port", "0", "-verify-clients=false")
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(p.region(t).Nodes[0].DERPPort))
	p.WaitOutput(t, "per_client_bytes_per_sec=100000", 5*time.Second)
	before := presentedPin(t, addr)

	// New files, then SIGHUP before any handshake: the reload is SIGHUP's.
	crt, _ := writeTestPair(t, certDir, host, host, false)
	newPin := pinOfFile(t, crt)
	if err := os.WriteFile(rate, []byte(`{"PerClientRateLimitBytesPerSec": 50000, "PerClientRateBurstBytes": 100000}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := p.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	p.WaitOutput(t, "SIGHUP: certificate reloaded", 5*time.Second)
	p.WaitOutput(t, "in_force_bytes_per_sec=50000", 5*time.Second)
	p.alive(t, "after SIGHUP")
	if got := presentedPin(t, addr); got != newPin || got == before {
		t.Errorf("after SIGHUP the server presents %s, want the new file's %s (before: %s)", got, newPin, before)
	}

	// Bad files: a second SIGHUP says why and keeps what is in force.
	if err := os.WriteFile(rate, []byte(`{"PerClientRateLimitBytesPerSec": 1`), 0o600); err != nil {
		t.Fatal(err)
	}
	writeTestPair(t, certDir, host, host, true) // key of another certificate
	if err := p.Cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	p.WaitOutput(t, "SIGHUP: rate config not reloaded", 5*time.Second)
	p.WaitOutput(t, "SIGHUP: certificate files not reloaded", 5*time.Second)
	p.alive(t, "after a SIGHUP with bad files")
	if got := presentedPin(t, addr); got != newPin {
		t.Errorf("after a bad reload the server presents %s, want the last good %s", got, newPin)
	}
	if !strings.Contains(p.Output.String(), "in_force_bytes_per_sec=50000") {
		t.Error("the limits in force are not named")
	}
	p.terminate(t)
}

// pinOfFile is the CertName of the PEM certificate in path.
func pinOfFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM", path)
	}
	return relay.CertName(blk.Bytes)
}

// TestBinaryACMEIPCerts runs the binary for an IP address with
// -acme-ip-certs against Pebble: the derpMap snippet has no CertName, the
// certificate Pebble issues (for 127.0.0.1, validated on the HTTP port) is
// what the server presents, and a DERP client that trusts Pebble's root and
// dials the IP relays a packet.
func TestBinaryACMEIPCerts(t *testing.T) {
	bin := buildTailderp(t)
	ca := testacme.Start(t, testacme.Options{ShortlivedValidity: time.Hour})
	bundle := filepath.Join(t.TempDir(), "pebble-api.pem")
	if err := os.WriteFile(bundle, ca.DirectoryCAPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	// The HTTP port is chosen before the start, so the CA's gateway points
	// at it before the first attempt.
	httpPort := testutil.FreePort(t, "tcp")
	ca.SetHTTP01Target(net.JoinHostPort("127.0.0.1", strconv.Itoa(httpPort)))
	state := filepath.Join(t.TempDir(), "state")
	p := startTailderp(t, bin, "-hostname", "127.0.0.1", "-acme-ip-certs", "-state-dir", state,
		"-acme-directory-url", ca.DirectoryURL, "-acme-ca-bundle", bundle,
		"-a", "127.0.0.1:0", "-http-port", strconv.Itoa(httpPort), "-stun-port", "0", "-verify-clients=false")
	region := p.region(t)
	node := region.Nodes[0]
	if node.CertName != "" {
		t.Errorf("snippet pins CertName %s; a CA-signed IP certificate needs none", node.CertName)
	}
	if node.HostName != "127.0.0.1" || node.IPv4 != "127.0.0.1" {
		t.Errorf("node %s/%s, want 127.0.0.1 for both", node.HostName, node.IPv4)
	}
	p.WaitOutput(t, "got a certificate for the IP address", 60*time.Second)
	relayPacketTrusting(t, region, ca.IssuerRoots)
	p.terminate(t)
}
