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

	"github.com/tailderp/tailderp/internal/commands"
	"github.com/tailderp/tailderp/internal/logs"
	"github.com/tailderp/tailderp/internal/testtailnet"
	"github.com/tailderp/tailderp/internal/testutil"
)

// The tests of `tailderp check` (internal/commands) against a relay this
// process serves with run; those of the command alone, which need no
// relay, are in internal/commands.

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
	code := commands.Check(args, envFrom(env), &stdout, &stderr)
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
	for _, name := range []string{"dns", "tls", "certificate", "generate_204", "admission", "member", "relay", "latency", "stun"} {
		l := ckLine(t, out, name)
		// A relay that refuses strangers is not relayed through
		// without the mesh key: not a failure.
		if !strings.HasPrefix(l, "✓ ") && !strings.HasPrefix(l, "– relay: not tested: strangers are refused") {
			t.Errorf("line %q, want ✓", l)
		}
	}
	if lastLine(out) != "all good" {
		t.Errorf("last line is not \"all good\" in:\n%s", out)
	}
}

// lastLine is the last non-empty line of out.
func lastLine(out string) string {
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	return lines[len(lines)-1]
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
		OK      bool   `json:"ok"`
		Member  string `json:"member"`
		AllGood bool   `json:"all_good"`
		Results []struct {
			Name string `json:"name"`
			OK   bool   `json:"ok"`
		} `json:"results"`
	}
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("JSON: %v\n%s", err, out)
	}
	if code != 0 || !rep.OK || len(rep.Results) != 9 || rep.Member != "admitted" || !rep.AllGood {
		t.Errorf("exit %d, report %+v; want ok, 9 results, member admitted (an open relay admits any key), all good", code, rep)
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

// ckTailnetRelay starts tailderp verifying its clients with its node in
// the tailnet of controlURL (auth key authKey, from a file), serving on
// port (the one the tailnet's DERP map names), with a fresh state
// directory.
func ckTailnetRelay(t *testing.T, port int, controlURL, authKey string) *ckServer {
	t.Helper()
	keyFile := filepath.Join(t.TempDir(), "authkey")
	if err := os.WriteFile(keyFile, []byte(authKey+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return ckServe(t, "-hostname", "127.0.0.1", "-certmode", "manual", "-state-dir", t.TempDir(),
		"-a", fmt.Sprintf("127.0.0.1:%d", port), "-stun-port", "0", "-http-port", "-1",
		"-control-url", controlURL, "-auth-key-file", keyFile)
}

// ckTailnetEnv sets what a test with tsnet nodes in this process needs:
// testtailnet's knobs, and a logs directory of its own (tsnet's backend
// looks for one in the environment; the relay keeps one that is set).
func ckTailnetEnv(t *testing.T) {
	t.Helper()
	testtailnet.SetTestEnv(t)
	t.Setenv("TS_LOGS_DIR", t.TempDir())
}

// TestCheckMemberAdmitted: a healthy relay of a tailnet, checked with an
// auth key of that tailnet, admits the member the check joins as, and the
// check ends in "all good"; the member leaves nothing behind. Without a
// key the same check passes but says members were not tested.
func TestCheckMemberAdmitted(t *testing.T) {
	ckTailnetEnv(t)
	port := testutil.FreePort(t, "tcp")
	ctl := testtailnet.NewControl(t, testtailnet.DERPRegion(port, -1, ""))
	s := ckTailnetRelay(t, port, ctl.URL, ctl.AuthKey)
	if !s.logOut.WaitFor("to=running", 30*time.Second) {
		t.Fatalf("the relay's node is not running after 30s:\n%s", s.logOut.String())
	}
	url := "https://127.0.0.1:" + s.derpPort()
	args := []string{url, "-cert-name", s.node.CertName, "-stun-port", s.stunPort(), "-pings", "3"}

	// Without a key: no false "all good".
	code, out, _ := ckCheck(t, nil, args...)
	if code != 0 {
		t.Errorf("exit %d, want 0 (every check that ran passed)", code)
	}
	if l := ckLine(t, out, "member"); !strings.HasPrefix(l, "– member: not tested") {
		t.Errorf("member line %q, want – not tested", l)
	}
	if strings.Contains(out, "all good") {
		t.Errorf("members untested, yet \"all good\":\n%s", out)
	}
	if l := lastLine(out); !strings.Contains(l, "members of the tailnet were not tested") || !strings.Contains(l, "TAILSCALE_AUTH_KEY") || !strings.Contains(l, "-auth-key-file") || !strings.Contains(l, "-control-url") {
		t.Errorf("last line %q, want it to say members were not tested and how to test them", l)
	}

	// With the tailnet's auth key (and its control server, by flag).
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp) // where the member keeps its files while it lives
	code, out, stderr := ckCheck(t, map[string]string{"TAILSCALE_AUTH_KEY": ctl.AuthKey}, append(args, "-control-url", ctl.URL)...)
	ckWantAllGood(t, code, out)
	var member *tailcfg.Node
	for _, n := range ctl.Server.AllNodes() {
		if n.Name == "tailderp-check" {
			member = n
		}
	}
	if member == nil {
		t.Fatal("no node named tailderp-check joined the tailnet")
	}
	want := "✓ member: a member of the tailnet is admitted (node " + member.Key.ShortString()
	if l := ckLine(t, out, "member"); !strings.HasPrefix(l, want) {
		t.Errorf("member line %q, want %q…", l, want)
	}
	if ents, err := os.ReadDir(tmp); err != nil || len(ents) != 0 {
		t.Errorf("the member left %d entries in the temporary directory (%v)", len(ents), err)
	}
	if strings.Contains(out+stderr, ctl.AuthKey) {
		t.Error("the output shows the auth key")
	}
}

// TestCheckMemberRefused: a relay whose node cannot log in (its control
// server refuses connections; fresh state) refuses every member. Without a
// member key the check says members were not tested; with one it prints
// the ✗ member line with the likely causes and exits 1.
func TestCheckMemberRefused(t *testing.T) {
	ckTailnetEnv(t)
	port := testutil.FreePort(t, "tcp")
	ctl := testtailnet.NewControl(t, testtailnet.DERPRegion(port, -1, ""))
	dead := fmt.Sprintf("http://127.0.0.1:%d", testutil.FreePort(t, "tcp"))
	s := ckTailnetRelay(t, port, dead, ctl.AuthKey)
	url := "https://127.0.0.1:" + s.derpPort()
	args := []string{url, "-cert-name", s.node.CertName, "-stun-port", s.stunPort(), "-pings", "3"}

	code, out, _ := ckCheck(t, nil, args...)
	if code != 0 || strings.Contains(out, "all good") || !strings.Contains(lastLine(out), "members of the tailnet were not tested") {
		t.Errorf("without a member key: exit %d, want 0 and a last line saying members were not tested:\n%s", code, out)
	}

	keyFile := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(keyFile, []byte(ctl.AuthKey), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, _ = ckCheck(t, nil, append(args, "-auth-key-file", keyFile, "-control-url", ctl.URL)...)
	ckWantFailure(t, code, out, "member", "a member of the tailnet is refused (node ")
	l := ckLine(t, out, "member")
	for _, cause := range []string{"not logged in or cannot reach its control server", "tailderp check -local", "another tailnet", "policy hides this member"} {
		if !strings.Contains(l, cause) {
			t.Errorf("member line does not name the cause %q: %s", cause, l)
		}
	}
	if strings.Contains(out, "all good") {
		t.Errorf("a relay refusing members is \"all good\":\n%s", out)
	}
}

// TestCheckLocalBehindProxyProtocol: a relay that requires a PROXY header
// from loopback (its proxy runs there) still passes its own healthcheck:
// check -local sends a v2 LOCAL header, as a proxy's health check does.
// A client from loopback without one is refused.
func TestCheckLocalBehindProxyProtocol(t *testing.T) {
	state := t.TempDir()
	s := ckServe(t, "-dev", "-a", "127.0.0.1:0", "-stun-port", "0", "-state-dir", state, "-proxy-protocol-from", "127.0.0.1/32")
	for _, args := range [][]string{{"-local", "-state-dir", state}, {"-local", "-liveness", "-state-dir", state}} {
		code, out, _ := ckCheck(t, nil, args...)
		if code != 0 || !strings.Contains(out, "✓ https") {
			t.Errorf("check %s: exit %d:\n%s", strings.Join(args, " "), code, out)
		}
	}
	// Without the header, from a listed source: closed before TLS.
	code, out, _ := ckCheck(t, nil, "-dev", "-a", "127.0.0.1:"+s.derpPort(), "-stun-port", s.stunPort(), "-pings", "1")
	if code == 0 || !strings.Contains(out, "✗ ") {
		t.Errorf("a client from a PROXY source without a header: exit %d:\n%s", code, out)
	}
}
