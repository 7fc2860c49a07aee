package relay

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"tailscale.com/types/logger"

	"github.com/tailderp/tailderp/internal/logs"
)

// What the relay logs about clients is bounded twice: each line is short
// (client input appears only as a logs.Excerpt, a library's message is cut
// to maxLogLine), and each kind of line an outsider can cause shares one
// budget of lines per interval, whoever causes it (logs.Limited).
const (
	// excerptBytes is how much of a client's input a log line quotes.
	excerptBytes = 64
	// maxLogLine bounds a line made from a library's message.
	maxLogLine = 512
)

// relayLogs are the rate-limited logs of one Server.
type relayLogs struct {
	// conn is derpserver's lines about one connection: its per-client
	// lines ("derp client <addr><key>: …", the "closing" of each client
	// at shutdown among them) and its per-connection errors ("derp:
	// <addr>: …").
	conn *logs.Limited
	// request is the lines about malformed /derp requests.
	request *logs.Limited
	// http is net/http's server error log: mostly failed TLS handshakes
	// of scanners and half-open connections closed by the timeouts.
	http *logs.Limited
}

func newRelayLogs(l *slog.Logger) relayLogs {
	return relayLogs{
		conn:    logs.NewLimited(l, "per-connection lines of derpserver", 10, 10*time.Second, maxLogLine),
		request: logs.NewLimited(l, "malformed /derp requests", 5, time.Minute, maxLogLine),
		http:    logs.NewLimited(l, "http server errors", 10, 10*time.Second, maxLogLine),
	}
}

// flush says what the budgets suppressed and nothing said yet.
func (rl relayLogs) flush() {
	rl.conn.Flush()
	rl.request.Flush()
	rl.http.Flush()
}

// derpLogf adapts derpserver's printf logging to slog.
//
// derpserver's own rate limit (logger.RateLimitedFn) keeps a budget per
// format string, and each client's lines have a format of their own (the
// client's address and key are in the prefix), so with it every client
// had its own budget: 300 clients said "closing" 300 times at shutdown.
// Here every per-connection line shares the one budget of conn, and
// per-connection errors are debug-level (refusals are logged, with their
// reason, by the Admitter). The other lines, about the server as a whole,
// keep derpserver's per-format limit.
func derpLogf(l *slog.Logger, conn *logs.Limited) logger.Logf {
	server := logger.RateLimitedFn(func(format string, args ...any) {
		l.Info(logs.Cut(strings.TrimSpace(fmt.Sprintf(format, args...)), maxLogLine), "component", "derpserver")
	}, 30*time.Second, 5, 100)
	return func(format string, args ...any) {
		if !strings.HasPrefix(format, "derp client ") && !strings.HasPrefix(format, "derp: %s: ") {
			server(format, args...)
			return
		}
		level := slog.LevelInfo
		if strings.HasPrefix(format, "derp: %s: ") {
			level = slog.LevelDebug
		}
		if !conn.Enabled(level) {
			return
		}
		conn.Log(level, strings.TrimSpace(fmt.Sprintf(format, args...)), "component", "derpserver")
	}
}

// warnEvery says a warning at most once per interval while its condition
// lasts, with how many times the condition occurred since it was last
// said: "said once at warning level, and again if it persists".
type warnEvery struct {
	l   *slog.Logger
	lim *logs.Limiter
}

func newWarnEvery(l *slog.Logger, interval time.Duration) *warnEvery {
	return &warnEvery{l: l, lim: logs.NewLimiter(1, interval)}
}

// add counts one occurrence and, if the interval allows, logs msg with
// args and "occurrences": how many there were since the last line.
func (w *warnEvery) add(msg string, args ...any) {
	ok, before := w.lim.Allow(time.Now())
	if !ok {
		return
	}
	w.l.Log(context.Background(), slog.LevelWarn, msg, append(args, "occurrences", before+1)...)
}
