// Package relay is tailderp's public side: a DERP relay over HTTPS built on
// tailscale.com/derp/derpserver, with its certificates, the plain-HTTP
// port, captive-portal and latency probes, bootstrap DNS, a neutral home
// page, and the mesh that joins the relays of a fleet (MeshWith, see
// mesh.go).
//
// A Server is configured through its exported fields and run with Start
// and Close (see the Server example):
//
//	certs, err := relay.LoadManualCerts("/var/lib/tailderp/certs", "derp.example.com", logger)
//	...
//	s := &relay.Server{Addr: ":443", HTTPPort: 80, Certs: certs, PrivateKey: k, Admitter: v}
//	if err := s.Start(); err != nil { ... } // listening; serving in the background
//	defer s.Close(context.Background())
//
// The relay never serves /debug: that lives on the tailnet (see package
// debugsrv). Who may relay is decided by the Admitter (see package
// verify); Revoke closes the connections of a client that may no longer
// relay. A program that sets an Admitter calls RegisterAdmissionScheme
// once first. A relay of several tailnets keeps them apart: Tenants gives
// each its own DERP server and Admitter behind the one port (tenants.go).
package relay

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"expvar"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"tailscale.com/derp/derpserver"
	"tailscale.com/metrics"
	"tailscale.com/net/ktimeout"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/logs"
)

// Defaults for the TCP settings, as derper sets them.
const (
	// DefaultTCPKeepAlive is long to spare mobile batteries; DERP has its
	// own application-level keepalive.
	DefaultTCPKeepAlive = 10 * time.Minute
	// DefaultTCPUserTimeout is short so a dead connection is dropped
	// promptly.
	DefaultTCPUserTimeout = 15 * time.Second
	// DefaultTCPWriteTimeout is derpserver's: a client that cannot take a
	// write for this long is dropped.
	DefaultTCPWriteTimeout = derpserver.DefaultTCPWiteTimeout
)

// Server is a DERP relay listening on the public internet.
//
// Its exported fields may be changed until Start is called.
type Server struct {
	// Addr is the HTTPS listen address, ":443" if empty. "host:0" picks
	// a free port (see LocalAddr).
	Addr string

	// HTTPPort is the plain-HTTP port, on the same IP as Addr: it answers
	// ACME HTTP-01 challenges and /generate_204, and redirects the rest to
	// HTTPS (at Hostname). -1 disables it; 0 picks a free port.
	HTTPPort int

	// Hostname is the relay's public name, a DNS name or an IP address:
	// where the plain-HTTP port redirects to. Empty means the IP address
	// the request arrived on. Never the request's Host header, which the
	// client chose: a redirect reflecting it sends visitors wherever a
	// crafted link says.
	Hostname string

	// Certs supplies the TLS certificates. Required.
	Certs Certificates

	// PrivateKey is the relay's DERP identity. Required; see
	// LoadOrCreateKey.
	PrivateKey key.NodePrivate

	// Admitter decides which clients may relay. Nil admits everyone: an
	// open relay that anyone who finds it can use. Unused with Tenants.
	Admitter Admitter

	// Tenants, if set, are the tailnets the relay serves apart from each
	// other (see tenants.go): one DERP server each, so a client of one
	// can neither reach nor see the clients of another, here or through
	// the mesh. Each client goes to the tenant TenantOf names and is
	// admitted by that tenant's Admitter. The first tenant is the
	// default: DERP() and the whole relay's metrics are its server's.
	Tenants []Tenant

	// TenantOf names the tenant of the client announcing node key k from
	// src (not yet proven: derpserver checks the proof, then the tenant's
	// Admitter decides), or "" for none: the connection is closed. It may
	// wait, bounded by ctx, for an answer that is about to arrive (a
	// tailnet's node has just started). Required with Tenants; see
	// verify.Verifier.TenantOf.
	TenantOf func(ctx context.Context, k key.NodePublic, src netip.Addr) string

	// MaxConnsPerTenant caps the client connections of each tenant (its
	// share of the relay; 0: no cap). Over it, a tenant's new clients are
	// refused, counted and warned about once a minute; mesh peers are
	// exempt.
	MaxConnsPerTenant int

	// Home is what "/" serves: "" a neutral page, "blank" an empty page,
	// or an http(s) URL to redirect to.
	Home string

	// MeshKey, if set, is the shared secret of a relay fleet: clients
	// presenting it are mesh peers and skip admission.
	MeshKey key.DERPMesh

	// MeshWith lists the other relays of the fleet (see mesh.go). Each is
	// dialed with MeshKey, which it must share, and kept connected, so a
	// packet for a client connected to another relay of the fleet is
	// forwarded there. An entry that turns out to be this relay is
	// dropped. Requires MeshKey.
	MeshWith []MeshPeer

	// MeshRootCAs, if set, are trusted for the certificates of MeshWith
	// peers, besides the system roots (a fleet whose certificates a
	// private CA signs). A peer with a self-signed certificate is pinned
	// by its MeshPeer.CertName instead.
	MeshRootCAs *x509.CertPool

	// BootstrapDNSNames are DNS names served with their addresses at
	// /bootstrap-dns, for clients whose own DNS fails (see
	// bootstrap_dns.go); UnpublishedBootstrapDNSNames are answered only
	// to a query for them (?q=name), never listed. At most
	// MaxBootstrapDNSNames in all.
	BootstrapDNSNames            []string
	UnpublishedBootstrapDNSNames []string

	// Resolver resolves the bootstrap DNS names, in the background, every
	// BootstrapDNSRefresh (0: DefaultBootstrapDNSRefresh). Nil means
	// net.DefaultResolver.
	Resolver            *net.Resolver
	BootstrapDNSRefresh time.Duration

	// TCPKeepAlive, TCPUserTimeout and TCPWriteTimeout tune client
	// connections; zero means derper's defaults (10 min, 15 s, 2 s). A
	// negative TCPWriteTimeout means none.
	TCPKeepAlive    time.Duration
	TCPUserTimeout  time.Duration
	TCPWriteTimeout time.Duration

	// HeaderTimeout bounds a new connection's TLS handshake and then each
	// request's header (half-open handshakes, slowloris); RequestTimeout
	// bounds reading a request and writing its response; MaxHeaderBytes
	// bounds a request's header (larger: 431). None applies to a DERP
	// connection once upgraded. Zero means the defaults: 10 s, 30 s,
	// 16 KiB. See limits.go.
	HeaderTimeout  time.Duration
	RequestTimeout time.Duration
	MaxHeaderBytes int

	// AcceptConnectionLimit is how many new HTTPS connections a second
	// are accepted once AcceptConnectionBurst have been (a token bucket,
	// as derper's flags of the same names); the rest are closed at once.
	// Zero (or +Inf) means no limit; with a limit the burst must be at
	// least 1.
	AcceptConnectionLimit float64
	AcceptConnectionBurst int

	// ProxyProtocolFrom lists the sources (a TCP proxy sharing the port,
	// routing by SNI) whose HTTPS connections must start with a PROXY
	// protocol v1 or v2 header; its source address is then the client's
	// everywhere. A header from any other source, or none from a listed
	// one within ProxyHeaderTimeout (0: DefaultProxyHeaderTimeout),
	// closes the connection before TLS. Empty: no PROXY protocol. See
	// proxyproto.go.
	ProxyProtocolFrom  []netip.Prefix
	ProxyHeaderTimeout time.Duration

	// MaxConnsPerIP caps the HTTPS connections open at once from one
	// client address (0: no cap), IPv6 addresses grouped by a prefix of
	// MaxConnsPerIPv6Prefix bits (0: DefaultMaxConnsPerIPv6Prefix, /64).
	// Connections over it are refused before TLS; MeshWith peers'
	// addresses are exempt. See caps.go and ConnsBySource.
	MaxConnsPerIP         int
	MaxConnsPerIPv6Prefix int

	// Logger receives the relay's logs; nil discards them.
	Logger *slog.Logger

	// CertAdvice, if set, says what the operator should do about a
	// problem with the certificate's dates, in the program's own words
	// (which command or setting); it is logged with the problem as "fix"
	// and is CertStatus's Fix. The relay says the problem at Start, when
	// the certificate changes, and daily while it lasts.
	CertAdvice func(CertProblem) string

	// OnCertChange, if set, is called when the certificate served changes
	// after Start (a reload, a renewal), from the goroutine that watches
	// it.
	OnCertChange func(CertStatus)

	// FleetPollEvery is how often a relay of a fleet (MeshWith) exchanges
	// derpMap nodes with each peer, and FleetPeerTTL how long a peer's
	// node stays in the published region after it was last heard of.
	// DefaultFleetPollEvery and DefaultFleetPeerTTL if zero.
	FleetPollEvery time.Duration
	FleetPeerTTL   time.Duration

	// PublicPort, if set, is the HTTPS port clients dial when it is not
	// the listener's (a TCP proxy or a port mapping in front): port 80
	// redirects there.
	PublicPort int

	// certCheckEvery overrides certCheckEvery, for tests.
	certCheckEvery time.Duration

	derp      *derpserver.Server // the first tenant's
	tenants   []*tenant          // one, unnamed, without Tenants
	logs      relayLogs
	conns     connTracker
	bootstrap *bootstrapDNS
	derpMap   derpMapDoc         // served at DERPMapPath; see PublishRegion
	bgCancel  context.CancelFunc // ends background work: bootstrap DNS, mesh links, the certificate watch
	https     *http.Server
	http80    *http.Server
	lnHTTPS   *guardedListener
	ln80      *guardedListener
	serveErr  chan error
	wg        sync.WaitGroup
	closeMu   sync.Mutex
	closed    bool
	stopped   bool // StopAccepting was called
}

// ListenError is returned by Start when a listener cannot be bound.
type ListenError struct {
	Listener string // "https" or "http"
	Addr     string // the address it tried, host:port
	Err      error  // from net.Listen; errors.Is finds syscall.EADDRINUSE, EACCES
}

func (e *ListenError) Error() string {
	return fmt.Sprintf("relay: %s listener: %v", e.Listener, e.Err)
}

func (e *ListenError) Unwrap() error { return e.Err }

// Start binds the listeners and serves in the background. A port that
// cannot be bound is a *ListenError.
func (s *Server) Start() (err error) {
	if s.Certs == nil {
		return errors.New("relay: no certificates configured")
	}
	if s.PrivateKey.IsZero() {
		return errors.New("relay: no DERP private key")
	}
	if s.Hostname != "" && !validHostName(s.Hostname) {
		return fmt.Errorf("relay: hostname %q is neither a DNS name nor an IP address", s.Hostname)
	}
	if s.Logger == nil {
		s.Logger = logs.Discard()
	}
	addr := s.Addr
	if addr == "" {
		addr = ":443"
	}
	listenHost, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("relay: listen address %q: %w", addr, err)
	}
	home, err := HomeHandler(s.Home)
	if err != nil {
		return err
	}

	acceptLimit, err := s.acceptLimiter()
	if err != nil {
		return err
	}
	gate, err := s.newConnGate()
	if err != nil {
		return err
	}

	s.logs = newRelayLogs(s.Logger)
	defer func() {
		if err != nil {
			for _, t := range s.tenants {
				t.derp.Close()
			}
			s.tenants, s.derp = nil, nil
		}
	}()
	if err := s.startTenants(); err != nil {
		return err
	}
	if len(s.MeshWith) > 0 && s.MeshKey.IsZero() {
		return errors.New("relay: mesh peers need a mesh key")
	}
	s.derpMap.configure(s.MeshKey, orDefault(s.FleetPeerTTL, DefaultFleetPeerTTL), s.Logger.Info)
	if s.bootstrap, err = newBootstrapDNS(s); err != nil {
		return err
	}
	var derpHandler http.Handler
	switch {
	case len(s.Tenants) > 0:
		// The tenant handler picks each connection's Admitter.
		derpHandler = withAdmission(nil, &s.conns, s.tenantHandler())
	case s.Admitter != nil:
		derpHandler = withAdmission(s.Admitter, &s.conns, derpserver.AddWebSocketSupport(s.derp, derpserver.Handler(s.derp)))
	default:
		derpHandler = derpserver.AddWebSocketSupport(s.derp, derpserver.Handler(s.derp))
	}
	derpHandler = checkUpgrade(s.logs.request, derpHandler)

	mux := http.NewServeMux()
	mux.Handle("/derp", derpHandler)
	mux.HandleFunc("/derp/probe", derpserver.ProbeHandler)
	mux.HandleFunc("/derp/latency-check", derpserver.ProbeHandler)
	mux.HandleFunc("/generate_204", derpserver.ServeNoContent)
	mux.Handle("/bootstrap-dns", s.bootstrap)
	mux.Handle(DERPMapPath, &s.derpMap)
	mux.HandleFunc("/robots.txt", robotsTxt)
	mux.Handle("/", home)

	lc := net.ListenConfig{
		Control:   ktimeout.UserTimeout(orDefault(s.TCPUserTimeout, DefaultTCPUserTimeout)),
		KeepAlive: orDefault(s.TCPKeepAlive, DefaultTCPKeepAlive),
	}
	// MPTCP does not support TCP_USER_TIMEOUT (derper, 2025-02).
	lc.SetMultipathTCP(false)

	tlsConfig := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{"http/1.1"}, // DERP upgrades an HTTP/1.1 connection
		GetCertificate: s.Certs.GetCertificate,
	}
	if a, ok := s.Certs.(alpnCertificates); ok {
		tlsConfig.NextProtos = append(tlsConfig.NextProtos, a.ALPNProtocols()...)
	}
	s.derp.ModifyTLSConfigToAddMetaCert(tlsConfig)

	// net/http's server error log is mostly failed TLS handshakes from
	// scanners: debug level. Running out of file descriptors is said by
	// the listener, at warning level.
	errorLog := log.New(s.logs.http.Writer(slog.LevelDebug, "component", "http"), "", 0)
	s.https = &http.Server{
		Handler:   mux,
		TLSConfig: tlsConfig,
		ErrorLog:  errorLog,
	}
	s.limitHTTP(s.https)
	lnHTTPS, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		return &ListenError{Listener: "https", Addr: addr, Err: err}
	}
	s.lnHTTPS = s.guard(lnHTTPS, acceptLimit)
	s.lnHTTPS.gate = gate
	s.serveErr = make(chan error, 2)
	if s.HTTPPort >= 0 {
		addr80 := net.JoinHostPort(listenHost, strconv.Itoa(s.HTTPPort))
		ln80, err := lc.Listen(context.Background(), "tcp", addr80)
		if err != nil {
			s.lnHTTPS.Close()
			return &ListenError{Listener: "http", Addr: addr80, Err: err}
		}
		// No accept limit: plain HTTP costs no handshake.
		s.ln80 = s.guard(ln80, nil)
		mux80 := http.NewServeMux()
		mux80.HandleFunc("/generate_204", derpserver.ServeNoContent)
		mux80.HandleFunc("/derp/probe", derpserver.ProbeHandler)
		mux80.HandleFunc("/derp/latency-check", derpserver.ProbeHandler)
		// Never hint that /debug exists, not even by redirecting.
		mux80.Handle("/debug", http.NotFoundHandler())
		mux80.Handle("/debug/", http.NotFoundHandler())
		mux80.Handle("/metrics", http.NotFoundHandler())
		mux80.Handle("/", s.Certs.HTTPHandler(http.HandlerFunc(s.redirectToHTTPS)))
		s.http80 = &http.Server{
			Handler:  mux80,
			ErrorLog: errorLog,
		}
		s.limitHTTP(s.http80)
		s.serve(func() error { return s.http80.Serve(s.ln80) })
	}
	s.serve(func() error { return s.https.ServeTLS(s.lnHTTPS.serving(), "", "") })
	s.Logger.Info("relay: serving DERP over HTTPS", "addr", s.lnHTTPS.Addr().String(), "http", s.HTTPAddr())

	bg, cancel := context.WithCancel(context.Background())
	s.bgCancel = cancel
	s.wg.Go(func() { s.bootstrap.run(bg) })
	// Dial the peers once serving, so a peer that dials back finds us.
	s.startMesh(bg)
	for _, p := range s.MeshWith {
		s.wg.Go(func() { s.runFleet(bg, p) })
	}
	// A certificate problem is said at start, beside the line above.
	w := &certWatch{s: s}
	w.check(time.Now())
	s.wg.Go(func() { s.watchCerts(bg, w) })
	return nil
}

func (s *Server) serve(f func() error) {
	s.wg.Go(func() {
		if err := f(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.serveErr <- err
		}
	})
}

// Err returns a channel that receives an error if a listener fails while
// serving.
func (s *Server) Err() <-chan error { return s.serveErr }

// redirectToHTTPS sends plain-HTTP visitors to the HTTPS port at
// Hostname (or the address they reached, without a Hostname).
func (s *Server) redirectToHTTPS(w http.ResponseWriter, r *http.Request) {
	host := s.Hostname
	if host == "" {
		la, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
		if !ok {
			http.NotFound(w, r)
			return
		}
		h, _, err := net.SplitHostPort(la.String())
		if err != nil {
			http.NotFound(w, r)
			return
		}
		host = h
	}
	_, port, _ := net.SplitHostPort(s.lnHTTPS.Addr().String())
	if s.PublicPort != 0 {
		port = strconv.Itoa(s.PublicPort)
	}
	if port != "443" {
		host = net.JoinHostPort(host, port)
	} else if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	http.Redirect(w, r, "https://"+host+r.URL.RequestURI(), http.StatusFound)
}

// LocalAddr is the address the HTTPS listener is bound to.
func (s *Server) LocalAddr() net.Addr { return s.lnHTTPS.Addr() }

// HTTPAddr is the address of the plain-HTTP listener, or "" when off.
func (s *Server) HTTPAddr() string {
	if s.ln80 == nil {
		return ""
	}
	return s.ln80.Addr().String()
}

// DERP returns the underlying derpserver (the first tenant's, with
// Tenants), for debug pages and mesh.
func (s *Server) DERP() *derpserver.Server { return s.derp }

// ExpVar returns the relay's metrics: derpserver's plus the certificate's
// expiry, the mesh peers (configured, connected) and the bootstrap DNS
// requests, for the debug server to publish.
func (s *Server) ExpVar() expvar.Var {
	m := new(metrics.Set)
	// Rate-limit metrics are published whether or not limits are set (0:
	// none): a rate config can set them while the relay runs.
	m.Set("derp", s.derp.ExpVar(true))
	m.Set("tls_listener", s.lnHTTPS.expVar())
	m.Set("gauge_cert_not_after_unix_seconds", expvar.Func(func() any {
		info, ok := s.Certs.Current()
		if !ok {
			return 0
		}
		return info.NotAfter.Unix()
	}))
	m.Set("gauge_mesh_peers", expvar.Func(func() any {
		peers, _ := s.meshCounts()
		return peers
	}))
	m.Set("gauge_mesh_peers_connected", expvar.Func(func() any {
		_, connected := s.meshCounts()
		return connected
	}))
	m.Set("counter_bootstrap_dns_requests", &s.bootstrap.requests)
	m.Set("counter_bootstrap_dns_hits", &s.bootstrap.hits)
	m.Set("counter_bootstrap_dns_misses", &s.bootstrap.misses)
	m.Set("gauge_cert_problem", expvar.Func(s.certProblemGauge))
	if len(s.Tenants) > 0 {
		// "derp" above is the first tenant's; each tenant's own set.
		tenants := new(metrics.Set)
		for _, t := range s.tenants {
			tenants.Set(t.Name, s.TenantExpVar(t.Name))
		}
		m.Set("tenant", tenants)
	}
	return m
}

// Revoke closes every admitted connection of the client k and reports how
// many there were. The client may reconnect; whether it is admitted again
// is the Admitter's decision. Mesh peers are never closed by Revoke.
func (s *Server) Revoke(k key.NodePublic) int { return s.conns.revoke(k) }

// Clients lists the connections the Admitter admitted that are open now,
// oldest first. Without an Admitter it is empty.
func (s *Server) Clients() []Client { return s.conns.clients() }

// ConnectedKeys lists the clients with an admitted connection open.
func (s *Server) ConnectedKeys() []key.NodePublic { return s.conns.keys() }

// ConnectedTenant is the tenant of the client k's admitted connection ("" if
// it has none, or without Tenants).
func (s *Server) ConnectedTenant(k key.NodePublic) string { return s.conns.tenantOf(k) }

// Connected reports whether the client k has an admitted connection open.
func (s *Server) Connected(k key.NodePublic) bool { return s.conns.connected(k) }

// StopAccepting closes the listeners (cutting connections still in their
// TLS handshake or request) and ends the background work (certificate
// watch, mesh links, bootstrap DNS); connected clients stay connected. It
// is for a process about to exit: the exit closes their connections at
// once, as derper's does, where Close tears each client down in turn
// (about 0.1 ms each: a quarter of a second for 2,000 clients on two
// cores), and a restart waits for the exit. Close afterwards closes the
// clients too.
func (s *Server) StopAccepting() {
	s.closeMu.Lock()
	if s.closed || s.stopped || s.derp == nil {
		s.closeMu.Unlock()
		return
	}
	s.stopped = true
	s.closeMu.Unlock()
	// An ended context: Shutdown closes the listeners and idle
	// connections and returns without waiting for requests in flight.
	ended, cancel := context.WithCancel(context.Background())
	cancel()
	for _, h := range []*http.Server{s.https, s.http80} {
		if h != nil {
			h.Shutdown(ended)
		}
	}
	s.stopBackground()
}

// stopBackground ends the background work: bootstrap DNS, the certificate
// watch and the mesh links (whose loops also need their clients closed to
// return promptly).
func (s *Server) stopBackground() {
	s.bgCancel()
	for _, t := range s.tenants {
		for _, m := range t.mesh {
			m.client.Close()
		}
	}
}

// Close stops accepting connections, closes every client, and waits up to
// the deadline of ctx for the listeners to finish. Closing a Server that
// never started (or failed to) does nothing.
func (s *Server) Close(ctx context.Context) error {
	s.closeMu.Lock()
	if s.closed || s.derp == nil {
		s.closeMu.Unlock()
		return nil
	}
	s.closed = true
	s.closeMu.Unlock()

	// Shutdown closes the listeners first, then waits for requests that
	// are not hijacked; derp.Close closes the hijacked DERP connections.
	shutdown := func(h *http.Server) {
		if h != nil {
			if err := h.Shutdown(ctx); err != nil {
				h.Close()
			}
		}
	}
	// Listeners first, so nothing new arrives while the rest closes.
	var wg sync.WaitGroup
	wg.Go(func() { shutdown(s.https) })
	wg.Go(func() { shutdown(s.http80) })
	s.stopBackground()
	// An Admitter holding a client until it can decide (verify's
	// NotReadyWait) returns when the request context ends; derp.Close
	// waits for every connection's handler.
	s.conns.cancelAll()
	var err error
	for _, t := range s.tenants {
		err = errors.Join(err, t.derp.Close())
	}
	wg.Wait()
	s.wg.Wait()
	s.logs.flush()
	return err
}

func orDefault(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}
