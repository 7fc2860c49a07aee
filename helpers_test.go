package main

import (
	"io"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/tailderp/tailderp/internal/config"
)

// The helpers of package main's tests that take the place of what moved
// to internal/config: the environment as a list, Load for the server.

// envFrom turns a map into an environment ("NAME=value" entries), sorted
// so that every run sees the same one.
func envFrom(m map[string]string) []string {
	var env []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		env = append(env, k+"="+m[k])
	}
	return env
}

// loadConfig is the server's Load.
func loadConfig(_ string, args []string, env []string, _ io.Writer) (*config.Config, error) {
	return config.Load(config.Run, nil, args, env)
}

// secretMark is appended to every auth key a fuzz target sets, so that a
// message quoting the key is caught (as in internal/config's fuzz tests).
const secretMark = "Zq7S3cr3tT0k3n"

// splitNUL splits a fuzzed NUL-separated list; "" is an empty list.
func splitNUL(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, "\x00")
}

// fuzzEnv turns a fuzzed environment ("K=V\x00K=V…") into an environment,
// with secretMark appended to the auth key variables that are set.
func fuzzEnv(env string) (list []string, m map[string]string) {
	m = map[string]string{}
	for _, kv := range splitNUL(env) {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	for _, k := range []string{"TAILSCALE_AUTH_KEY", "TS_AUTHKEY"} {
		if m[k] != "" {
			m[k] += secretMark
		}
	}
	return envFrom(m), m
}

// markElsewhere reports whether secretMark is in an input other than an
// auth key, where a message may quote it rightly.
func markElsewhere(args []string, env map[string]string) bool {
	for _, a := range args {
		if strings.Contains(a, secretMark) {
			return true
		}
	}
	for k, v := range env {
		if k != "TAILSCALE_AUTH_KEY" && k != "TS_AUTHKEY" && (strings.Contains(v, secretMark) || strings.Contains(k, secretMark)) {
			return true
		}
	}
	return false
}

// checkMessage fails t unless msg is made of non-empty lines, each its
// own log line, and, when checkSecret, does not quote an auth key.
func checkMessage(t *testing.T, what, msg string, checkSecret bool) {
	t.Helper()
	for i, line := range strings.Split(msg, "\n") {
		if strings.TrimSpace(line) == "" {
			t.Fatalf("%s: empty line %d in %q", what, i+1, msg)
		}
		if strings.ContainsRune(line, '\r') || (i > 0 && !strings.HasPrefix(line, "tailderp")) {
			t.Fatalf("%s: line %d is not a line of its own: %q", what, i+1, msg)
		}
	}
	if checkSecret && strings.Contains(msg, secretMark) {
		t.Fatalf("%s: message shows the auth key: %q", what, msg)
	}
}
