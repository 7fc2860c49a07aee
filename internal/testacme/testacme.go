// Package testacme runs a real ACME certificate authority inside a test
// process, on loopback only, for tests of ACME clients such as the relay's
// -certmode letsencrypt.
//
// The CA is Pebble (github.com/letsencrypt/pebble/v2), Let's Encrypt's test
// CA, run in-process: its web front end (the ACME API) behind an
// [httptest.Server] with its own TLS certificate, its validation authority
// (VA) doing real HTTP-01 and TLS-ALPN-01 validations, and its signing CA
// with a root and an intermediate generated at start. Validation is real:
// PEBBLE_VA_ALWAYS_VALID is forced off, so a certificate is issued only if
// the VA fetched the key authorization over HTTP, or completed a TLS
// handshake with ALPN "acme-tls/1" and saw the right validation certificate.
//
// Nothing leaves the machine. Pebble resolves every name through a DNS
// server of this package on 127.0.0.1 that answers A 127.0.0.1 for every
// name (and no AAAA), so no real DNS is queried. The VA connects, for every
// name, to one of two gateways on 127.0.0.1:
//
//   - the HTTP-01 gateway (Pebble's "httpPort") forwards each request to the
//     address set with [CA.SetHTTP01Target], with the Host header's port
//     removed, exactly as a CA validating on port 80 sends it;
//   - the TLS-ALPN-01 gateway (Pebble's "tlsPort") forwards each TCP
//     connection byte for byte to the address set with
//     [CA.SetTLSALPN01Target].
//
// A gateway with no target closes every connection, as if nothing were
// listening: that is how a test makes one challenge type fail so that the
// other is the only one that can succeed. The gateways let the server under
// test bind port 0 and be started after the CA, and count the connections
// the VA made ([CA.HTTP01Attempts], [CA.TLSALPN01Attempts]);
// [CA.ValidatedBy] then says which challenge validated an issued
// certificate, from Pebble's own records.
//
// The environment knobs Pebble reads are set while it is constructed and
// restored afterwards: no random sleeps before validations
// (PEBBLE_VA_NOSLEEP=1), no deliberately rejected nonces
// (PEBBLE_WFE_NONCEREJECT=0), no reuse of earlier valid authorizations
// (PEBBLE_AUTHZREUSE=0, so every order is really validated) and real
// validation (PEBBLE_VA_ALWAYS_VALID=0). Tests using this package may run in
// parallel.
//
// A typical test:
//
//	// FinalizeLocation: autocert before x/crypto v0.58.0 needs it.
//	ca := testacme.Start(t, testacme.Options{FinalizeLocation: true})
//	certs, _ := relay.NewACME(relay.ACMEConfig{
//		Hostname:     "derp.test",
//		CacheDir:     t.TempDir(),
//		DirectoryURL: ca.DirectoryURL,
//		RootCAs:      ca.DirectoryCAs, // trust Pebble's API certificate
//	})
//	srv := &relay.Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: certs, ...}
//	srv.Start()
//	ca.SetTLSALPN01Target(srv.LocalAddr().String())
//	// A TLS client trusting ca.IssuerRoots now gets a certificate for
//	// derp.test issued by Pebble after a real TLS-ALPN-01 validation.
//
// Pebble issues certificates for IP address identifiers too (it validates
// them by connecting to the address itself, i.e. to the gateways on
// 127.0.0.1); [Options.ShortlivedValidity] adds a "shortlived" profile like
// Let's Encrypt's, with a lifetime short enough to watch a renewal.
// [CA.Orders] lists the new-order requests the CA received, for tests of
// a client's backoff.
//
// Pebble's log is kept in memory ([CA.Log]) and printed through t.Log when
// the test fails.
package testacme

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/letsencrypt/pebble/v2/acme"
	pebbleca "github.com/letsencrypt/pebble/v2/ca"
	"github.com/letsencrypt/pebble/v2/core"
	"github.com/letsencrypt/pebble/v2/db"
	"github.com/letsencrypt/pebble/v2/va"
	"github.com/letsencrypt/pebble/v2/wfe"

	"github.com/tailderp/tailderp/internal/testutil"
)

// Challenge types, as ACME names them.
const (
	HTTP01    = acme.ChallengeHTTP01    // "http-01"
	TLSALPN01 = acme.ChallengeTLSALPN01 // "tls-alpn-01"
)

// Options configures the CA. The zero value is Pebble's defaults.
type Options struct {
	// PromoteCommonName puts the first name of each certificate in its
	// subject common name too, as Let's Encrypt's "classic" profile does.
	// By default a certificate names its hostnames only in the subject
	// alternative names, like Let's Encrypt's newer profiles.
	PromoteCommonName bool

	// ValidityPeriod is the lifetime of issued certificates; zero means
	// Pebble's default of 90 days.
	ValidityPeriod time.Duration

	// FinalizeLocation adds to each order-finalization response a
	// Location header naming the order, as Let's Encrypt's Boulder does.
	// Pebble leaves it out on purpose (RFC 8555 does not require it;
	// letsencrypt/pebble#508), and so do some CAs (Buypass). Clients that
	// need it cannot finish an order without it: among them
	// golang.org/x/crypto/acme/autocert before x/crypto v0.58.0
	// (golang/go#77704), whose CreateOrderCert then polls the order URL "".
	FinalizeLocation bool

	// ShortlivedValidity, if non-zero, adds a second profile named
	// "shortlived" (Let's Encrypt's name for its ~6-day profile, the one
	// it issues IP address certificates under) whose certificates live
	// this long, in whole seconds. Pebble gives an order that names no
	// profile a random one of those it has, so a client that wants a
	// lifetime names the profile.
	ShortlivedValidity time.Duration
}

// ShortlivedProfile is the name of the profile ShortlivedValidity adds.
const ShortlivedProfile = "shortlived"

// CA is a running Pebble CA with its DNS server and validation gateways.
// Its fields are read-only.
type CA struct {
	// DirectoryURL is the ACME directory, https://127.0.0.1:<port>/dir.
	DirectoryURL string
	// DirectoryCAs trusts the TLS certificate of the ACME API at
	// DirectoryURL (and nothing else): what a client needs in place of the
	// system roots to talk to this CA (relay.ACMEConfig.RootCAs).
	DirectoryCAs *x509.CertPool
	// DirectoryCAPEM is the same certificate as PEM, for a client that
	// takes a CA bundle file (-acme-ca-bundle).
	DirectoryCAPEM []byte

	// IssuerRoot is the root that the certificates this CA issues chain
	// to, generated when the CA started. The chain a client downloads
	// holds the leaf and one intermediate.
	IssuerRoot *x509.Certificate
	// IssuerRoots holds IssuerRoot alone: what a TLS client of a server
	// using this CA's certificates trusts.
	IssuerRoots *x509.CertPool
	// IssuerRootPEM is IssuerRoot as PEM.
	IssuerRootPEM []byte

	// DNSAddr is the TCP address of the DNS server Pebble resolves names
	// with. It answers A 127.0.0.1 for every name.
	DNSAddr string

	db       *db.MemoryStore
	api      *httptest.Server
	dns      *dnsServer
	http01   *httpGateway
	tlsALPN  *tcpGateway
	logBuf   *testutil.Buffer
	closeOne sync.Once

	ordersMu sync.Mutex
	orders   []Order // each new-order request, in arrival order
}

// Order is a new-order request as the CA received it.
type Order struct {
	At time.Time
	// Profile is the profile the request named; "" for none (Pebble then
	// picks one of its profiles at random).
	Profile string
}

// envMu serializes the environment changes around Pebble's constructors,
// which read their knobs from the environment once.
var envMu sync.Mutex

// pebbleEnv are the knobs set while Pebble is constructed.
var pebbleEnv = map[string]string{
	"PEBBLE_VA_NOSLEEP":      "1", // validate at once, not after 0-5 s
	"PEBBLE_VA_ALWAYS_VALID": "0", // validation must be real
	"PEBBLE_WFE_NONCEREJECT": "0", // no random badNonce errors
	"PEBBLE_AUTHZREUSE":      "0", // every order is validated afresh
}

// withPebbleEnv runs f with pebbleEnv set, restoring the environment after.
func withPebbleEnv(f func()) {
	envMu.Lock()
	defer envMu.Unlock()
	for k, v := range pebbleEnv {
		old, had := os.LookupEnv(k)
		os.Setenv(k, v)
		defer func() {
			if had {
				os.Setenv(k, old)
			} else {
				os.Unsetenv(k)
			}
		}()
	}
	f()
}

// Start runs a CA until the end of the test. Both gateways start with no
// target: set them with SetHTTP01Target and SetTLSALPN01Target once the
// server under test listens.
func Start(t testing.TB, opts Options) *CA {
	t.Helper()
	c, err := start(opts)
	if err != nil {
		t.Fatalf("testacme: %v", err)
	}
	t.Cleanup(func() {
		c.Close()
		if t.Failed() {
			t.Logf("testacme: Pebble log:\n%s", c.Log())
		}
	})
	return c
}

func start(opts Options) (_ *CA, err error) {
	c := &CA{logBuf: new(testutil.Buffer)}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	logger := log.New(c.logBuf, "pebble ", log.Lmicroseconds)

	if c.dns, err = startDNS([4]byte{127, 0, 0, 1}); err != nil {
		return nil, err
	}
	c.DNSAddr = c.dns.addr()
	if c.http01, err = startHTTPGateway(logger); err != nil {
		return nil, err
	}
	if c.tlsALPN, err = startTCPGateway(logger); err != nil {
		return nil, err
	}

	profile := pebbleca.Profile{
		Description:       "testacme default profile",
		ValidityPeriod:    uint64(opts.ValidityPeriod / time.Second),
		PromoteCommonName: opts.PromoteCommonName,
	}
	profiles := map[string]pebbleca.Profile{"default": profile}
	if opts.ShortlivedValidity > 0 {
		profiles[ShortlivedProfile] = pebbleca.Profile{
			Description:       "testacme short-lived profile",
			ValidityPeriod:    uint64(opts.ShortlivedValidity / time.Second),
			PromoteCommonName: opts.PromoteCommonName,
		}
	}
	c.db = db.NewMemoryStore()
	var handler *wfe.WebFrontEndImpl
	var ca *pebbleca.CAImpl
	withPebbleEnv(func() {
		// ECDSA keys are generated much faster than RSA ones, under -race too.
		ca = pebbleca.New(logger, c.db, "", "ecdsa", 0, 1, profiles)
		v := va.New(logger, c.http01.port(), c.tlsALPN.port(), false, c.DNSAddr, c.db)
		w := wfe.New(logger, c.db, v, ca, []string{"pebble.letsencrypt.org"}, false, false, 0, 0)
		handler = &w
	})

	api := c.countOrders(handler.Handler())
	if opts.FinalizeLocation {
		api = addFinalizeLocation(api)
	}
	c.api = httptest.NewUnstartedServer(api)
	c.api.Config.ErrorLog = log.New(c.logBuf, "pebble-api ", log.Lmicroseconds)
	c.api.StartTLS()
	c.DirectoryURL = c.api.URL + wfe.DirectoryPath
	apiCert := c.api.Certificate()
	c.DirectoryCAs = x509.NewCertPool()
	c.DirectoryCAs.AddCert(apiCert)
	c.DirectoryCAPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: apiCert.Raw})

	root := ca.GetRootCert(0)
	if root == nil || root.Cert == nil {
		return nil, fmt.Errorf("pebble generated no root")
	}
	c.IssuerRoot = root.Cert
	c.IssuerRoots = x509.NewCertPool()
	c.IssuerRoots.AddCert(root.Cert)
	c.IssuerRootPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.Cert.Raw})
	return c, nil
}

// addFinalizeLocation sets, on responses to POST /finalize-order/<id>, the
// header "Location: https://<host>/my-order/<id>": the order's URL, as
// Pebble builds it.
func addFinalizeLocation(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if id, ok := strings.CutPrefix(r.URL.Path, "/finalize-order/"); ok && r.Method == http.MethodPost {
			w.Header().Set("Location", "https://"+r.Host+"/my-order/"+id)
		}
		next.ServeHTTP(w, r)
	})
}

// newOrderPath is where Pebble takes new orders (wfe's newOrderPath).
const newOrderPath = "/order-plz"

// countOrders notes every new-order request (its time and the profile it
// names) before passing it on to Pebble, whether or not Pebble then
// accepts the order.
func (c *CA) countOrders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == newOrderPath && r.Method == http.MethodPost {
			o := Order{At: time.Now()}
			body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
			r.Body.Close()
			r.Body = io.NopCloser(bytes.NewReader(body))
			if err == nil {
				o.Profile = requestedProfile(body)
			}
			c.ordersMu.Lock()
			c.orders = append(c.orders, o)
			c.ordersMu.Unlock()
		}
		next.ServeHTTP(w, r)
	})
}

// requestedProfile reads the "profile" of a new-order request: a JWS in
// flattened JSON whose payload is base64url JSON.
func requestedProfile(body []byte) string {
	var jws struct {
		Payload string `json:"payload"`
	}
	if json.Unmarshal(body, &jws) != nil {
		return ""
	}
	payload, err := base64.RawURLEncoding.DecodeString(jws.Payload)
	if err != nil {
		return ""
	}
	var req struct {
		Profile string `json:"profile"`
	}
	json.Unmarshal(payload, &req)
	return req.Profile
}

// Orders returns the new-order requests that reached the CA, oldest
// first: what a client asked of the CA, whatever came of it. A test of a
// client's backoff counts them.
func (c *CA) Orders() []Order {
	c.ordersMu.Lock()
	defer c.ordersMu.Unlock()
	return slices.Clone(c.orders)
}

// SetHTTP01Target makes Pebble's HTTP-01 validations reach addr
// ("127.0.0.1:port", a plain-HTTP server: the relay's HTTP port). The
// request keeps its path; its Host header is the validated name without a
// port, as on port 80. "" makes every HTTP-01 validation fail to connect.
func (c *CA) SetHTTP01Target(addr string) { c.http01.setTarget(addr) }

// SetTLSALPN01Target makes Pebble's TLS-ALPN-01 validations reach addr
// ("127.0.0.1:port": the relay's HTTPS port), forwarding the TCP connection
// unchanged. "" makes every TLS-ALPN-01 validation fail to connect.
func (c *CA) SetTLSALPN01Target(addr string) { c.tlsALPN.setTarget(addr) }

// HTTP01Attempts is how many HTTP-01 validation requests Pebble has made,
// whether or not a target was set. Pebble validates from three
// "perspectives" at once, so one challenge makes three.
func (c *CA) HTTP01Attempts() int { return int(c.http01.attempts.Load()) }

// TLSALPN01Attempts is how many TLS-ALPN-01 validation connections Pebble
// has made, whether or not a target was set (three per challenge).
func (c *CA) TLSALPN01Attempts() int { return int(c.tlsALPN.attempts.Load()) }

// ValidatedBy returns, for the certificate leaf issued by this CA, the
// challenge type that validated each of its names (name → HTTP01 or
// TLSALPN01), from Pebble's records of the order that produced it. It
// waits, until ctx ends, for Pebble to file the order, which it does just
// after issuing the certificate.
func (c *CA) ValidatedBy(ctx context.Context, leaf *x509.Certificate) (map[string]string, error) {
	serial := hex.EncodeToString(leaf.SerialNumber.Bytes())
	for {
		order, err := c.db.GetOrderByIssuedSerial(serial)
		if err == nil {
			return validations(order)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("testacme: no order issued certificate serial %s: %w", serial, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// validations reads, under Pebble's locks, which challenge validated each
// authorization of order.
func validations(order *core.Order) (map[string]string, error) {
	order.RLock()
	authzs := slices.Clone(order.AuthorizationObjects)
	order.RUnlock()
	out := make(map[string]string, len(authzs))
	for _, z := range authzs {
		z.RLock()
		name, status := z.Identifier.Value, z.Status
		chals := slices.Clone(z.Challenges)
		z.RUnlock()
		if status != acme.StatusValid {
			return nil, fmt.Errorf("testacme: authorization for %s is %s", name, status)
		}
		for _, ch := range chals {
			ch.RLock()
			typ, st := ch.Type, ch.Status
			ch.RUnlock()
			if st == acme.StatusValid {
				out[name] = typ
			}
		}
		if out[name] == "" {
			return nil, fmt.Errorf("testacme: authorization for %s has no valid challenge", name)
		}
	}
	return out, nil
}

// Log returns what Pebble has logged so far.
func (c *CA) Log() string { return c.logBuf.String() }

// Close stops the CA's ACME API, its DNS server and gateways. Start
// arranges it at the end of the test; calling it again does nothing.
// (Pebble's VA keeps one idle goroutine: Pebble offers no way to stop it.)
func (c *CA) Close() {
	c.closeOne.Do(func() {
		if c.api != nil {
			c.api.Close()
		}
		if c.http01 != nil {
			c.http01.close()
		}
		if c.tlsALPN != nil {
			c.tlsALPN.close()
		}
		if c.dns != nil {
			c.dns.close()
		}
	})
}
