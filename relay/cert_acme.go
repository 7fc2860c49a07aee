package relay

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"

	"github.com/tailderp/tailderp/internal/logs"
)

// ACMEConfig configures certificates from an ACME certificate authority
// (Let's Encrypt by default).
type ACMEConfig struct {
	// Hostname is the one DNS name certificates are requested for. It
	// must resolve to this server, and the CA must reach it on port 443
	// (TLS-ALPN-01) or port 80 (HTTP-01).
	Hostname string
	// CacheDir holds the ACME account key and the issued certificates
	// (files 0600). Keep it: without it every start requests a new
	// certificate and hits the CA's rate limits.
	CacheDir string
	// Email is the optional contact the CA may send expiry notices to.
	Email string
	// DirectoryURL is the CA's ACME directory; empty means Let's Encrypt
	// production. Staging, ZeroSSL, step-ca or Pebble work the same
	// (x/crypto v0.58.0 or later: earlier autocert needed the CA to send a
	// Location header when finalizing an order, golang/go#77704).
	DirectoryURL string
	// RootCAs, if non-nil, is the set of roots trusted for the HTTPS
	// connection to DirectoryURL (a private CA's own bundle). Nil means
	// the system roots.
	RootCAs *x509.CertPool
	// Logger receives issuance failures; nil discards.
	Logger *slog.Logger
}

// ACMECerts gets and renews certificates with autocert.Manager: on the
// first handshake for Hostname it obtains a certificate through TLS-ALPN-01
// on the HTTPS port, or HTTP-01 on port 80 when HTTPHandler is serving
// there; it renews them in the background 30 days before expiry, with no
// restart.
type ACMECerts struct {
	hostname string
	m        *autocert.Manager
	logger   *slog.Logger
	last     atomic.Pointer[CertInfo]

	// failures are logged when the error changes, and otherwise at most
	// once a minute: during a CA outage every handshake fails.
	failMu   sync.Mutex
	lastFail string
	failLog  *logs.Limiter
}

// ACMERequestTimeout bounds each request to the ACME CA.
const ACMERequestTimeout = 30 * time.Second

// NewACME returns ACME certificates for cfg. It checks the settings and
// creates the cache directory; it does not contact the CA.
func NewACME(cfg ACMEConfig) (*ACMECerts, error) {
	if cfg.Hostname == "" {
		return nil, errors.New("relay: ACME needs a hostname: the DNS name of this server")
	}
	if net.ParseIP(cfg.Hostname) != nil {
		return nil, fmt.Errorf("relay: ACME hostname %s is an IP address, not a DNS name", cfg.Hostname)
	}
	if cfg.CacheDir == "" {
		return nil, errors.New("relay: ACME needs a cache directory to keep its account and certificates")
	}
	if err := os.MkdirAll(cfg.CacheDir, 0o700); err != nil {
		return nil, fmt.Errorf("relay: ACME cache directory: %w", err)
	}
	logger := cfg.Logger
	if logger == nil {
		logger = logs.Discard()
	}
	// A CA that accepts connections and then stalls must not hold
	// handshakes for autocert's whole 5-minute issuance budget.
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if cfg.RootCAs != nil {
		tr.TLSClientConfig = &tls.Config{RootCAs: cfg.RootCAs}
	}
	client := &acme.Client{
		DirectoryURL: cfg.DirectoryURL,
		UserAgent:    "tailderp",
		HTTPClient:   &http.Client{Transport: tr, Timeout: ACMERequestTimeout},
	}
	return &ACMECerts{
		hostname: cfg.Hostname,
		logger:   logger,
		failLog:  logs.NewLimiter(1, time.Minute),
		m: &autocert.Manager{
			Prompt:     autocert.AcceptTOS,
			Cache:      autocert.DirCache(cfg.CacheDir),
			HostPolicy: autocert.HostWhitelist(cfg.Hostname),
			Email:      cfg.Email,
			Client:     client,
		},
	}, nil
}

// GetCertificate implements Certificates. A handshake with no server name
// (scanners, clients dialing the IP) is answered with the hostname's
// certificate instead of autocert's "missing server name" error.
func (a *ACMECerts) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if hello.ServerName == "" {
		h := *hello
		h.ServerName = a.hostname
		hello = &h
	}
	c, err := a.m.GetCertificate(hello)
	if err != nil {
		if strings.EqualFold(hello.ServerName, a.hostname) {
			a.noteFailure(err)
		}
		return nil, err
	}
	if c.Leaf != nil {
		if prev := a.last.Load(); prev == nil || !prev.NotAfter.Equal(c.Leaf.NotAfter) {
			info := certInfo(c.Leaf)
			a.last.Store(&info)
		}
	}
	return c, nil
}

// noteFailure logs a failure to get the certificate: each new error at
// once, a repeated one at most once a minute. While autocert backs off
// after a failure it answers "missing certificate"; the cause logged
// before stays the one worth reading, so that answer is not logged as new.
func (a *ACMECerts) noteFailure(err error) {
	msg := err.Error()
	a.failMu.Lock()
	isNew := msg != a.lastFail && !strings.Contains(msg, "missing certificate")
	if isNew {
		a.lastFail = msg
	}
	cause := a.lastFail
	a.failMu.Unlock()
	if ok, suppressed := a.failLog.Allow(time.Now()); ok || isNew {
		a.logger.Warn("relay: ACME certificate not available; handshakes for the hostname fail until it is",
			"hostname", a.hostname, "err", cause, "failures_not_logged", suppressed)
	}
}

// Current describes the last certificate served; ok is false before the
// first one.
func (a *ACMECerts) Current() (info CertInfo, ok bool) {
	p := a.last.Load()
	if p == nil {
		return CertInfo{}, false
	}
	return *p, true
}

// HTTPHandler implements Certificates: it answers HTTP-01 challenges and
// passes other requests to fallback.
func (a *ACMECerts) HTTPHandler(fallback http.Handler) http.Handler {
	return a.m.HTTPHandler(fallback)
}

// ALPNProtocols offers "acme-tls/1" so the CA can validate with
// TLS-ALPN-01 on the HTTPS port.
func (a *ACMECerts) ALPNProtocols() []string { return []string{acme.ALPNProto} }
