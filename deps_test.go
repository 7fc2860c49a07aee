package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// The package rules, checked on every run instead of remembered (derper's
// TestDeps does the same for derper). Rules are about production code;
// internal/test* are test harnesses and may use anything.
const module = "github.com/tailderp/tailderp"

// depRule says what one package (or the binary) must not depend on,
// directly or through anything it imports, and what it must not import
// itself though it may reach it through another package.
type depRule struct {
	pkg     string            // module-relative import path; "" is the binary
	deps    map[string]string // path, or path prefix + "...", → why
	imports map[string]string // path, or path prefix + "...", → why
}

var depRules = []depRule{
	{pkg: "/relay",
		deps: map[string]string{
			"tailscale.com/tsnet": "the public side knows no tailnet; only node embeds one",
			module + "/node":      "relay asks an Admitter, it does not know where answers come from",
			module + "/verify":    "relay asks an Admitter (an interface it owns), not verify",
		}},
	{pkg: "/stun",
		deps: map[string]string{
			"tailscale.com/tsnet": "STUN knows no tailnet",
			module + "/node":      "STUN knows no tailnet",
			module + "/verify":    "STUN admits nobody: it is unauthenticated by design",
		}},
	{pkg: "/verify",
		deps: map[string]string{
			"tailscale.com/tsnet": "verify asks a KeyChecker, so it is tested without a tailnet and asks several",
			module + "/node":      "verify asks a KeyChecker, not the node",
			module + "/relay":     "verify decides; relay asks it through relay.Admitter",
		}},
	{pkg: "/node",
		deps: map[string]string{
			module + "/verify": "the node reports (known, ready); verify decides",
			module + "/relay":  "the node knows nothing of the public side",
		}},
	{pkg: "/debugsrv",
		deps: map[string]string{
			"tailscale.com/tsnet": "debugsrv serves on a listener it is given",
		}},
	{pkg: "/check",
		deps: map[string]string{
			"tailscale.com/tsnet": "check is a client of the public side",
			module + "/node":      "check is a client of the public side",
			module + "/relay":     "check judges a relay by the rules it shares with it (internal/relayrules), not by the relay's code",
		}},
	{pkg: "/internal/config",
		deps: map[string]string{
			// tsnet is reached only through node (node.HasLogin, node.Problem):
			// config never starts a node.
			module + "/verify":           "config decides the settings; admission is wired by main",
			module + "/check":            "config is read by check's command, not the other way",
			module + "/debugsrv":         "config knows nothing of the status pages",
			module + "/internal/serving": "serving reads config (a running server's settings), not the other way",
		}},
	{pkg: "/internal/serving",
		deps: map[string]string{
			module + "/verify":   "serving.json says what is served, not how admission decides",
			module + "/debugsrv": "serving.json is read by local commands, not the status pages",
		}},
	{pkg: "/internal/commands",
		imports: map[string]string{
			"tailscale.com/tsnet": "a command reaches the tailnet through node (node.JoinEphemeral), as the server does",
		},
		deps: map[string]string{
			module + "/verify":            "commands print and check; admission is the server's, wired by main",
			module + "/stun":              "the STUN listener is the server's, wired by main; check speaks STUN as a client",
			module + "/debugsrv":          "commands knows nothing of the status pages",
			module + "/internal/tailnets": "the server's tailnets are main's to run; a command joins through node",
		}},
	{pkg: "/internal/readiness",
		deps: map[string]string{
			module + "/...": "readiness is a leaf: the server publishes it, check judges it",
		}},
	{pkg: "/policy",
		deps: map[string]string{
			module + "/...":       "policy is a client of Tailscale's API only: it knows nothing of the relay",
			"tailscale.com/tsnet": "policy talks to the API, not the tailnet",
		}},
	{pkg: "/internal/relayrules",
		deps: map[string]string{
			module + "/...": "relayrules is a leaf: relay and check both import it",
		}},
	{pkg: "", // the shipped binary
		deps: map[string]string{
			"testing":                        "no test code in the binary",
			"tailscale.com/tstest/...":       "no test code in the binary",
			module + "/internal/testtailnet": "no test code in the binary",
			module + "/internal/testacme":    "no test code in the binary",
			module + "/internal/testutil":    "no test code in the binary",
			"github.com/letsencrypt/...":     "no test code in the binary (Pebble is a test CA)",
			// Upstream derper is a go.mod tool, built by the mesh tests only.
			"tailscale.com/cmd/derper":       "derper is a test tool (go.mod's tool block), not part of tailderp",
			"github.com/tailscale/setec/...": "derper's secrets client came with the derper tool; tailderp reads its mesh key from a file",
			"github.com/prometheus/...":      "derper's dependencies came with the derper tool; tailderp's metrics are tsweb's",
		}},
}

// listedPackage is what `go list -json` says of a package.
type listedPackage struct {
	ImportPath string
	Imports    []string
	Deps       []string
}

// goList lists the module's packages with their imports and dependencies.
func goList(t *testing.T) map[string]listedPackage {
	t.Helper()
	out, err := exec.Command("go", "list", "-json", "./...").Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("go list: %v\n%s", err, ee.Stderr)
		}
		t.Fatal(err)
	}
	pkgs := map[string]listedPackage{}
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		var p listedPackage
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		pkgs[p.ImportPath] = p
	}
	return pkgs
}

// violations lists what p depends on or imports against r.
func (r depRule) violations(p listedPackage) []string {
	var out []string
	for _, c := range []struct {
		rules map[string]string
		got   []string
		verb  string
	}{{r.deps, p.Deps, "depends on "}, {r.imports, p.Imports, "imports "}} {
		for pattern, why := range c.rules {
			for _, d := range c.got {
				if d == pattern || (strings.HasSuffix(pattern, "...") && strings.HasPrefix(d, strings.TrimSuffix(pattern, "..."))) {
					out = append(out, c.verb+d+": "+why)
				}
			}
		}
	}
	slices.Sort(out)
	return out
}

func TestDeps(t *testing.T) {
	pkgs := goList(t)
	for _, r := range depRules {
		path := module + r.pkg
		p, ok := pkgs[path]
		if !ok {
			t.Errorf("package %s not found: update depRules", path)
			continue
		}
		for _, v := range r.violations(p) {
			t.Errorf("%s %s", path, v)
		}
	}
	// Only node imports tsnet, of all the production packages.
	for path, p := range pkgs {
		if strings.HasPrefix(path, module+"/internal/test") || path == module+"/node" {
			continue
		}
		if slices.Contains(p.Imports, "tailscale.com/tsnet") {
			t.Errorf("%s imports tailscale.com/tsnet: only node embeds the tailnet node", path)
		}
	}
}

// TestDepRulesCatchViolations shows that a rule fires: a package listed as
// importing or depending on what its rule forbids is reported, and an
// import rule does not fire on a mere dependency.
func TestDepRulesCatchViolations(t *testing.T) {
	example := func(forbidden string) string {
		return strings.TrimSuffix(forbidden, "...") + strings.Repeat("x", len(forbidden)-len(strings.TrimSuffix(forbidden, "...")))
	}
	for _, r := range depRules {
		for forbidden := range r.deps {
			dep := example(forbidden)
			p := listedPackage{ImportPath: module + r.pkg, Deps: []string{"fmt", dep}}
			if v := r.violations(p); len(v) != 1 {
				t.Errorf("rule for %q: a package depending on %s gives %q, want one violation", r.pkg, dep, v)
			}
		}
		for forbidden := range r.imports {
			imp := example(forbidden)
			if v := r.violations(listedPackage{ImportPath: module + r.pkg, Imports: []string{"fmt", imp}, Deps: []string{"fmt", imp}}); len(v) != 1 {
				t.Errorf("rule for %q: a package importing %s gives %q, want one violation", r.pkg, imp, v)
			}
			if v := r.violations(listedPackage{ImportPath: module + r.pkg, Imports: []string{"fmt"}, Deps: []string{"fmt", imp}}); len(v) != 0 {
				t.Errorf("rule for %q: a package depending on %s through another gives %q, want none", r.pkg, imp, v)
			}
		}
	}
}
