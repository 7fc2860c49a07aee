package tailnets

import (
	"cmp"
	"context"
	"log/slog"
	"sync"
	"time"

	"tailscale.com/ipn"

	"github.com/tailderp/tailderp/internal/readiness"
	"github.com/tailderp/tailderp/internal/serving"
	"github.com/tailderp/tailderp/relay"
	"github.com/tailderp/tailderp/verify"
)

// Relay is what the readiness of a running relay is made of.
type Relay struct {
	Tailnets []*Tailnet       // none for an open relay
	Verifier *verify.Verifier // nil without admission
	Server   *relay.Server
	// URLFailOpen: clients are admitted unverified while the admission
	// URL is unreachable.
	URLFailOpen bool
	// Started is when the relay started: mesh peers (Server.MeshWith) are
	// waited for from then, at most readiness.MeshReadyWait. Zero: not
	// waited for.
	Started time.Time

	mu            sync.Mutex
	drainingSince time.Time
	kick          chan struct{} // Publish writes at once
}

// Drain marks the relay as stopping: from now on it is not ready, and
// Publish says so at once.
func (r *Relay) Drain() {
	r.mu.Lock()
	if r.drainingSince.IsZero() {
		r.drainingSince = time.Now()
	}
	kick := r.kickLocked()
	r.mu.Unlock()
	select {
	case kick <- struct{}{}:
	default:
	}
}

func (r *Relay) kickLocked() chan struct{} {
	if r.kick == nil {
		r.kick = make(chan struct{}, 1)
	}
	return r.kick
}

// Readiness is the relay's readiness now, part by part: each tailnet's
// node (its Readiness, with the fix in the settings' words), the
// admission URL as its last calls showed it, the mesh links, the
// certificate, draining.
func (r *Relay) Readiness() readiness.Readiness {
	var out readiness.Readiness
	out.Open = len(r.Tailnets) == 0
	for _, t := range r.Tailnets {
		nr := t.Node.Readiness()
		tr := readiness.Tailnet{
			Name:       t.Name,
			ControlURL: cmp.Or(t.ControlURL, ipn.DefaultControlURL),
			Admits:     readiness.Admits(nr.Admits),
			Problem:    string(nr.Problem),
			Since:      nr.Since.UTC(),
			Netmap:     nr.Netmap.UTC(),
			Until:      nr.Until.UTC(),
		}
		if nr.Problem != "" {
			tr.Fix = t.Advice(nr.Problem)
		}
		out.Tailnets = append(out.Tailnets, tr)
	}
	if r.Verifier != nil && r.Verifier.URL != "" {
		h := r.Verifier.URLHealth()
		out.AdmissionURL = &readiness.URL{Asked: h.Asked, Reachable: h.Reachable, Since: h.Since.UTC(), Err: h.Err,
			FailOpen: r.URLFailOpen || r.Verifier.FailOpen}
	}
	out.Mesh = r.mesh()
	if cs := r.Server.CertStatus(); cs.Serving {
		out.Cert = readiness.Cert{Problem: string(cs.Problem), NotAfter: cs.NotAfter.UTC(), Fix: cs.Fix}
	}
	r.mu.Lock()
	out.Draining, out.DrainingSince = !r.drainingSince.IsZero(), r.drainingSince.UTC()
	r.mu.Unlock()
	return out
}

// mesh is the mesh links' part: nil without peers. A peer that turned
// out to be this relay is left out. "Connected once" is read from the
// link's ServerKey, which relay sets when the link first comes up and
// never clears.
func (r *Relay) mesh() *readiness.Mesh {
	peers := r.Server.MeshPeers()
	if len(peers) == 0 {
		return nil
	}
	m := &readiness.Mesh{Started: r.Started.UTC()}
	for _, p := range peers {
		if p.State == relay.MeshSelf {
			continue
		}
		m.Peers = append(m.Peers, readiness.MeshPeer{
			Peer:          p.Peer.String(),
			Tailnet:       p.Tenant,
			Connected:     p.State == relay.MeshConnected,
			ConnectedOnce: !p.ServerKey.IsZero(),
			Since:         p.Since.UTC(),
			Err:           p.LastError,
		})
	}
	if len(m.Peers) == 0 {
		return nil // its only peer is itself
	}
	return m
}

// PublishEvery is how often the relay's readiness is looked at and, when
// it changed, written to serving.json.
const PublishEvery = time.Second

// Publish keeps the readiness in serving.json (p) up to date until ctx
// ends: every PublishEvery, and at once when Drain is called. A write
// that fails is said once (and again when it recovers); the server goes
// on.
func (r *Relay) Publish(ctx context.Context, p *serving.Publisher, logger *slog.Logger) {
	r.mu.Lock()
	kick := r.kickLocked()
	r.mu.Unlock()
	t := time.NewTicker(PublishEvery)
	defer t.Stop()
	failing := false
	for {
		changed, err := p.SetReadiness(r.Readiness())
		switch {
		case err != nil && !failing:
			logger.Warn("cannot update serving.json: `tailderp check -local` sees an old readiness", "err", err)
		case err == nil && changed && failing:
			logger.Info("serving.json updated again")
		}
		failing = err != nil
		select {
		case <-ctx.Done():
			return
		case <-kick:
		case <-t.C:
		}
	}
}
