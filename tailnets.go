package main

import (
	"context"
	"log/slog"
	"sync"

	"github.com/tailderp/tailderp/internal/config"
	"github.com/tailderp/tailderp/node"
	"github.com/tailderp/tailderp/verify"
)

// tailnet is a tailnet the relay serves, running: its node, and what
// stopped it if it stopped.
type tailnet struct {
	config.Tailnet
	node *node.Node

	mu      sync.Mutex
	failure error // the node stopped for good (login rejected)
}

// failed returns what stopped the tailnet's node, or nil.
func (t *tailnet) failed() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.failure
}

// newTailnets makes the nodes of every tailnet cfg names, each reporting
// its drops to v for revocation. logger is tagged with the tailnet's name
// when there are several.
func newTailnets(cfg *config.Config, v *verify.Verifier, logger *slog.Logger) []*tailnet {
	tcs := cfg.Tailnets()
	var out []*tailnet
	for _, tc := range tcs {
		l := logger
		if len(tcs) > 1 {
			l = logger.With("tailnet", tc.Name)
		}
		t := &tailnet{Tailnet: tc}
		t.node = &node.Node{
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
		v.Tailnets = append(v.Tailnets, verify.Tailnet{Name: tc.Name, Keys: t.node})
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

// watchFatal waits for the tailnet's node to stop for good (its login
// rejected) and keeps the reason for the status pages; the relay and the
// other tailnets go on.
func (t *tailnet) watchFatal(ctx context.Context, logger *slog.Logger) {
	select {
	case <-ctx.Done():
	case err := <-t.node.Fatal():
		t.mu.Lock()
		t.failure = err
		t.mu.Unlock()
		logger.Error("tailnet stopped: its clients are refused; the relay and the other tailnets go on",
			"tailnet", t.Name, "err", err, "fix", t.Advice(node.ProblemLoginRejected))
	}
}
