package testutil

import (
	"context"
	"log/slog"
	"strings"
	"sync"
)

// LogRecorder is a slog.Handler that keeps every record, at every level,
// for a test to look at: slog.New(&LogRecorder{}) is a logger for the code
// under test. Attributes and groups given to WithAttrs and WithGroup are
// dropped; only a record's own attributes are kept. It is safe for
// concurrent use. The zero value is ready to use.
type LogRecorder struct {
	mu   sync.Mutex
	recs []slog.Record
}

// Enabled reports true: every level is recorded.
func (r *LogRecorder) Enabled(context.Context, slog.Level) bool { return true }

// Handle keeps a copy of rec.
func (r *LogRecorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.recs = append(r.recs, rec.Clone())
	return nil
}

// WithAttrs returns r itself: the attributes are dropped.
func (r *LogRecorder) WithAttrs([]slog.Attr) slog.Handler { return r }

// WithGroup returns r itself: the group is dropped.
func (r *LogRecorder) WithGroup(string) slog.Handler { return r }

// Take returns the records since the last Take (or ever), as "LEVEL
// message key=value…" lines, and forgets them.
func (r *LogRecorder) Take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, rec := range r.recs {
		var b strings.Builder
		b.WriteString(rec.Level.String() + " " + rec.Message)
		rec.Attrs(func(a slog.Attr) bool {
			b.WriteString(" " + a.Key + "=" + a.Value.String())
			return true
		})
		out = append(out, b.String())
	}
	r.recs = nil
	return out
}

// Count returns how many of the records since the last Take (or ever) are
// at exactly level and have a message (not counting attributes)
// containing substr.
func (r *LogRecorder) Count(level slog.Level, substr string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, rec := range r.recs {
		if rec.Level == level && strings.Contains(rec.Message, substr) {
			n++
		}
	}
	return n
}
