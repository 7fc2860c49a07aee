package logs

import (
	"bytes"
	"log"
	"log/slog"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

func TestExcerptAndCut(t *testing.T) {
	huge := strings.Repeat("é", 1<<19) // 1 MiB of two-byte characters
	tests := []struct {
		name, got, want string
	}{
		{"short excerpt", Excerpt("derp\n", 64), `"derp\n"`},
		{"long excerpt", Excerpt(strings.Repeat("a", 100), 8), `"aaaaaaaa"… (100 bytes)`},
		{"excerpt cut inside a character", Excerpt(huge, 5), `"éé"… (1048576 bytes)`},
		{"short cut", Cut("hello", 5), "hello"},
		{"long cut", Cut("hello, world", 5), "hello… (7 more bytes)"},
		{"cut inside a character", Cut(huge, 5), "éé… (1048572 more bytes)"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s: got %q, want %q", tt.name, tt.got, tt.want)
		}
		if !utf8.ValidString(tt.got) {
			t.Errorf("%s: %q is not valid UTF-8", tt.name, tt.got)
		}
	}
}

// TestLimited: one budget for every line, short lines, the suppressed
// lines counted once the budget allows again and by Flush, and nothing
// spent on lines below the logger's level.
func TestLimited(t *testing.T) {
	var buf bytes.Buffer
	l := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo}))
	const interval = 200 * time.Millisecond
	ll := NewLimited(l, "test lines", 3, interval, 32)
	for i := range 10 {
		ll.Log(slog.LevelDebug, "below the level", "i", i)
	}
	for i := range 10 {
		ll.Log(slog.LevelInfo, "client said "+strings.Repeat("x", 1000), "value", strings.Repeat("y", 1000), "i", i)
	}
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("%d lines for 10 debug and 10 info lines with a budget of 3, want 3:\n%s", len(lines), buf.String())
	}
	for _, line := range lines {
		if len(line) > 200 || !strings.Contains(line, "more bytes") {
			t.Errorf("line of %d bytes, want it cut: %s", len(line), line)
		}
	}

	time.Sleep(interval)
	buf.Reset()
	ll.Log(slog.LevelWarn, "next window")
	if got := buf.String(); !strings.Contains(got, `msg="log lines suppressed" what="test lines" count=7`) || !strings.Contains(got, "next window") {
		t.Errorf("after the interval, want the count of the 7 suppressed lines, then the line:\n%s", got)
	}

	buf.Reset()
	for range 5 {
		ll.Log(slog.LevelWarn, "more")
	}
	ll.Flush()
	if got := buf.String(); strings.Count(got, "more") != 2 || !strings.Contains(got, "level=WARN msg=\"log lines suppressed\" what=\"test lines\" count=3") {
		t.Errorf("want 2 lines, then Flush counting 3 suppressed warnings:\n%s", got)
	}
	buf.Reset()
	ll.Flush()
	if buf.Len() != 0 {
		t.Errorf("a second Flush logged %q", buf.String())
	}
}

// TestLimitedWriter: a *log.Logger writing through Limited, as the
// standard logger of main does, cannot log a 1 MiB line.
func TestLimitedWriter(t *testing.T) {
	var buf bytes.Buffer
	l := slog.New(slog.NewTextHandler(&buf, nil))
	std := log.New(NewLimited(l, "std", 2, time.Hour, 64).Writer(slog.LevelInfo, "component", "std"), "", 0)
	for range 5 {
		std.Printf("Weird upgrade: %q", strings.Repeat("z", 1<<20))
	}
	if buf.Len() > 1024 {
		t.Errorf("5 lines of 1 MiB logged %d bytes", buf.Len())
	}
	if got := strings.Count(buf.String(), "Weird upgrade"); got != 2 {
		t.Errorf("%d lines, want the budget of 2:\n%s", got, buf.String())
	}
	if !strings.Contains(buf.String(), "component=std") {
		t.Errorf("attributes lost:\n%s", buf.String())
	}
}
