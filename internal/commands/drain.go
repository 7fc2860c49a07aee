package commands

import (
	"cmp"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tailderp/tailderp/internal/config"
	"github.com/tailderp/tailderp/internal/serving"
)

// drainMargin is added to the relay's -drain-timeout to bound the wait
// for its exit: its node's part of the shutdown (up to 2 s when the drain
// timeout is shorter) and the process's own exit.
const drainMargin = 5 * time.Second

// drainPoll is how often the command looks at serving.json and the
// process while it waits: often, because a relay with few clients stops
// in milliseconds and removes serving.json as it exits.
const drainPoll = 2 * time.Millisecond

// Drain is `tailderp drain ARGS` with the environment env: it finds the
// relay running on this machine (as `check -local` does: the one of
// -state-dir when given, else the one running here), makes sure the
// process serving.json names is still that relay, sends it SIGTERM (the
// same drain as `docker stop` or systemd: readiness false, no new clients,
// clients closed so they move to the region's next relay, caches written)
// and waits for it to exit. It returns 0 when the relay exited within the
// bound, 1 when it did not or no running relay was found, 2 for bad flags
// or settings.
func Drain(args []string, env []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("tailderp drain", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	wait := fs.Duration("wait", 0, "how long to wait for the relay to exit (default: its -drain-timeout and 5s)")
	own, err := config.Load(config.Check, fs, args, env)
	if errors.Is(err, flag.ErrHelp) {
		printDrainUsage(stderr, fs)
		return 0
	}
	if err == nil && fs.NArg() > 0 {
		err = fmt.Errorf("unexpected argument %q (the relay is found by its settings: -state-dir)", fs.Arg(0))
	}
	if err == nil && *wait < 0 {
		err = fmt.Errorf("-wait %v: a duration cannot be negative", *wait)
	}
	if err != nil {
		fmt.Fprintf(stderr, "tailderp drain: %v\n", err)
		return 2
	}

	// The relay's own settings when it was found by its process; its
	// serving.json says what it serves.
	sv, cfg, from, err := serving.Running(own)
	switch {
	case err != nil:
		fmt.Fprintf(stderr, "tailderp drain: %v\n", err)
		if errors.Is(err, serving.ErrNotServing) {
			return 1
		}
		return 2
	case sv == nil && cfg == nil:
		fmt.Fprintf(stderr, "tailderp drain: no running tailderp found: none serves from %s %s, and no tailderp server runs here (give the -state-dir of the relay to drain)\n",
			settingName("state-dir"), own.StateDir)
		return 1
	case sv == nil:
		fmt.Fprintf(stderr, "tailderp drain: a tailderp server runs here (%s) but publishes no serving.json in %s, so its process cannot be told apart from another: stop it through its service manager, or send it SIGTERM yourself\n",
			from, cfg.StateDir)
		return 1
	}
	bound := *wait
	if bound == 0 {
		bound = cmp.Or(sv.DrainTimeout, cfg.DrainTimeout) + drainMargin
	}
	if err := sameRelay(sv); err != nil {
		fmt.Fprintf(stderr, "tailderp drain: %s names pid %d, but %v: not signalled (if that relay is gone, remove the stale file)\n", from, sv.PID, err)
		return 1
	}
	fmt.Fprintf(stdout, "draining tailderp pid %d (%s, from %s); waiting up to %v for it to exit\n", sv.PID, sv.HTTPSAddr, from, bound)
	start := time.Now()
	if err := syscall.Kill(sv.PID, syscall.SIGTERM); err != nil {
		fix := ""
		if errors.Is(err, syscall.EPERM) {
			fix = fmt.Sprintf(" (run it as the relay's user or root; this is uid %d)", os.Getuid())
		}
		fmt.Fprintf(stderr, "tailderp drain: SIGTERM to pid %d: %v%s\n", sv.PID, err, fix)
		return 1
	}
	path := from // with a serving.json, Running says where it is
	var drainingAt time.Duration = -1
	deadline := start.Add(bound)
	for {
		if drainingAt < 0 {
			if s, err := serving.Read(path); err == nil && s.PID == sv.PID && s.Readiness != nil && s.Readiness.Draining {
				drainingAt = time.Since(start)
				fmt.Fprintf(stdout, "not ready: serving.json said draining %v after SIGTERM\n", drainingAt.Round(time.Millisecond))
			}
		}
		if !running(sv.PID) {
			took := time.Since(start)
			if drainingAt < 0 {
				fmt.Fprintln(stdout, "serving.json was not seen saying draining: the relay stopped before it was read again (it says draining before it closes its listeners)")
			}
			fmt.Fprintf(stdout, "pid %d exited %v after SIGTERM\n", sv.PID, took.Round(time.Millisecond))
			return 0
		}
		if time.Now().After(deadline) {
			fmt.Fprintf(stdout, "pid %d is still running %v after SIGTERM (its %s is %v): look at its log for why it does not stop; stop it for good with `kill -KILL %d` or its service manager (clients are already told to go)\n",
				sv.PID, bound, settingName("drain-timeout"), cmp.Or(sv.DrainTimeout, cfg.DrainTimeout), sv.PID)
			return 1
		}
		time.Sleep(drainPoll)
	}
}

// sameRelay makes sure the process serving.json names is still the relay
// that wrote it, not another process that was given its pid after the
// relay died without removing the file (killed, a crash, a state
// directory copied from elsewhere). On Linux it asks /proc: the process
// started no later than the relay said it served (serving.json's since,
// with a few seconds for the clock's coarseness), which a pid given out
// again after that cannot have; and it runs a tailderp binary: the same
// file as this command's, or else (a binary upgraded in place, or another
// copy) a program whose path or argv[0] names tailderp. Elsewhere only
// that the process exists (serving.Read checked it).
func sameRelay(sv *serving.Serving) error {
	if runtime.GOOS != "linux" {
		return nil
	}
	dir := fmt.Sprintf("/proc/%d", sv.PID)
	started, err := procStart(dir)
	if err != nil {
		return fmt.Errorf("its start time cannot be read: %w", err)
	}
	const slack = 5 * time.Second
	if started.After(sv.Since.Add(slack)) {
		return fmt.Errorf("that process started at %s, after the relay wrote the file (%s): it is another process", started.UTC().Format(time.RFC3339), sv.Since.UTC().Format(time.RFC3339))
	}
	exe, exeErr := os.Readlink(dir + "/exe")
	exe = strings.TrimSuffix(exe, " (deleted)")
	if exeErr == nil {
		if self, err := os.Executable(); err == nil && sameFile(self, dir+"/exe") {
			return nil
		}
		if strings.Contains(filepath.Base(exe), "tailderp") {
			return nil
		}
	}
	b, err := config.ReadFileLimited(dir+"/cmdline", 1<<20)
	if err != nil {
		return fmt.Errorf("its command line cannot be read: %w", err)
	}
	argv0, _, _ := strings.Cut(string(b), "\x00")
	if strings.Contains(filepath.Base(argv0), "tailderp") {
		return nil
	}
	name := exe
	if name == "" {
		name = argv0
	}
	return fmt.Errorf("it runs %q, not tailderp", name)
}

func sameFile(a, b string) bool {
	fa, err1 := os.Stat(a)
	fb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(fa, fb)
}

// running reports whether pid is a process that has not exited: a zombie
// (exited, not yet reaped by its parent) has.
func running(pid int) bool {
	if !serving.ProcessAlive(pid) {
		return false
	}
	if runtime.GOOS != "linux" {
		return true
	}
	state, _, err := procStat(fmt.Sprintf("/proc/%d", pid))
	return err == nil && state != "Z" && state != "X"
}

// procStat reads /proc/PID/stat: the process's state letter and the
// fields after it (fields[0] is the state, field 3 of proc(5)).
func procStat(dir string) (state string, fields []string, err error) {
	b, err := os.ReadFile(dir + "/stat")
	if err != nil {
		return "", nil, err
	}
	// The command name (field 2) is in parentheses and may hold anything.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return "", nil, fmt.Errorf("%s/stat: unexpected format", dir)
	}
	fields = strings.Fields(string(b[i+1:]))
	if len(fields) < 20 {
		return "", nil, fmt.Errorf("%s/stat: unexpected format", dir)
	}
	return fields[0], fields, nil
}

// procStart is when the process of /proc/PID (dir) started: its start
// time in clock ticks after boot (field 22 of stat; USER_HZ is 100 on
// Linux whatever the kernel's HZ) plus the boot time (/proc/stat btime).
func procStart(dir string) (time.Time, error) {
	_, fields, err := procStat(dir)
	if err != nil {
		return time.Time{}, err
	}
	ticks, err := strconv.ParseInt(fields[22-3], 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("%s/stat: start time: %w", dir, err)
	}
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return time.Time{}, err
	}
	for l := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "btime "); ok {
			boot, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				break
			}
			const userHZ = 100
			return time.Unix(boot, 0).Add(time.Duration(ticks) * time.Second / userHZ), nil
		}
	}
	return time.Time{}, errors.New("/proc/stat: no btime")
}

func printDrainUsage(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprint(w, `tailderp drain: stop the relay on this machine gracefully, and wait for it.

Usage:
  tailderp drain [-state-dir DIR] [-wait DURATION]

It finds the running relay as "tailderp check -local" does (the relay of
-state-dir / STATE_DIR when given, and only that one; else the one running
here), checks that the process its serving.json names is still that relay
(on Linux: it started before the file was written, and runs tailderp), and
sends it SIGTERM: readiness turns false at once (serving.json says
draining, so "check -local" fails), the listeners close, its clients are
closed so they reconnect to another relay of the region, the known-peers
caches are written, and the relay exits 0 within its -drain-timeout. The
command says when serving.json said draining and when the process exited.

Exit status 0 when the relay exited within the wait, 1 when it did not
(it says what to do) or no running relay was found, 2 on bad flags or
settings.

Flags:
`)
	fs.VisitAll(func(f *flag.Flag) {
		if config.IsSetting(f.Name) {
			return
		}
		fmt.Fprintf(w, "  -%s\n    \t%s\n", f.Name, f.Usage)
	})
	fmt.Fprintln(w, "\nServer settings (-state-dir and the rest): see tailderp -help.")
}
