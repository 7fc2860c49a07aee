package relay

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/derp/derpserver"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// How a fleet of relays meshes, as derper does (cmd/derper/mesh.go):
//
// Every relay of a fleet (a derpMap region with several nodes) holds the
// same mesh key and dials every other relay as a DERP client presenting
// it. derpserver trusts such a client: it skips admission and rate limits,
// and lets it watch connections. So each relay learns, over its
// connection to a peer, which clients are connected to that peer
// (derphttp.RunWatchConnectionLoop), and registers that connection as the
// way to reach them (derpserver's AddPacketForwarder). A packet for a
// client on another relay is then forwarded over it. The meshing is
// symmetric: each relay dials each other one, so each direction has its
// own connection, and upstream derper and tailderp relays mix freely.

// MeshPeer is another relay of the fleet, as Server.MeshWith lists it.
//
// It is dialed the way a Tailscale client dials a derpMap node: TLS to
// Host on Port, the certificate verified for Host against the system
// roots plus Server.MeshRootCAs, or pinned by CertName.
type MeshPeer struct {
	// Host is the peer's DNS name or IP address, as in its certificate.
	Host string
	// Port is its HTTPS port; 0 means 443.
	Port int
	// DialIP, if valid, is dialed instead of resolving Host (derper's
	// "host/dialhost", for peers reached over a private network); the
	// certificate is still verified for Host.
	DialIP netip.Addr
	// CertName, if set, is what the peer's certificate must match, as a
	// derpMap node's CertName: "sha256-raw:<hex>" pins the exact
	// certificate (a self-signed IP-mode relay), a DNS name is checked
	// instead of Host.
	CertName string
}

// String is the peer's address: host, or host:port when the port is not
// 443.
func (p MeshPeer) String() string {
	if p.Port == 0 || p.Port == 443 {
		if strings.Contains(p.Host, ":") {
			return "[" + p.Host + "]"
		}
		return p.Host
	}
	return net.JoinHostPort(p.Host, strconv.Itoa(p.Port))
}

// dnsName matches a DNS host name: ASCII letters, digits and hyphens in
// dotted labels of at most 63 characters. (Not (?i)[a-z]: that matches
// the Kelvin sign and the long s too, names nothing resolves.)
var dnsName = regexp.MustCompile(`^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*\.?$`)

// validHostName reports whether s is an IP address or a DNS name.
func validHostName(s string) bool {
	if _, err := netip.ParseAddr(s); err == nil {
		return true
	}
	return isDNSName(s)
}

// isDNSName reports whether s is a DNS host name (see dnsName), at most
// 253 characters long.
func isDNSName(s string) bool { return len(s) <= 253 && dnsName.MatchString(s) }

// ParseMeshPeer parses one peer: "[CERTNAME@]HOST[:PORT][/DIALIP]".
// HOST is a DNS name or an IP address (IPv6 in brackets when a port
// follows); CERTNAME is a pin as a derpMap node's CertName; DIALIP is an
// address to dial instead of resolving HOST. "derp2.example.com",
// "derp2.example.com:8443", "[2001:db8::2]:443",
// "sha256-raw:4f…@203.0.113.7" and "derp2.example.com/10.0.0.2" are
// peers.
func ParseMeshPeer(s string) (MeshPeer, error) {
	var p MeshPeer
	orig := s
	bad := func(format string, args ...any) (MeshPeer, error) {
		return MeshPeer{}, fmt.Errorf("relay: mesh peer %q: %s", orig, fmt.Sprintf(format, args...))
	}
	if strings.Contains(s, "://") {
		return bad("want host[:port], not a URL (the peer is dialed at https://host[:port]/derp)")
	}
	if pin, rest, ok := strings.Cut(s, "@"); ok {
		if err := checkCertName(pin); err != nil {
			return bad("%v", err)
		}
		p.CertName, s = pin, rest
	}
	hostPort, dial, hasDial := strings.Cut(s, "/")
	if hasDial {
		ip, err := netip.ParseAddr(dial)
		if err != nil {
			return bad("the part after / must be an IP address to dial (derper also takes a name there; resolve it)")
		}
		p.DialIP = ip.Unmap()
	}
	host, port := hostPort, ""
	switch {
	case strings.HasPrefix(hostPort, "["):
		h, pt, err := net.SplitHostPort(hostPort)
		if err != nil {
			h, ok := strings.CutSuffix(strings.TrimPrefix(hostPort, "["), "]")
			if !ok {
				return bad("want [ipv6] or [ipv6]:port")
			}
			host = h
			break
		}
		host, port = h, pt
	case strings.Count(hostPort, ":") == 1:
		h, pt, err := net.SplitHostPort(hostPort)
		if err != nil {
			// The error quotes the address raw: say only what is wrong
			// with it, so the message stays one line (orig is quoted).
			var ae *net.AddrError
			if errors.As(err, &ae) {
				return bad("%s", ae.Err)
			}
			return bad("%q", err.Error())
		}
		host, port = h, pt
	}
	if host == "" {
		return bad("no host")
	}
	if !validHostName(host) {
		return bad("%q is neither a DNS name nor an IP address", host)
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Zone() != "" {
			// It would go into the derpMap, where clients cannot use a
			// zone, and no certificate names one.
			return bad("%q has a zone: give the peer's global address (a link-local one can be dialed with host/ip)", host)
		}
		host = ip.Unmap().String()
	} else {
		host = strings.ToLower(strings.TrimSuffix(host, "."))
	}
	p.Host = host
	if port != "" {
		n, err := strconv.Atoi(port)
		if err != nil || n < 1 || n > 65535 {
			return bad("port %q: want a number from 1 to 65535", port)
		}
		p.Port = n
	}
	if p.Port == 443 {
		p.Port = 0
	}
	return p, nil
}

// checkCertName checks a pin as derphttp reads a derpMap CertName.
func checkCertName(s string) error {
	if hex, ok := strings.CutPrefix(s, "sha256-raw:"); ok {
		if len(hex) != 64 || strings.Trim(strings.ToLower(hex), "0123456789abcdef") != "" {
			return errors.New("a sha256-raw: pin takes 64 hex digits (the CertName of the peer's derpMap node)")
		}
		return nil
	}
	if s == "" || !dnsName.MatchString(s) {
		return fmt.Errorf("certificate name %q: want sha256-raw:<64 hex digits> or a DNS name", s)
	}
	return nil
}

// MeshState is where a mesh link stands.
type MeshState string

// The states of a mesh link.
const (
	// MeshDialing: not connected; dialing, or waiting to dial again after
	// LastError.
	MeshDialing MeshState = "dialing"
	// MeshConnected: connected, and the peer has listed its clients.
	MeshConnected MeshState = "connected"
	// MeshSelf: the peer turned out to be this relay (it presented this
	// relay's own DERP key); it is not dialed again.
	MeshSelf MeshState = "self"
)

// MeshPeerStatus is one mesh link as Server.MeshPeers reports it.
type MeshPeerStatus struct {
	Peer MeshPeer
	// Tenant is the tenant (tailnet) whose clients the link carries: a
	// relay with Tenants has one link per tenant and peer. "" without.
	Tenant string
	State  MeshState
	// Since is when State began.
	Since time.Time
	// LastError is the last dial or connection error, kept after the link
	// recovers; "" if there was none. LastErrorAt is when it happened.
	LastError   string
	LastErrorAt time.Time
	// ServerKey is the peer's DERP key, once it has been connected.
	ServerKey key.NodePublic
	// Clients is how many keys the peer lists as connected to it (its own
	// mesh connections included): packets for them are forwarded there.
	Clients int
}

// Mesh timing. derphttp.RunWatchConnectionLoop waits a fixed 5 s after
// each failure before it dials again; a link adds to that wait after
// repeated failures, so a dead peer is dialed after 5, 10, 20, then every
// 30 s (±10%), not every 5 s for as long as it is gone. A link that was
// up retries after 5 s, so a restarted peer is rejoined within seconds.
const (
	meshLoopRetry = 5 * time.Second  // derphttp's own fixed retry wait
	meshRetryMax  = 30 * time.Second // the longest wait between dials
	// meshWarnAfter is how long a peer may stay unreachable before it is
	// a warning (peers starting together fail their first dials), and
	// meshWarnEvery how often the warning is repeated while it lasts.
	meshWarnAfter = 30 * time.Second
	meshWarnEvery = 10 * time.Minute
	// An unpinned self-signed peer is a configuration error, not a peer
	// still starting: it is a warning at the first failure, repeated
	// after meshPinWarnFirst, then twice as long each time up to
	// meshWarnEvery, while it lasts.
	meshPinWarnFirst = time.Minute
)

// meshRetryWait is the whole wait before the next dial after the n-th
// failure in a row (n ≥ 1), before jitter.
func meshRetryWait(n int) time.Duration { return retryDelay(n, meshLoopRetry, meshRetryMax) }

// meshLink is this relay's connection to one peer: a derphttp mesh
// client whose watch loop adds and removes packet forwarders.
type meshLink struct {
	peer   MeshPeer
	tenant string // the tenant whose clients it carries ("" with one)
	derp   *derpserver.Server
	client *derphttp.Client
	logger *slog.Logger

	mu       sync.Mutex
	status   MeshPeerStatus
	present  map[key.NodePublic]bool // keys the peer listed, for Clients
	listed   bool                    // the current connection has listed clients
	failures int                     // failures since the link was last up
	warnedAt time.Time               // last warning of this outage
	// unpinned is the refusal of the last handshake, if the peer's
	// certificate was self-signed and not pinned; failed takes it.
	unpinned atomic.Pointer[unpinnedSelfSignedError]
	// The warning about a missing pin: when it was last said, and the
	// wait before it is said again (0: not said in this outage).
	pinWarnedAt time.Time
	pinWarnGap  time.Duration
}

func newMeshLink(s *Server, t *tenant, p MeshPeer) *meshLink {
	m := &meshLink{
		peer:    p,
		tenant:  t.Name,
		derp:    t.derp,
		logger:  s.tenantLogger(t.Name).With("mesh_peer", p.String()),
		present: map[key.NodePublic]bool{},
		status:  MeshPeerStatus{Peer: p, Tenant: t.Name, State: MeshDialing, Since: time.Now()},
	}
	// The peer as a derpMap node, so it is dialed and its certificate
	// checked exactly as Tailscale clients check a node (CertName pin,
	// DNS-free dial address).
	n := &tailcfg.DERPNode{Name: "mesh", HostName: p.Host, DERPPort: p.Port, CertName: p.CertName}
	if p.DialIP.Is4() {
		n.IPv4, n.IPv6 = p.DialIP.String(), "none"
	} else if p.DialIP.Is6() {
		n.IPv4, n.IPv6 = "none", p.DialIP.String()
	}
	region := &tailcfg.DERPRegion{RegionCode: p.String(), Nodes: []*tailcfg.DERPNode{n}}
	// derphttp logs every dial failure and every peer it cannot find:
	// debug level, rate-limited; the link logs what matters itself.
	logf := logger.RateLimitedFn(func(format string, args ...any) {
		m.logger.Debug(strings.TrimSpace(fmt.Sprintf(format, args...)), "component", "derphttp")
	}, time.Minute, 5, 50)
	m.client = derphttp.NewRegionClient(t.derp.PrivateKey(), logf, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	// The tenant's own mesh key: the peer hands the link to the same
	// tenant's server (see tenants.go), and it watches and forwards
	// within that tenant only.
	m.client.MeshKey = t.derp.MeshKey()
	m.client.WatchConnectionChanges = true
	m.client.TLSConfig = meshTLSConfig(p, s.MeshRootCAs, m.unpinned.Store)
	return m
}

// meshTLSConfig is the base TLS configuration of the link to p. derphttp
// (tlsdial) verifies the chain against the system roots, then roots, and
// honours a CertName pin; it checks the name the certificate is for only
// through the TLS server name, which Go leaves empty for an IP address.
// A peer dialed by IP without a pin would then pass with any certificate
// a trusted CA issued for anything, and whoever presented one would learn
// the mesh key: so without a pin the leaf must also be for p.Host.
//
// An unpinned peer presenting a self-signed certificate that no root
// trusts is refused with an *unpinnedSelfSignedError, which carries the
// pin the operator would add (a fleet of self-signed relays needs one per
// peer); tlsdial would refuse it too, with a generic x509 error.
//
// onUnpinned, if set, is told of each such refusal: derphttp keeps only
// the error's text.
func meshTLSConfig(p MeshPeer, roots *x509.CertPool, onUnpinned func(*unpinnedSelfSignedError)) *tls.Config {
	conf := &tls.Config{RootCAs: roots}
	if p.CertName != "" {
		return conf // pinned: the exact certificate, or the name CertName says
	}
	conf.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return errors.New("no certificate")
		}
		leaf, err := x509.ParseCertificate(raw[0])
		if err != nil {
			return err
		}
		if info := CertInfoOf(leaf); info.SelfSigned && !trustedLeaf(leaf, roots) {
			err := &unpinnedSelfSignedError{peer: p, certName: info.CertName}
			if onUnpinned != nil {
				onUnpinned(err)
			}
			return err
		}
		return leaf.VerifyHostname(p.Host)
	}
	return conf
}

// trustedLeaf reports whether leaf chains to the system roots or to roots
// (a self-signed certificate the operator made a root of).
func trustedLeaf(leaf *x509.Certificate, roots *x509.CertPool) bool {
	if _, err := leaf.Verify(x509.VerifyOptions{}); err == nil {
		return true
	}
	if roots == nil {
		return false
	}
	_, err := leaf.Verify(x509.VerifyOptions{Roots: roots})
	return err == nil
}

// unpinnedSelfSignedError: a peer without a CertName pin presented a
// self-signed certificate that no root trusts.
type unpinnedSelfSignedError struct {
	peer     MeshPeer
	certName string // the certificate's pin, "sha256-raw:<hex>"
}

func (e *unpinnedSelfSignedError) Error() string {
	return fmt.Sprintf("the peer's certificate is self-signed and not pinned (its pin: %s)", e.certName)
}

// pinnedEntry is the peer as a MeshWith entry with the pin: the form
// ParseMeshPeer reads, "sha256-raw:<hex>@host[:port][/dialip]".
func (e *unpinnedSelfSignedError) pinnedEntry() string {
	s := e.certName + "@" + e.peer.String()
	if e.peer.DialIP.IsValid() {
		s += "/" + e.peer.DialIP.String()
	}
	return s
}

// run keeps the link up until ctx ends or the peer turns out to be this
// relay.
func (m *meshLink) run(ctx context.Context) {
	m.client.RunWatchConnectionLoop(ctx, m.derp.PublicKey(), nil, m.add, m.remove, func(err error) { m.failed(ctx, err) })
	if ctx.Err() != nil {
		return
	}
	// The loop returns early only when the peer's key is our own.
	m.client.Close()
	m.mu.Lock()
	m.status.State, m.status.Since = MeshSelf, time.Now()
	m.mu.Unlock()
	m.logger.Info("relay: mesh peer is this relay itself; not dialed again")
}

// add: the peer says client k is connected to it.
func (m *meshLink) add(pm derp.PeerPresentMessage) {
	m.derp.AddPacketForwarder(pm.Key, m.client)
	m.mu.Lock()
	m.present[pm.Key] = true
	up := !m.listed
	warned := !m.warnedAt.IsZero()
	if up {
		// The peer lists at least our own connection at once, so the
		// first listing is the sign that the connection works.
		m.listed, m.failures, m.warnedAt = true, 0, time.Time{}
		m.pinWarnedAt, m.pinWarnGap = time.Time{}, 0
		m.status.State, m.status.Since = MeshConnected, time.Now()
		m.status.ServerKey = m.client.ServerPublicKey()
	}
	m.mu.Unlock()
	if up {
		msg := "relay: mesh peer connected"
		if warned {
			msg = "relay: mesh peer reachable again"
		}
		m.logger.Info(msg, "peer_key", m.client.ServerPublicKey().ShortString())
	}
}

// remove: client k left the peer (or the connection to it broke).
func (m *meshLink) remove(pm derp.PeerGoneMessage) {
	m.derp.RemovePacketForwarder(pm.Peer, m.client)
	m.mu.Lock()
	delete(m.present, pm.Peer)
	m.mu.Unlock()
}

// failed is told of every failed dial and broken connection, before the
// loop's own 5 s wait; it records the error, logs, and makes the wait
// longer after repeated failures.
func (m *meshLink) failed(ctx context.Context, err error) {
	if ctx.Err() != nil {
		return
	}
	now := time.Now()
	m.mu.Lock()
	wasUp := m.status.State == MeshConnected
	if !m.listed && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)) {
		// Connected, then closed before listing anything: a relay refuses
		// a watcher without the right mesh key this way.
		err = fmt.Errorf("%w (the peer closed the connection before listing its clients: does it have the same mesh key?)", err)
	}
	m.listed = false
	m.failures++
	failures := m.failures
	if wasUp {
		m.status.State, m.status.Since = MeshDialing, now
	}
	m.status.LastError, m.status.LastErrorAt = err.Error(), now
	down := now.Sub(m.status.Since)
	// The handshake's refusal, taken whether or not it caused this
	// failure, so a stale one never explains a later one.
	unpinned := m.unpinned.Swap(nil)
	if unpinned != nil && !strings.Contains(err.Error(), unpinned.Error()) {
		unpinned = nil
	}
	pinWarn := false
	if unpinned != nil {
		// The generic warning below would only say less, later.
		pinWarn = m.pinWarnDue(now)
	}
	warn := unpinned == nil && !wasUp && down >= meshWarnAfter && (m.warnedAt.IsZero() || now.Sub(m.warnedAt) >= meshWarnEvery)
	if warn {
		m.warnedAt = now
	}
	m.mu.Unlock()

	switch {
	case pinWarn:
		m.logger.Warn("relay: mesh peer's certificate is self-signed and not pinned: the link is refused and packets for its clients are not relayed; if pin is the CertName the peer itself reports (its derpMap node), list the peer as pinned_peer",
			"pin", unpinned.certName, "pinned_peer", unpinned.pinnedEntry(), "down_for", down.Round(time.Second).String())
	case wasUp:
		m.logger.Info("relay: mesh peer disconnected; reconnecting", "err", err)
	case warn:
		m.logger.Warn("relay: mesh peer unreachable: packets for its clients are not relayed until it is back; check that it runs and is reachable on its HTTPS port, that it has the same mesh key, and that its certificate is trusted (a public CA, the mesh root CAs, or a CertName pin)",
			"err", err, "down_for", down.Round(time.Second).String())
	default:
		m.logger.Debug("relay: mesh peer not reachable; retrying", "err", err, "failures", failures)
	}

	extra := meshRetryWait(failures) - meshLoopRetry
	if extra <= 0 {
		return
	}
	extra += time.Duration(rand.Int64N(int64(extra)/5)) - extra/10 // ±10%
	t := time.NewTimer(extra)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// pinWarnDue reports whether the missing pin is to be said at now, and if
// so records it: at the first failure, then meshPinWarnFirst later, then
// twice as long each time, at most meshWarnEvery apart. m.mu is held.
func (m *meshLink) pinWarnDue(now time.Time) bool {
	if m.pinWarnGap != 0 && now.Sub(m.pinWarnedAt) < m.pinWarnGap {
		return false
	}
	m.pinWarnedAt = now
	m.pinWarnGap = min(max(2*m.pinWarnGap, meshPinWarnFirst), meshWarnEvery)
	return true
}

// snapshot is the link's status now.
func (m *meshLink) snapshot() MeshPeerStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.status
	st.Clients = len(m.present)
	return st
}

// startMesh dials every peer of s.MeshWith in the background, one link
// per tenant, until ctx ends (and stopBackground closes the clients).
func (s *Server) startMesh(ctx context.Context) {
	for _, t := range s.tenants {
		for _, p := range s.MeshWith {
			m := newMeshLink(s, t, p)
			t.mesh = append(t.mesh, m)
			s.wg.Go(func() { m.run(ctx) })
		}
	}
}

// MeshPeers reports each link to a peer of MeshWith, in that order (per
// tenant, in the order of Tenants): whether it is connected, since when,
// and its last error. Empty without MeshWith.
func (s *Server) MeshPeers() []MeshPeerStatus {
	var out []MeshPeerStatus
	for _, t := range s.tenants {
		for _, m := range t.mesh {
			out = append(out, m.snapshot())
		}
	}
	return out
}

// meshCounts are how many peers are configured (itself left out) and
// connected, over the links of the first tenant (every tenant links to
// the same peers), for metrics.
func (s *Server) meshCounts() (peers, connected int) {
	if len(s.tenants) == 0 {
		return 0, 0
	}
	return meshCounts(s.tenants[0].mesh)
}

// meshCounts are how many of links lead to another relay, and how many of
// those are connected.
func meshCounts(links []*meshLink) (peers, connected int) {
	for _, m := range links {
		switch m.snapshot().State {
		case MeshSelf:
		case MeshConnected:
			peers++
			connected++
		default:
			peers++
		}
	}
	return peers, connected
}
