package relay_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"expvar"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"tailscale.com/metrics"

	"github.com/tailderp/tailderp/internal/testacme"
	"github.com/tailderp/tailderp/relay"

	"github.com/tailderp/tailderp/internal/testutil"
)

// These tests get the relay a certificate for its IP address from Pebble
// (which issues IP certificates, validated for real through the relay's
// own HTTP-01 or TLS-ALPN-01 answers) and connect DERP clients that dial
// https://127.0.0.1:<port>/derp as Tailscale clients do: no SNI, the
// certificate verified against the CA's root, no CertName pin.

const acmeIPTestIP = "127.0.0.1"

// sniRecorder serves certs and remembers the server name of every
// handshake, so a test can tell what clients sent.
type sniRecorder struct {
	*relay.ACMEIPCerts
	mu    sync.Mutex
	names []string
}

func (r *sniRecorder) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if len(hello.SupportedProtos) != 1 || hello.SupportedProtos[0] != "acme-tls/1" {
		r.mu.Lock()
		r.names = append(r.names, hello.ServerName)
		r.mu.Unlock()
	}
	return r.ACMEIPCerts.GetCertificate(hello)
}

func (r *sniRecorder) serverNames() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.names)
}

// acmeIPRelay is a relay with ACME IP certificates, started for a test.
type acmeIPRelay struct {
	srv   *relay.Server
	certs *relay.ACMEIPCerts
	rec   *sniRecorder
	dir   string
	log   *testutil.Buffer
}

// startACMEIPRelay starts a relay for 127.0.0.1 with certificates from
// ca (HTTP port on when http), then starts the issuer. cfg's hostname,
// cache, CA and logger are filled in.
func startACMEIPRelay(t *testing.T, ca *testacme.CA, cfg relay.ACMEConfig, http bool) *acmeIPRelay {
	t.Helper()
	r := &acmeIPRelay{dir: t.TempDir(), log: new(testutil.Buffer)}
	logger := slog.New(slog.NewTextHandler(r.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg.Hostname = acmeIPTestIP
	cfg.CacheDir = r.dir
	cfg.DirectoryURL = ca.DirectoryURL
	cfg.RootCAs = ca.DirectoryCAs
	cfg.Logger = logger
	var err error
	if r.certs, err = relay.NewACMEIP(cfg); err != nil {
		t.Fatal(err)
	}
	r.rec = &sniRecorder{ACMEIPCerts: r.certs}
	r.srv = startRelay(t, r.rec, func(s *relay.Server) {
		s.Logger = logger
		if http {
			s.HTTPPort = 0
		}
	})
	if http {
		ca.SetHTTP01Target(r.srv.HTTPAddr())
	}
	ca.SetTLSALPN01Target(r.srv.LocalAddr().String())
	r.certs.Start()
	t.Cleanup(func() {
		r.certs.Close()
		if t.Failed() {
			t.Logf("relay log:\n%s", r.log)
		}
	})
	return r
}

// waitCert waits for the relay to have a certificate other than old (nil:
// any) and returns it.
func (r *acmeIPRelay) waitCert(t *testing.T, old *relay.CertInfo, timeout time.Duration) relay.CertInfo {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if info, ok := r.certs.Current(); ok && (old == nil || info.CertName != old.CertName) {
			return info
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new certificate within %v", timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// presentedIP returns the leaf the relay presents to a client that dials
// 127.0.0.1 without SNI and verifies against roots.
func presentedIP(t *testing.T, addr string, roots *x509.CertPool) *x509.Certificate {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	d := tls.Dialer{Config: &tls.Config{ServerName: acmeIPTestIP, RootCAs: roots}}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("TLS to %s trusting the CA's root: %v", addr, err)
	}
	defer c.Close()
	return c.(*tls.Conn).ConnectionState().PeerCertificates[0]
}

// derpCounter reads one of derpserver's counters.
func derpCounter(t *testing.T, s *relay.Server, name string) int64 {
	t.Helper()
	v, ok := s.DERP().ExpVar(true).(*metrics.Set).Get(name).(*expvar.Int)
	if !ok {
		t.Fatalf("derpserver has no counter %q", name)
	}
	return v.Value()
}

// TestACMEIPCertificate: Pebble issues a certificate for 127.0.0.1 under
// its short-lived profile (HTTP-01 through the relay's HTTP port); DERP
// clients that dial the IP with no SNI and trust only Pebble's root, with
// no pin, relay packets; the certificate is renewed in the background
// with a third of its lifetime left and swapped in with no restart, while
// the clients stay connected; key and certificate are kept 0600.
func TestACMEIPCertificate(t *testing.T) {
	t.Parallel()
	// 30 s: renewal is due after 20 s, leaving 10 s for it on a busy
	// machine (issuance takes 1-3 s here).
	const lifetime = 30 * time.Second
	ca := testacme.Start(t, testacme.Options{ShortlivedValidity: lifetime})
	r := startACMEIPRelay(t, ca, relay.ACMEConfig{}, true)

	start := time.Now()
	first := r.waitCert(t, nil, acmeTestTimeout)
	t.Logf("first certificate after %v: %+v", time.Since(start).Round(time.Millisecond), first)

	addr := r.srv.LocalAddr().String()
	leaf := presentedIP(t, addr, ca.IssuerRoots)
	if relay.CertName(leaf.Raw) != first.CertName {
		t.Fatalf("presented %s, Current says %s", relay.CertName(leaf.Raw), first.CertName)
	}
	// Pebble makes NotAfter NotBefore + validity - 1 s, in whole seconds.
	if got := leaf.NotAfter.Sub(leaf.NotBefore); got < lifetime-2*time.Second || got > lifetime {
		t.Errorf("certificate lifetime %v, want the shortlived profile's %v (Pebble's default profile is 90 days)", got, lifetime)
	}
	// Without a profile Pebble picks one at random: check the request.
	if orders := ca.Orders(); len(orders) == 0 || orders[0].Profile != testacme.ShortlivedProfile {
		t.Errorf("orders %+v; want the first to ask for the %q profile the directory offers", orders, testacme.ShortlivedProfile)
	}
	if len(leaf.IPAddresses) != 1 || leaf.IPAddresses[0].String() != acmeIPTestIP || len(leaf.DNSNames) != 0 {
		t.Errorf("certificate for IPs %v and names %v, want [%s] only", leaf.IPAddresses, leaf.DNSNames, acmeIPTestIP)
	}
	ctx, cancel := context.WithTimeout(context.Background(), acmeTestTimeout)
	defer cancel()
	by, err := ca.ValidatedBy(ctx, leaf)
	if err != nil {
		t.Fatal(err)
	}
	if by[acmeIPTestIP] != testacme.HTTP01 {
		t.Errorf("Pebble validated %v, want %s by HTTP-01", by, acmeIPTestIP)
	}

	// Two DERP clients as tailscaled makes them for a node with HostName
	// 127.0.0.1 and no CertName: derphttp with the CA's root as the only
	// extra root.
	a, b := newClient(t, r.srv, ca.IssuerRoots), newClient(t, r.srv, ca.IssuerRoots)
	aIn, bIn := watch(a), watch(b)
	aIn.mustBeAdmitted(t)
	bIn.mustBeAdmitted(t)
	exchange(t, a, a.SelfPublicKey(), aIn, b, b.SelfPublicKey(), bIn)
	for _, n := range r.rec.serverNames() {
		if n != "" {
			t.Errorf("a client sent SNI %q; clients dialing an IP send none", n)
		}
	}
	if len(r.rec.serverNames()) == 0 {
		t.Error("no handshake recorded")
	}

	// Files: the account key and the certificate, both 0600.
	for _, f := range []string{"acme_account+key", filepath.Base(relay.ACMEIPCertPath(r.dir, acmeIPTestIP))} {
		st, err := os.Stat(filepath.Join(r.dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", f, st.Mode().Perm())
		}
	}

	// Renewal, in the background.
	accepts := derpCounter(t, r.srv, "accepts")
	second := r.waitCert(t, &first, lifetime)
	renewedAfter := time.Since(leaf.NotBefore)
	t.Logf("renewed %v after the first certificate's NotBefore (lifetime %v; due at 2/3 = %v less up to %v jitter); first expires %v after the renewal",
		renewedAfter.Round(time.Millisecond), lifetime, (lifetime * 2 / 3).Round(time.Millisecond), lifetime/30, leaf.NotAfter.Sub(time.Now()).Round(time.Millisecond))
	if !time.Now().Before(leaf.NotAfter) {
		t.Errorf("renewed only after the first certificate expired")
	}
	if renewedAfter < lifetime/2 {
		t.Errorf("renewed %v into a %v lifetime: too early (due with a third left)", renewedAfter, lifetime)
	}
	leaf2 := presentedIP(t, addr, ca.IssuerRoots)
	if relay.CertName(leaf2.Raw) != second.CertName {
		t.Errorf("after renewal a new handshake gets %s, want the renewed %s", relay.CertName(leaf2.Raw), second.CertName)
	}
	// The clients connected before the renewal still relay, on the same
	// connections.
	exchange(t, a, a.SelfPublicKey(), aIn, b, b.SelfPublicKey(), bIn)
	if n := derpCounter(t, r.srv, "accepts"); n != accepts {
		t.Errorf("DERP accepts went from %d to %d across the renewal: clients reconnected", accepts, n)
	}

	// A restart serves the kept certificate without asking the CA.
	orders := len(ca.Orders())
	again, err := relay.NewACMEIP(relay.ACMEConfig{Hostname: acmeIPTestIP, CacheDir: r.dir, DirectoryURL: ca.DirectoryURL, RootCAs: ca.DirectoryCAs})
	if err != nil {
		t.Fatal(err)
	}
	if info, ok := again.Current(); !ok || info.CertName != second.CertName {
		t.Errorf("after a restart Current = %+v, %v; want the kept %s", info, ok, second.CertName)
	}
	if n := len(ca.Orders()); n != orders {
		t.Errorf("a restart placed %d orders", n-orders)
	}
}

// TestACMEIPTLSALPN01 gets the IP certificate through TLS-ALPN-01 on the
// HTTPS port, the relay having no HTTP port, from a CA with no short-lived
// profile (so the order names none: naming one the directory does not
// list is an error).
func TestACMEIPTLSALPN01(t *testing.T) {
	t.Parallel()
	ca := testacme.Start(t, testacme.Options{})
	r := startACMEIPRelay(t, ca, relay.ACMEConfig{}, false)
	r.waitCert(t, nil, acmeTestTimeout)
	leaf := presentedIP(t, r.srv.LocalAddr().String(), ca.IssuerRoots)
	ctx, cancel := context.WithTimeout(context.Background(), acmeTestTimeout)
	defer cancel()
	by, err := ca.ValidatedBy(ctx, leaf)
	if err != nil {
		t.Fatal(err)
	}
	if by[acmeIPTestIP] != testacme.TLSALPN01 {
		t.Errorf("Pebble validated %v, want %s by TLS-ALPN-01", by, acmeIPTestIP)
	}
	if n := ca.HTTP01Attempts(); n != 0 {
		t.Errorf("Pebble made %d HTTP-01 requests, want 0: the relay has no HTTP port", n)
	}
	for _, o := range ca.Orders() {
		if o.Profile != "" {
			t.Errorf("an order named profile %q, which the CA does not offer", o.Profile)
		}
	}
}

// TestACMEIPBackoff makes every validation fail (no gateway target) and
// checks that the issuer asks the CA on the backoff's schedule and no
// more, however many clients try to connect meanwhile (their handshakes
// fail at once), and that the failure is logged at warning level with
// what to check, no more than once per attempt.
func TestACMEIPBackoff(t *testing.T) {
	t.Parallel()
	ca := testacme.Start(t, testacme.Options{})
	r := startACMEIPRelay(t, ca, relay.ACMEConfig{RetryMin: backoffMin, RetryMax: backoffMax}, true)
	ca.SetHTTP01Target("")
	ca.SetTLSALPN01Target("")

	start := time.Now()
	handshakes := 0
	for time.Since(start) < backoffWindow {
		c, err := tls.Dial("tcp", r.srv.LocalAddr().String(), &tls.Config{ServerName: acmeIPTestIP, RootCAs: ca.IssuerRoots})
		if err == nil {
			c.Close()
			t.Fatal("handshake succeeded with no certificate")
		}
		handshakes++
		time.Sleep(20 * time.Millisecond)
	}
	// Each attempt orders twice: HTTP-01, then TLS-ALPN-01.
	attempts := checkBackoff(t, ca, start, handshakes, 2)
	if !r.log.WaitFor("ACME certificate for the IP address not issued", time.Second) {
		t.Fatal("no warning logged")
	}
	logged := bytes.Count([]byte(r.log.String()), []byte("ACME certificate for the IP address not issued"))
	if logged > attempts {
		t.Errorf("%d warnings for %d failed attempts", logged, attempts)
	}
	// A validation that fails: the CA must reach the address, on both
	// ports since the relay serves port 80.
	for _, want := range []string{"could not validate " + acmeIPTestIP, "port 443 (TLS-ALPN-01) or port 80 (HTTP-01)", "firewall"} {
		if !bytes.Contains([]byte(r.log.String()), []byte(want)) {
			t.Errorf("the warning does not say %q:\n%s", want, r.log)
		}
	}
}

// The backoff tests' schedule: a failed attempt takes about 1.1 s here
// (x/crypto/acme polls an authorization once a second), so the waits are
// longer than that, to tell "waited for the backoff" from "retried as soon
// as the last attempt failed".
const (
	backoffMin    = 1500 * time.Millisecond
	backoffMax    = 3 * time.Second
	backoffWindow = 8 * time.Second
)

// checkBackoff checks the orders ca saw since start, perAttempt of them
// per issuance attempt: at least two attempts (it retried), each at least
// the backoff's wait after the one before (1.5 s, then 3 s), and so no more
// than four in the window. It returns the number of attempts.
func checkBackoff(t *testing.T, ca *testacme.CA, start time.Time, handshakes, perAttempt int) int {
	t.Helper()
	orders := ca.Orders()
	var attempts []time.Time
	for i := 0; i < len(orders); i += perAttempt {
		attempts = append(attempts, orders[i].At)
	}
	t.Logf("%d handshakes in %v; the CA saw %d orders, in %d attempts starting at %v (backoff %v doubling to %v)",
		handshakes, backoffWindow, len(orders), len(attempts), sinceEach(start, attempts), backoffMin, backoffMax)
	if len(attempts) < 2 || len(attempts) > 4 {
		t.Errorf("%d attempts in %v, want 2 to 4", len(attempts), backoffWindow)
	}
	for i := 1; i < len(attempts); i++ {
		gap := attempts[i].Sub(attempts[i-1])
		if want := min(backoffMin<<(i-1), backoffMax); gap < want {
			t.Errorf("attempt %d came %v after the one before, want at least %v", i+1, gap.Round(time.Millisecond), want)
		}
	}
	return len(attempts)
}

// sinceEach lists how long after start each time was, rounded.
func sinceEach(start time.Time, ts []time.Time) []time.Duration {
	var out []time.Duration
	for _, t := range ts {
		out = append(out, t.Sub(start).Round(10*time.Millisecond))
	}
	return out
}
