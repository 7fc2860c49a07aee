// Package logs builds tailderp's slog loggers and adapts the printf-style
// loggers of the Tailscale libraries (logger.Logf) onto them, with secrets
// redacted and floods rate-limited.
package logs

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"

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

// Writer returns an io.Writer that logs each write to l at level, for
// libraries that log through a *log.Logger (net/http's ErrorLog, the
// standard logger).
func Writer(l *slog.Logger, level slog.Level, attrs ...any) io.Writer {
	return writer{l: l, level: level, attrs: attrs}
}

type writer struct {
	l     *slog.Logger
	level slog.Level
	attrs []any
}

func (w writer) Write(p []byte) (int, error) {
	w.l.Log(context.Background(), w.level, strings.TrimSpace(string(p)), w.attrs...)
	return len(p), nil
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
