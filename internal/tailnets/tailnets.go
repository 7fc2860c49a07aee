// Package tailnets runs the tailnets a relay serves: each one's embedded
// node (New), what stopped it (Failed), and the /debug pages and status
// page each tailnet gets on its own address (Debug).
package tailnets

import (
	"context"
	"log/slog"
	"sync"

	"github.com/tailderp/tailderp/internal/config"
	"github.com/tailderp/tailderp/node"
	"github.com/tailderp/tailderp/verify"
)

// Tailnet is a tailnet the relay serves, running: its node, and what
// stopped it if it stopped.
type Tailnet struct {
	config.Tailnet
	Node *node.Node // the tailnet's embedded node

	mu      sync.Mutex
	failure error // the node stopped for good (login rejected)
}

// Failed returns what stopped the tailnet's node, or nil.
func (t *Tailnet) Failed() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.failure
}

// New makes the nodes of every tailnet cfg names, each reporting
// its drops to v for revocation. logger is tagged with the tailnet's name
// when there are several.
func New(cfg *config.Config, v *verify.Verifier, logger *slog.Logger) []*Tailnet {
	tcs := cfg.Tailnets()
	var out []*Tailnet
	for _, tc := range tcs {
		l := logger
		if len(tcs) > 1 {
			l = logger.With("tailnet", tc.Name)
		}
		t := &Tailnet{Tailnet: tc}
		t.Node = &node.Node{
			Dir:           tc.Dir,
			Hostname:      tc.Hostname,
			AuthKey:       tc.AuthKey,
			ControlURL:    tc.ControlURL,
			AdvertiseTags: tc.Tags,
			Port:          uint16(tc.Port),
			CacheMaxAge:   cfg.VerifyClientsCacheMaxAge,
			Logger:        l,
			Advice:        func(p node.Problem) string { return tc.Advice(p) },
			OnDrop:        revokeDropped(v, tc.Name),
		}
		v.Tailnets = append(v.Tailnets, verify.Tailnet{Name: tc.Name, Keys: t.Node})
		out = append(out, t)
	}
	return out
}

// revokeDropped returns a node's OnDrop: each key the tailnet dropped has
// its connections closed (unless another tailnet still admits it).
func revokeDropped(v *verify.Verifier, tailnet string) func([]node.Drop) {
	return func(drops []node.Drop) {
		for _, d := range drops {
			v.Revoke(verify.Revocation{Key: d.Key, Name: d.Name, Tailnet: tailnet, Reason: string(d.Reason)})
		}
	}
}

// WatchFatal waits for the tailnet's node to stop for good (its login
// rejected) and keeps the reason for the status pages; the relay and the
// other tailnets go on.
func (t *Tailnet) WatchFatal(ctx context.Context, logger *slog.Logger) {
	select {
	case <-ctx.Done():
	case err := <-t.Node.Fatal():
		t.mu.Lock()
		t.failure = err
		t.mu.Unlock()
		logger.Error("tailnet stopped: its clients are refused; the relay and the other tailnets go on",
			"tailnet", t.Name, "err", err, "fix", t.Advice(node.ProblemLoginRejected))
	}
}
