package relay

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/acme"
	"tailscale.com/atomicfile"

	"github.com/tailderp/tailderp/internal/logs"
)

// ShortlivedProfile is the ACME certificate profile a CA issues IP address
// certificates under: Let's Encrypt's "shortlived", about 6 days. ACMEIPCerts
// asks for it when the CA's directory offers it.
const ShortlivedProfile acme.ProfileName = "shortlived"

// ACMEIPCerts gets and renews a certificate for the server's IP address
// from an ACME certificate authority, so that clients dialing the address
// (they send no server name) verify it against the CA's root like any
// web certificate, with no CertName pin. autocert cannot do this: it
// orders DNS identifiers and writes the name into a CSR as a DNS name, so
// this is a small issuer on acme.Client instead.
//
// It works in the background, never in a handshake: Start issues a
// certificate at once (unless a valid one is in the cache directory),
// then renews it when a third of its lifetime is left, and swaps it in
// without a restart; a handshake only reads the current certificate. A
// failed issuance is retried after ACMEConfig.RetryMin, doubling with each
// failure in a row up to RetryMax, while the previous certificate keeps
// serving. The CA validates with HTTP-01 on port 80 (when HTTPHandler is
// serving there) or TLS-ALPN-01 on the HTTPS port, in that order.
//
// Make one with NewACMEIP; call Start once the relay listens, and Close.
type ACMEIPCerts struct {
	ip       netip.Addr
	certPath string
	keyPath  string // the ACME account key
	email    string
	retryMin time.Duration
	retryMax time.Duration
	logger   *slog.Logger
	client   *acme.Client

	cur atomic.Pointer[issuedCert] // nil before the first

	tryHTTP01 atomic.Bool // HTTPHandler was asked for: port 80 is served

	mu         sync.Mutex
	httpTokens map[string]string // HTTP-01 path → key authorization
	alpnCert   *tls.Certificate  // TLS-ALPN-01 challenge certificate, while one is pending
	lastErr    error             // the last failed issuance, nil after a success
	failures   int               // failed issuances in a row
	nextTry    time.Time         // no issuance before this, after a failure
	registered bool

	failLog  *logs.Limiter
	lastFail string

	startOnce sync.Once
	cancel    context.CancelFunc
	done      chan struct{}
}

// NewACMEIP returns ACME certificates for the IP address cfg.Hostname. It
// creates the cache directory and the ACME account key there, and loads a
// certificate an earlier run left (still valid and for this address); it
// does not contact the CA before Start.
func NewACMEIP(cfg ACMEConfig) (*ACMEIPCerts, error) {
	ip, err := netip.ParseAddr(cfg.Hostname)
	if err != nil {
		return nil, fmt.Errorf("relay: ACME IP certificate: %q is not an IP address", cfg.Hostname)
	}
	ip = ip.Unmap()
	logger, err := cfg.prepare()
	if err != nil {
		return nil, err
	}
	a := &ACMEIPCerts{
		ip:         ip,
		certPath:   ACMEIPCertPath(cfg.CacheDir, ip.String()),
		keyPath:    filepath.Join(cfg.CacheDir, acmeAccountKeyFile),
		email:      cfg.Email,
		retryMin:   orDefault(cfg.RetryMin, DefaultACMERetryMin),
		retryMax:   orDefault(cfg.RetryMax, DefaultACMERetryMax),
		logger:     logger,
		client:     newACMEClient(cfg),
		httpTokens: map[string]string{},
		failLog:    logs.NewLimiter(1, time.Hour),
	}
	if a.client.Key, err = loadOrCreateAccountKey(a.keyPath); err != nil {
		return nil, fmt.Errorf("relay: ACME account key: %w", err)
	}
	switch c, err := a.loadCached(time.Now()); {
	case err == nil:
		a.cur.Store(newIssuedCert(c))
		logger.Info("relay: loaded the IP address certificate issued earlier", "ip", ip.String(), "path", a.certPath,
			"not_after", c.Leaf.NotAfter.Format(time.RFC3339))
	case !errors.Is(err, os.ErrNotExist):
		logger.Warn("relay: the IP address certificate issued earlier does not load; getting a new one", "path", a.certPath, "err", err)
	}
	return a, nil
}

// acmeAccountKeyFile is the ACME account key's file in the cache
// directory: autocert's name and format, so a relay moving between a DNS
// name and an IP address keeps one account with the CA.
const acmeAccountKeyFile = "acme_account+key"

// ACMEIPCertPath is the file, in cacheDir, where ACMEIPCerts keeps the
// key and certificate chain of ip (PEM, mode 0600). It is not the manual
// mode's <ip>.crt, so switching modes never serves one mode's certificate
// in the other.
func ACMEIPCertPath(cacheDir, ip string) string {
	return filepath.Join(cacheDir, "acme-ip-"+strings.ReplaceAll(ip, ":", "-")+".pem")
}

// newACMEClient is the ACME client for cfg: its own transport (cfg.RootCAs)
// and a bound on every request, so a CA that accepts connections and
// stalls cannot hold an issuance forever.
func newACMEClient(cfg ACMEConfig) *acme.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if cfg.RootCAs != nil {
		tr.TLSClientConfig = &tls.Config{RootCAs: cfg.RootCAs}
	}
	return &acme.Client{
		DirectoryURL: cfg.DirectoryURL,
		UserAgent:    "tailderp",
		HTTPClient:   &http.Client{Transport: tr, Timeout: ACMERequestTimeout},
	}
}

// loadOrCreateAccountKey reads the P-256 account key at path, or makes
// one and writes it (0600, atomically).
func loadOrCreateAccountKey(path string) (crypto.Signer, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		blk, _ := pem.Decode(b)
		if blk == nil || !strings.Contains(blk.Type, "PRIVATE KEY") {
			return nil, fmt.Errorf("%s: no PEM private key in it (remove it to register a new account)", path)
		}
		k, err := parsePrivateKey(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w (remove it to register a new account)", path, err)
		}
		return k, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return nil, err
	}
	if err := atomicfile.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return nil, err
	}
	return k, nil
}

// parsePrivateKey reads a DER private key in the encodings autocert and
// tls.X509KeyPair accept.
func parsePrivateKey(der []byte) (crypto.Signer, error) {
	if k, err := x509.ParseECPrivateKey(der); err == nil {
		return k, nil
	}
	if k, err := x509.ParsePKCS1PrivateKey(der); err == nil {
		return k, nil
	}
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, errors.New("unknown private key type")
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, errors.New("private key cannot sign")
	}
	return s, nil
}

// loadCached reads the certificate an earlier run left, if it is valid at
// now and for the address.
func (a *ACMEIPCerts) loadCached(now time.Time) (*tls.Certificate, error) {
	b, err := os.ReadFile(a.certPath)
	if err != nil {
		return nil, err
	}
	c, err := tls.X509KeyPair(b, b)
	if err != nil {
		return nil, err
	}
	if err := a.check(c.Leaf, now); err != nil {
		return nil, err
	}
	return &c, nil
}

// check says whether leaf can be served for the address at now.
func (a *ACMEIPCerts) check(leaf *x509.Certificate, now time.Time) error {
	if err := leaf.VerifyHostname(a.ip.String()); err != nil {
		return err
	}
	if now.Before(leaf.NotBefore) || !now.Before(leaf.NotAfter) {
		return fmt.Errorf("certificate valid from %s to %s, not now", leaf.NotBefore.Format(time.RFC3339), leaf.NotAfter.Format(time.RFC3339))
	}
	return nil
}

// Start begins getting and renewing the certificate in the background.
// Call it once the relay listens: the CA's validation connects to it.
// Calling it again does nothing.
func (a *ACMEIPCerts) Start() {
	a.startOnce.Do(func() {
		ctx, cancel := context.WithCancel(context.Background())
		a.cancel = cancel
		a.done = make(chan struct{})
		go a.run(ctx)
	})
}

// Close stops the background work and waits for it; an issuance in
// progress is abandoned.
func (a *ACMEIPCerts) Close() {
	a.startOnce.Do(func() {}) // no Start after Close
	if a.cancel != nil {
		a.cancel()
		<-a.done
	}
}

// run issues and renews until ctx ends.
func (a *ACMEIPCerts) run(ctx context.Context) {
	defer close(a.done)
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		t.Reset(time.Until(a.nextIssue()))
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		c, err := a.issue(ctx)
		if ctx.Err() != nil {
			return
		}
		a.finish(c, err)
	}
}

// nextIssue is when the next issuance is due: now without a certificate,
// else when a third of its lifetime is left; after a failure, not before
// the backoff allows.
func (a *ACMEIPCerts) nextIssue() time.Time {
	due := time.Now()
	if c := a.cur.Load(); c != nil {
		due = c.renewAt
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.nextTry.After(due) {
		return a.nextTry
	}
	return due
}

// issuedCert is a certificate the CA issued (Leaf set), described once:
// what Current reports, and when it is renewed (one draw of the jitter, so
// the time logged is the time used).
type issuedCert struct {
	cert    *tls.Certificate
	info    CertInfo
	renewAt time.Time
}

func newIssuedCert(c *tls.Certificate) *issuedCert {
	return &issuedCert{cert: c, info: CertInfoOf(c.Leaf), renewAt: renewAt(c.Leaf)}
}

// renewAt is when a certificate is renewed: with a third of its lifetime
// left, less a jitter of up to a thirtieth of it so a fleet of relays
// started together does not renew in the same second. Let's Encrypt's
// six-day certificates are renewed with about two days left; a renewal
// that fails keeps being retried (up to hourly) for those two days while
// the current certificate serves.
func renewAt(leaf *x509.Certificate) time.Time {
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	var jitter time.Duration
	if span := int64(life / 30); span > 0 {
		if n, err := rand.Int(rand.Reader, big.NewInt(span)); err == nil {
			jitter = time.Duration(n.Int64())
		}
	}
	return leaf.NotAfter.Add(-life/3 - jitter)
}

// finish records the outcome of an issuance.
func (a *ACMEIPCerts) finish(c *tls.Certificate, err error) {
	now := time.Now()
	if err == nil {
		ic := newIssuedCert(c)
		a.cur.Store(ic)
		a.mu.Lock()
		a.failures, a.nextTry, a.lastErr, a.lastFail = 0, time.Time{}, nil, ""
		a.mu.Unlock()
		a.logger.Info("relay: got a certificate for the IP address from the ACME CA", "ip", a.ip.String(),
			"not_after", c.Leaf.NotAfter.Format(time.RFC3339),
			"renew_at", ic.renewAt.Round(time.Second).Format(time.RFC3339), "path", a.certPath)
		return
	}
	a.mu.Lock()
	a.failures++
	delay := retryDelay(a.failures, a.retryMin, a.retryMax)
	a.nextTry = now.Add(delay)
	a.lastErr = err
	isNew := err.Error() != a.lastFail
	a.lastFail = err.Error()
	failures := a.failures
	a.mu.Unlock()

	serving := "nothing: handshakes fail until a certificate is issued"
	if cur := a.cur.Load(); cur != nil {
		serving = "the previous certificate, valid until " + cur.info.NotAfter.Format(time.RFC3339)
	}
	if ok, _ := a.failLog.Allow(now); ok || isNew {
		a.logger.Warn("relay: ACME certificate for the IP address not issued",
			"ip", a.ip.String(), "err", err, "failures_in_a_row", failures,
			"next_attempt_in", delay.String(), "serving", serving,
			"hint", acmeFailure{name: a.ip.String(), isIP: true, directory: a.client.DirectoryURL, http01: a.tryHTTP01.Load()}.hint(err))
	}
}

// Current describes the certificate being served; ok is false before the
// first issuance.
func (a *ACMEIPCerts) Current() (CertInfo, bool) {
	c := a.cur.Load()
	if c == nil {
		return CertInfo{}, false
	}
	return c.info, true
}

// GetCertificate implements Certificates. It serves the address's
// certificate whatever the server name (clients dialing an IP send none),
// and the TLS-ALPN-01 challenge certificate to the CA's validation.
func (a *ACMEIPCerts) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if wantsACMETLS(hello) {
		a.mu.Lock()
		defer a.mu.Unlock()
		if a.alpnCert == nil {
			return nil, errors.New("relay: no TLS-ALPN-01 challenge pending")
		}
		return a.alpnCert, nil
	}
	c := a.cur.Load()
	if c == nil {
		a.mu.Lock()
		err := a.lastErr
		a.mu.Unlock()
		if err != nil {
			return nil, fmt.Errorf("relay: no certificate for %s yet: %w", a.ip, err)
		}
		return nil, fmt.Errorf("relay: no certificate for %s yet: being issued", a.ip)
	}
	cc := *c.cert
	cc.Certificate = slices.Clip(cc.Certificate)
	return &cc, nil
}

// wantsACMETLS reports whether hello is a CA's TLS-ALPN-01 validation,
// which offers "acme-tls/1" alone.
func wantsACMETLS(hello *tls.ClientHelloInfo) bool {
	return len(hello.SupportedProtos) == 1 && hello.SupportedProtos[0] == acme.ALPNProto
}

// HTTPHandler implements Certificates: it answers the CA's HTTP-01
// requests and passes the rest to fallback. Asking for it says port 80 is
// served, so HTTP-01 is tried first.
func (a *ACMEIPCerts) HTTPHandler(fallback http.Handler) http.Handler {
	a.tryHTTP01.Store(true)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.URL.Path, "/.well-known/acme-challenge/") {
			fallback.ServeHTTP(w, r)
			return
		}
		a.mu.Lock()
		body, ok := a.httpTokens[r.URL.Path]
		a.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, body)
	})
}

// ALPNProtocols offers "acme-tls/1" so the CA can validate with
// TLS-ALPN-01 on the HTTPS port.
func (a *ACMEIPCerts) ALPNProtocols() []string { return []string{acme.ALPNProto} }

// issueTimeout bounds one issuance: registration, orders, validations
// and finalization.
const issueTimeout = 5 * time.Minute

// issue gets a new certificate: one order per challenge type until one
// validates (a failed challenge fails its order).
func (a *ACMEIPCerts) issue(ctx context.Context) (*tls.Certificate, error) {
	ctx, cancel := context.WithTimeout(ctx, issueTimeout)
	defer cancel()
	if err := a.register(ctx); err != nil {
		return nil, err
	}
	dir, err := a.client.Discover(ctx)
	if err != nil {
		return nil, fmt.Errorf("ACME directory: %w", err)
	}
	var opts []acme.OrderOption
	if _, ok := dir.Profiles[ShortlivedProfile]; ok {
		opts = append(opts, acme.WithOrderIssuanceProfile(ShortlivedProfile))
	}
	types := []string{"tls-alpn-01"}
	if a.tryHTTP01.Load() {
		types = []string{"http-01", "tls-alpn-01"}
	}
	var errs []error
	for _, typ := range types {
		order, err := a.authorize(ctx, typ, opts)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", typ, err))
			if ctx.Err() != nil {
				break
			}
			continue
		}
		return a.finalize(ctx, order)
	}
	return nil, errors.Join(errs...)
}

// register makes sure the account exists; once per process.
func (a *ACMEIPCerts) register(ctx context.Context) error {
	a.mu.Lock()
	done := a.registered
	a.mu.Unlock()
	if done {
		return nil
	}
	acct := &acme.Account{}
	if a.email != "" {
		acct.Contact = []string{"mailto:" + a.email}
	}
	if _, err := a.client.Register(ctx, acct, acme.AcceptTOS); err != nil && !errors.Is(err, acme.ErrAccountAlreadyExists) {
		return fmt.Errorf("ACME account: %w", err)
	}
	a.mu.Lock()
	a.registered = true
	a.mu.Unlock()
	return nil
}

// authorize places an order for the address and satisfies its
// authorization with a challenge of type typ, returning the order once it
// is ready to finalize.
func (a *ACMEIPCerts) authorize(ctx context.Context, typ string, opts []acme.OrderOption) (*acme.Order, error) {
	o, err := a.client.AuthorizeOrder(ctx, acme.IPIDs(a.ip.String()), opts...)
	if err != nil {
		return nil, fmt.Errorf("new order: %w", err)
	}
	for _, u := range o.AuthzURLs {
		z, err := a.client.GetAuthorization(ctx, u)
		if err != nil {
			return nil, fmt.Errorf("authorization: %w", err)
		}
		if z.Status != acme.StatusPending {
			continue
		}
		var chal *acme.Challenge
		for _, c := range z.Challenges {
			if c.Type == typ {
				chal = c
			}
		}
		if chal == nil {
			return nil, fmt.Errorf("the CA offers no %s challenge for %s", typ, a.ip)
		}
		cleanup, err := a.fulfill(chal)
		if err != nil {
			return nil, err
		}
		_, err = a.client.Accept(ctx, chal)
		if err == nil {
			_, err = a.client.WaitAuthorization(ctx, z.URI)
		}
		cleanup()
		if err != nil {
			return nil, fmt.Errorf("validation: %w", err)
		}
	}
	o, err = a.client.WaitOrder(ctx, o.URI)
	if err != nil {
		return nil, fmt.Errorf("order: %w", err)
	}
	return o, nil
}

// fulfill makes the answer to chal available to the CA until cleanup.
func (a *ACMEIPCerts) fulfill(chal *acme.Challenge) (cleanup func(), err error) {
	switch chal.Type {
	case "http-01":
		body, err := a.client.HTTP01ChallengeResponse(chal.Token)
		if err != nil {
			return nil, err
		}
		path := a.client.HTTP01ChallengePath(chal.Token)
		a.mu.Lock()
		a.httpTokens[path] = body
		a.mu.Unlock()
		return func() {
			a.mu.Lock()
			delete(a.httpTokens, path)
			a.mu.Unlock()
		}, nil
	case "tls-alpn-01":
		c, err := a.client.TLSALPN01ChallengeCert(chal.Token, a.ip.String())
		if err != nil {
			return nil, err
		}
		a.mu.Lock()
		a.alpnCert = &c
		a.mu.Unlock()
		return func() {
			a.mu.Lock()
			a.alpnCert = nil
			a.mu.Unlock()
		}, nil
	}
	return nil, fmt.Errorf("unsupported challenge %s", chal.Type)
}

// finalize sends the CSR for a new key, checks the certificate, and keeps
// key and chain in the cache directory (one file, 0600, atomically: a
// crash leaves the old pair or the new one).
func (a *ACMEIPCerts) finalize(ctx context.Context, o *acme.Order) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{IPAddresses: []net.IP{a.ip.AsSlice()}}, key)
	if err != nil {
		return nil, fmt.Errorf("certificate request: %w", err)
	}
	der, _, err := a.client.CreateCertFromOrder(ctx, o, csr, true)
	if err != nil {
		return nil, fmt.Errorf("finalize order: %w", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	for _, b := range der {
		pemBytes = append(pemBytes, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: b})...)
	}
	c, err := tls.X509KeyPair(pemBytes, pemBytes)
	if err != nil {
		return nil, fmt.Errorf("issued certificate: %w", err)
	}
	if err := a.check(c.Leaf, time.Now()); err != nil {
		return nil, fmt.Errorf("issued certificate: %w", err)
	}
	if err := atomicfile.WriteFile(a.certPath, pemBytes, 0o600); err != nil {
		// Serve it anyway; the next start issues again.
		a.logger.Warn("relay: cannot keep the issued certificate; a restart will order a new one", "err", err)
	}
	return &c, nil
}
