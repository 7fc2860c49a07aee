package relay

import (
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// DERPMapPath is where the relay publishes its own region on the HTTPS
// port, as a tailcfg.DERPMap: what Headscale's derp.urls fetch, and what
// `tailderp derpmap` prints inside "derpMap".
const DERPMapPath = "/derpmap.json"

// derpMapDoc is the published region: the JSON body, made once per
// change, and its ETag, so a poller costs a header compare. In a fleet it
// also holds the peers' nodes heard of (fleet.go).
type derpMapDoc struct {
	mu       sync.RWMutex
	own      *tailcfg.DERPRegion  // PublishRegion's; nil until then
	peers    map[string]heardNode // by nodeID; zero time: listed statically
	ttl      time.Duration        // how long a peer's node is kept
	order    []string             // node IDs in the fleet's order
	meshKey  key.DERPMesh         // signs and checks fleet nodes; zero: no fleet
	body     []byte               // nil until the first Publish
	etag     string
	modified time.Time
	logf     func(msg string, args ...any)
	region   *tailcfg.DERPRegion // as body has it
	changed  chan struct{}       // closed when body changes (derpmap_watch.go)
}

// DERPMapOf is the derpMap that holds region r alone: the object
// Headscale merges by region ID.
func DERPMapOf(r *tailcfg.DERPRegion) *tailcfg.DERPMap {
	return &tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{r.RegionID: r}}
}

// publish sets this relay's own region and remakes the document.
func (d *derpMapDoc) publish(r *tailcfg.DERPRegion) error {
	if r == nil || len(r.Nodes) == 0 {
		return errors.New("relay: derpMap: a region with no node")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.own = r
	return d.remakeLocked(time.Now())
}

// remakeLocked renders the region (with the peers heard of) as the
// document; an unchanged region keeps its ETag and modification time, so
// pollers see no change.
func (d *derpMapDoc) remakeLocked(now time.Time) error {
	if d.own == nil {
		return nil
	}
	r := d.own
	if !d.meshKey.IsZero() {
		r = fleetRegion(d.own, d.peers, d.order, now, d.ttl)
	}
	b, err := json.MarshalIndent(DERPMapOf(r), "", "  ")
	if err != nil {
		return fmt.Errorf("relay: derpMap: %w", err)
	}
	b = append(b, '\n')
	etag := fmt.Sprintf(`"%x"`, sha256.Sum256(b))
	if etag == d.etag {
		return nil
	}
	d.body, d.etag, d.modified = b, etag, now.UTC().Truncate(time.Second)
	d.region = r
	d.notifyLocked()
	return nil
}

// configure sets what a fleet needs, at Start: the mesh key (zero: no
// fleet), how long peers are kept, where joins and leaves are said.
func (d *derpMapDoc) configure(mk key.DERPMesh, ttl time.Duration, logf func(msg string, args ...any)) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.meshKey, d.ttl, d.logf = mk, ttl, logf
	d.remakeLocked(time.Now())
}

// ownNode is this relay's node (the first of its own region), nil before
// PublishRegion.
func (d *derpMapDoc) ownNode() *tailcfg.DERPNode {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.own == nil {
		return nil
	}
	n := *d.own.Nodes[0]
	return &n
}

// heard records a peer's node, heard of at (zero: listed statically, for
// good), and remakes the document when it changed.
func (d *derpMapDoc) heard(n *tailcfg.DERPNode, at time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	id := nodeID(n)
	if d.own != nil {
		for _, o := range d.own.Nodes {
			if nodeID(o) == id {
				return // this relay itself, reached under its own name
			}
		}
	}
	if d.peers == nil {
		d.peers = map[string]heardNode{}
	}
	if _, had := d.peers[id]; !had && d.logf != nil {
		d.logf("relay: fleet: a relay joined the region", "node", id)
	}
	d.peers[id] = heardNode{node: n, at: at}
	d.remakeLocked(time.Now())
}

// expire drops the peers not heard of within the TTL.
func (d *derpMapDoc) expire(now time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	changed := false
	for id, h := range d.peers {
		if !h.at.IsZero() && now.Sub(h.at) >= d.ttl {
			delete(d.peers, id)
			changed = true
			if d.logf != nil {
				d.logf("relay: fleet: a relay left the region (not heard of)", "node", id, "for", now.Sub(h.at).Round(time.Second).String())
			}
		}
	}
	if changed {
		d.remakeLocked(now)
	}
}

// ServeHTTP answers GET and HEAD with the current document; 503 before
// the first Publish (the relay knows its bound ports only once started).
func (d *derpMapDoc) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	// A fleet peer's signed node: added to the region, and answered with
	// this relay's own. Anything else about the header is ignored: the
	// document is public.
	if v := r.Header.Get(FleetNodeHeader); v != "" && !d.meshKey.IsZero() {
		if own := d.ownNode(); own != nil {
			if n, err := verifyNode(d.meshKey, v, own.RegionID, time.Now()); err == nil {
				d.heard(n, time.Now())
				if signed, err := signNode(d.meshKey, own, time.Now()); err == nil {
					w.Header().Set(FleetNodeHeader, signed)
				}
			}
		}
	}
	d.mu.RLock()
	body, etag, modified := d.body, d.etag, d.modified
	d.mu.RUnlock()
	if body == nil {
		w.Header().Set("Retry-After", "1")
		http.Error(w, "the relay's region is not known yet", http.StatusServiceUnavailable)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	// Pollers revalidate every time: a changed pin must reach them at once.
	h.Set("Cache-Control", "no-cache")
	h.Set("ETag", etag)
	h.Set("Last-Modified", modified.Format(http.TimeFormat))
	// Only the ETag answers 304: Last-Modified has whole seconds, and
	// two changes within one second must not look like none.
	if inm := r.Header.Get("If-None-Match"); inm == etag || inm == "*" {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	h.Set("Content-Length", strconv.Itoa(len(body)))
	if r.Method == http.MethodHead {
		return
	}
	w.Write(body)
}

// SetFleetOrder sets the order of the fleet's nodes in the published
// region: FleetOrder of the region `tailderp derpmap` prints, so that the
// region published equals it once every relay is heard of (nodes not in
// it come after, sorted).
func (s *Server) SetFleetOrder(order []string) {
	d := &s.derpMap
	d.mu.Lock()
	defer d.mu.Unlock()
	d.order = slices.Clone(order)
	d.remakeLocked(time.Now())
}

// PublishRegion sets this relay's own region, served at DERPMapPath: its
// node as the operator configured it (DERPRegion). With MeshWith the
// relay adds the nodes of the fleet it hears of (fleet.go). It may be
// called at any time, before or after Start; a region equal to the one
// published changes nothing a poller sees.
func (s *Server) PublishRegion(r *tailcfg.DERPRegion) error {
	return s.derpMap.publish(r)
}
