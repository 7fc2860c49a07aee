package main

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/tailderp/tailderp/internal/config"
)

// TestREADMESettingsTable keeps the README's settings table equal to the
// settings the binary has. Run with UPDATE_README=1 to rewrite it.
func TestREADMESettingsTable(t *testing.T) {
	const begin, end = "<!-- settings:begin -->\n", "<!-- settings:end -->"
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(readme)
	i, j := strings.Index(s, begin), strings.Index(s, end)
	if i < 0 || j < i {
		t.Fatalf("README.md has no %q … %q block", begin, end)
	}
	var table bytes.Buffer
	config.WriteSettingsTable(&table)
	want := table.String() + "\n"
	got := s[i+len(begin) : j]
	if got == want {
		return
	}
	if os.Getenv("UPDATE_README") != "" {
		s = s[:i+len(begin)] + want + s[j:]
		if err := os.WriteFile("README.md", []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Errorf("README.md settings table is out of date; run UPDATE_README=1 go test -run TestREADMESettingsTable .\n--- want ---\n%s", want)
}

// TestHelpNamesEverySetting checks that --help shows every flag with its
// environment variable, and every environment-only setting.
func TestHelpNamesEverySetting(t *testing.T) {
	var stderr bytes.Buffer
	if code := realMain([]string{"-help"}, nil, &bytes.Buffer{}, &stderr); code != 0 {
		t.Fatalf("-help exit %d", code)
	}
	help := stderr.String()
	for _, s := range config.Names() {
		if s.Flag != "" && !strings.Contains(help, "-"+s.Flag+"  [env "+s.Env) {
			t.Errorf("--help does not show -%s with env %s", s.Flag, s.Env)
		}
		if s.Flag == "" && !strings.Contains(help, "env "+s.Env) {
			t.Errorf("--help does not show env %s", s.Env)
		}
	}
}
