package relay

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"tailscale.com/types/logger"
)

// derpLogf adapts derpserver's printf logging to slog. Its per-connection
// errors ("derp: <addr>: ...", refused clients included) are debug-level
// and every format is rate-limited, so a flood of bad clients cannot fill
// a disk; refusals are logged with their reason by the Admitter.
func derpLogf(l *slog.Logger) logger.Logf {
	base := func(format string, args ...any) {
		level := slog.LevelInfo
		if strings.HasPrefix(format, "derp: %s: ") || strings.Contains(format, "rejected") {
			level = slog.LevelDebug
		}
		l.Log(context.Background(), level, strings.TrimSpace(fmt.Sprintf(format, args...)), "component", "derpserver")
	}
	return logger.RateLimitedFn(base, 30*time.Second, 5, 100)
}
