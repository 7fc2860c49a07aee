package policy

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"reflect"
	"time"

	"tailscale.com/tailcfg"
)

// Keeper defaults.
const (
	DefaultKeepSettle     = 5 * time.Second
	DefaultKeepBackoff    = 30 * time.Second
	DefaultKeepMaxBackoff = 30 * time.Minute
	DefaultKeepResync     = time.Hour
)

// Keeper keeps a region written in the policy file while a relay runs: it
// writes the latest region it is given at start and after every change,
// and again every Resync (someone may have edited it out by hand). A
// burst of changes (a fleet's peers heard of one after another) makes one
// write. An API error never stops it: it waits (Backoff, doubling up to
// MaxBackoff, with jitter) and tries again, with a warning each time.
//
// Its fields may be changed until Run is called.
type Keeper struct {
	// Client writes the file; required.
	Client *Client
	// Logger gets one INFO line per write and one WARN line per failed
	// attempt; default slog.Default(). Nothing is logged when the file
	// already holds the region.
	Logger *slog.Logger
	// Advice, when set, says how to fix an error in the program's terms
	// (which setting to change); it goes in the warning beside the error.
	Advice func(error) string
	// Settle is how long a change waits for more before it is written;
	// default DefaultKeepSettle.
	Settle time.Duration
	// Backoff is the wait after a first failure, doubled at each next one
	// up to MaxBackoff; defaults DefaultKeepBackoff, DefaultKeepMaxBackoff.
	Backoff, MaxBackoff time.Duration
	// Resync is how often the region is written again without a change;
	// default DefaultKeepResync, negative for never.
	Resync time.Duration
}

// Keep runs a Keeper with the defaults: see Keeper.Run.
func Keep(ctx context.Context, c *Client, regions <-chan *tailcfg.DERPRegion, logger *slog.Logger) {
	(&Keeper{Client: c, Logger: logger}).Run(ctx, regions)
}

// timer purposes: what Run does when its timer fires.
const (
	idle   = iota // not armed
	settle        // a change is waiting for more
	retry         // a failed write is to be tried again
	resync        // a written region is to be checked again
)

// Run writes the regions received on regions (the latest of a burst) until
// ctx ends. A closed channel keeps the last region (still written again at
// Resync and after failures). Nil regions and regions without nodes are
// ignored.
func (k *Keeper) Run(ctx context.Context, regions <-chan *tailcfg.DERPRegion) {
	logger := k.Logger
	if logger == nil {
		logger = slog.Default()
	}
	var want, written *tailcfg.DERPRegion
	failures := 0
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	state := idle
	arm := func(s int, d time.Duration) {
		timer.Reset(d)
		state = s
	}
	for {
		select {
		case <-ctx.Done():
			return
		case r, ok := <-regions:
			if !ok {
				regions = nil // a nil channel is never ready: keep the last region
				continue
			}
			if r == nil || len(r.Nodes) == 0 {
				continue
			}
			want = r
			// While a change settles, it takes this one too; while a
			// failure backs off, the retry writes the latest.
			if (state == idle || state == resync) && !reflect.DeepEqual(r, written) {
				arm(settle, orDefault(k.Settle, DefaultKeepSettle))
			}
		case <-timer.C:
			state = idle
			if want == nil {
				continue
			}
			res, err := k.Client.Apply(ctx, SetRegion(want), false)
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				failures++
				wait := k.backoff(failures)
				args := []any{"err", err.Error()}
				if k.Advice != nil {
					if fix := k.Advice(err); fix != "" {
						args = append(args, "fix", fix)
					}
				}
				args = append(args, "failures", failures, "retry_in", roundWait(wait).String())
				logger.Warn(fmt.Sprintf("policy file: region %d not written; trying again later", want.RegionID), args...)
				arm(retry, wait)
				continue
			}
			failures = 0
			written = want
			if res.Written {
				args := []any{"tailnet", k.Client.tailnet(), "attempts", res.Attempts}
				if len(res.Warnings) > 0 {
					args = append(args, "warnings", res.Warnings)
				}
				logger.Info(fmt.Sprintf("policy file: region %d written, %d %s", want.RegionID, len(want.Nodes), plural(len(want.Nodes), "node", "nodes")), args...)
			}
			if d := orDefault(k.Resync, DefaultKeepResync); d > 0 {
				arm(resync, d)
			}
		}
	}
}

// backoff is the wait after the n-th failure in a row: Backoff doubled
// n-1 times, at most MaxBackoff, ±20% so a fleet's relays do not retry in
// step.
func (k *Keeper) backoff(n int) time.Duration {
	base, max := orDefault(k.Backoff, DefaultKeepBackoff), orDefault(k.MaxBackoff, DefaultKeepMaxBackoff)
	d := base
	for i := 1; i < n && d < max; i++ {
		d *= 2
	}
	d = min(d, max)
	return time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
}

// roundWait rounds a wait for a log line: to the second, or to the
// millisecond below one.
func roundWait(d time.Duration) time.Duration {
	if d >= time.Second {
		return d.Round(time.Second)
	}
	return d.Round(time.Millisecond)
}

func orDefault(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
