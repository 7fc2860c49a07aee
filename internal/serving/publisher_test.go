package serving

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/internal/readiness"
)

func readFile(t *testing.T, path string) Serving {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var s Serving
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatal(err)
	}
	return s
}

// TestPublisher: the file says what the publisher holds; an unchanged
// readiness is not written again; a failed write is tried again at the
// next call even when nothing changed.
func TestPublisher(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "serving.json")
	region := &tailcfg.DERPRegion{RegionID: 900, Nodes: []*tailcfg.DERPNode{{Name: "900a", HostName: "127.0.0.1"}}}
	p, err := NewPublisher(path, Serving{PID: os.Getpid(), HTTPSAddr: "127.0.0.1:1", Region: region})
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("serving.json: %v, mode %v; want 0600", err, fi.Mode().Perm())
	}
	r := readiness.Readiness{Tailnets: []readiness.Tailnet{{Name: "default", Admits: readiness.AdmitsNobody, Problem: "starting", Since: time.Now().UTC().Truncate(time.Second)}}}
	if changed, err := p.SetReadiness(r); err != nil || !changed {
		t.Fatalf("first readiness: changed %v, %v", changed, err)
	}
	if got := readFile(t, path); got.Readiness == nil || !got.Readiness.Equal(&r) {
		t.Fatalf("file says %+v, want %+v", got.Readiness, r)
	}
	if changed, _ := p.SetReadiness(r); changed {
		t.Fatal("the same readiness was written again")
	}

	// A write that fails (the directory is gone) is tried again.
	os.RemoveAll(dir)
	r.Tailnets[0].Admits = readiness.AdmitsMembers
	if _, err := p.SetReadiness(r); err == nil {
		t.Fatal("a write into a removed directory did not fail")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if changed, err := p.SetReadiness(r); err != nil || !changed {
		t.Fatalf("after the directory came back: changed %v, %v; want the file written again", changed, err)
	}
	if got := readFile(t, path); got.Readiness.Tailnets[0].Admits != readiness.AdmitsMembers || got.Region.Nodes[0].HostName != "127.0.0.1" {
		t.Fatalf("file says %+v", got)
	}

	// A new pin keeps the readiness.
	pinned := &tailcfg.DERPRegion{RegionID: 900, Nodes: []*tailcfg.DERPNode{{Name: "900a", HostName: "127.0.0.1", CertName: "sha256-raw:00"}}}
	if err := p.SetRegion(pinned); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, path); got.Region.Nodes[0].CertName != "sha256-raw:00" || got.Readiness == nil {
		t.Fatalf("after SetRegion: %+v", got)
	}
	p.Remove()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("Remove left the file: %v", err)
	}
}

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
