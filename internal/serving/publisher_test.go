package serving

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/internal/readiness"
)

// TestDrainingIsNotUndone: the server's periodic publisher computes the
// readiness, then writes it; a shutdown that sets draining in between
// must not be overwritten by that older value, or serving.json says
// ready again while the listener closes (a readiness probe would keep
// the relay in the load balancer to the end).
func TestDrainingIsNotUndone(t *testing.T) {
	path := filepath.Join(t.TempDir(), "serving.json")
	sv := Serving{PID: os.Getpid(), HTTPSAddr: "127.0.0.1:443", Region: &tailcfg.DERPRegion{RegionID: 900, Nodes: []*tailcfg.DERPNode{{Name: "900a"}}}}
	p, err := NewPublisher(path, sv)
	if err != nil {
		t.Fatal(err)
	}
	stale := readiness.Readiness{Open: true} // computed before the drain
	draining := readiness.Readiness{Open: true, Draining: true, DrainingSince: time.Now().UTC()}
	if changed, err := p.SetReadiness(draining); err != nil || !changed {
		t.Fatalf("SetReadiness(draining) = %v, %v; want written", changed, err)
	}
	if changed, err := p.SetReadiness(stale); err != nil || changed {
		t.Fatalf("SetReadiness(stale, not draining) = %v, %v; want ignored", changed, err)
	}
	got, err := Read(path)
	if err != nil {
		t.Fatal(err)
	}
	if got.Readiness == nil || !got.Readiness.Draining {
		t.Fatalf("serving.json's readiness after a stale update: %+v, want draining", got.Readiness)
	}
	// Before any drain, readiness still changes both ways.
	q, err := NewPublisher(filepath.Join(t.TempDir(), "serving.json"), sv)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []readiness.Readiness{{Open: true}, {Open: false}, {Open: true}} {
		if changed, err := q.SetReadiness(r); err != nil || !changed {
			t.Fatalf("SetReadiness(%+v) = %v, %v; want written", r, changed, err)
		}
	}
}
