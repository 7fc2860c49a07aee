package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/tailderp/tailderp/internal/config"
	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/relay"
)

const day = 24 * time.Hour

// writeSpanPair writes a self-signed certificate for host (a DNS name or
// IP address), valid from notBefore to notAfter, where tailderp looks for
// it in dir, and returns it.
func writeSpanPair(t *testing.T, dir, host string, notBefore, notAfter time.Time) *x509.Certificate {
	t.Helper()
	c := testutil.NewCert(t, testutil.CertOptions{Names: []string{host}, NotBefore: notBefore, NotAfter: notAfter})
	crt, keyPath := relay.CertPaths(dir, host)
	c.WriteFiles(t, crt, keyPath)
	return c.Cert
}

// logLine waits up to 10 s for a line of out containing every one of
// want, and returns it.
func logLine(t *testing.T, out interface{ String() string }, want ...string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		for l := range strings.SplitSeq(out.String(), "\n") {
			all := true
			for _, w := range want {
				all = all && strings.Contains(l, w)
			}
			if all {
				return l
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no line with %q in:\n%s", want, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// runBin runs the built binary to its end with a clean environment.
func runBin(t *testing.T, bin string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = cleanEnv(t)
	var out, errOut testutil.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code = cmd.ProcessState.ExitCode()
	if err != nil && code <= 0 {
		t.Fatalf("%s %q: %v", bin, args, err)
	}
	t.Logf("tailderp %s → exit %d\nstdout:\n%sstderr:\n%s", strings.Join(args, " "), code, out.String(), errOut.String())
	return code, out.String(), errOut.String()
}

// pinnedClient connects a derphttp client made from region, as tailscaled
// makes it, and waits until the relay registered it.
func pinnedClient(t *testing.T, region *tailcfg.DERPRegion) (*derphttp.Client, <-chan derp.ReceivedPacket) {
	t.Helper()
	c := derphttp.NewRegionClient(key.NewNode(), logger.Discard, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		t.Fatalf("Connect: %v", err)
	}
	registered := make(chan struct{})
	packets := make(chan derp.ReceivedPacket, 8)
	go func() {
		once := false
		for {
			m, err := c.Recv()
			if err != nil {
				close(packets)
				return
			}
			switch m := m.(type) {
			case derp.ServerInfoMessage:
				if !once {
					once = true
					close(registered)
				}
			case derp.ReceivedPacket:
				m.Data = append([]byte(nil), m.Data...)
				packets <- m
			}
		}
	}()
	select {
	case <-registered:
	case <-time.After(10 * time.Second):
		t.Fatal("client not registered within 10s")
	}
	return c, packets
}

// The IP-only server's certificate over its last weeks: the warning at
// start with the fix, `check` saying the same, `tailderp cert renew`
// writing the next certificate and printing its pin while the relay goes
// on serving the current one, and `-activate` switching the running relay
// to it: clients pinning the printed CertName connect and relay, a client
// connected before stays connected, and the relay's log, serving.json and
// `tailderp derpmap` show the new pin.
func TestIPCertificateRenewal(t *testing.T) {
	bin := buildTailderp(t)
	const ip = "127.0.0.1"
	state := filepath.Join(t.TempDir(), "state")
	now := time.Now()
	// Made 345 days ago by a first start: 20 days left.
	old := writeSpanPair(t, filepath.Join(state, "certs"), ip, now.Add(-345*day), now.Add(20*day))
	oldPin := relay.CertName(old.Raw)
	settings := []string{"-hostname", ip, "-certmode", "manual", "-state-dir", state}
	p := startTailderp(t, bin, append(settings, "-a", ip+":0", "-http-port", "-1", "-stun-port", "0", "-verify-clients=false")...)
	region := p.region(t)
	node := region.Nodes[0]
	if node.CertName != oldPin {
		t.Fatalf("snippet pins %s, want the certificate's %s", node.CertName, oldPin)
	}
	addr := net.JoinHostPort(ip, strconv.Itoa(node.DERPPort))

	// The warning at start, with the certificate, its end, and the fix.
	warn := logLine(t, p.Output, "level=WARN", "the certificate expires in 19 days")
	for _, want := range []string{"not_after=" + old.NotAfter.UTC().Format(time.RFC3339), "days_left=19", "cert_name=" + oldPin, "tailderp cert renew", "Renewing the IP certificate"} {
		if !strings.Contains(warn, want) {
			t.Errorf("start warning lacks %q:\n%s", want, warn)
		}
	}

	// `tailderp check` from another machine's point of view: ⚠, with the fix.
	code, out, _ := ckCheck(t, nil, "https://"+addr, "-stun-port", strconv.Itoa(node.STUNPort), "-cert-name", oldPin, "-pings", "3", "-expect-open")
	if line := ckLine(t, out, "certificate"); code != 1 || !strings.HasPrefix(line, "⚠ certificate:") ||
		!strings.Contains(line, "(in 19 days): then Tailscale clients refuse it") || !strings.Contains(line, "`tailderp cert renew`") {
		t.Errorf("check exit %d, certificate line %q: want ⚠ with 19 days and the renew command", code, line)
	}

	before, beforePackets := pinnedClient(t, region)

	// Step 1: the next certificate; the relay still serves the current one.
	code, stdout, stderr := runBin(t, bin, append([]string{"cert", "renew"}, settings...)...)
	if code != 0 {
		t.Fatalf("cert renew: exit %d", code)
	}
	next := testutil.DERPMapRegion(t, stdout) // pure JSON on stdout
	newPin := next.Nodes[0].CertName
	if newPin == oldPin || !strings.HasPrefix(newPin, "sha256-raw:") || next.Nodes[0].DERPPort != node.DERPPort {
		t.Fatalf("cert renew printed node %+v: want a new pin and the running server's port %d", next.Nodes[0], node.DERPPort)
	}
	if !strings.Contains(stderr, "do not save it yet") || !strings.Contains(stderr, "tailderp cert renew -activate") {
		t.Errorf("cert renew stderr does not give the steps:\n%s", stderr)
	}
	if got := presentedPin(t, addr); got != oldPin {
		t.Fatalf("after cert renew the relay serves %s, want still %s", got, oldPin)
	}
	_, nkey := relay.NextCertPaths(filepath.Join(state, "certs"), ip)
	if fi, err := os.Stat(nkey); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("next key: %v, want mode 0600", err)
	}
	// Run again (the output was lost): the same pin, not a third one.
	if _, again, _ := runBin(t, bin, append([]string{"cert", "renew"}, settings...)...); testutil.DERPMapRegion(t, again).Nodes[0].CertName != newPin {
		t.Errorf("a second cert renew printed another pin")
	}

	// Step 2: activate.
	code, stdout, stderr = runBin(t, bin, append([]string{"cert", "renew", "-activate"}, settings...)...)
	if code != 0 {
		t.Fatalf("cert renew -activate: exit %d", code)
	}
	printed := testutil.DERPMapRegion(t, stdout)
	if printed.Nodes[0].CertName != newPin || !strings.Contains(stderr, "running relay (pid "+strconv.Itoa(p.Cmd.Process.Pid)+")") {
		t.Errorf("-activate printed pin %s (want %s); stderr:\n%s", printed.Nodes[0].CertName, newPin, stderr)
	}
	if got := presentedPin(t, addr); got != newPin {
		t.Fatalf("after -activate the relay serves %s, want %s", got, newPin)
	}

	// Step 3, the derpMap pushed: clients made from the printed region
	// connect and relay; one connected before is still connected.
	relayPacket(t, printed)
	after, _ := pinnedClient(t, printed)
	if err := after.Send(before.SelfPublicKey(), []byte("still here")); err != nil {
		t.Fatal(err)
	}
	select {
	case m, ok := <-beforePackets:
		if !ok || string(m.Data) != "still here" {
			t.Errorf("client connected before the switch got %q (open %v)", m.Data, ok)
		}
	case <-time.After(10 * time.Second):
		t.Error("client connected before the switch got nothing")
	}
	// The outage: a client still holding the old pin is refused.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stale := derphttp.NewRegionClient(key.NewNode(), logger.Discard, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	defer stale.Close()
	if err := stale.Connect(ctx); err == nil || !strings.Contains(err.Error(), "cert hash does not match") {
		t.Errorf("old pin after the switch: %v, want refused", err)
	}

	// The relay says so, prints the new snippet, and the warning is over.
	logLine(t, p.Output, "level=INFO", "serving a new certificate", newPin)
	logLine(t, p.Output, "level=INFO", "its dates are fine now")
	logLine(t, p.Output, `"CertName": "`+newPin+`"`)
	code, stdout, _ = runMain(t, nil, append([]string{"derpmap"}, settings...)...)
	if code != 0 || testutil.DERPMapRegion(t, stdout).Nodes[0].CertName != newPin {
		t.Errorf("derpmap after the switch: exit %d, %s", code, stdout)
	}
	// /derpmap.json serves the new pin at once.
	pinned := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	defer pinned.CloseIdleConnections()
	if res, err := pinned.Get("https://" + addr + relay.DERPMapPath); err != nil {
		t.Errorf("%s after the switch: %v", relay.DERPMapPath, err)
	} else {
		var m tailcfg.DERPMap
		err := json.NewDecoder(res.Body).Decode(&m)
		res.Body.Close()
		if err != nil || m.Regions[printed.RegionID] == nil || m.Regions[printed.RegionID].Nodes[0].CertName != newPin {
			t.Errorf("%s after the switch: %+v, %v; want the new pin %s", relay.DERPMapPath, m.Regions, err, newPin)
		}
	}
	code, out, _ = ckCheck(t, nil, "https://"+addr, "-stun-port", strconv.Itoa(node.STUNPort), "-cert-name", newPin, "-pings", "3", "-expect-open")
	if line := ckLine(t, out, "certificate"); code != 0 || !strings.HasPrefix(line, "✓ ") {
		t.Errorf("check with the new pin: exit %d, %q", code, line)
	}

	p.terminate(t)
	if strings.Contains(p.Output.String(), "level=ERROR") {
		t.Errorf("errors logged:\n%s", p.Output.String())
	}
	checkStateDir(t, state)
}

// An expired manual certificate at start is served (there is nothing
// better) with an error line naming the file and the fix.
func TestManualCertificateExpiredAtStart(t *testing.T) {
	const host = "derp.test.example"
	state := t.TempDir()
	dir := filepath.Join(state, "certs")
	writeSpanPair(t, dir, host, time.Now().Add(-90*day), time.Now().Add(-time.Hour))
	s := ckServe(t, "-hostname", host, "-certmode", "manual", "-state-dir", state,
		"-a", "127.0.0.1:0", "-http-port", "-1", "-stun-port", "0", "-verify-clients=false")
	crt, key := relay.CertPaths(dir, host)
	line := logLine(t, s.logOut, "level=ERROR", "the certificate has expired")
	for _, want := range []string{"file=" + crt, "put a renewed certificate at " + crt + " and its key at " + key, "reloaded without a restart"} {
		if !strings.Contains(line, want) {
			t.Errorf("error line lacks %q:\n%s", want, line)
		}
	}
}

func TestCertRenewRefuses(t *testing.T) {
	state := t.TempDir()
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no subcommand", nil, 2, "Usage:"},
		{"help", []string{"-h"}, 0, "tailderp cert renew -activate"},
		{"renew help", []string{"renew", "-h"}, 0, "tailderp cert renew -activate"},
		{"ACME", []string{"renew", "-hostname", "derp.example.com", "-state-dir", state}, 2, "renews its certificate by itself"},
		{"manual with a DNS name", []string{"renew", "-hostname", "derp.example.com", "-certmode", "manual", "-state-dir", state}, 2,
			"put the renewed certificate at " + filepath.Join(state, "certs", "derp.example.com.crt")},
		{"-dev", []string{"renew", "-dev", "-state-dir", state}, 2, "nothing to renew"},
		{"before the first start", []string{"renew", "-hostname", "203.0.113.7", "-certmode", "manual", "-state-dir", state}, 1, "start tailderp once"},
		{"activate with nothing written", []string{"renew", "-activate", "-hostname", "203.0.113.7", "-certmode", "manual", "-state-dir", state}, 1, "run `tailderp cert renew` first"},
		{"a stray argument", []string{"renew", "now"}, 2, `unexpected argument "now"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, stderr := runMain(t, nil, append([]string{"cert"}, tc.args...)...)
			if code != tc.code || !strings.Contains(stderr, tc.want) {
				t.Errorf("exit %d, want %d; stderr should contain %q:\n%s", code, tc.code, tc.want, stderr)
			}
		})
	}
	if names := listFiles(t, state); len(names) != 0 {
		t.Errorf("refused renewals left files: %q", names)
	}
}

// Each mode's fix names what fixes it there.
func TestCertAdvice(t *testing.T) {
	ip := &config.Config{Hostname: "203.0.113.7", CertMode: "manual", StateDir: t.TempDir(), HTTPPort: 80}
	manual := &config.Config{Hostname: "derp.example.com", CertMode: "manual", StateDir: "/s", HTTPPort: 80}
	acme := &config.Config{Hostname: "derp.example.com", CertMode: "letsencrypt", StateDir: "/s", HTTPPort: -1}
	for _, tc := range []struct {
		name string
		cfg  *config.Config
		p    relay.CertProblem
		want []string
	}{
		{"IP, expiring", ip, relay.CertExpiring, []string{"`tailderp cert renew`", "`tailderp cert renew -activate`", "Renewing the IP certificate"}},
		{"manual, expired", manual, relay.CertExpired, []string{"/s/certs/derp.example.com.crt", "/s/certs/derp.example.com.key", "reloaded without a restart"}},
		{"ACME, expiring", acme, relay.CertExpiring, []string{"renewal is failing", "-acme-directory-url (ACME_DIRECTORY_URL) Let's Encrypt", "derp.example.com on port 443 ("}},
		{"ACME, expired", acme, relay.CertExpired, []string{"then restart", "ACME certificate not available"}},
		{"any, not valid yet", manual, relay.CertNotYetValid, []string{"clock", "/s/certs/derp.example.com.crt"}},
	} {
		got := tc.cfg.CertAdvice(tc.p)
		for _, w := range tc.want {
			if !strings.Contains(got, w) {
				t.Errorf("%s: %q lacks %q", tc.name, got, w)
			}
		}
	}
	// Once `cert renew` wrote the next pair, the fix is to activate it.
	certs := filepath.Join(ip.StateDir, "certs")
	writeSpanPair(t, certs, ip.Hostname, time.Now(), time.Now().Add(day))
	if _, err := relay.WriteNextSelfSignedIPCert(certs, ip.Hostname); err != nil {
		t.Fatal(err)
	}
	if got := ip.CertAdvice(relay.CertExpiring); !strings.Contains(got, "next certificate is ready") || !strings.Contains(got, "-activate") {
		t.Errorf("with a next pair waiting: %q", got)
	}
}

// TestCertRenewPrintsTheFleet: with -mesh-with, the derpMap `cert renew`
// prints is the fleet's region, as the server and `tailderp derpmap` print
// it, with this relay's node pinned by the new certificate.
func TestCertRenewPrintsTheFleet(t *testing.T) {
	state := t.TempDir()
	const ip, peer = "203.0.113.7", "203.0.113.8"
	if _, err := relay.EnsureSelfSignedIPCert(filepath.Join(state, "certs"), ip); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr := runMain(t, nil, "cert", "renew", "-hostname", ip, "-certmode", "manual", "-state-dir", state,
		"-mesh-with", ip+","+peer)
	if code != 0 {
		t.Fatalf("exit %d:\n%s", code, stderr)
	}
	region := testutil.DERPMapFleetRegion(t, stdout)
	if len(region.Nodes) != 2 || region.Nodes[0].HostName != ip || region.Nodes[1].HostName != peer {
		t.Fatalf("printed region %+v, want this relay then %s", region.Nodes, peer)
	}
	ncrt, nkey := relay.NextCertPaths(filepath.Join(state, "certs"), ip)
	next, err := relay.ReadCertPair(ncrt, nkey, ip)
	if err != nil {
		t.Fatal(err)
	}
	want := next.CertName
	if region.Nodes[0].CertName != want || region.Nodes[1].CertName == want {
		t.Errorf("pins %q, %q: want this relay's node pinned by the next certificate %q", region.Nodes[0].CertName, region.Nodes[1].CertName, want)
	}
}
