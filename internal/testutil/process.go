package testutil

import (
	"errors"
	"fmt"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// ErrKilled is wrapped by the error of [Process.Stop] when it had to kill
// the process.
var ErrKilled = errors.New("killed")

// Process is a child process a test started with [StartProcess]: its
// output is collected, and it is stopped when the test ends.
type Process struct {
	// Cmd is the started command (Cmd.Process.Pid is its process ID).
	Cmd *exec.Cmd
	// Output holds what the process wrote to its standard output and
	// standard error, interleaved as it wrote them.
	Output *Buffer

	name string
	done chan struct{} // closed when Wait has returned
	err  error         // Wait's error, once done is closed
}

// ProcessOptions says how [StartProcess] names and stops a process.
type ProcessOptions struct {
	// Name names the process in failure messages and over its output in
	// the test log.
	Name string
	// StopGrace is how long the stop at the end of the test waits for the
	// process to exit after SIGTERM before it kills it; 0 kills it at once.
	StopGrace time.Duration
}

// StartProcess starts cmd, whose Stdout and Stderr must be unset, with
// both collected in Output. When the test ends, the process is stopped
// ([Process.Stop] with o.StopGrace) if it still runs, and its output
// logged if the test failed or runs with -v.
func StartProcess(t testing.TB, cmd *exec.Cmd, o ProcessOptions) *Process {
	t.Helper()
	if cmd.Stdout != nil || cmd.Stderr != nil {
		t.Fatalf("testutil.StartProcess: %s already has an output", o.Name)
	}
	p := &Process{Cmd: cmd, Output: &Buffer{}, name: o.Name, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.Output, p.Output
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", o.Name, err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.Stop(o.StopGrace)
		if t.Failed() || testing.Verbose() {
			t.Logf("%s output:\n%s", p.name, p.Output.String())
		}
	})
	return p
}

// Done is closed once the process has exited and Output holds all it
// wrote.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Err is how the process exited (exec.Cmd.Wait's error: nil for exit
// status 0); nil while it runs.
func (p *Process) Err() error {
	if !p.Exited() {
		return nil
	}
	return p.err
}

// Stop sends SIGTERM, as `docker stop` and systemd do, waits up to grace
// for the process to exit, then kills it; with grace 0 it kills it at
// once. It returns how the process exited, or an error wrapping ErrKilled
// if it had to kill it. Stopping a process that has exited only returns
// how it exited.
func (p *Process) Stop(grace time.Duration) error {
	if p.Exited() {
		return p.err
	}
	if grace > 0 {
		p.Cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
			return p.err
		case <-time.After(grace):
		}
	}
	p.Cmd.Process.Kill()
	<-p.done
	if grace > 0 {
		return fmt.Errorf("%s: no exit within %v of SIGTERM: %w", p.name, grace, ErrKilled)
	}
	return fmt.Errorf("%s: %w (%v)", p.name, ErrKilled, p.err)
}

// WaitOutput waits until the output holds s, and fails the test if the
// process exits first or timeout passes.
func (p *Process) WaitOutput(t testing.TB, s string, timeout time.Duration) {
	t.Helper()
	if !p.Output.wait(timeout, p.done, func(out string) bool { return strings.Contains(out, s) }) {
		p.failWait(t, fmt.Sprintf("%q", s), timeout)
	}
}

// WaitMatch waits until re matches the output and returns the match and
// its submatches; it fails the test if the process exits first or timeout
// passes.
func (p *Process) WaitMatch(t testing.TB, re *regexp.Regexp, timeout time.Duration) []string {
	t.Helper()
	m := p.Output.WaitMatch(re, timeout, p.done)
	if m == nil {
		p.failWait(t, "a match of "+re.String(), timeout)
	}
	return m
}

func (p *Process) failWait(t testing.TB, what string, timeout time.Duration) {
	t.Helper()
	if p.Exited() {
		t.Fatalf("%s exited (%v) before writing %s:\n%s", p.name, p.err, what, p.Output.String())
	}
	t.Fatalf("%s did not write %s within %v:\n%s", p.name, what, timeout, p.Output.String())
}
