package testacme

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/acme"
)

// TestDNS checks that Pebble's resolver answers A 127.0.0.1 and no AAAA.
func TestDNS(t *testing.T) {
	t.Parallel()
	ca := Start(t, Options{})
	r := &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", ca.DNSAddr)
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	v4, err := r.LookupIP(ctx, "ip4", "anything.test")
	if err != nil {
		t.Fatal(err)
	}
	if len(v4) != 1 || !v4[0].Equal(net.IPv4(127, 0, 0, 1)) {
		t.Errorf("A anything.test = %v, want [127.0.0.1]", v4)
	}
	if v6, err := r.LookupIP(ctx, "ip6", "anything.test"); err == nil && len(v6) > 0 {
		t.Errorf("AAAA anything.test = %v, want none", v6)
	}
}

// TestIssue obtains a certificate with a bare ACME client: a TLS-ALPN-01
// challenge fails (no target), then an HTTP-01 challenge is validated
// through the gateway and the certificate chains to IssuerRoot.
func TestIssue(t *testing.T) {
	t.Parallel()
	const name = "example.test"
	// x/crypto/acme's CreateOrderCert (before v0.58.0) needs the Location.
	ca := Start(t, Options{FinalizeLocation: true})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	acctKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.DirectoryCAs}}
	defer tr.CloseIdleConnections()
	cl := &acme.Client{Key: acctKey, DirectoryURL: ca.DirectoryURL, HTTPClient: &http.Client{Transport: tr}}
	if _, err := cl.Register(ctx, &acme.Account{}, acme.AcceptTOS); err != nil {
		t.Fatalf("Register: %v", err)
	}

	// A first order, answered with TLS-ALPN-01: the gateway has no target,
	// so Pebble cannot connect and the authorization becomes invalid.
	_, chal, authzURL := newChallenge(ctx, t, cl, name, "tls-alpn-01")
	if _, err := cl.Accept(ctx, chal); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.WaitAuthorization(ctx, authzURL); err == nil {
		t.Fatal("TLS-ALPN-01 with no target was validated")
	} else {
		t.Logf("TLS-ALPN-01 with no target: %v", err)
	}
	if n := ca.TLSALPN01Attempts(); n == 0 {
		t.Error("TLSALPN01Attempts = 0 after a TLS-ALPN-01 validation")
	}

	// A second order, answered with HTTP-01 by a server that insists on the
	// Host header a CA sends to port 80.
	o, chal, authzURL := newChallenge(ctx, t, cl, name, "http-01")
	body, err := cl.HTTP01ChallengeResponse(chal.Token)
	if err != nil {
		t.Fatal(err)
	}
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Host != name || r.URL.Path != cl.HTTP01ChallengePath(chal.Token) {
			http.Error(w, "wrong host or path", http.StatusNotFound)
			return
		}
		w.Write([]byte(body))
	}))
	defer web.Close()
	ca.SetHTTP01Target(web.Listener.Addr().String())
	if _, err := cl.Accept(ctx, chal); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.WaitAuthorization(ctx, authzURL); err != nil {
		t.Fatalf("HTTP-01: %v", err)
	}
	certKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{DNSNames: []string{name}}, certKey)
	if err != nil {
		t.Fatal(err)
	}
	if o, err = cl.WaitOrder(ctx, o.URI); err != nil {
		t.Fatal(err)
	}
	der, _, err := cl.CreateOrderCert(ctx, o.FinalizeURL, csr, true)
	if err != nil {
		t.Fatalf("CreateOrderCert: %v", err)
	}
	if len(der) != 2 {
		t.Errorf("chain has %d certificates, want leaf + intermediate", len(der))
	}
	leaf, err := x509.ParseCertificate(der[0])
	if err != nil {
		t.Fatal(err)
	}
	inter := x509.NewCertPool()
	for _, d := range der[1:] {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			t.Fatal(err)
		}
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: ca.IssuerRoots, Intermediates: inter}); err != nil {
		t.Errorf("issued certificate does not verify against IssuerRoots: %v", err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: ca.DirectoryCAs, Intermediates: inter}); err == nil {
		t.Error("issued certificate verifies against DirectoryCAs too")
	}
	by, err := ca.ValidatedBy(ctx, leaf)
	if err != nil {
		t.Fatal(err)
	}
	if by[name] != HTTP01 || len(by) != 1 {
		t.Errorf("ValidatedBy = %v, want %s: %s", by, name, HTTP01)
	}
	if n := ca.HTTP01Attempts(); n != 3 {
		t.Errorf("HTTP01Attempts = %d, want 3 (one per perspective)", n)
	}
}

// newChallenge creates an order for name and returns it with its challenge
// of type typ and its authorization URL.
func newChallenge(ctx context.Context, t *testing.T, cl *acme.Client, name, typ string) (*acme.Order, *acme.Challenge, string) {
	t.Helper()
	o, err := cl.AuthorizeOrder(ctx, acme.DomainIDs(name))
	if err != nil {
		t.Fatalf("AuthorizeOrder: %v", err)
	}
	if len(o.AuthzURLs) != 1 {
		t.Fatalf("order has %d authorizations, want 1", len(o.AuthzURLs))
	}
	z, err := cl.GetAuthorization(ctx, o.AuthzURLs[0])
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(z.Challenges, func(c *acme.Challenge) bool { return c.Type == typ })
	if i < 0 {
		var types []string
		for _, c := range z.Challenges {
			types = append(types, c.Type)
		}
		t.Fatalf("no %s challenge among %s", typ, strings.Join(types, ", "))
	}
	return o, z.Challenges[i], z.URI
}
