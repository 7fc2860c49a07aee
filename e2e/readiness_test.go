package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tailderp/tailderp/internal/testtailnet"
	"github.com/tailderp/tailderp/internal/testutil"
)

// The readiness of a running relay as its reporters show it, through the
// built binary (issue 18): `check -local` (the HEALTHCHECK and the
// probes) and `check URL` with and without a member's auth key. The same
// commands in-process are package main's TestCheckMemberAdmitted and
// TestCheckMemberRefused; the rule itself is internal/readiness's
// TestJudge.

// checkRun is the outcome of one `tailderp check` run.
type checkRun struct {
	code int
	out  string // stdout and stderr, interleaved
	took time.Duration
}

// runCheck runs `tailderp check ARGS` (the binary) with env added to the
// test's environment, in a working and temporary directory of its own
// (where a member it joins as keeps its files while it lives: the test
// fails if anything is left there), bounded by 60 s.
func runCheck(t *testing.T, env []string, args ...string) checkRun {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, append([]string{"check"}, args...)...)
	tmp := t.TempDir()
	cmd.Dir = tmp
	cmd.Env = append(os.Environ(), "TS_NO_LOGS_NO_SUPPORT=true", "TMPDIR="+tmp)
	cmd.Env = append(cmd.Env, env...)
	start := time.Now()
	out, err := cmd.CombinedOutput()
	r := checkRun{out: string(out), took: time.Since(start)}
	if ctx.Err() != nil {
		t.Fatalf("tailderp check %s: no exit within 60 s:\n%s", strings.Join(args, " "), out)
	}
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("tailderp check: %v", err)
	}
	r.code = cmd.ProcessState.ExitCode()
	// Nothing left behind: a member the check joined as kept its state
	// in tmp while it lived.
	if ents, err := os.ReadDir(tmp); err != nil || len(ents) != 0 {
		t.Errorf("tailderp check %s left %d entries in its working and temporary directory (%v)", strings.Join(args, " "), len(ents), err)
	}
	return r
}

// lineWith returns the first line of out that starts with prefix, or "".
func lineWith(out, prefix string) string {
	for l := range strings.SplitSeq(out, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

// lastLineOf is the last non-empty line of out.
func lastLineOf(out string) string {
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	return lines[len(lines)-1]
}

// closedControlURL is an http URL on 127.0.0.1 whose port refuses
// connections.
func closedControlURL(t *testing.T) string {
	return fmt.Sprintf("http://127.0.0.1:%d", testutil.FreePort(t, "tcp"))
}

// TestControlDownIsNotGreen: a relay with an auth key whose control URL
// refuses connections, with a fresh state directory, admits nobody.
//   - `check -local -state-dir D` never passes, and within 10 s of the
//     relay's start it says so naming the tailnet, the control URL, the
//     cause and the fix (the setting to look at);
//   - `check -local -liveness` passes: the relay serves, and a restart
//     would not bring the control server back;
//   - `check URL` without a member key does not end in "all good" and says
//     members were not tested; with an auth key of the tailnet it joins as
//     a member, prints a ✗ member line and exits 1.
func TestControlDownIsNotGreen(t *testing.T) {
	testtailnet.SetTestEnv(t)
	p := newRelay(t, relayOpts{})
	// The tailnet the relay should belong to: its control server runs, but
	// the relay is given a dead URL for it.
	ctl := testtailnet.NewControl(t, testtailnet.DERPRegion(p.HTTPSPort, p.STUNPort, p.CertName))
	dead := closedControlURL(t)
	p.cmd.Env = append(p.cmd.Env, "TAILSCALE_AUTH_KEY="+ctl.AuthKey, "TAILSCALE_CONTROL_URL="+dead)
	started := time.Now()
	p.start()
	t.Logf("measured: the relay serves %v after its start", time.Since(started).Round(time.Millisecond))

	// The healthcheck, polled as Docker would (faster): never green, and
	// the cause said within 10 s of the start.
	var said checkRun
	runs := 0
	for deadline := started.Add(10 * time.Second); ; {
		r := runCheck(t, nil, "-local", "-state-dir", p.StateDir, "-timeout", "5s")
		runs++
		if r.code == 0 {
			t.Fatalf("check -local passed for a relay that admits nobody:\n%s", r.out)
		}
		if strings.Contains(r.out, "control server does not answer") {
			said = r
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("check -local does not say the control server is unreachable 10 s after the start; last output (exit %d):\n%s", r.code, r.out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("measured: check -local says the cause %v after the relay's start (run %d, which took %v); exit %d:\n%s",
		time.Since(started).Round(time.Millisecond), runs, said.took.Round(time.Millisecond), said.code, said.out)
	if said.code != 1 {
		t.Errorf("check -local exit %d, want 1", said.code)
	}
	line := lineWith(said.out, "✗ tailnet default: ")
	for _, want := range []string{"refuses every member", "control " + dead, "fix: ", "TAILSCALE_CONTROL_URL"} {
		if !strings.Contains(line, want) {
			t.Errorf("check -local's tailnet line %q does not say %q", line, want)
		}
	}
	if strings.Contains(said.out, ctl.AuthKey) {
		t.Error("check -local shows the auth key")
	}

	// Liveness: it serves, and that is all a liveness probe asks.
	r := runCheck(t, nil, "-local", "-liveness", "-state-dir", p.StateDir, "-timeout", "5s")
	t.Logf("check -local -liveness: exit %d in %v:\n%s", r.code, r.took.Round(time.Millisecond), r.out)
	if r.code != 0 || !strings.Contains(r.out, "✓ https ") || !strings.Contains(r.out, "✓ stun ") || strings.Contains(r.out, "tailnet default") {
		t.Errorf("check -local -liveness: exit %d, want 0 with the https and stun lines only:\n%s", r.code, r.out)
	}

	// check URL, as from another machine.
	url := args(p.url(""), "-cert-name", p.CertName, "-stun-port", fmt.Sprint(p.STUNPort), "-pings", "3")
	r = runCheck(t, nil, url...)
	t.Logf("check URL without a member key: exit %d in %v:\n%s", r.code, r.took.Round(time.Millisecond), r.out)
	if strings.Contains(r.out, "all good") {
		t.Errorf("check URL without a member key ends in \"all good\" against a relay that admits nobody:\n%s", r.out)
	}
	if !strings.HasPrefix(lineWith(r.out, "– member: "), "– member: not tested") ||
		!strings.Contains(lastLineOf(r.out), "members of the tailnet were not tested") {
		t.Errorf("check URL without a member key does not say members were not tested:\n%s", r.out)
	}

	r = runCheck(t, []string{"TAILSCALE_AUTH_KEY=" + ctl.AuthKey}, append(url, "-control-url", ctl.URL)...)
	t.Logf("check URL with a member key: exit %d in %v:\n%s", r.code, r.took.Round(time.Millisecond), r.out)
	if r.code != 1 {
		t.Errorf("check URL with a member key: exit %d, want 1", r.code)
	}
	if l := lineWith(r.out, "✗ member: "); !strings.Contains(l, "a member of the tailnet is refused") || !strings.Contains(l, "tailderp check -local") {
		t.Errorf("no ✗ member line naming the refusal and where to look:\n%s", r.out)
	}
	if strings.Contains(r.out, "all good") || strings.Contains(r.out, ctl.AuthKey) {
		t.Errorf("check URL with a member key says \"all good\" or shows the key:\n%s", r.out)
	}
}

// args is its arguments, as a slice.
func args(a ...string) []string { return a }

// TestHealthyRelayChecks: a relay of a tailnet whose members talk
// through it: `check -local -state-dir D` passes with the tailnet's line;
// `check URL` with the tailnet's auth key (TAILSCALE_AUTH_KEY and
// -control-url, the server's names) prints a ✓ member line and ends in
// "all good", and the member it joined as leaves nothing behind.
func TestHealthyRelayChecks(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	p, ctl := tailnetWithRelay(t, relayOpts{})
	a, b := ctl.NewNode(t, "a"), ctl.NewNode(t, "b")
	serveHello(t, a, "a")
	if err := sayHello(ctx, b, a, "a"); err != nil {
		t.Fatal(err)
	}

	// The relay publishes its readiness every second: its node is running,
	// so within a few seconds the tailnet admits from a live map.
	var r checkRun
	start := time.Now()
	for deadline := start.Add(10 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		r = runCheck(t, nil, "-local", "-state-dir", p.StateDir, "-timeout", "5s")
		if r.code == 0 || time.Now().After(deadline) {
			break
		}
	}
	t.Logf("measured: check -local passes %v after the node ran (the run took %v):\n%s",
		time.Since(start).Round(time.Millisecond), r.took.Round(time.Millisecond), r.out)
	if r.code != 0 {
		t.Fatalf("check -local of a healthy relay: exit %d:\n%s", r.code, r.out)
	}
	if l := lineWith(r.out, "✓ tailnet default: "); !strings.Contains(l, "admits its members (live network map from "+ctl.URL) {
		t.Errorf("no ✓ tailnet line naming the control server:\n%s", r.out)
	}

	url := args(p.url(""), "-cert-name", p.CertName, "-stun-port", fmt.Sprint(p.STUNPort), "-pings", "3")
	r = runCheck(t, []string{"TAILSCALE_AUTH_KEY=" + ctl.AuthKey}, append(url, "-control-url", ctl.URL)...)
	t.Logf("measured: check URL with a member key: exit %d in %v:\n%s", r.code, r.took.Round(time.Millisecond), r.out)
	if r.code != 0 || lastLineOf(r.out) != "all good" {
		t.Errorf("check URL with a member key: exit %d, last line %q; want 0 and \"all good\"", r.code, lastLineOf(r.out))
	}
	if l := lineWith(r.out, "✓ member: "); !strings.Contains(l, "a member of the tailnet is admitted (node ") {
		t.Errorf("no ✓ member line:\n%s", r.out)
	}
	if strings.Contains(r.out, ctl.AuthKey) {
		t.Error("check URL shows the auth key")
	}
}

// TestCheckLocalStateDirStoppedRelay: `check -local -state-dir D1` checks
// that relay only: stopped (cleanly, or killed with serving.json left
// behind) it fails naming D1, while another relay (D2) runs on the machine
// and passes its own check.
func TestCheckLocalStateDirStoppedRelay(t *testing.T) {
	open := relayOpts{args: []string{"-verify-clients=false"}}
	stopped, killed, running := newRelay(t, open), newRelay(t, open), newRelay(t, open)
	for _, p := range []*relayProc{stopped, killed, running} {
		p.start()
	}
	if r := runCheck(t, nil, "-local", "-state-dir", running.StateDir, "-timeout", "5s"); r.code != 0 {
		t.Fatalf("check -local of the running relay: exit %d:\n%s", r.code, r.out)
	}
	if err := stopped.stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if err := killed.proc.Stop(0); !errors.Is(err, testutil.ErrKilled) {
		t.Fatalf("kill: %v", err)
	}
	if _, err := os.Stat(filepath.Join(killed.StateDir, "serving.json")); err != nil {
		t.Fatalf("the killed relay's serving.json: %v (the test wants it left behind)", err)
	}
	for _, p := range []*relayProc{stopped, killed} {
		r := runCheck(t, nil, "-local", "-state-dir", p.StateDir, "-timeout", "5s")
		t.Logf("check -local -state-dir of a relay that is down: exit %d in %v:\n%s", r.code, r.took.Round(time.Millisecond), r.out)
		if r.code != 1 || !strings.Contains(r.out, p.StateDir) || !strings.Contains(r.out, "not running") {
			t.Errorf("check -local -state-dir %s of a relay that is down: exit %d, want 1 naming the directory and that it is not running", p.StateDir, r.code)
		}
		if strings.Contains(r.out, fmt.Sprint(running.HTTPSPort)) {
			t.Errorf("check -local -state-dir %s looked at the other relay (port %d):\n%s", p.StateDir, running.HTTPSPort, r.out)
		}
	}
	if r := runCheck(t, nil, "-local", "-state-dir", running.StateDir, "-timeout", "5s"); r.code != 0 {
		t.Errorf("check -local of the relay still running: exit %d:\n%s", r.code, r.out)
	}
}
