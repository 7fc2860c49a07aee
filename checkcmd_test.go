package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/internal/logs"
	"github.com/tailderp/tailderp/internal/testutil"
)

// ckServer is a tailderp serving in this process, as `tailderp ARGS` would.
type ckServer struct {
	node   *tailcfg.DERPNode // from its derpMap snippet
	stop   func()
	logOut *testutil.Buffer
}

// ckServe starts tailderp with args (no environment) on loopback and
// waits until it serves. It stops when the test ends, or at stop().
func ckServe(t *testing.T, args ...string) *ckServer {
	t.Helper()
	var stderr testutil.Buffer
	cfg, err := loadConfig("tailderp", args, nil, &stderr)
	if err != nil {
		t.Fatalf("tailderp %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	s := &ckServer{logOut: &testutil.Buffer{}}
	logger, err := logs.New(s.logOut, "text", "info")
	if err != nil {
		t.Fatal(err)
	}
	var out testutil.Buffer
	ctx, cancel := context.WithCancel(context.Background())
	exited := make(chan struct{})
	var runErr error
	go func() {
		runErr = run(ctx, cfg, logger, &out)
		close(exited)
	}()
	var once sync.Once
	s.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				t.Errorf("tailderp did not stop within 10s")
			}
		})
	}
	t.Cleanup(s.stop)
	m := out.WaitMatch(snippetRE, 10*time.Second, exited)
	if m == nil {
		select {
		case <-exited:
			t.Fatalf("tailderp exited (%v) before serving:\n%s", runErr, s.logOut.String())
		default:
			t.Fatalf("tailderp not serving after 10s:\n%s", s.logOut.String())
		}
	}
	s.node = testutil.DERPMapRegion(t, m[1]).Nodes[0]
	return s
}

func (s *ckServer) derpPort() string { return fmt.Sprint(s.node.DERPPort) }
func (s *ckServer) stunPort() string { return fmt.Sprint(s.node.STUNPort) }

// ckIPMode starts tailderp in IP mode on 127.0.0.1 (self-signed
// certificate, pinned by CertName) as an open relay, and returns it with
// its state directory.
func ckIPMode(t *testing.T, extra ...string) (*ckServer, string) {
	t.Helper()
	state := t.TempDir()
	args := append([]string{"-hostname", "127.0.0.1", "-certmode", "manual", "-state-dir", state,
		"-a", "127.0.0.1:0", "-stun-port", "0", "-http-port", "-1", "-verify-clients=false"}, extra...)
	return ckServe(t, args...), state
}

// ckCheck runs `tailderp check ARGS` with env and returns the exit code
// and output.
func ckCheck(t *testing.T, env map[string]string, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr testutil.Buffer
	code := runCheck(args, envFrom(env), &stdout, &stderr)
	t.Logf("tailderp check %s → exit %d\n%s%s", strings.Join(args, " "), code, stdout.String(), stderr.String())
	return code, stdout.String(), stderr.String()
}

// ckLine returns the output line of check name, or fails.
func ckLine(t *testing.T, out, name string) string {
	t.Helper()
	for l := range strings.SplitSeq(out, "\n") {
		if len(l) > 4 && strings.HasPrefix(strings.SplitN(l, " ", 2)[1], name+":") {
			return l
		}
	}
	t.Fatalf("no %q line in:\n%s", name, out)
	return ""
}

// ckWantFailure checks exit 1 with exactly the line name marked ✗, and
// every other line passed or skipped.
func ckWantFailure(t *testing.T, code int, out, name, substr string) {
	t.Helper()
	if code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	line := ckLine(t, out, name)
	if !strings.HasPrefix(line, "✗ "+name+": ") || !strings.Contains(line, substr) {
		t.Errorf("line %q, want it marked ✗ and containing %q", line, substr)
	}
	for l := range strings.SplitSeq(out, "\n") {
		if strings.HasPrefix(l, "✗ ") && l != line {
			t.Errorf("another line failed: %q", l)
		}
	}
}

func ckWantAllGood(t *testing.T, code int, out string) {
	t.Helper()
	if code != 0 {
		t.Fatalf("exit %d, want 0", code)
	}
	for _, name := range []string{"dns", "tls", "certificate", "generate_204", "admission", "relay", "latency", "stun"} {
		if l := ckLine(t, out, name); !strings.HasPrefix(l, "✓ ") {
			t.Errorf("line %q, want ✓", l)
		}
	}
	if !strings.Contains(out, "all good") {
		t.Errorf("no \"all good\" in:\n%s", out)
	}
}

func TestCheckDev(t *testing.T) {
	s := ckServe(t, "-dev", "-a", "127.0.0.1:0", "-stun-port", "0")
	code, out, _ := ckCheck(t, nil, "-dev", "-a", "127.0.0.1:"+s.derpPort(), "-stun-port", s.stunPort(), "-pings", "5")
	ckWantAllGood(t, code, out)
	if l := ckLine(t, out, "certificate"); !strings.Contains(l, "sha256-raw:") {
		t.Errorf("certificate line %q does not show the pin", l)
	}
	// -local, the HEALTHCHECK, on the same server.
	code, out, _ = ckCheck(t, nil, "-local", "-dev", "-a", "127.0.0.1:"+s.derpPort(), "-stun-port", s.stunPort())
	if code != 0 || strings.Count(out, "✓ ") != 2 {
		t.Errorf("-local: exit %d:\n%s", code, out)
	}
}

func TestCheckIPMode(t *testing.T) {
	s, state := ckIPMode(t)
	// From the server's own settings (the environment, as in a container):
	// the pin comes from its certificate directory.
	env := map[string]string{
		"TAILSCALE_DERP_HOSTNAME": "127.0.0.1", "CERTMODE": "manual", "STATE_DIR": state,
		"ADDR": "127.0.0.1:" + s.derpPort(), "STUN_PORT": s.stunPort(), "VERIFY_CLIENTS": "false",
	}
	code, out, _ := ckCheck(t, env, "-pings", "5")
	ckWantAllGood(t, code, out)
	if !strings.Contains(ckLine(t, out, "certificate"), "matches the pin "+s.node.CertName[:len("sha256-raw:")+16]) {
		t.Errorf("certificate line does not name the pin %s", s.node.CertName)
	}
	// The same by URL and pin, as from another machine: this relay is
	// open, which by URL is a failure unless -expect-open says it is meant
	// to be.
	code, out, _ = ckCheck(t, nil, "https://127.0.0.1:"+s.derpPort(), "-stun-port", s.stunPort(), "-cert-name", s.node.CertName, "-pings", "5")
	ckWantFailure(t, code, out, "admission", "open to anyone")
	if strings.Contains(out, "all good") {
		t.Errorf("an open relay is reported as all good:\n%s", out)
	}
	// JSON, expecting it open.
	code, out, _ = ckCheck(t, nil, "https://127.0.0.1:"+s.derpPort(), "-stun-port", s.stunPort(), "-cert-name", s.node.CertName, "-json", "-pings", "5", "-expect-open")
	var rep struct {
		OK      bool `json:"ok"`
		Results []struct {
			Name string `json:"name"`
			OK   bool   `json:"ok"`
		} `json:"results"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("JSON: %v\n%s", err, out)
	}
	if code != 0 || !rep.OK || len(rep.Results) != 8 {
		t.Errorf("exit %d, report %+v", code, rep)
	}
}

func TestCheckStoppedServer(t *testing.T) {
	s, _ := ckIPMode(t)
	s.stop()
	code, out, _ := ckCheck(t, nil, "https://127.0.0.1:"+s.derpPort(), "-stun=false", "-cert-name", s.node.CertName)
	ckWantFailure(t, code, out, "tls", "connection refused")
	if !strings.HasPrefix(ckLine(t, out, "relay"), "– relay: skipped") {
		t.Errorf("relay line %q, want skipped", ckLine(t, out, "relay"))
	}
}

func TestCheckWrongPin(t *testing.T) {
	s, _ := ckIPMode(t)
	code, out, _ := ckCheck(t, nil, "https://127.0.0.1:"+s.derpPort(), "-stun-port", s.stunPort(),
		"-cert-name", "sha256-raw:"+strings.Repeat("0", 64))
	ckWantFailure(t, code, out, "certificate", "pin mismatch: the relay presents "+s.node.CertName)
}

func TestCheckWrongCertName(t *testing.T) {
	// A relay with a certificate for relay.test from a private CA, checked
	// by its IP address: the name the client checks is not on it.
	state := t.TempDir()
	caPEM := ckWriteCASigned(t, filepath.Join(state, "certs"), "relay.test")
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, caPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	s := ckServe(t, "-hostname", "relay.test", "-certmode", "manual", "-state-dir", state,
		"-a", "127.0.0.1:0", "-stun-port", "0", "-http-port", "-1", "-verify-clients=false")
	code, out, _ := ckCheck(t, nil, "https://127.0.0.1:"+s.derpPort(), "-stun-port", s.stunPort(), "-ca-file", caFile, "-expect-open")
	ckWantFailure(t, code, out, "certificate", "the certificate is for relay.test, not 127.0.0.1")

	// By its name (dialled at 127.0.0.1; nothing resolved) it passes.
	code, out, _ = ckCheck(t, nil, "https://relay.test:"+s.derpPort(), "-expect-open", "-ipv4", "127.0.0.1", "-ipv6", "none",
		"-stun-port", s.stunPort(), "-ca-file", caFile, "-pings", "5")
	ckWantAllGood(t, code, out)
}

// ckWriteCASigned writes <dir>/<name>.crt and .key (an EC PRIVATE KEY),
// signed by a new CA, and returns the CA certificate in PEM.
func ckWriteCASigned(t *testing.T, dir, name string) []byte {
	t.Helper()
	ca := testutil.NewCert(t, testutil.CertOptions{CommonName: "check test CA", IsCA: true})
	leaf := testutil.NewCert(t, testutil.CertOptions{Names: []string{name}, CA: ca, ValidFor: 90 * 24 * time.Hour, KeyFormat: testutil.EC})
	leaf.WriteFiles(t, filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key"))
	return ca.CertPEM
}

func TestCheckClosedSTUNPort(t *testing.T) {
	s, _ := ckIPMode(t, "-stun=false")
	closed := fmt.Sprint(testutil.FreePort(t, "udp"))
	code, out, _ := ckCheck(t, nil, "https://127.0.0.1:"+s.derpPort(), "-cert-name", s.node.CertName, "-stun-port", closed, "-pings", "5", "-expect-open")
	ckWantFailure(t, code, out, "stun", "no answer")
}

func TestCheckLoadSmoke(t *testing.T) {
	s, _ := ckIPMode(t)
	code, out, stderr := ckCheck(t, nil, "-load", "https://127.0.0.1:"+s.derpPort(), "-stun-port", s.stunPort(), "-cert-name", s.node.CertName,
		"-pairs", "1,2", "-sizes", "64", "-in-flight", "2", "-load-duration", "200ms", "-max-packets", "20",
		"-connects", "2", "-concurrent-connects", "2", "-concurrency", "2", "-idle", "2", "-stun-workers", "1",
		"-pid", fmt.Sprint(os.Getpid()))
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{"idle        2 clients", "connect     sequential", "connect     2 at once", "throughput   1 pairs", "throughput   2 pairs", "stun        1 workers"} {
		if !strings.Contains(out, want) {
			t.Errorf("no %q in:\n%s", want, out)
		}
	}
}

func TestCheckLoadRefusesNonLoopback(t *testing.T) {
	// TEST-NET-1: never dialled, the refusal comes first.
	code, _, stderr := ckCheck(t, nil, "-load", "https://192.0.2.1", "-cert-name", "sha256-raw:"+strings.Repeat("0", 64))
	if code != 2 || !strings.Contains(stderr, "-yes-i-own-this-server") {
		t.Errorf("exit %d, stderr %q; want 2 naming -yes-i-own-this-server", code, stderr)
	}
}

func TestCheckUsage(t *testing.T) {
	for _, args := range [][]string{
		{"https://a.example", "https://b.example"},
		{"-local", "https://a.example"},
		{"http://a.example"},
		{"-load", "-pairs", "x", "https://127.0.0.1"},
	} {
		if code, _, stderr := ckCheck(t, nil, args...); code != 2 || stderr == "" {
			t.Errorf("check %q: exit %d, stderr %q; want 2 and a message", args, code, stderr)
		}
	}
	code, _, stderr := ckCheck(t, nil, "-h")
	if code != 0 || !strings.Contains(stderr, "-expect-open") || !strings.Contains(stderr, "-yes-i-own-this-server") {
		t.Errorf("-h: exit %d:\n%s", code, stderr)
	}
}
