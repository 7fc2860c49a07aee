package serving

import (
	"slices"
	"sync"

	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/internal/readiness"
)

// Publisher is the running server's serving.json: the one writer of the
// file, which the parts that change what it says (a new certificate pin,
// the readiness) update through it.
type Publisher struct {
	// Path is the file (<state-dir>/serving.json); "" keeps the value in
	// memory only (no writable state directory).
	Path string

	mu        sync.Mutex
	sv        Serving
	unwritten bool // the last write failed: the next call tries again
}

// NewPublisher starts the file at path with sv and writes it.
func NewPublisher(path string, sv Serving) (*Publisher, error) {
	p := &Publisher{Path: path, sv: sv}
	return p, p.writeLocked()
}

func (p *Publisher) writeLocked() error {
	if p.Path == "" {
		return nil
	}
	err := Write(p.Path, &p.sv)
	p.unwritten = err != nil
	return err
}

// Serving returns what the file says now.
func (p *Publisher) Serving() Serving {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sv
}

// SetRegion sets the derpMap region (a new pin) and writes the file.
func (p *Publisher) SetRegion(r *tailcfg.DERPRegion) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.sv.Region = r
	return p.writeLocked()
}

// SetReadiness sets the readiness and writes the file when it changed;
// changed says whether it did. Once a readiness that says draining is
// set, one that does not is stale and ignored.
func (p *Publisher) SetReadiness(r readiness.Readiness) (changed bool, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.sv.Readiness != nil && p.sv.Readiness.Draining && !r.Draining {
		// A process drains once and for good. A readiness that does not
		// say so was computed before the drain began (the periodic
		// publisher racing the shutdown): written, it would tell a
		// readiness probe "ready" again while the listener closes.
		return false, nil
	}
	if p.sv.Readiness != nil && p.sv.Readiness.Equal(&r) && !p.unwritten {
		return false, nil
	}
	// Kept: not shared with the caller, who may reuse r.
	r.Tailnets = slices.Clone(r.Tailnets)
	if r.AdmissionURL != nil {
		u := *r.AdmissionURL
		r.AdmissionURL = &u
	}
	if r.Mesh != nil {
		m := *r.Mesh
		m.Peers = slices.Clone(m.Peers)
		r.Mesh = &m
	}
	p.sv.Readiness = &r
	return true, p.writeLocked()
}

// Remove removes the file if it still describes this process.
func (p *Publisher) Remove() {
	if p.Path != "" {
		Remove(p.Path)
	}
}
