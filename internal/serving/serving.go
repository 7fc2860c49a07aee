// Package serving is what a running tailderp says it serves, in
// <state-dir>/serving.json, and how the commands on the same machine find
// it (`check -local`, the container's healthcheck; `derpmap`; `cert
// renew`): the file, or else the server process and its settings.
package serving

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"tailscale.com/atomicfile"
	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/internal/config"
	"github.com/tailderp/tailderp/internal/readiness"
)

// Serving is what a running server serves on its public side, as bound:
// real ports (also when the settings said 0), the certificate pin. The
// server writes it to <state-dir>/serving.json once it serves and removes
// it when it stops; `tailderp check -local` (the container's healthcheck)
// and `tailderp derpmap` read it, so they describe the server as it runs
// even when they were given other settings than the server (compose
// `command:` flags reach the server but not the healthcheck).
type Serving struct {
	PID           int       `json:"pid"`
	Version       string    `json:"version"`
	Since         time.Time `json:"since"`
	HTTPSAddr     string    `json:"https_addr"`          // the HTTPS listener, as bound
	STUNAddr      string    `json:"stun_addr,omitempty"` // "" when STUN is off
	ServerName    string    `json:"server_name"`         // the TLS name (-hostname)
	VerifyClients bool      `json:"verify_clients"`
	// ProxyProtocolFrom are the sources whose connections must start
	// with a PROXY protocol header (-proxy-protocol-from), so `check
	// -local` sends one when it connects from one of them.
	ProxyProtocolFrom []netip.Prefix      `json:"proxy_protocol_from,omitempty"`
	Region            *tailcfg.DERPRegion `json:"region"` // the derpMap region the snippet shows
	// DrainTimeout is the relay's -drain-timeout: how long it takes at
	// most to stop after SIGTERM (`tailderp drain` waits that long and a
	// margin). 0 in a file of a relay that predates it.
	DrainTimeout time.Duration `json:"drain_timeout_ns,omitempty"`
	// Readiness is whether the relay does its job now, part by part; it
	// is rewritten when it changes (about a second late at most).
	Readiness *readiness.Readiness `json:"readiness,omitempty"`
}

// Write writes s to path atomically, mode 0600.
func Write(path string, s *Serving) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, append(b, '\n'), 0o600)
}

// Remove removes path if it still describes this process.
func Remove(path string) {
	if s, err := Read(path); err == nil && s.PID == os.Getpid() {
		os.Remove(path)
	}
}

// ErrNotServing means a serving.json names a process that is gone.
var ErrNotServing = errors.New("the server it names is not running")

// maxFileSize bounds serving.json: a region of a few nodes.
const maxFileSize = 1 << 20

// Read reads a serving.json whose process is still running.
func Read(path string) (*Serving, error) {
	if path == "" {
		return nil, errors.New("no state directory")
	}
	b, err := config.ReadFileLimited(path, maxFileSize)
	if err != nil {
		return nil, err
	}
	var s Serving
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if s.Region == nil || len(s.Region.Nodes) == 0 || s.HTTPSAddr == "" {
		return nil, fmt.Errorf("%s: incomplete", path)
	}
	if !ProcessAlive(s.PID) {
		return nil, fmt.Errorf("%s: pid %d: %w", path, s.PID, ErrNotServing)
	}
	return &s, nil
}

// ProcessAlive reports whether a process with pid exists (this user may
// not be allowed to signal it). A zombie exists.
func ProcessAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// serverProcess is a tailderp server running on this machine, found in
// /proc, with the settings it was started with.
type serverProcess struct {
	pid int
	cfg *config.Config
}

// findServers lists the tailderp servers running this same executable
// (Linux: /proc; elsewhere none). A process whose command line or
// environment this user cannot read is left out.
func findServers() []serverProcess {
	self, err := os.Executable()
	if err != nil {
		return nil
	}
	self, _ = filepath.EvalSymlinks(self)
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []serverProcess
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		dir := filepath.Join("/proc", e.Name())
		exe, err := os.Readlink(filepath.Join(dir, "exe"))
		if err != nil || strings.TrimSuffix(exe, " (deleted)") != self {
			continue
		}
		args, err1 := readNULList(filepath.Join(dir, "cmdline"))
		env, err2 := readNULList(filepath.Join(dir, "environ"))
		if err1 != nil || err2 != nil || len(args) == 0 {
			continue
		}
		args = args[1:]
		if len(args) > 0 && slices.Contains(config.Subcommands, args[0]) {
			continue // a check or derpmap, not a server
		}
		cfg, err := config.Load(config.Inspect, nil, args, env)
		if err != nil {
			continue
		}
		out = append(out, serverProcess{pid: pid, cfg: cfg})
	}
	return out
}

func readNULList(path string) ([]string, error) {
	b, err := config.ReadFileLimited(path, maxFileSize)
	if err != nil {
		return nil, err
	}
	b = bytes.TrimRight(b, "\x00")
	if len(b) == 0 {
		return nil, nil
	}
	return strings.Split(string(b), "\x00"), nil
}

// theServer picks the server a local check or derpmap means: pid 1 (the
// container's server) if it is one, else the only one. Several servers
// and no pid 1 is an error naming them.
func theServer(procs []serverProcess) (*serverProcess, error) {
	switch len(procs) {
	case 0:
		return nil, nil
	case 1:
		return &procs[0], nil
	}
	var pids []string
	for i, p := range procs {
		if p.pid == 1 {
			return &procs[i], nil
		}
		pids = append(pids, strconv.Itoa(p.pid))
	}
	return nil, fmt.Errorf("several tailderp servers run here (pids %s): give the -state-dir (or the settings) of the one to check", strings.Join(pids, ", "))
}

// Running finds what the relay on this machine serves, for `check
// -local` and `derpmap`. When own (the command's own settings) names a
// state directory (-state-dir or STATE_DIR), that relay only: its
// serving.json, and an error when it is not running, even if another
// tailderp runs here. Otherwise, in this order: the serving.json in own's
// default state directory; the tailderp server process running here (pid
// 1 in a container, or the only one): its serving.json, or else its
// settings. It returns nil, and no error, when no server is found: then
// the command's own settings are all there is. from says where the answer
// came from, for the output.
func Running(own *config.Config) (s *Serving, cfg *config.Config, from string, err error) {
	s, err = Read(own.ServingPath())
	switch {
	case err == nil:
		return s, own, own.ServingPath(), nil
	case own.Given("state-dir"):
		if errors.Is(err, os.ErrNotExist) {
			err = fmt.Errorf("no %s: %w", own.ServingPath(), ErrNotServing)
		}
		return nil, nil, "", fmt.Errorf("no tailderp serves from %s %s: %w (start it, or give the state directory of the relay to check)",
			config.SettingName("state-dir"), own.StateDir, err)
	}
	p, err := theServer(findServers())
	if err != nil || p == nil {
		return nil, nil, "", err
	}
	if s, err := Read(p.cfg.ServingPath()); err == nil {
		return s, p.cfg, p.cfg.ServingPath(), nil
	}
	return nil, p.cfg, fmt.Sprintf("the settings of pid %d", p.pid), nil
}
