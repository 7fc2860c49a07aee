package testutil

import (
	"maps"
	"slices"
	"strings"
	"testing"
)

// The inputs of tailderp's command lines in tests, and the fuzz targets'
// way of writing them: command lines and environments as NUL-separated
// strings (NUL is the one byte neither an argv entry nor an environment
// variable can hold, so every input stands for a real command line), with
// a mark on every auth key so that a message quoting one is caught.

// EnvFrom turns a map into an environment ("NAME=value" entries), sorted
// so that every run sees the same one.
func EnvFrom(m map[string]string) []string {
	var env []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		env = append(env, k+"="+m[k])
	}
	return env
}

// SecretMark is appended to every auth key a fuzz target sets (FuzzEnv),
// so that a message quoting the key is caught.
const SecretMark = "Zq7S3cr3tT0k3n"

// SplitNUL splits a fuzzed NUL-separated list; "" is an empty list.
func SplitNUL(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, "\x00")
}

// FuzzEnv turns a fuzzed environment ("K=V\x00K=V…") into an environment
// (EnvFrom) and a map, with SecretMark appended to the auth key variables
// that are set.
func FuzzEnv(env string) (list []string, m map[string]string) {
	m = map[string]string{}
	for _, kv := range SplitNUL(env) {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	for _, k := range []string{"TAILSCALE_AUTH_KEY", "TS_AUTHKEY"} {
		if m[k] != "" {
			m[k] += SecretMark
		}
	}
	return EnvFrom(m), m
}

// MarkElsewhere reports whether SecretMark is in an input other than an
// auth key, where a message may quote it rightly.
func MarkElsewhere(args []string, env map[string]string) bool {
	for _, a := range args {
		if strings.Contains(a, SecretMark) {
			return true
		}
	}
	for k, v := range env {
		if k != "TAILSCALE_AUTH_KEY" && k != "TS_AUTHKEY" && (strings.Contains(v, SecretMark) || strings.Contains(k, SecretMark)) {
			return true
		}
	}
	return false
}

// CheckMessage fails t unless msg is made of non-empty lines, each its
// own log line (every line after the first starts with "tailderp"), and,
// when checkSecret, does not quote an auth key (SecretMark).
func CheckMessage(t testing.TB, what, msg string, checkSecret bool) {
	t.Helper()
	for i, line := range strings.Split(msg, "\n") {
		if strings.TrimSpace(line) == "" {
			t.Fatalf("%s: empty line %d in %q", what, i+1, msg)
		}
		if strings.ContainsRune(line, '\r') || (i > 0 && !strings.HasPrefix(line, "tailderp")) {
			t.Fatalf("%s: line %d is not a line of its own: %q", what, i+1, msg)
		}
	}
	if checkSecret && strings.Contains(msg, SecretMark) {
		t.Fatalf("%s: message shows the auth key: %q", what, msg)
	}
}
