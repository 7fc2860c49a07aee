package testutil

import (
	"bytes"
	"regexp"
	"strings"
	"sync"
	"time"
)

// pollInterval is how often the Wait methods look at a Buffer again.
const pollInterval = 20 * time.Millisecond

// Buffer is a bytes.Buffer safe for concurrent use: a logger, a program
// under test or a child process writes to it from its own goroutines while
// the test reads it. The zero value is an empty buffer.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// Write appends p.
func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

// Take returns everything written since the last Take (or ever), and
// empties the buffer.
func (b *Buffer) Take() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := b.b.String()
	b.b.Reset()
	return out
}

// String returns everything written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// Lines returns the lines of out that contain every one of substrs (with
// no substrs, every line), in order and without their "\n".
func Lines(out string, substrs ...string) []string {
	var lines []string
	for l := range strings.Lines(out) {
		ok := true
		for _, sub := range substrs {
			ok = ok && strings.Contains(l, sub)
		}
		if ok {
			lines = append(lines, strings.TrimSuffix(l, "\n"))
		}
	}
	return lines
}

// WaitFor reports whether the buffer holds s within timeout.
func (b *Buffer) WaitFor(s string, timeout time.Duration) bool {
	return b.wait(timeout, nil, func(out string) bool { return strings.Contains(out, s) })
}

// WaitCount reports whether the buffer holds s at least n times within
// timeout.
func (b *Buffer) WaitCount(s string, n int, timeout time.Duration) bool {
	return b.wait(timeout, nil, func(out string) bool { return strings.Count(out, s) >= n })
}

// WaitMatch waits until re matches what the buffer holds and returns the
// match and its submatches (as [regexp.Regexp.FindStringSubmatch]). It
// returns nil if timeout passes first, or once stop is closed (nil: never)
// and the buffer still does not match: stop says the writer is gone, so
// the buffer holds all it ever will.
func (b *Buffer) WaitMatch(re *regexp.Regexp, timeout time.Duration, stop <-chan struct{}) []string {
	var m []string
	b.wait(timeout, stop, func(out string) bool {
		m = re.FindStringSubmatch(out)
		return m != nil
	})
	return m
}

// wait polls the buffer until ok accepts its contents (true), timeout
// passes or stop is closed (false, unless ok accepts what the buffer holds
// then).
func (b *Buffer) wait(timeout time.Duration, stop <-chan struct{}, ok func(string) bool) bool {
	return Poll(timeout, pollInterval, stop, func() bool { return ok(b.String()) })
}

// Poll calls cond every interval until it returns true, and reports
// whether it did within timeout. Once stop is closed (nil: never) it calls
// cond a last time and returns what it says: stop says that what cond
// waits for can no longer come (the process that would make it true has
// exited, for example). Poll calls cond on the caller's goroutine, so cond
// may fail the test.
func Poll(timeout, interval time.Duration, stop <-chan struct{}, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		select {
		case <-stop:
			return cond()
		case <-time.After(interval):
		}
	}
	return true
}
