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
// (Let's Encrypt by default): NewACME for a DNS name, NewACMEIP for an IP
// address.
type ACMEConfig struct {
	// Hostname is the one DNS name (NewACME) or IP address (NewACMEIP)
	// certificates are requested for. A name must resolve to this server,
	// and the CA must reach it on port 443 (TLS-ALPN-01) or port 80
	// (HTTP-01).
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
	// RetryMin and RetryMax bound the wait after a failed issuance before
	// the CA is asked again: RetryMin after the first failure, doubled
	// after each further failure in a row, never more than RetryMax. Zero
	// means DefaultACMERetryMin and DefaultACMERetryMax. Meanwhile no
	// handshake, probe or healthcheck reaches the CA.
	RetryMin, RetryMax time.Duration
	// Logger receives issuance failures; nil discards.
	Logger *slog.Logger
}

// The default backoff after a failed issuance: 1, 2, 4, … 32 minutes, then
// hourly. Let's Encrypt refuses a sixth failed validation for the same
// name and account within an hour, so retrying faster only earns its rate
// limit; an hour apart a fixed problem (DNS, firewall) is picked up soon
// enough.
const (
	DefaultACMERetryMin = time.Minute
	DefaultACMERetryMax = time.Hour
)

// retryDelay is the wait after the n-th failure in a row (n >= 1): lo,
// doubled n-1 times, at most hi.
func retryDelay(n int, lo, hi time.Duration) time.Duration {
	d := lo
	for i := 1; i < n && d < hi; i++ {
		d *= 2
	}
	return min(d, hi)
}

// ACMECerts gets and renews certificates for a DNS name with
// autocert.Manager: on the first handshake for Hostname it obtains a
// certificate through TLS-ALPN-01 on the HTTPS port, or HTTP-01 on port 80
// when HTTPHandler is serving there; it renews them in the background
// with a third of their lifetime left (30 days at most), with no restart.
//
// While the CA does not issue, handshakes for Hostname would each start a
// new attempt (autocert remembers a failure for one minute only, forever);
// ACMECerts keeps its own backoff instead (see ACMEConfig.RetryMin): a
// handshake in the backoff fails at once, without asking the CA, and the
// last certificate obtained, if still valid, keeps serving.
type ACMECerts struct {
	hostname string
	dir      string // the CA's directory URL, for the failure's hint
	newMgr   func() *autocert.Manager
	retryMin time.Duration
	retryMax time.Duration
	logger   *slog.Logger
	last     atomic.Pointer[CertInfo]

	mu       sync.Mutex
	m        *autocert.Manager // the manager handshakes use now
	h        http.Handler      // m's HTTP-01 handler, once HTTPHandler was called
	fallback http.Handler      // what HTTPHandler was given
	hadCert  bool              // m has issued or loaded a certificate
	lastGood *tls.Certificate  // the last certificate m returned
	failures int               // failed issuances in a row
	nextTry  time.Time         // no issuance before this
	lastErr  error             // the cause of the last failure

	// failures are logged when the error changes, and otherwise at most
	// once a minute.
	lastFail string
	failLog  *logs.Limiter
}

// ACMERequestTimeout bounds each request to the ACME CA.
const ACMERequestTimeout = 30 * time.Second

// prepare checks the settings both ACME modes share and creates the
// cache directory; it returns the logger to use.
func (cfg ACMEConfig) prepare() (*slog.Logger, error) {
	if cfg.CacheDir == "" {
		return nil, errors.New("relay: ACME needs a cache directory to keep its account and certificates")
	}
	if err := os.MkdirAll(cfg.CacheDir, 0o700); err != nil {
		return nil, fmt.Errorf("relay: ACME cache directory: %w", err)
	}
	if cfg.Logger == nil {
		return logs.Discard(), nil
	}
	return cfg.Logger, nil
}

// NewACME returns ACME certificates for cfg. It checks the settings and
// creates the cache directory; it does not contact the CA.
func NewACME(cfg ACMEConfig) (*ACMECerts, error) {
	if cfg.Hostname == "" {
		return nil, errors.New("relay: ACME needs a hostname: the DNS name of this server")
	}
	if net.ParseIP(cfg.Hostname) != nil {
		return nil, fmt.Errorf("relay: ACME hostname %s is an IP address, not a DNS name", cfg.Hostname)
	}
	logger, err := cfg.prepare()
	if err != nil {
		return nil, err
	}
	a := &ACMECerts{
		hostname: cfg.Hostname,
		dir:      cfg.DirectoryURL,
		retryMin: orDefault(cfg.RetryMin, DefaultACMERetryMin),
		retryMax: orDefault(cfg.RetryMax, DefaultACMERetryMax),
		logger:   logger,
		failLog:  logs.NewLimiter(1, time.Minute),
		newMgr: func() *autocert.Manager {
			return &autocert.Manager{
				Prompt:     autocert.AcceptTOS,
				Cache:      autocert.DirCache(cfg.CacheDir),
				HostPolicy: autocert.HostWhitelist(cfg.Hostname),
				Email:      cfg.Email,
				// A CA that accepts connections and then stalls must not
				// hold handshakes for autocert's whole 5-minute budget.
				Client: newACMEClient(cfg),
			}
		},
	}
	a.m = a.newMgr()
	return a, nil
}

// manager is the autocert.Manager handshakes use now.
func (a *ACMECerts) manager() *autocert.Manager {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.m
}

// errBackoff is a handshake refused because the last issuance failed and
// the backoff has not passed.
type errBackoff struct {
	hostname string
	until    time.Time
	cause    error
}

func (e *errBackoff) Error() string {
	return fmt.Sprintf("relay: no ACME certificate for %s; next attempt in %v: %v",
		e.hostname, time.Until(e.until).Round(time.Second), e.cause)
}

func (e *errBackoff) Unwrap() error { return e.cause }

// GetCertificate implements Certificates. A handshake with no server name
// (scanners, clients dialing the IP) is answered with the hostname's
// certificate instead of autocert's "missing server name" error.
func (a *ACMECerts) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if hello.ServerName == "" {
		h := *hello
		h.ServerName = a.hostname
		hello = &h
	}
	name := strings.TrimSuffix(hello.ServerName, ".")
	if wantsACMETLS(hello) || !strings.EqualFold(name, a.hostname) {
		// The CA's TLS-ALPN-01 validation (never held back: an issuance
		// in progress needs it), or a name autocert refuses without
		// asking the CA.
		return a.manager().GetCertificate(hello)
	}
	a.mu.Lock()
	m := a.m
	if now := time.Now(); now.Before(a.nextTry) {
		good, err := a.lastGood, &errBackoff{hostname: a.hostname, until: a.nextTry, cause: a.lastErr}
		a.mu.Unlock()
		if good != nil && now.Before(good.Leaf.NotAfter) {
			return good, nil
		}
		return nil, err
	}
	a.mu.Unlock()

	c, err := m.GetCertificate(hello)
	if err != nil {
		a.noteFailure(m, err)
		return nil, err
	}
	a.mu.Lock()
	if m == a.m {
		a.hadCert, a.failures, a.nextTry, a.lastErr = true, 0, time.Time{}, nil
		if c.Leaf != nil {
			a.lastGood = c
		}
	}
	a.mu.Unlock()
	if c.Leaf != nil {
		if prev := a.last.Load(); prev == nil || !prev.NotAfter.Equal(c.Leaf.NotAfter) {
			info := CertInfoOf(c.Leaf)
			a.last.Store(&info)
		}
	}
	return c, nil
}

// noteFailure starts or extends the backoff after manager m failed to
// issue, and logs the failure: each new error at once, a repeated one at
// most once a minute (the backoff makes repeats rarer still).
//
// While an issuance fails, autocert answers the handshakes that waited
// for it, and those of the next minute, with "missing certificate": they
// did not ask the CA, so they neither count as failures nor hide the
// cause. After a failure the manager is replaced by a new one (unless it
// holds a certificate, whose renewal it owns), so that autocert's fixed
// minute does not stand in for the backoff.
func (a *ACMECerts) noteFailure(m *autocert.Manager, err error) {
	if strings.Contains(err.Error(), "missing certificate") {
		return
	}
	now := time.Now()
	a.mu.Lock()
	if m != a.m {
		a.mu.Unlock()
		return // an attempt of a manager already replaced
	}
	a.failures++
	delay := retryDelay(a.failures, a.retryMin, a.retryMax)
	a.nextTry = now.Add(delay)
	a.lastErr = err
	if !a.hadCert {
		a.m = a.newMgr()
		if a.fallback != nil {
			a.h = a.m.HTTPHandler(a.fallback)
		}
	}
	msg := err.Error()
	isNew := msg != a.lastFail
	a.lastFail = msg
	failures := a.failures
	http01 := a.fallback != nil
	a.mu.Unlock()
	if ok, suppressed := a.failLog.Allow(now); ok || isNew {
		a.logger.Warn("relay: ACME certificate not available; handshakes for the hostname fail until it is",
			"hostname", a.hostname, "err", msg, "failures_in_a_row", failures, "next_attempt_in", delay.String(),
			"hint", acmeFailure{name: a.hostname, directory: a.dir, http01: http01}.hint(err),
			"failures_not_logged", suppressed)
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
	// Asking a manager for its handler is what tells it that HTTP-01 can
	// be offered: every manager made later is asked too (noteFailure).
	a.mu.Lock()
	a.fallback = fallback
	a.h = a.m.HTTPHandler(fallback)
	a.mu.Unlock()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		h := a.h
		a.mu.Unlock()
		h.ServeHTTP(w, r)
	})
}

// ALPNProtocols offers "acme-tls/1" so the CA can validate with
// TLS-ALPN-01 on the HTTPS port.
func (a *ACMECerts) ALPNProtocols() []string { return []string{acme.ALPNProto} }
