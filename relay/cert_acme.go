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
	"sync/atomic"

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
	// production. Staging, ZeroSSL, step-ca or Pebble work the same.
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
}

// NewACME returns ACME certificates for cfg. It checks the settings and
// creates the cache directory; it does not contact the CA.
func NewACME(cfg ACMEConfig) (*ACMECerts, error) {
	if cfg.Hostname == "" {
		return nil, errors.New("relay: -certmode letsencrypt needs -hostname (TAILSCALE_DERP_HOSTNAME): the DNS name of this server")
	}
	if net.ParseIP(cfg.Hostname) != nil {
		return nil, fmt.Errorf("relay: -hostname %s is an IP address; ACME certificates need a DNS name: use -certmode manual for a self-signed IP certificate pinned by CertName", cfg.Hostname)
	}
	if cfg.CacheDir == "" {
		return nil, errors.New("relay: -certmode letsencrypt needs -certdir to keep its account and certificates")
	}
	if err := os.MkdirAll(cfg.CacheDir, 0o700); err != nil {
		return nil, fmt.Errorf("relay: -certdir %s: %w", cfg.CacheDir, err)
	}
	logger := cfg.Logger
	if logger == nil {
		logger = logs.Discard()
	}
	client := &acme.Client{DirectoryURL: cfg.DirectoryURL, UserAgent: "tailderp"}
	if cfg.RootCAs != nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = &tls.Config{RootCAs: cfg.RootCAs}
		client.HTTPClient = &http.Client{Transport: tr}
	}
	return &ACMECerts{
		hostname: cfg.Hostname,
		logger:   logger,
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
		if hello.ServerName == a.hostname {
			a.logger.Warn("relay: ACME certificate not available", "hostname", a.hostname, "err", err)
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
