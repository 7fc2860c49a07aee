package relay

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"time"

	"tailscale.com/tailcfg"
)

// DERPMapPath is where the relay publishes its own region on the HTTPS
// port, as a tailcfg.DERPMap: what Headscale's derp.urls fetch, and what
// `tailderp derpmap` prints inside "derpMap".
const DERPMapPath = "/derpmap.json"

// derpMapDoc is the published region: the JSON body, made once per
// change, and its ETag, so a poller costs a header compare.
type derpMapDoc struct {
	mu       sync.RWMutex
	body     []byte // nil until the first Publish
	etag     string
	modified time.Time
}

// DERPMapOf is the derpMap that holds region r alone: the object
// Headscale merges by region ID.
func DERPMapOf(r *tailcfg.DERPRegion) *tailcfg.DERPMap {
	return &tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{r.RegionID: r}}
}

// publish replaces the document; an unchanged region keeps its ETag and
// modification time, so pollers see no change.
func (d *derpMapDoc) publish(r *tailcfg.DERPRegion) error {
	b, err := json.MarshalIndent(DERPMapOf(r), "", "  ")
	if err != nil {
		return fmt.Errorf("relay: derpMap: %w", err)
	}
	b = append(b, '\n')
	etag := fmt.Sprintf(`"%x"`, sha256.Sum256(b))
	d.mu.Lock()
	defer d.mu.Unlock()
	if etag == d.etag {
		return nil
	}
	d.body, d.etag, d.modified = b, etag, time.Now().UTC().Truncate(time.Second)
	return nil
}

// ServeHTTP answers GET and HEAD with the current document; 503 before
// the first Publish (the relay knows its bound ports only once started).
func (d *derpMapDoc) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
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

// PublishRegion sets the region the relay serves at DERPMapPath (the
// caller builds it: this relay's node, or the whole fleet's). It may be
// called at any time, before or after Start; a region equal to the one
// published changes nothing a poller sees.
func (s *Server) PublishRegion(r *tailcfg.DERPRegion) error {
	return s.derpMap.publish(r)
}
