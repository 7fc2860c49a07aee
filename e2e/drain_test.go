package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tailderp/tailderp/internal/config"
)

// drainRun is the outcome of one `tailderp drain` run.
type drainRun struct {
	code        int
	stdout, out string // stdout; stdout and stderr
}

// runDrain runs `tailderp drain ARGS` (the binary), bounded by 60 s.
func runDrain(t *testing.T, args ...string) drainRun {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, append([]string{"drain"}, args...)...)
	cmd.Env = append(os.Environ(), "TS_NO_LOGS_NO_SUPPORT=true")
	var stdout, both strings.Builder
	cmd.Stdout = multiWriter{&stdout, &both}
	cmd.Stderr = &both
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("tailderp drain %s: no exit within 60 s:\n%s", strings.Join(args, " "), both.String())
	}
	if _, ok := errors.AsType[*exec.ExitError](err); err != nil && !ok {
		t.Fatalf("tailderp drain: %v", err)
	}
	return drainRun{code: cmd.ProcessState.ExitCode(), stdout: stdout.String(), out: both.String()}
}

type multiWriter []interface{ Write([]byte) (int, error) }

func (m multiWriter) Write(b []byte) (int, error) {
	for _, w := range m {
		w.Write(b)
	}
	return len(b), nil
}

// TestDrainCommand: `tailderp drain -state-dir D` stops the relay of D,
// a tailnet relay with its node running: the command finds the relay's
// pid in serving.json, sends SIGTERM and waits; the relay says draining
// in serving.json before it closes its listeners (its own log, written in
// order), exits 0, and removes serving.json; the command reports when it
// saw serving.json say draining (or that the relay was too quick for it
// to see) and when the process exited, and exits 0.
// The command never prints the auth key (it is in the relay's
// environment, not the command's: nothing to print, but checked).
func TestDrainCommand(t *testing.T) {
	p, ctl := tailnetWithRelay(t, relayOpts{})
	pid := p.proc.Cmd.Process.Pid
	r := runDrain(t, "-state-dir", p.StateDir)
	t.Logf("tailderp drain: exit %d:\n%s", r.code, r.out)
	if r.code != 0 {
		t.Fatalf("tailderp drain: exit %d, want 0", r.code)
	}
	// The command exits once the relay has: its exit status is there.
	select {
	case <-p.proc.Done():
	case <-time.After(stopGrace):
		t.Fatal("the relay still runs after tailderp drain exited 0")
	}
	if err := p.proc.Err(); err != nil {
		t.Errorf("the relay exited with %v, want status 0", err)
	}
	out := p.proc.Output.String()
	drained, closed := strings.Index(out, `msg="readiness: draining"`), strings.Index(out, `msg="listeners closed`)
	if drained < 0 || closed < 0 || drained > closed {
		t.Errorf("\"readiness: draining\" at %d, \"listeners closed\" at %d in the relay's log: want serving.json to say draining before the listeners close", drained, closed)
	}
	if !strings.Contains(r.stdout, fmt.Sprintf("draining tailderp pid %d (", pid)) {
		t.Errorf("the command does not name the relay's pid %d:\n%s", pid, r.stdout)
	}
	// serving.json said draining before the exit: the relay logs
	// "readiness: draining" only once it has written it (checked above,
	// in order). The command reads the file every 2 ms, but a relay with
	// one client stops in a few: it says which it saw, and when it saw
	// draining, that line comes before the exit's.
	exited := regexp.MustCompile(fmt.Sprintf(`(?m)^pid %d exited \S+ after SIGTERM$`, pid)).FindStringIndex(r.stdout)
	if exited == nil {
		t.Fatalf("the command does not say the relay exited:\n%s", r.stdout)
	}
	saw := regexp.MustCompile(`(?m)^not ready: serving.json said draining \S+ after SIGTERM$`).FindStringIndex(r.stdout)
	missed := strings.Index(r.stdout, "serving.json was not seen saying draining")
	switch {
	case saw != nil && saw[0] < exited[0] && missed < 0:
	case saw == nil && missed >= 0 && missed < exited[0]:
		t.Logf("the relay stopped between two reads of serving.json: the command says so")
	default:
		t.Errorf("the command's report of the drain is not one of: draining seen, then the exit; or not seen, then the exit:\n%s", r.stdout)
	}
	if _, err := os.Stat(filepath.Join(p.StateDir, config.ServingFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("serving.json after the drain: %v", err)
	}
	if strings.Contains(r.out, ctl.AuthKey) {
		t.Error("tailderp drain printed the auth key")
	}

	// Drained already: nothing runs there now.
	r = runDrain(t, "-state-dir", p.StateDir)
	if r.code != 1 || !strings.Contains(r.out, p.StateDir) || !strings.Contains(r.out, "not running") {
		t.Errorf("tailderp drain of a relay already stopped: exit %d, want 1 naming %s and that it is not running:\n%s", r.code, p.StateDir, r.out)
	}
}

// TestDrainNoRelay: `tailderp drain -state-dir D` where no relay ever ran
// exits 1 naming D; a stale serving.json (a relay killed, its pid given
// to another process: here this test's own) is refused without a signal;
// bad flags exit 2.
func TestDrainNoRelay(t *testing.T) {
	dir := t.TempDir()
	r := runDrain(t, "-state-dir", dir)
	if r.code != 1 || !strings.Contains(r.out, dir) || r.stdout != "" {
		t.Errorf("tailderp drain with no relay: exit %d, want 1 naming %s on stderr:\n%s", r.code, dir, r.out)
	}

	// A serving.json naming a live process that is not a tailderp relay
	// (sleep), started before the file says the relay served.
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Process.Kill(); other.Wait() })
	stale := fmt.Sprintf(`{"pid": %d, "version": "dev", "since": %q, "https_addr": "127.0.0.1:1", "server_name": "127.0.0.1",
		"verify_clients": false, "region": {"RegionID": 900, "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": "127.0.0.1"}]}}`,
		other.Process.Pid, time.Now().UTC().Format(time.RFC3339Nano))
	if err := os.WriteFile(filepath.Join(dir, config.ServingFile), []byte(stale), 0o600); err != nil {
		t.Fatal(err)
	}
	r = runDrain(t, "-state-dir", dir)
	if r.code != 1 || !strings.Contains(r.out, "not tailderp") || !strings.Contains(r.out, "not signalled") {
		t.Errorf("tailderp drain of a serving.json naming another program: exit %d, want 1 saying it is not tailderp and was not signalled:\n%s", r.code, r.out)
	}

	if other.ProcessState != nil || other.Process.Signal(syscall.Signal(0)) != nil {
		t.Error("the other process was signalled")
	}

	for _, bad := range [][]string{{"-wait", "-1s"}, {"-state-dir", dir, "extra"}, {"-no-such-flag"}} {
		if r := runDrain(t, bad...); r.code != 2 {
			t.Errorf("tailderp drain %q: exit %d, want 2:\n%s", bad, r.code, r.out)
		}
	}
}
