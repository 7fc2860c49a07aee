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
