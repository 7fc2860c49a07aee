package relay

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"tailscale.com/derp/derpserver"

	"github.com/tailderp/tailderp/internal/logs"
)

// RateConfig is derpserver's per-client rate limit, in bytes of DERP
// frames a client sends, as derper's -rate-config file holds it:
//
//	{"PerClientRateLimitBytesPerSec": 1000000, "PerClientRateBurstBytes": 2000000}
//
// A client sending faster is slowed by reading its connection slower (TCP
// backpressure: nothing is dropped). Zero PerClientRateLimitBytesPerSec
// means no limit; a burst below one DERP packet (64 KiB and a bit) is
// raised to it. Mesh peers are never limited.
type RateConfig = derpserver.RateConfig

// LoadRateConfig reads a RateConfig from a JSON file. Unlike derpserver's
// loader it refuses unknown fields and trailing data: a misspelled field
// would otherwise mean "no limit".
func LoadRateConfig(path string) (RateConfig, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return RateConfig{}, fmt.Errorf("relay: rate config: %w", err)
	}
	return parseRateConfig(b)
}

func parseRateConfig(b []byte) (RateConfig, error) {
	var rc RateConfig
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rc); err != nil {
		return RateConfig{}, fmt.Errorf("relay: rate config: %w (want {\"PerClientRateLimitBytesPerSec\": N, \"PerClientRateBurstBytes\": N})", err)
	}
	// Nothing but space may follow the object. (dec.More is not the
	// test: it is false before a stray "}" or "]", which derper's
	// json.Unmarshal refuses.)
	if _, err := dec.Token(); err != io.EOF {
		return RateConfig{}, errors.New("relay: rate config: more after the JSON object (want one object)")
	}
	return rc, nil
}

// SetRateLimits applies rc to every client, those connected now included,
// and returns the limits as applied (the burst may be raised). Call it
// after Start.
func (s *Server) SetRateLimits(rc RateConfig) RateConfig {
	var applied RateConfig
	for _, t := range s.tenants {
		applied = t.derp.UpdateRateLimits(rc) // the same for each
	}
	return applied
}

// DefaultRatePoll is how often a RateConfigFile looks at its file.
const DefaultRatePoll = 5 * time.Second

// RateConfigFile keeps a relay's per-client rate limits in step with a
// JSON file (see RateConfig): it applies the file at start, then reads it
// again every Poll, and when Reload is called (on SIGHUP), and applies
// each new version. A version that does not load is logged once, at
// warning level, and the limits in force stay.
//
// Make one with WatchRateConfig; Close stops it.
type RateConfigFile struct {
	path   string
	srv    *Server
	logger *slog.Logger

	mu      sync.Mutex
	seen    []byte     // the content last read, applied or not
	applied RateConfig // what is in force

	stop chan struct{}
	done chan struct{}
}

// WatchRateConfig applies the rate config at path to s (started) and
// watches the file every poll (0: DefaultRatePoll). A file that does not
// load at start is an error.
func WatchRateConfig(s *Server, path string, poll time.Duration, logger *slog.Logger) (*RateConfigFile, error) {
	if logger == nil {
		logger = logs.Discard()
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("relay: rate config: %w", err)
	}
	rc, err := parseRateConfig(b)
	if err != nil {
		return nil, fmt.Errorf("%w in %s", err, path)
	}
	w := &RateConfigFile{path: path, srv: s, logger: logger, seen: b, stop: make(chan struct{}), done: make(chan struct{})}
	w.applied = s.SetRateLimits(rc)
	w.logApplied("relay: rate limits applied", w.applied)
	go w.poll(orDefault(poll, DefaultRatePoll))
	return w, nil
}

func (w *RateConfigFile) logApplied(msg string, rc RateConfig) {
	if rc.PerClientRateLimitBytesPerSec == 0 {
		w.logger.Info(msg, "path", w.path, "per_client_bytes_per_sec", "unlimited")
		return
	}
	w.logger.Info(msg, "path", w.path, "per_client_bytes_per_sec", rc.PerClientRateLimitBytesPerSec,
		"per_client_burst_bytes", rc.PerClientRateBurstBytes)
}

// Applied returns the limits in force.
func (w *RateConfigFile) Applied() RateConfig {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.applied
}

func (w *RateConfigFile) poll(every time.Duration) {
	defer close(w.done)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-w.stop:
			return
		case <-t.C:
			w.check(false)
		}
	}
}

// Reload reads the file now and applies it if it changed. It reports
// whether new limits were applied, or why the file does not load (also
// when that version was reported before: the caller asked).
func (w *RateConfigFile) Reload() (changed bool, err error) { return w.check(true) }

// check reads the file and applies a new version. A version already seen
// is not applied or reported again unless force.
func (w *RateConfigFile) check(force bool) (changed bool, err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	b, err := os.ReadFile(w.path)
	if err != nil {
		// A missing file is reported once per disappearance, like a bad
		// version: nil content stands for it.
		if w.seen != nil || force {
			w.seen = nil
			w.warn(err)
		}
		return false, fmt.Errorf("relay: rate config: %w", err)
	}
	if bytes.Equal(b, w.seen) && !force {
		return false, nil
	}
	isNew := !bytes.Equal(b, w.seen)
	w.seen = b
	rc, err := parseRateConfig(b)
	if err != nil {
		if isNew || force {
			w.warn(err)
		}
		return false, fmt.Errorf("%w in %s", err, w.path)
	}
	if rc == w.applied || (rc.PerClientRateLimitBytesPerSec == 0 && w.applied.PerClientRateLimitBytesPerSec == 0) {
		return false, nil
	}
	w.applied = w.srv.SetRateLimits(rc)
	w.logApplied("relay: rate limits changed: applied to every client, those connected too", w.applied)
	return true, nil
}

// warn says that the file does not load; w.mu is held.
func (w *RateConfigFile) warn(err error) {
	keep := "unlimited"
	if w.applied.PerClientRateLimitBytesPerSec != 0 {
		keep = fmt.Sprintf("%d bytes/s per client, burst %d", w.applied.PerClientRateLimitBytesPerSec, w.applied.PerClientRateBurstBytes)
	}
	w.logger.Warn("relay: rate config does not load; the limits in force stay", "path", w.path, "err", err, "in_force", keep)
}

// Close stops watching the file; the limits in force stay.
func (w *RateConfigFile) Close() {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	<-w.done
}
