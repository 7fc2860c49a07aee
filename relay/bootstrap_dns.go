package relay

import (
	"context"
	"encoding/json"
	"errors"
	"expvar"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Bootstrap DNS is derper's /bootstrap-dns: a Tailscale client whose own
// DNS fails asks the relays of its (cached) derpMap for a name it needs,
// typically the control server's: GET /bootstrap-dns?q=NAME answers a
// JSON object mapping names to their IP addresses. Clients ask only nodes
// with a literal IPv4 or IPv6 in the derpMap, on port 443, verifying the
// certificate against the public CAs (net/dnsfallback), with a 3 s
// timeout. The relay never resolves on a client's behalf: it answers from
// a cache of the names it was given, refreshed in the background.

// Bootstrap DNS limits: the response is bounded by names × addresses.
const (
	// MaxBootstrapDNSNames is the most names a Server takes, published and
	// unpublished together.
	MaxBootstrapDNSNames = 32
	// maxBootstrapAddrs is the most addresses kept for one name.
	maxBootstrapAddrs = 16
	// DefaultBootstrapDNSRefresh is how often the names are resolved
	// again (derper's interval).
	DefaultBootstrapDNSRefresh = 10 * time.Minute
	// bootstrapLookupTimeout bounds one name's lookup.
	bootstrapLookupTimeout = 10 * time.Second
)

// ValidBootstrapDNSName reports whether name can be served at
// /bootstrap-dns: a DNS name (not an IP address, URL or host:port).
func ValidBootstrapDNSName(name string) bool {
	if _, err := netip.ParseAddr(name); err == nil {
		return false
	}
	return isDNSName(name)
}

// bootstrapDNS is the cache behind /bootstrap-dns.
type bootstrapDNS struct {
	published   []string
	unpublished []string
	resolver    *net.Resolver
	refresh     time.Duration
	logger      *slog.Logger

	answers atomic.Pointer[bootstrapAnswers]

	// failing remembers which names failed their last lookup, so a
	// failure is a warning once, not every refresh.
	failing map[string]bool

	requests, hits, misses expvar.Int
}

// bootstrapAnswers is one refresh's result.
type bootstrapAnswers struct {
	addrs map[string][]netip.Addr // every name, published or not
	list  []byte                  // the JSON of the published names
}

func newBootstrapDNS(s *Server) (*bootstrapDNS, error) {
	b := &bootstrapDNS{
		published:   dedupNames(s.BootstrapDNSNames),
		unpublished: dedupNames(s.UnpublishedBootstrapDNSNames),
		resolver:    s.Resolver,
		refresh:     s.BootstrapDNSRefresh,
		logger:      s.Logger,
		failing:     map[string]bool{},
	}
	if n := len(b.published) + len(b.unpublished); n > MaxBootstrapDNSNames {
		return nil, fmt.Errorf("relay: %d bootstrap DNS names: at most %d", n, MaxBootstrapDNSNames)
	}
	for _, n := range append(slices.Clone(b.published), b.unpublished...) {
		// n lost one final dot to dedupNames: a second one ("a..") is no
		// DNS name either.
		if !ValidBootstrapDNSName(n) || strings.HasSuffix(n, ".") {
			return nil, fmt.Errorf("relay: bootstrap DNS name %q: want a DNS name", n)
		}
	}
	if b.resolver == nil {
		b.resolver = net.DefaultResolver
	}
	if b.refresh <= 0 {
		b.refresh = DefaultBootstrapDNSRefresh
	}
	b.answers.Store(&bootstrapAnswers{list: []byte("{}")})
	return b, nil
}

func dedupNames(names []string) []string {
	var out []string
	for _, n := range names {
		n = strings.ToLower(strings.TrimSuffix(strings.TrimSpace(n), "."))
		if n != "" && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

// run resolves every name now and then every refresh, until ctx ends.
func (b *bootstrapDNS) run(ctx context.Context) {
	if len(b.published)+len(b.unpublished) == 0 {
		return
	}
	t := time.NewTicker(b.refresh)
	defer t.Stop()
	for {
		b.resolveAll(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// resolveAll resolves every name, all at once, each bounded by
// bootstrapLookupTimeout. A name whose lookup fails keeps its last
// answer: for a client whose DNS is broken, a recent address is better
// than none.
func (b *bootstrapDNS) resolveAll(ctx context.Context) {
	names := append(slices.Clone(b.published), b.unpublished...)
	prev := b.answers.Load().addrs
	results := make([][]netip.Addr, len(names))
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, name := range names {
		wg.Go(func() {
			lctx, cancel := context.WithTimeout(ctx, bootstrapLookupTimeout)
			defer cancel()
			results[i], errs[i] = b.resolver.LookupNetIP(lctx, "ip", name)
		})
	}
	wg.Wait()
	if ctx.Err() != nil {
		return
	}
	addrs := map[string][]netip.Addr{}
	for i, name := range names {
		if errs[i] == nil && len(results[i]) == 0 {
			errs[i] = errors.New("no addresses")
		}
		if errs[i] != nil {
			if !b.failing[name] {
				b.logger.Warn("relay: bootstrap DNS: cannot resolve a name; clients asking for it get its last known addresses, if any", "name", name, "err", errs[i])
			}
			b.failing[name] = true
			if old := prev[name]; len(old) > 0 {
				addrs[name] = old
			}
			continue
		}
		if b.failing[name] {
			b.logger.Info("relay: bootstrap DNS: name resolves again", "name", name)
			delete(b.failing, name)
		}
		addrs[name] = cleanAddrs(results[i])
	}
	pub := map[string][]netip.Addr{}
	for _, name := range b.published {
		if a := addrs[name]; len(a) > 0 {
			pub[name] = a
		}
	}
	list, err := json.Marshal(pub)
	if err != nil {
		return // addresses always marshal; keep the old answers if not
	}
	b.answers.Store(&bootstrapAnswers{addrs: addrs, list: list})
}

// cleanAddrs unmaps, deduplicates, bounds and shuffles addrs (derper
// shuffles so clients do not all favour the same address family).
func cleanAddrs(addrs []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range addrs {
		a = a.Unmap()
		if a.IsValid() && !slices.Contains(out, a) && len(out) < maxBootstrapAddrs {
			out = append(out, a)
		}
	}
	rand.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out
}

// ServeHTTP answers /bootstrap-dns: with ?q=NAME, NAME's addresses if it
// is one of the names (published or not); otherwise, as derper does, the
// published names and their addresses ({} when there are none).
func (b *bootstrapDNS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.requests.Add(1)
	w.Header().Set("Content-Type", "application/json")
	// Clients ask a random relay once: keeping the connection is waste.
	w.Header().Set("Connection", "close")
	ans := b.answers.Load()
	if q := r.URL.Query().Get("q"); q != "" {
		q = strings.ToLower(strings.TrimSuffix(q, "."))
		if a := ans.addrs[q]; len(a) > 0 {
			b.hits.Add(1)
			json.NewEncoder(w).Encode(map[string][]netip.Addr{q: a})
			return
		}
		b.misses.Add(1)
	}
	w.Write(ans.list)
}
