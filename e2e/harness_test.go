// Package e2e tests the built tailderp binary end to end: a real tailnet
// (Tailscale's test control server and tsnet nodes, see
// internal/testtailnet) whose DERP map names only tailderp, running as a
// subprocess on loopback.
package e2e

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/relay"
)

// binary is the tailderp binary built once for all tests.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "tailderp-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "tailderp")
	build := exec.Command("go", "build", "-o", binary, "..")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build tailderp:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// relayProc is a tailderp subprocess.
type relayProc struct {
	t         *testing.T
	cmd       *exec.Cmd         // prepared by newRelay; tests may add to it before start
	proc      *testutil.Process // the running process, once started
	HTTPSPort int
	HTTPPort  int
	STUNPort  int
	StateDir  string
	CertName  string
}

// relayOpts configures startRelay.
type relayOpts struct {
	env      []string // extra environment, KEY=VALUE
	args     []string // extra flags
	stateDir string   // reuse a state directory (restart tests)
	httpPort bool     // also serve plain HTTP
}

// newRelay prepares a tailderp in IP mode on 127.0.0.1 with its
// self-signed certificate generated up front, so its CertName can go into
// the DERP map before it starts.
func newRelay(t *testing.T, o relayOpts) *relayProc {
	t.Helper()
	p := &relayProc{t: t, HTTPSPort: testutil.FreePort(t, "tcp"), STUNPort: testutil.FreePort(t, "udp"), HTTPPort: -1, StateDir: o.stateDir}
	if p.StateDir == "" {
		p.StateDir = t.TempDir()
	}
	if o.httpPort {
		p.HTTPPort = testutil.FreePort(t, "tcp")
	}
	certDir := filepath.Join(p.StateDir, "certs")
	if _, err := relay.EnsureSelfSignedIPCert(certDir, "127.0.0.1"); err != nil {
		t.Fatal(err)
	}
	certs, err := relay.LoadManualCerts(certDir, "127.0.0.1", nil)
	if err != nil {
		t.Fatal(err)
	}
	info, _ := certs.Current()
	p.CertName = info.CertName
	args := []string{
		"-hostname", "127.0.0.1", "-certmode", "manual",
		"-a", fmt.Sprintf("127.0.0.1:%d", p.HTTPSPort),
		"-http-port", fmt.Sprint(p.HTTPPort),
		"-stun-port", fmt.Sprint(p.STUNPort),
		"-state-dir", p.StateDir,
		"-log-level", "debug",
	}
	p.cmd = exec.Command(binary, append(args, o.args...)...)
	p.cmd.Env = append(os.Environ(), "TS_NO_LOGS_NO_SUPPORT=true")
	p.cmd.Env = append(p.cmd.Env, o.env...)
	return p
}

// start starts the process and waits until the relay serves.
func (p *relayProc) start() {
	p.t.Helper()
	p.proc = testutil.StartProcess(p.t, p.cmd, testutil.ProcessOptions{Name: "tailderp", StopGrace: stopGrace})
	p.waitLog("relay: serving DERP over HTTPS", 10*time.Second)
}

// stopGrace bounds the wait for tailderp's exit after SIGTERM.
const stopGrace = 10 * time.Second

// stop sends SIGTERM and waits (bounded) for the exit.
func (p *relayProc) stop() error {
	if p.proc == nil {
		return nil
	}
	return p.proc.Stop(stopGrace)
}

// waitLog waits until the output contains s.
func (p *relayProc) waitLog(s string, d time.Duration) {
	p.t.Helper()
	p.proc.WaitOutput(p.t, s, d)
}

// waitNodeRunning waits until tailderp's own node is on the tailnet.
func (p *relayProc) waitNodeRunning() {
	p.t.Helper()
	p.waitLog(`to=running`, 30*time.Second)
	p.waitLog(`debug: serving on the tailnet only`, 10*time.Second)
}

// url returns an https URL on the relay.
func (p *relayProc) url(path string) string {
	return fmt.Sprintf("https://127.0.0.1:%d%s", p.HTTPSPort, path)
}

// publicClient is an HTTPS client for the relay's public side; it trusts
// any certificate (these tests are not about the certificate).
func publicClient() *http.Client {
	return &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}},
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

// get fetches url with c and returns status and body.
func get(ctx context.Context, t *testing.T, c *http.Client, url string, hdr ...string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	res, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(b)
}
