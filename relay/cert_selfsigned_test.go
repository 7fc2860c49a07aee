package relay_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/relay"
)

// readCert parses the PEM certificate at path.
func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		t.Fatalf("%s: no PEM certificate", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// dirNames lists the names in dir.
func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func TestEnsureSelfSignedIPCert(t *testing.T) {
	for _, ip := range []string{"127.0.0.1", "203.0.113.7", "2001:db8::7"} {
		t.Run(ip, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "certs") // created on demand
			crt, key := relay.CertPaths(dir, ip)

			created, err := relay.EnsureSelfSignedIPCert(dir, ip)
			if err != nil || !created {
				t.Fatalf("first call: created=%v err=%v, want a new pair", created, err)
			}
			fi, err := os.Stat(key)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("key mode %v, want 0600", fi.Mode().Perm())
			}
			leaf := readCert(t, crt)
			if err := leaf.VerifyHostname(ip); err != nil {
				t.Errorf("certificate not valid for %s: %v", ip, err)
			}
			if got := dirNames(t, dir); len(got) != 2 {
				t.Errorf("dir holds %q, want only the two files", got)
			}
			crtBefore, _ := os.ReadFile(crt)
			keyBefore, _ := os.ReadFile(key)

			// Second start: reused as is, so the pin clients have stays good.
			created, err = relay.EnsureSelfSignedIPCert(dir, ip)
			if err != nil || created {
				t.Fatalf("second call: created=%v err=%v, want the pair reused", created, err)
			}
			crtAfter, _ := os.ReadFile(crt)
			keyAfter, _ := os.ReadFile(key)
			if !bytes.Equal(crtBefore, crtAfter) || !bytes.Equal(keyBefore, keyAfter) {
				t.Error("second call changed the files")
			}

			// The pair is what manual mode serves.
			certs, err := relay.LoadManualCerts(dir, ip, nil)
			if err != nil {
				t.Fatalf("LoadManualCerts of the generated pair: %v", err)
			}
			if got, want := mustCurrent(t, certs).CertName, relay.CertName(leaf.Raw); got != want {
				t.Errorf("CertName %s, want %s", got, want)
			}
		})
	}
}

func TestEnsureSelfSignedIPCertOnlyOneFile(t *testing.T) {
	for _, keep := range []string{"crt", "key"} {
		t.Run("only "+keep, func(t *testing.T) {
			dir := t.TempDir()
			const ip = "198.51.100.4"
			if _, err := relay.EnsureSelfSignedIPCert(dir, ip); err != nil {
				t.Fatal(err)
			}
			crt, key := relay.CertPaths(dir, ip)
			kept, gone := crt, key
			if keep == "key" {
				kept, gone = key, crt
			}
			os.Remove(gone)
			before, _ := os.ReadFile(kept)

			created, err := relay.EnsureSelfSignedIPCert(dir, ip)
			if err == nil {
				t.Fatalf("created=%v, want an error: a new pair would silently change the pin", created)
			}
			for _, w := range []string{crt, key} {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not name %s: %v", w, err)
				}
			}
			after, _ := os.ReadFile(kept)
			if !bytes.Equal(before, after) {
				t.Errorf("%s was changed", kept)
			}
			if _, err := os.Stat(gone); err == nil {
				t.Errorf("%s was recreated", gone)
			}
		})
	}
}

func TestEnsureSelfSignedIPCertNotAnIP(t *testing.T) {
	dir := t.TempDir()
	if _, err := relay.EnsureSelfSignedIPCert(dir, "derp.example.com"); err == nil || !strings.Contains(err.Error(), "derp.example.com") {
		t.Errorf("err = %v, want one naming the non-IP", err)
	}
	if names := dirNames(t, dir); len(names) != 0 {
		t.Errorf("dir holds %q, want nothing", names)
	}
}

func TestCertName(t *testing.T) {
	der := []byte("any DER bytes")
	want := fmt.Sprintf("sha256-raw:%x", sha256.Sum256(der))
	if got := relay.CertName(der); got != want {
		t.Errorf("CertName = %s, want %s", got, want)
	}
}

// regionFromSnippet renders the derpMap snippet for node, as the operator
// pastes it into the policy file, and reads the region back as a client's
// netmap would carry it.
func regionFromSnippet(t *testing.T, node relay.NodeInfo) *tailcfg.DERPRegion {
	t.Helper()
	rc := relay.RegionConfig{RegionID: 900, RegionCode: "test", RegionName: "Test"}
	b, err := relay.PolicySnippet(relay.DERPRegion(rc, node))
	if err != nil {
		t.Fatal(err)
	}
	r := testutil.DERPMapRegion(t, string(b))
	if r.RegionID != 900 {
		t.Fatalf("snippet has no region 900 with one node:\n%s", b)
	}
	return r
}

// regionClient is a client as tailscaled makes one: from the derpMap region,
// with no TLS settings of its own.
func regionClient(t *testing.T, region *tailcfg.DERPRegion) *derphttp.Client {
	t.Helper()
	c := derphttp.NewRegionClient(key.NewNode(), logger.Discard, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	t.Cleanup(func() { c.Close() })
	return c
}

func TestSelfSignedIPPinnedClients(t *testing.T) {
	const ip = "127.0.0.1"
	dir := t.TempDir()
	if _, err := relay.EnsureSelfSignedIPCert(dir, ip); err != nil {
		t.Fatal(err)
	}
	certs, err := relay.LoadManualCerts(dir, ip, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := startRelay(t, certs)
	printed := mustCurrent(t, certs).CertName

	// The pin printed is the hash of what the server really presents.
	leaf, err := presented(t, s.LocalAddr().String(), "")
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("sha256-raw:%x", sha256.Sum256(leaf.Raw)); printed != want {
		t.Fatalf("printed CertName %s, but the server presents %s", printed, want)
	}

	node := relay.NodeInfo{
		HostName: ip,
		IPv4:     ip,
		IPv6:     "none",
		DERPPort: s.LocalAddr().(*net.TCPAddr).Port,
		STUNPort: -1,
		CertName: printed,
	}
	a, b := regionClient(t, regionFromSnippet(t, node)), regionClient(t, regionFromSnippet(t, node))
	aIn, bIn := watch(a), watch(b)
	aIn.mustBeAdmitted(t)
	bIn.mustBeAdmitted(t)
	exchange(t, a, a.SelfPublicKey(), aIn, b, b.SelfPublicKey(), bIn)

	// Pinned to anything else, or not pinned at all, the same client
	// refuses the relay.
	wrong := map[string]string{
		"other pin": "sha256-raw:" + strings.Repeat("ab", sha256.Size),
		"no pin":    "",
	}
	for name, pin := range wrong {
		t.Run(name, func(t *testing.T) {
			n := node
			n.CertName = pin
			c := regionClient(t, regionFromSnippet(t, n))
			ctx, cancel := context.WithTimeout(context.Background(), waitFor)
			defer cancel()
			if err := c.Connect(ctx); err == nil {
				t.Fatal("Connect succeeded, want a certificate error")
			} else if ctx.Err() != nil {
				t.Fatalf("Connect timed out instead of failing: %v", err)
			}
		})
	}
}

// The renewal of an IP certificate: the next pair is written beside the
// current one without changing what is served; activating it switches the
// relay at its next handshake, clients connected before stay connected,
// a client given the new pin connects, and one with the old pin is
// refused (the outage the switch implies: Tailscale clients accept only
// the pinned certificate, and try no other).
func TestSelfSignedIPRenewal(t *testing.T) {
	const ip = "127.0.0.1"
	dir := t.TempDir()
	if _, err := relay.EnsureSelfSignedIPCert(dir, ip); err != nil {
		t.Fatal(err)
	}
	certs, err := relay.LoadManualCerts(dir, ip, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := startRelay(t, certs)
	addr := s.LocalAddr().String()
	oldPin := mustCurrent(t, certs).CertName
	node := relay.NodeInfo{HostName: ip, IPv4: ip, IPv6: "none", DERPPort: s.LocalAddr().(*net.TCPAddr).Port, STUNPort: -1}
	pinned := func(pin string) *tailcfg.DERPRegion {
		n := node
		n.CertName = pin
		return regionFromSnippet(t, n)
	}
	servedPin := func() string {
		t.Helper()
		leaf, err := presented(t, addr, "")
		if err != nil {
			t.Fatal(err)
		}
		return relay.CertName(leaf.Raw)
	}
	before := regionClient(t, pinned(oldPin))
	beforeIn := watch(before)
	beforeIn.mustBeAdmitted(t)

	next, err := relay.WriteNextSelfSignedIPCert(dir, ip)
	if err != nil {
		t.Fatal(err)
	}
	ncrt, nkey := relay.NextCertPaths(dir, ip)
	if next.CertName == oldPin || next.File != ncrt {
		t.Fatalf("next certificate %+v: want a new pin, from %s", next, ncrt)
	}
	if fi, err := os.Stat(nkey); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("next key %s: %v, mode %v, want 0600", nkey, err, fi.Mode())
	}
	if got := servedPin(); got != oldPin {
		t.Fatalf("after writing the next pair the relay serves %s, want still %s", got, oldPin)
	}

	info, err := relay.ActivateNextCert(dir, ip)
	if err != nil {
		t.Fatal(err)
	}
	if info.CertName != next.CertName {
		t.Fatalf("activated %s, want %s", info.CertName, next.CertName)
	}
	if got := servedPin(); got != next.CertName {
		t.Fatalf("after activating the relay serves %s, want %s", got, next.CertName)
	}
	crt, _ := relay.CertPaths(dir, ip)
	pcrt, _ := relay.PrevCertPaths(dir, ip)
	if relay.CertName(readCert(t, crt).Raw) != next.CertName || relay.CertName(readCert(t, pcrt).Raw) != oldPin {
		t.Errorf("files after activation: current %s, previous %s", crt, pcrt)
	}
	if _, err := os.Stat(ncrt); err == nil {
		t.Errorf("%s still there after activation", ncrt)
	}

	// New pin: connects and relays to the client connected before.
	after := regionClient(t, pinned(next.CertName))
	afterIn := watch(after)
	afterIn.mustBeAdmitted(t)
	exchange(t, after, after.SelfPublicKey(), afterIn, before, before.SelfPublicKey(), beforeIn)
	// Old pin, new connection: refused.
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if err := regionClient(t, pinned(oldPin)).Connect(ctx); err == nil || !strings.Contains(err.Error(), "cert hash does not match") {
		t.Errorf("a client with the old pin: %v, want a certificate hash mismatch", err)
	}

	// Activating again, with no next pair, fails and changes nothing.
	if _, err := relay.ActivateNextCert(dir, ip); err == nil {
		t.Error("a second activation without a next pair succeeded")
	}
	if got := servedPin(); got != next.CertName {
		t.Errorf("after a failed activation the relay serves %s", got)
	}
}

// A start that finds no current pair but a next or previous one (a switch
// interrupted between its renames) does not generate a pair with a new
// pin: it says which files to move.
func TestEnsureSelfSignedIPCertAfterInterruptedSwitch(t *testing.T) {
	const ip = "203.0.113.7"
	dir := t.TempDir()
	if _, err := relay.EnsureSelfSignedIPCert(dir, ip); err != nil {
		t.Fatal(err)
	}
	if _, err := relay.WriteNextSelfSignedIPCert(dir, ip); err != nil {
		t.Fatal(err)
	}
	crt, key := relay.CertPaths(dir, ip)
	pcrt, pkey := relay.PrevCertPaths(dir, ip)
	// As if interrupted after moving the current pair aside.
	for _, mv := range [][2]string{{crt, pcrt}, {key, pkey}} {
		if err := os.Rename(mv[0], mv[1]); err != nil {
			t.Fatal(err)
		}
	}
	created, err := relay.EnsureSelfSignedIPCert(dir, ip)
	ncrt, _ := relay.NextCertPaths(dir, ip)
	if err == nil || created || !strings.Contains(err.Error(), "interrupted") || !strings.Contains(err.Error(), ncrt) {
		t.Fatalf("EnsureSelfSignedIPCert = %v, %v; want an error naming %s", created, err, ncrt)
	}
	if _, err := os.Stat(crt); err == nil {
		t.Errorf("%s was generated", crt)
	}
	// Finishing the switch by hand, as the error says, works.
	if _, err := relay.ActivateNextCert(dir, ip); err != nil {
		t.Fatalf("activating the waiting pair: %v", err)
	}
	if created, err := relay.EnsureSelfSignedIPCert(dir, ip); err != nil || created {
		t.Errorf("after the switch: %v, %v", created, err)
	}
}
