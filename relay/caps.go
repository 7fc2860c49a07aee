package relay

import (
	"cmp"
	"context"
	"expvar"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tailderp/tailderp/internal/logs"
)

// Caps per address. The global limits (limits.go) bound the relay as a
// whole, so one address could still take all of it: a NAT of a thousand
// laptops, or one host opening connections until the file descriptors run
// out. MaxConnsPerIP bounds the HTTPS connections open at once from one
// client address: an IPv4 address, or an IPv6 prefix (a /64 by default:
// one host is given a whole /64 and can pick any address in it). The
// client address is the PROXY header's when one applies (proxyproto.go).
//
// A connection over the cap is refused before its TLS handshake: at
// Accept, or, from a PROXY protocol source, right after its header. It is
// counted (counter_rejected_connections_per_ip) and said in a warning at
// most once per capWarnEvery, naming the sources refused most since the
// last warning.
//
// Mesh peers are exempt, but a mesh peer is only known for sure after the
// DERP handshake, when it presents the mesh key, long after the cap was
// applied. So the exemption is by address: connections from the addresses
// the relay dials its MeshWith peers at (MeshPeer.DialIP, an IP Host, or
// Host resolved every capResolveEvery) are never counted nor refused. Its
// limit: a peer that connects to us from another address than the one we
// dial it at (a NAT, a second interface, a name resolving elsewhere) is
// counted like any client. One connection per peer, against a cap meant
// for tens, is what it then costs; and an outsider sharing a peer's
// address is exempt too.
const (
	// DefaultMaxConnsPerIPv6Prefix groups IPv6 clients by /64.
	DefaultMaxConnsPerIPv6Prefix = 64
	// capWarnEvery is how often refusals by the cap are said at most.
	capWarnEvery = time.Minute
	// capWarnTop is how many sources the warning names.
	capWarnTop = 5
	// capRefusedSources bounds the sources whose refusals are counted
	// between two warnings; beyond it they count as "others".
	capRefusedSources = 1024
	// capResolveEvery is how often the names of MeshWith peers are
	// resolved for the exemption.
	capResolveEvery = 5 * time.Minute
)

// SourceConns is one client source and how many HTTPS connections it has
// open: Source is an IPv4 address as a /32, or an IPv6 prefix of
// Server.MaxConnsPerIPv6Prefix bits.
type SourceConns struct {
	Source netip.Prefix
	Conns  int
}

// ConnsBySource lists the n sources with the most HTTPS connections open,
// most first, for a status page. It costs one pass over the sources with
// connections open. It is empty unless MaxConnsPerIP is set (nothing is
// counted otherwise); mesh peers' exempt connections are not counted.
func (s *Server) ConnsBySource(n int) []SourceConns {
	if s.lnHTTPS == nil || s.lnHTTPS.gate == nil || s.lnHTTPS.gate.caps == nil {
		return nil
	}
	return s.lnHTTPS.gate.caps.top(n)
}

// connCaps counts the open connections of each source and refuses those
// over the cap.
type connCaps struct {
	max    int
	v6Bits int
	exempt atomic.Pointer[map[netip.Addr]bool] // mesh peers' addresses

	mu      sync.Mutex
	open    map[netip.Prefix]int
	refused map[netip.Prefix]int // since the last warning
	others  int                  // refusals beyond capRefusedSources sources

	refusedTotal expvar.Int

	l       *slog.Logger
	warnLim *logs.Limiter
}

// newConnCaps returns the caps of s, nil if MaxConnsPerIP is 0.
func (s *Server) newConnCaps() (*connCaps, error) {
	switch {
	case s.MaxConnsPerIP < 0:
		return nil, fmt.Errorf("relay: max connections per IP %d: want a positive number, or 0 for no cap", s.MaxConnsPerIP)
	case s.MaxConnsPerIPv6Prefix < 0 || s.MaxConnsPerIPv6Prefix > 128:
		return nil, fmt.Errorf("relay: IPv6 prefix length %d for the connection cap: want 1 to 128 bits, or 0 for /%d", s.MaxConnsPerIPv6Prefix, DefaultMaxConnsPerIPv6Prefix)
	case s.MaxConnsPerIP == 0:
		return nil, nil
	}
	c := &connCaps{
		max:     s.MaxConnsPerIP,
		v6Bits:  cmp.Or(s.MaxConnsPerIPv6Prefix, DefaultMaxConnsPerIPv6Prefix),
		open:    make(map[netip.Prefix]int),
		refused: make(map[netip.Prefix]int),
		l:       s.Logger,
		warnLim: logs.NewLimiter(1, capWarnEvery),
	}
	exempt := make(map[netip.Addr]bool)
	for _, p := range s.MeshWith {
		if p.DialIP.IsValid() {
			exempt[p.DialIP.Unmap()] = true
		} else if ip, err := netip.ParseAddr(p.Host); err == nil {
			exempt[ip.Unmap()] = true
		}
	}
	c.exempt.Store(&exempt)
	return c, nil
}

// meshNames are the MeshWith peers' host names to resolve for the
// exemption: those without a DialIP and not an IP address.
func meshNames(peers []MeshPeer) []string {
	var names []string
	for _, p := range peers {
		if _, err := netip.ParseAddr(p.Host); err != nil && !p.DialIP.IsValid() {
			names = append(names, p.Host)
		}
	}
	return names
}

// resolveExempt resolves the mesh peers' names now and every
// capResolveEvery until ctx ends, adding what they resolve to to the
// exempt addresses. An address once exempt stays so: a peer whose name
// moves still connects from the old address until it restarts.
func (c *connCaps) resolveExempt(ctx context.Context, r *net.Resolver, names []string) {
	if r == nil {
		r = net.DefaultResolver
	}
	t := time.NewTicker(capResolveEvery)
	defer t.Stop()
	for {
		next := make(map[netip.Addr]bool)
		for a := range *c.exempt.Load() {
			next[a] = true
		}
		for _, name := range names {
			lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			ips, err := r.LookupNetIP(lctx, "ip", name)
			cancel()
			if err != nil {
				if ctx.Err() == nil {
					c.l.Debug("relay: resolving a mesh peer for the connection cap's exemption", "peer", name, "err", err.Error())
				}
				continue
			}
			for _, ip := range ips {
				next[ip.Unmap()] = true
			}
		}
		c.exempt.Store(&next)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// source is the key a client address is counted under.
func (c *connCaps) source(a netip.Addr) netip.Prefix {
	a = a.Unmap()
	if a.Is4() {
		return netip.PrefixFrom(a, 32)
	}
	p, _ := a.Prefix(c.v6Bits)
	return p
}

// acquire counts a new connection from a. It returns a func releasing it
// (nil for an exempt address: nothing to release), or ok false if a is
// at the cap (the refusal is counted and warned about).
func (c *connCaps) acquire(a netip.Addr) (release func(), ok bool) {
	if !a.IsValid() || (*c.exempt.Load())[a.Unmap()] {
		return nil, true
	}
	src := c.source(a)
	c.mu.Lock()
	if n := c.open[src]; n >= c.max {
		if _, known := c.refused[src]; known || len(c.refused) < capRefusedSources {
			c.refused[src]++
		} else {
			c.others++
		}
		c.mu.Unlock()
		c.refusedTotal.Add(1)
		c.warn()
		return nil, false
	}
	c.open[src]++
	c.mu.Unlock()
	var once sync.Once
	return func() { once.Do(func() { c.release(src) }) }, true
}

func (c *connCaps) release(src netip.Prefix) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.open[src] <= 1 {
		delete(c.open, src)
		return
	}
	c.open[src]--
}

// warn says the refusals since the last warning, if the interval allows:
// the total and the capWarnTop sources refused most.
func (c *connCaps) warn() {
	if ok, _ := c.warnLim.Allow(time.Now()); !ok {
		return
	}
	c.mu.Lock()
	refused := make([]SourceConns, 0, len(c.refused))
	total := c.others
	for src, n := range c.refused {
		refused = append(refused, SourceConns{src, n})
		total += n
	}
	others := c.others
	clear(c.refused)
	c.others = 0
	c.mu.Unlock()
	sortSources(refused)
	var top strings.Builder
	for i, r := range refused[:min(len(refused), capWarnTop)] {
		if i > 0 {
			top.WriteByte(' ')
		}
		top.WriteString(sourceString(r.Source) + "=" + strconv.Itoa(r.Conns))
	}
	args := []any{"max_conns_per_ip", c.max, "refused", total, "top_sources", top.String(), "sources", len(refused)}
	if others > 0 {
		args = append(args, "refused_from_uncounted_sources", others)
	}
	c.l.Warn("relay: refusing connections over the per-address cap; if these are your clients (a NAT, a proxy not trusted for the PROXY protocol), raise the cap", args...)
}

// top returns the n sources with the most connections open.
func (c *connCaps) top(n int) []SourceConns {
	if n <= 0 {
		return nil
	}
	c.mu.Lock()
	all := make([]SourceConns, 0, len(c.open))
	for src, k := range c.open {
		all = append(all, SourceConns{src, k})
	}
	c.mu.Unlock()
	sortSources(all)
	return all[:min(n, len(all))]
}

// gauges returns how many sources have connections open and the most any
// has.
func (c *connCaps) gauges() (sources, most int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range c.open {
		most = max(most, n)
	}
	return len(c.open), most
}

// sortSources orders by count, most first, then by source, so equal
// counts list the same way each time.
func sortSources(s []SourceConns) {
	slices.SortFunc(s, func(a, b SourceConns) int {
		return cmp.Or(cmp.Compare(b.Conns, a.Conns), a.Source.Addr().Compare(b.Source.Addr()), cmp.Compare(a.Source.Bits(), b.Source.Bits()))
	})
}

// sourceString is a source as an operator reads it: an IPv4 address
// without "/32".
func sourceString(p netip.Prefix) string {
	if p.Addr().Is4() && p.Bits() == 32 {
		return p.Addr().String()
	}
	return p.String()
}

// CapsStatus is what the connection caps are and did, for a status page.
type CapsStatus struct {
	MaxConnsPerIP int
	RefusedPerIP  int64         // refused over MaxConnsPerIP since Start
	TopSources    []SourceConns // the sources with the most connections open (at most 5)

	MaxConnsPerTenant int
	Tenants           []TenantConns // with Tenants, in their order
}

// TenantConns is one tenant's share of the relay.
type TenantConns struct {
	Name        string
	Conns       int   // client connections open now
	RefusedFull int64 // refused over MaxConnsPerTenant since Start
}

// Caps reports the connection caps and what they did.
func (s *Server) Caps() CapsStatus {
	cs := CapsStatus{MaxConnsPerIP: s.MaxConnsPerIP, MaxConnsPerTenant: s.MaxConnsPerTenant, TopSources: s.ConnsBySource(5)}
	if s.lnHTTPS != nil && s.lnHTTPS.gate != nil && s.lnHTTPS.gate.caps != nil {
		cs.RefusedPerIP = s.lnHTTPS.gate.caps.refusedTotal.Value()
	}
	if len(s.Tenants) > 0 {
		for _, t := range s.tenants {
			cs.Tenants = append(cs.Tenants, TenantConns{Name: t.Name, Conns: s.conns.tenantCount(t.Name), RefusedFull: t.refusedFull.Value()})
		}
	}
	return cs
}
