// Package logs builds tailderp's slog loggers and adapts the printf-style
// loggers of the Tailscale libraries (logger.Logf) onto them, with secrets
// redacted and floods rate-limited.
package logs

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"tailscale.com/types/logger"
)

// New returns a logger writing to w in the given format ("text" or "json")
// at the given minimum level ("debug", "info", "warn", "error").
func New(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text", "":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	default:
		return nil, fmt.Errorf("log format %q: want text or json", format)
	}
}

// Discard returns a logger that drops everything, for callers that were
// given no logger.
func Discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

// Logf adapts l to the printf-style logger used by the Tailscale
// libraries. Each line becomes one record at level with the text in msg.
// Any of the secrets that appears in a line is replaced by "[redacted]"
// before it is logged, so a library that echoes a key cannot leak it.
func Logf(l *slog.Logger, level slog.Level, secrets ...string) logger.Logf {
	var rs []string
	for _, s := range secrets {
		if s != "" {
			rs = append(rs, s, "[redacted]")
		}
	}
	var rep *strings.Replacer
	if len(rs) > 0 {
		rep = strings.NewReplacer(rs...)
	}
	return func(format string, args ...any) {
		msg := strings.TrimRight(fmt.Sprintf(format, args...), "\n")
		if rep != nil {
			msg = rep.Replace(msg)
		}
		l.Log(context.Background(), level, msg)
	}
}

// Limiter lets through at most Burst events per Interval and counts the
// rest, so that a flood of refused clients cannot fill a disk with log
// lines. The zero value is not usable; use NewLimiter.
type Limiter struct {
	interval time.Duration
	burst    int

	mu         sync.Mutex
	windowFrom time.Time
	inWindow   int
	suppressed int
}

// NewLimiter returns a Limiter allowing burst events per interval.
func NewLimiter(burst int, interval time.Duration) *Limiter {
	return &Limiter{interval: interval, burst: burst}
}

// Allow reports whether an event at now may be logged. When it starts a
// new window it also returns how many events the previous windows
// suppressed, so the caller can say so once.
func (l *Limiter) Allow(now time.Time) (ok bool, suppressedBefore int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.windowFrom) >= l.interval {
		l.windowFrom = now
		l.inWindow = 0
		suppressedBefore, l.suppressed = l.suppressed, 0
	}
	if l.inWindow < l.burst {
		l.inWindow++
		return true, suppressedBefore
	}
	l.suppressed++
	return false, suppressedBefore
}

// Excerpt returns at most n bytes of s (cut at a character boundary) as a
// quoted string, followed by s's full length when it was cut. Log lines
// carry client input only through Excerpt, so they stay short whatever a
// client sends: Excerpt(<1 MB of "a">, 8) is `"aaaaaaaa"… (1048576 bytes)`.
func Excerpt(s string, n int) string {
	if len(s) <= n {
		return strconv.Quote(s)
	}
	return strconv.Quote(strings.ToValidUTF8(cutAt(s, n), "")) + "… (" + strconv.Itoa(len(s)) + " bytes)"
}

// Cut returns s shortened to at most n bytes (cut at a character
// boundary), with how much was cut, for messages of libraries that may
// embed something a client sent.
func Cut(s string, n int) string {
	if len(s) <= n {
		return s
	}
	head := cutAt(s, n)
	return head + "… (" + strconv.Itoa(len(s)-len(head)) + " more bytes)"
}

// cutBytes is Cut for a []byte, copying only what it keeps.
func cutBytes(p []byte, n int) string {
	if len(p) <= n {
		return string(p)
	}
	head := cutAt(string(p[:n+1]), n)
	return head + "… (" + strconv.Itoa(len(p)-len(head)) + " more bytes)"
}

// cutAt returns the longest prefix of s of at most n bytes that does not
// split a UTF-8 sequence.
func cutAt(s string, n int) string {
	for n > 0 && n < len(s) && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// Limited logs lines that outsiders can cause (refused clients, malformed
// requests, errors of each connection): one budget of burst lines per
// interval for all of them, whoever causes them, and each message and
// string value cut to maxLen bytes. What the budget drops is counted and
// said in one line ("log lines suppressed") before the next line that gets
// through, or by Flush. So a flood costs a few lines per interval, not a
// line per request.
type Limited struct {
	l      *slog.Logger
	what   string
	maxLen int
	lim    *Limiter

	mu         sync.Mutex
	suppressed int
	level      slog.Level // the highest level suppressed
}

// NewLimited returns a Limited logging to l at most burst lines per
// interval, each cut to maxLen bytes; what names the kind of line in the
// "suppressed" summary.
func NewLimited(l *slog.Logger, what string, burst int, interval time.Duration, maxLen int) *Limited {
	return &Limited{l: l, what: what, maxLen: maxLen, lim: NewLimiter(burst, interval)}
}

// Enabled reports whether a line at level would be logged at all, so a
// caller can skip formatting it.
func (ll *Limited) Enabled(level slog.Level) bool {
	return ll.l.Enabled(context.Background(), level)
}

// Log logs msg with args (slog key-value pairs) at level if the budget
// allows. Lines below the logger's level cost nothing and no budget.
func (ll *Limited) Log(level slog.Level, msg string, args ...any) {
	if !ll.Enabled(level) {
		return
	}
	ok, _ := ll.lim.Allow(time.Now())
	ll.mu.Lock()
	n, nLevel := 0, ll.level
	if ok {
		n, ll.suppressed = ll.suppressed, 0
	} else {
		if ll.suppressed == 0 || level > ll.level {
			ll.level = level
		}
		ll.suppressed++
	}
	ll.mu.Unlock()
	if n > 0 {
		ll.l.Log(context.Background(), nLevel, "log lines suppressed", "what", ll.what, "count", n)
	}
	if !ok {
		return
	}
	args = slices.Clone(args)
	for i := 1; i < len(args); i += 2 {
		if s, isString := args[i].(string); isString {
			args[i] = Cut(s, ll.maxLen)
		}
	}
	ll.l.Log(context.Background(), level, Cut(msg, ll.maxLen), args...)
}

// Flush says how many lines were suppressed since the last line that got
// through, if any: at shutdown, when no further line will say it.
func (ll *Limited) Flush() {
	ll.mu.Lock()
	n, level := ll.suppressed, ll.level
	ll.suppressed = 0
	ll.mu.Unlock()
	if n > 0 {
		ll.l.Log(context.Background(), level, "log lines suppressed", "what", ll.what, "count", n)
	}
}

// Writer returns an io.Writer that logs each write through ll at level,
// with attrs (slog key-value pairs), for libraries that log through a
// *log.Logger (net/http's ErrorLog, the standard logger).
func (ll *Limited) Writer(level slog.Level, attrs ...any) io.Writer {
	return limitedWriter{ll: ll, level: level, attrs: attrs}
}

type limitedWriter struct {
	ll    *Limited
	level slog.Level
	attrs []any
}

func (w limitedWriter) Write(p []byte) (int, error) {
	if w.ll.Enabled(w.level) {
		// Cut before converting: a write may be as large as what a
		// client sent.
		w.ll.Log(w.level, strings.TrimSpace(cutBytes(p, w.ll.maxLen)), w.attrs...)
	}
	return len(p), nil
}
