package relay_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/testacme"
	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/relay"
)

// These tests get the relay a certificate from a real ACME CA (Pebble, run
// in-process by package testacme) through real HTTP-01 and TLS-ALPN-01
// validations on loopback, then check what a TLS client sees.

// acmeTestHost is the relay's hostname in these tests. Pebble resolves it
// (like every name) to 127.0.0.1 with its own DNS server; nothing else
// resolves it.
const acmeTestHost = "derp.test"

// acmeTestTimeout bounds each test's ACME work and handshakes. Issuance
// takes 1-3 s here.
const acmeTestTimeout = 60 * time.Second

// TestACMETLSALPN01 gets a certificate through TLS-ALPN-01 only: the relay
// has no HTTP port (so autocert never offers HTTP-01), and Pebble's HTTP-01
// gateway has no target.
func TestACMETLSALPN01(t *testing.T) {
	t.Parallel()
	ca := testacme.Start(t, testacme.Options{FinalizeLocation: true})
	r := startACMERelay(t, acmeConfig(ca), -1)
	ca.SetTLSALPN01Target(r.srv.LocalAddr().String())

	ctx, cancel := context.WithTimeout(context.Background(), acmeTestTimeout)
	defer cancel()
	start := time.Now()
	cs := acmeGet204(ctx, t, r.srv.LocalAddr().String(), ca.IssuerRoots)
	t.Logf("first request, including issuance: %v", time.Since(start).Round(time.Millisecond))
	leaf := checkIssuedCert(t, ca, cs)
	checkValidatedBy(ctx, t, ca, leaf, testacme.TLSALPN01)
	if n := ca.HTTP01Attempts(); n != 0 {
		t.Errorf("Pebble made %d HTTP-01 requests, want 0", n)
	}
	if n := ca.TLSALPN01Attempts(); n == 0 {
		t.Error("Pebble made no TLS-ALPN-01 connection")
	}
	checkCurrent(t, r.certs, leaf)
}

// TestACMEHTTP01 gets a certificate through HTTP-01: Pebble's TLS-ALPN-01
// gateway has no target, so the TLS-ALPN-01 challenge autocert tries first
// fails to connect, and autocert falls back to HTTP-01 on a new order,
// answered by the relay's HTTP port.
func TestACMEHTTP01(t *testing.T) {
	t.Parallel()
	ca := testacme.Start(t, testacme.Options{FinalizeLocation: true})
	r := startACMERelay(t, acmeConfig(ca), 0)
	ca.SetHTTP01Target(r.srv.HTTPAddr())

	ctx, cancel := context.WithTimeout(context.Background(), acmeTestTimeout)
	defer cancel()
	start := time.Now()
	cs := acmeGet204(ctx, t, r.srv.LocalAddr().String(), ca.IssuerRoots)
	t.Logf("first request, including issuance: %v", time.Since(start).Round(time.Millisecond))
	leaf := checkIssuedCert(t, ca, cs)
	checkValidatedBy(ctx, t, ca, leaf, testacme.HTTP01)
	if n := ca.TLSALPN01Attempts(); n == 0 {
		t.Error("Pebble made no TLS-ALPN-01 connection: autocert did not try TLS-ALPN-01 first")
	}
	if n := ca.HTTP01Attempts(); n == 0 {
		t.Error("Pebble made no HTTP-01 request")
	}
	checkCurrent(t, r.certs, leaf)
}

// TestACMENoSNI checks that a handshake without SNI (scanners, clients
// dialing the IP) gets the hostname's certificate, even as the handshake
// that triggers issuance: ACMECerts.GetCertificate fills in the hostname.
func TestACMENoSNI(t *testing.T) {
	t.Parallel()
	ca := testacme.Start(t, testacme.Options{FinalizeLocation: true})
	r := startACMERelay(t, acmeConfig(ca), -1)
	ca.SetTLSALPN01Target(r.srv.LocalAddr().String())

	ctx, cancel := context.WithTimeout(context.Background(), acmeTestTimeout)
	defer cancel()
	addr := r.srv.LocalAddr().String()
	c, err := acmeDialTLS(ctx, addr, "", ca.IssuerRoots)
	if err != nil {
		t.Fatalf("handshake without SNI: %v\nrelay log:\n%s", err, r.log)
	}
	cs := c.ConnectionState()
	c.Close()
	if cs.ServerName != "" {
		t.Fatalf("client sent SNI %q", cs.ServerName)
	}
	leaf := checkIssuedCert(t, ca, &cs)
	checkValidatedBy(ctx, t, ca, leaf, testacme.TLSALPN01)

	c, err = acmeDialTLS(ctx, addr, acmeTestHost, ca.IssuerRoots)
	if err != nil {
		t.Fatalf("handshake with SNI: %v", err)
	}
	defer c.Close()
	if got := c.ConnectionState().PeerCertificates[0]; !got.Equal(leaf) {
		t.Errorf("with SNI: certificate serial %x, without: %x; want the same", got.SerialNumber, leaf.SerialNumber)
	}
}

// TestACMEWithoutFinalizeLocation gets a certificate from Pebble as it is:
// its order-finalization response has no Location header (RFC 8555 does
// not require one). x/crypto/acme/autocert before v0.58.0 cannot finish
// such an order (golang/go#77704): it polls the order at URL "" and fails
// with `Post "": unsupported protocol scheme ""`, so the relay would never
// get a certificate from such a CA (Pebble, Buypass). The Let's Encrypt
// CA software (Boulder) sends the header, which the other tests emulate.
// go.mod requires v0.58.0 for this; this test fails if it is downgraded.
func TestACMEWithoutFinalizeLocation(t *testing.T) {
	t.Parallel()
	ca := testacme.Start(t, testacme.Options{})
	r := startACMERelay(t, acmeConfig(ca), -1)
	ca.SetTLSALPN01Target(r.srv.LocalAddr().String())

	ctx, cancel := context.WithTimeout(context.Background(), acmeTestTimeout)
	defer cancel()
	cs := acmeGet204(ctx, t, r.srv.LocalAddr().String(), ca.IssuerRoots)
	leaf := checkIssuedCert(t, ca, cs)
	checkValidatedBy(ctx, t, ca, leaf, testacme.TLSALPN01)
}

// TestACMEUnreachableCA checks that when the CA cannot be reached, a
// handshake fails with an error instead of hanging past the client's
// context, and that the relay logs why.
func TestACMEUnreachableCA(t *testing.T) {
	t.Parallel()

	t.Run("refused", func(t *testing.T) {
		t.Parallel()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		caAddr := ln.Addr().String()
		ln.Close() // nothing listens there now: connections are refused

		r := startACMERelay(t, relay.ACMEConfig{DirectoryURL: "https://" + caAddr + "/dir"}, -1)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		addr := r.srv.LocalAddr().String()

		start := time.Now()
		c, err := acmeDialTLS(ctx, addr, acmeTestHost, nil)
		took := time.Since(start)
		if err == nil {
			c.Close()
			t.Fatal("handshake succeeded with no CA")
		}
		t.Logf("handshake failed after %v: %v", took.Round(time.Millisecond), err)
		if ctx.Err() != nil {
			t.Fatalf("handshake failed only when the context ended (%v)", took)
		}
		if !r.log.WaitFor("ACME certificate not available", 5*time.Second) {
			t.Fatalf("relay logged no ACME failure:\n%s", r.log)
		}
		if s := r.log.String(); !strings.Contains(s, caAddr) || !strings.Contains(s, acmeTestHost) {
			t.Errorf("relay log should name the hostname and the CA address %s:\n%s", caAddr, s)
		}
		// The hint blames the CA's reachability, not DNS or the firewall
		// in front of the relay.
		if s := r.log.String(); !strings.Contains(s, "the CA (https://"+caAddr+"/dir) unreachable from this server") || strings.Contains(s, "DNS records") {
			t.Errorf("the hint should say the CA is unreachable, and only that:\n%s", s)
		}

		// autocert does not retry for a minute after a failure: the next
		// handshake fails at once too.
		start = time.Now()
		if c, err := acmeDialTLS(ctx, addr, acmeTestHost, nil); err == nil {
			c.Close()
			t.Fatal("second handshake succeeded with no CA")
		}
		if took := time.Since(start); took > 5*time.Second {
			t.Errorf("second handshake took %v to fail", took)
		}
	})

	t.Run("silent", func(t *testing.T) {
		// A CA address that accepts TCP connections and never answers.
		// The client gives up when its context ends; the relay's attempt
		// stays blocked on the CA until the connection dies, then logs.
		t.Parallel()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		var (
			mu       sync.Mutex
			held     []net.Conn
			silenced bool
		)
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				mu.Lock()
				if silenced {
					c.Close()
				} else {
					held = append(held, c)
				}
				mu.Unlock()
			}
		}()
		silence := sync.OnceFunc(func() {
			ln.Close()
			mu.Lock()
			defer mu.Unlock()
			silenced = true
			for _, c := range held {
				c.Close()
			}
		})
		defer silence()

		r := startACMERelay(t, relay.ACMEConfig{DirectoryURL: "https://" + ln.Addr().String() + "/dir"}, -1)
		const clientWait = 2 * time.Second
		ctx, cancel := context.WithTimeout(context.Background(), clientWait)
		defer cancel()
		start := time.Now()
		c, err := acmeDialTLS(ctx, r.srv.LocalAddr().String(), acmeTestHost, nil)
		took := time.Since(start)
		if err == nil {
			c.Close()
			t.Fatal("handshake succeeded with a silent CA")
		}
		t.Logf("handshake failed after %v: %v", took.Round(time.Millisecond), err)
		if took > clientWait+3*time.Second {
			t.Errorf("handshake returned %v after its %v context", took-clientWait, clientWait)
		}
		silence() // the CA connection dies: the relay's ACME attempt fails
		if !r.log.WaitFor("ACME certificate not available", 15*time.Second) {
			t.Fatalf("relay logged no ACME failure:\n%s", r.log)
		}
	})
}

// TestACMEBackoff makes every validation fail (no gateway target) while
// clients keep connecting, and checks that the CA is asked again only on
// the relay's backoff schedule (autocert alone would retry one minute
// after each failure, forever; and without the backoff, on the first
// handshake after each failure), that handshakes in the backoff fail at
// once, and that the failure is logged with what to check, once per
// attempt at most.
func TestACMEBackoff(t *testing.T) {
	t.Parallel()
	ca := testacme.Start(t, testacme.Options{})
	cfg := acmeConfig(ca)
	cfg.RetryMin, cfg.RetryMax = backoffMin, backoffMax
	r := startACMERelay(t, cfg, -1)
	ca.SetTLSALPN01Target("")

	start := time.Now()
	handshakes, slow := 0, 0
	for time.Since(start) < backoffWindow {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		hs := time.Now()
		c, err := acmeDialTLS(ctx, r.srv.LocalAddr().String(), acmeTestHost, ca.IssuerRoots)
		cancel()
		if err == nil {
			c.Close()
			t.Fatal("handshake succeeded with no certificate")
		}
		if time.Since(hs) > 200*time.Millisecond {
			slow++ // it waited for an attempt in progress
		}
		handshakes++
		time.Sleep(20 * time.Millisecond)
	}
	// Each attempt orders twice: TLS-ALPN-01, then once more to find no
	// other challenge type it can answer (the relay has no HTTP port).
	attempts := checkBackoff(t, ca, start, handshakes, 2)
	t.Logf("%d handshakes waited for an attempt in progress; the rest failed at once", slow)
	if slow > 2*attempts {
		t.Errorf("%d handshakes waited, for %d attempts", slow, attempts)
	}
	logged := strings.Count(r.log.String(), "ACME certificate not available")
	if logged == 0 || logged > attempts {
		t.Errorf("%d warnings for %d failed attempts", logged, attempts)
	}
	// A validation that fails: DNS or the firewall, on port 443 only
	// since the relay has no HTTP port.
	for _, want := range []string{"could not validate " + acmeTestHost, "DNS records (A/AAAA) must point to this server", "port 443 (TLS-ALPN-01) (a firewall"} {
		if !strings.Contains(r.log.String(), want) {
			t.Errorf("the warning does not say %q:\n%s", want, r.log)
		}
	}
}

// acmeRelay is a relay with ACME certificates, started for a test.
type acmeRelay struct {
	srv   *relay.Server
	certs *relay.ACMECerts
	log   *testutil.Buffer // its log
}

// acmeConfig is the ACME configuration pointing the relay at ca.
func acmeConfig(ca *testacme.CA) relay.ACMEConfig {
	return relay.ACMEConfig{DirectoryURL: ca.DirectoryURL, RootCAs: ca.DirectoryCAs}
}

// startACMERelay starts a relay on 127.0.0.1 port 0 for acmeTestHost with
// ACME certificates configured by cfg (hostname, cache and logger filled
// in), its plain-HTTP port at httpPort (-1 for none, 0 for any). It is
// closed at the end of the test.
func startACMERelay(t *testing.T, cfg relay.ACMEConfig, httpPort int) *acmeRelay {
	t.Helper()
	r := &acmeRelay{log: new(testutil.Buffer)}
	logger := slog.New(slog.NewTextHandler(r.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg.Hostname = acmeTestHost
	cfg.CacheDir = t.TempDir()
	cfg.Logger = logger
	var err error
	if r.certs, err = relay.NewACME(cfg); err != nil {
		t.Fatal(err)
	}
	r.srv = &relay.Server{
		Addr:       "127.0.0.1:0",
		HTTPPort:   httpPort,
		Certs:      r.certs,
		PrivateKey: key.NewNode(),
		Logger:     logger,
	}
	if err := r.srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := r.srv.Close(ctx); err != nil {
			t.Errorf("relay Close: %v", err)
		}
		if t.Failed() {
			t.Logf("relay log:\n%s", r.log)
		}
	})
	return r
}

// acmeDialTLS completes a TLS handshake with the relay at addr, sending sni
// as the server name ("" sends none), and accepts only a certificate for
// acmeTestHost that chains to roots (nil: the system roots).
func acmeDialTLS(ctx context.Context, addr, sni string, roots *x509.CertPool) (*tls.Conn, error) {
	cfg := &tls.Config{
		ServerName: sni,
		RootCAs:    roots,
		NextProtos: []string{"http/1.1"},
	}
	if sni == "" {
		// Without a server name the standard verification cannot check
		// the hostname: verify the same things by hand.
		cfg.InsecureSkipVerify = true
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{DNSName: acmeTestHost, Roots: roots, Intermediates: inter})
			return err
		}
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c := tls.Client(nc, cfg)
	if err := c.HandshakeContext(ctx); err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

// acmeGet204 GETs https://acmeTestHost/generate_204 from the relay at addr,
// trusting roots, expects 204 No Content, and returns the connection's TLS
// state.
func acmeGet204(ctx context.Context, t *testing.T, addr string, roots *x509.CertPool) *tls.ConnectionState {
	t.Helper()
	tr := &http.Transport{
		DialTLSContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return acmeDialTLS(ctx, addr, acmeTestHost, roots)
		},
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, "GET", "https://"+acmeTestHost+"/generate_204", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatalf("GET /generate_204: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("GET /generate_204: %s, want 204", resp.Status)
	}
	if resp.TLS == nil {
		t.Fatal("GET /generate_204: no TLS state")
	}
	return resp.TLS
}

// checkIssuedCert checks that the relay presented a certificate for
// acmeTestHost only, issued by ca (chaining to ca.IssuerRoot), and returns
// it.
func checkIssuedCert(t *testing.T, ca *testacme.CA, cs *tls.ConnectionState) *x509.Certificate {
	t.Helper()
	if len(cs.PeerCertificates) == 0 {
		t.Fatal("no certificate")
	}
	leaf := cs.PeerCertificates[0]
	if !slices.Equal(leaf.DNSNames, []string{acmeTestHost}) {
		t.Errorf("certificate names %q, want [%s]", leaf.DNSNames, acmeTestHost)
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	chains, err := leaf.Verify(x509.VerifyOptions{DNSName: acmeTestHost, Roots: ca.IssuerRoots, Intermediates: inter})
	if err != nil {
		t.Fatalf("certificate does not chain to Pebble's root: %v", err)
	}
	if root := chains[0][len(chains[0])-1]; !root.Equal(ca.IssuerRoot) {
		t.Errorf("chain ends at %q, want Pebble's root %q", root.Subject, ca.IssuerRoot.Subject)
	}
	if len(chains[0]) < 3 {
		t.Errorf("chain has %d certificates, want leaf, Pebble intermediate, root", len(chains[0]))
	}
	return leaf
}

// checkValidatedBy checks, from Pebble's records, that leaf was issued on
// the strength of a valid challenge of type want.
func checkValidatedBy(ctx context.Context, t *testing.T, ca *testacme.CA, leaf *x509.Certificate, want string) {
	t.Helper()
	by, err := ca.ValidatedBy(ctx, leaf)
	if err != nil {
		t.Fatal(err)
	}
	if len(by) != 1 || by[acmeTestHost] != want {
		t.Errorf("Pebble validated %v, want %s by %s", by, acmeTestHost, want)
	}
}

// checkCurrent checks that the relay reports leaf as its current
// certificate (for metrics and logs).
func checkCurrent(t *testing.T, certs *relay.ACMECerts, leaf *x509.Certificate) {
	t.Helper()
	info, ok := certs.Current()
	if !ok {
		t.Fatal("Current: no certificate after a handshake")
	}
	t.Logf("Current() = %+v", info)
	if !info.NotAfter.Equal(leaf.NotAfter) || info.CertName != relay.CertName(leaf.Raw) {
		t.Errorf("Current = %+v, want NotAfter %v, CertName %s", info, leaf.NotAfter, relay.CertName(leaf.Raw))
	}
}
