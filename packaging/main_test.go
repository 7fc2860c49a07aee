package packaging

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/tailcfg"
)

// testVersion is stamped into the binary TestMain builds.
const testVersion = "v0.0.0-packaging-test"

var (
	repoRoot string // the module's root directory
	imageDir string // the image's root filesystem, built by the Dockerfile's script
	binary   string // imageDir/tailderp
)

func TestMain(m *testing.M) {
	// The test binary doubles as the launcher that enters the empty root
	// (see launcherMain); it never returns from there.
	if len(os.Args) > 1 && os.Args[1] == launcherArg {
		launcherMain(os.Args[2:])
	}
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	var err error
	repoRoot, err = filepath.Abs("..")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	dir, err := os.MkdirTemp("", "tailderp-packaging-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	imageDir = filepath.Join(dir, "image")
	binary = filepath.Join(imageDir, "tailderp")
	// Exactly what the Dockerfile's build stage runs, for this machine's
	// GOOS/GOARCH (an empty TARGETOS/TARGETARCH means "the toolchain's").
	build := exec.Command("sh", filepath.Join(repoRoot, "scripts", "build-image-contents.sh"), imageDir)
	build.Env = append(os.Environ(), "VERSION="+testVersion, "TARGETOS=", "TARGETARCH=", "TARGETVARIANT=")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "packaging: scripts/build-image-contents.sh:", err)
		return 1
	}
	return m.Run()
}

// readRepoFile returns a file of the repository.
func readRepoFile(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// --- Dockerfile ---

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	cmd  string // upper case: FROM, RUN, ...
	args string
	line int
}

func parseDockerfile(t *testing.T) []instruction {
	t.Helper()
	var out []instruction
	var cur *instruction
	for i, line := range strings.Split(readRepoFile(t, "Dockerfile"), "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "#") || (trimmed == "" && cur == nil) {
			continue // comments are dropped, even inside a continuation
		}
		if cur == nil {
			cmd, args, _ := strings.Cut(trimmed, " ")
			cur = &instruction{cmd: strings.ToUpper(cmd), line: i + 1}
			trimmed = args
		}
		cont := strings.HasSuffix(trimmed, `\`)
		trimmed = strings.TrimSuffix(trimmed, `\`)
		cur.args = strings.TrimSpace(cur.args + " " + strings.TrimSpace(trimmed))
		if !cont {
			out = append(out, *cur)
			cur = nil
		}
	}
	if cur != nil {
		t.Fatalf("Dockerfile:%d: continuation at end of file", cur.line)
	}
	return out
}

// dockerfileAll returns every instruction named cmd.
func dockerfileAll(ins []instruction, cmd string) []instruction {
	var out []instruction
	for _, in := range ins {
		if in.cmd == cmd {
			out = append(out, in)
		}
	}
	return out
}

// dockerfileOne returns the only instruction named cmd in the final stage.
func dockerfileOne(t *testing.T, ins []instruction, cmd string) instruction {
	t.Helper()
	var found []instruction
	for _, in := range finalStage(ins) {
		if in.cmd == cmd {
			found = append(found, in)
		}
	}
	if len(found) != 1 {
		t.Fatalf("Dockerfile: want exactly one %s in the final stage, have %d", cmd, len(found))
	}
	return found[0]
}

// finalStage returns the instructions from the last FROM on.
func finalStage(ins []instruction) []instruction {
	last := 0
	for i, in := range ins {
		if in.cmd == "FROM" {
			last = i
		}
	}
	return ins[last:]
}

// execForm parses a JSON-array (exec form) argument list.
func execForm(t *testing.T, in instruction, s string) []string {
	t.Helper()
	var argv []string
	if err := json.Unmarshal([]byte(s), &argv); err != nil || len(argv) == 0 {
		t.Fatalf("Dockerfile:%d: %s must use the exec form [\"/tailderp\", ...] (no shell in the image): %q", in.line, in.cmd, s)
	}
	return argv
}

// dockerImage is what the tests need to know about the image.
type dockerImage struct {
	entrypoint  []string
	healthcheck []string // the HEALTHCHECK's CMD, exec form
	uid, gid    int      // USER
	workdir     string   // WORKDIR
}

func parseImage(t *testing.T) dockerImage {
	t.Helper()
	ins := parseDockerfile(t)
	var img dockerImage
	ep := dockerfileOne(t, ins, "ENTRYPOINT")
	img.entrypoint = execForm(t, ep, ep.args)
	hc := dockerfileOne(t, ins, "HEALTHCHECK")
	_, cmd, ok := strings.Cut(hc.args, "CMD ")
	if !ok {
		t.Fatalf("Dockerfile:%d: HEALTHCHECK without CMD: %q", hc.line, hc.args)
	}
	img.healthcheck = execForm(t, hc, cmd)
	user := dockerfileOne(t, ins, "USER")
	if _, err := fmt.Sscanf(user.args, "%d:%d", &img.uid, &img.gid); err != nil {
		t.Fatalf("Dockerfile:%d: USER %q: want numeric uid:gid (a scratch image has no user database for names)", user.line, user.args)
	}
	img.workdir = "/"
	for _, in := range finalStage(ins) {
		if in.cmd == "WORKDIR" {
			img.workdir = in.args
		}
	}
	return img
}

// --- environment files ---

// envLine is one NAME=value line of an environment file.
type envLine struct {
	name, value string
	commented   bool // "# NAME=value": an example, not set
	line        int
}

var envLineRE = regexp.MustCompile(`^(#\s?)?([A-Z][A-Z0-9_]*)=(.*)$`)

// parseEnvFile reads NAME=value lines the way docker compose and systemd's
// EnvironmentFile= do (surrounding quotes removed); with examples, also
// the "# NAME=value" lines that document a setting.
func parseEnvFile(text string, examples bool) []envLine {
	var out []envLine
	for i, line := range strings.Split(text, "\n") {
		m := envLineRE.FindStringSubmatch(strings.TrimRight(line, "\r"))
		if m == nil || (m[1] != "" && !examples) {
			continue
		}
		v := m[3]
		if len(v) >= 2 && (v[0] == '"' || v[0] == '\'') && v[len(v)-1] == v[0] {
			v = v[1 : len(v)-1]
		}
		out = append(out, envLine{name: m[2], value: v, commented: m[1] != "", line: i + 1})
	}
	return out
}

// envList turns lines into a KEY=VALUE environment.
func envList(lines []envLine) []string {
	env := []string{}
	for _, l := range lines {
		env = append(env, l.name+"="+l.value)
	}
	return env
}

// --- the binary's settings, from --help ---

// settingNames is one setting as --help shows it.
type settingNames struct {
	flag    string // "" for environment-only settings
	env     string // primary environment variable
	aliases []string
	dflt    string // default, as --help shows it
}

var (
	helpFlagRE = regexp.MustCompile(`^  -(\S+)  \[env (\S+)(?: \(or ([^)]*)\))?\]$`)
	helpEnvRE  = regexp.MustCompile(`^  env (\S+)(?: \(or ([^)]*)\))?$`)
	helpDefRE  = regexp.MustCompile(`\(default ([^)]*)\)$`)
)

var helpOnce = sync.OnceValues(func() ([]settingNames, error) {
	cmd := exec.Command(binary, "--help")
	cmd.Env = []string{}
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("tailderp --help: %v\n%s", err, stderr.String())
	}
	var out []settingNames
	sc := bufio.NewScanner(&stderr)
	for sc.Scan() {
		line := sc.Text()
		split := func(s string) []string {
			if s == "" {
				return nil
			}
			return strings.Split(s, ", ")
		}
		if m := helpFlagRE.FindStringSubmatch(line); m != nil {
			out = append(out, settingNames{flag: m[1], env: m[2], aliases: split(m[3])})
		} else if m := helpEnvRE.FindStringSubmatch(line); m != nil {
			out = append(out, settingNames{env: m[1], aliases: split(m[2])})
		} else if m := helpDefRE.FindStringSubmatch(line); m != nil && len(out) > 0 && strings.HasPrefix(line, "    \t") {
			out[len(out)-1].dflt = m[1]
		}
	}
	if len(out) < 10 {
		return nil, fmt.Errorf("tailderp --help lists only %d settings; has its format changed?\n%s", len(out), stderr.String())
	}
	return out, nil
})

// settings returns the binary's settings, as its --help lists them.
func settings(t *testing.T) []settingNames {
	t.Helper()
	s, err := helpOnce()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// settingByFlag returns the setting of a flag.
func settingByFlag(t *testing.T, flag string) settingNames {
	t.Helper()
	for _, s := range settings(t) {
		if s.flag == flag {
			return s
		}
	}
	t.Fatalf("tailderp --help has no -%s", flag)
	return settingNames{}
}

// --- running the binary on this host ---

// runBinary runs tailderp with exactly env and returns its exit code,
// stdout and stderr.
func runBinary(t *testing.T, env []string, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	cmd.Env = append([]string{}, env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		t.Fatal(err)
	}
	return cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()
}

// publicDERPPort is the HTTPS port a derpMap node advertises.
func publicDERPPort(n tailcfg.DERPNode) int {
	if n.DERPPort == 0 {
		return 443
	}
	return n.DERPPort
}

// publicSTUNPort is the STUN port a derpMap node advertises.
func publicSTUNPort(n tailcfg.DERPNode) int {
	if n.STUNPort == 0 {
		return 3478
	}
	return n.STUNPort
}

// sortedKeys returns a map's keys in order, for messages.
func sortedKeys[V any](m map[string]V) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}
