// Package e2e tests the built tailderp binary end to end: a real tailnet
// (Tailscale's test control server and tsnet nodes, see
// internal/testtailnet) whose DERP map names only tailderp, running as a
// subprocess on loopback.
package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

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

// freePort returns a port on 127.0.0.1 that was free a moment ago, for
// the relay's listeners: the DERP map handed to the tailnet must name
// them before tailderp starts.
func freePort(t *testing.T, network string) int {
	t.Helper()
	switch network {
	case "udp":
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		return pc.LocalAddr().(*net.UDPAddr).Port
	default:
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		return ln.Addr().(*net.TCPAddr).Port
	}
}

// relayProc is a tailderp subprocess.
type relayProc struct {
	t         *testing.T
	cmd       *exec.Cmd
	out       *syncBuffer // stdout and stderr, interleaved
	done      chan struct{}
	exitErr   error
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
	p := &relayProc{t: t, HTTPSPort: freePort(t, "tcp"), STUNPort: freePort(t, "udp"), HTTPPort: -1, StateDir: o.stateDir}
	if p.StateDir == "" {
		p.StateDir = t.TempDir()
	}
	if o.httpPort {
		p.HTTPPort = freePort(t, "tcp")
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
	p.out = &syncBuffer{}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	return p
}

// start starts the process and waits until the relay serves.
func (p *relayProc) start() {
	t := p.t
	t.Helper()
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p.done = make(chan struct{})
	go func() {
		p.exitErr = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() || testing.Verbose() {
			t.Logf("tailderp output:\n%s", p.out.String())
		}
	})
	p.waitLog("relay: serving DERP over HTTPS", 10*time.Second)
}

// stop sends SIGTERM and waits (bounded) for the exit.
func (p *relayProc) stop() error {
	if p.done == nil {
		return nil
	}
	select {
	case <-p.done:
		return p.exitErr
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("tailderp did not exit within 10s of SIGTERM")
	}
	return p.exitErr
}

// waitLog waits until the output contains s.
func (p *relayProc) waitLog(s string, d time.Duration) {
	p.t.Helper()
	deadline := time.Now().Add(d)
	for !strings.Contains(p.out.String(), s) {
		select {
		case <-p.done:
			p.t.Fatalf("tailderp exited (%v) before logging %q:\n%s", p.exitErr, s, p.out.String())
		default:
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("tailderp did not log %q within %v:\n%s", s, d, p.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
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

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
