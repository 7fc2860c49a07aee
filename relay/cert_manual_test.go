package relay_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/relay"
)

const testHost = "derp.test.example"

// newPair makes a self-signed certificate for names (DNS names or IPs)
// with the test's own code, so the relay's generator is not under test
// here.
func newPair(t *testing.T, names ...string) *testutil.Cert {
	t.Helper()
	return newPairSpan(t, time.Time{}, time.Time{}, names...)
}

// newPairSpan is newPair for a certificate valid from notBefore to
// notAfter (zero: an hour ago; a day from now).
func newPairSpan(t *testing.T, notBefore, notAfter time.Time, names ...string) *testutil.Cert {
	t.Helper()
	return testutil.NewCert(t, testutil.CertOptions{Names: names, NotBefore: notBefore, NotAfter: notAfter})
}

// fileClock hands out strictly increasing modification times. File
// timestamps have the kernel's tick granularity, so two writes in one test
// can share one; real replacements are far apart, and the reload check
// compares times and sizes.
type fileClock struct {
	mu   sync.Mutex
	next time.Time
}

func newFileClock() *fileClock { return &fileClock{next: time.Now().Add(-time.Hour)} }

// replace atomically replaces path with data (temporary file + rename, as
// certbot, acme.sh and Kubernetes secret mounts all avoid a half-written
// file) and gives it the next modification time.
func (c *fileClock) replace(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	mt := c.next
	c.next = c.next.Add(time.Second)
	c.mu.Unlock()
	if err := os.Chtimes(tmp, mt, mt); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// writePair puts p where manual mode looks for hostname's files in dir.
func (c *fileClock) writePair(t *testing.T, dir, hostname string, p *testutil.Cert) {
	t.Helper()
	crt, key := relay.CertPaths(dir, hostname)
	c.replace(t, crt, p.CertPEM)
	c.replace(t, key, p.KeyPEM)
}

// presented does a TLS handshake with addr, sending serverName as SNI
// ("" sends none), and returns the leaf the server presented.
func presented(t *testing.T, addr, serverName string) (*x509.Certificate, error) {
	t.Helper()
	d := &tls.Dialer{
		NetDialer: &net.Dialer{Timeout: waitFor},
		// Not verifying here: these checks compare the exact bytes.
		Config: &tls.Config{ServerName: serverName, InsecureSkipVerify: true},
	}
	c, err := d.DialContext(context.Background(), "tcp", addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.(*tls.Conn).ConnectionState().PeerCertificates[0], nil
}

// mustPresent fails the test unless the server at addr presents want.
func mustPresent(t *testing.T, addr string, want *x509.Certificate, why string) {
	t.Helper()
	got, err := presented(t, addr, testHost)
	if err != nil {
		t.Fatalf("%s: handshake: %v", why, err)
	}
	if !bytes.Equal(got.Raw, want.Raw) {
		t.Fatalf("%s: server presents serial %v, want serial %v", why, got.SerialNumber, want.SerialNumber)
	}
}

// clientVia returns a derphttp client for https://<hostname>:<port>/derp
// that dials addr instead of resolving hostname, trusting only roots.
func clientVia(t *testing.T, hostname string, addr net.Addr, roots ...*x509.Certificate) *derphttp.Client {
	t.Helper()
	_, port, _ := net.SplitHostPort(addr.String())
	c, err := derphttp.NewClient(key.NewNode(), "https://"+net.JoinHostPort(hostname, port)+"/derp", logger.Discard, netmon.NewStatic())
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	c.TLSConfig = &tls.Config{RootCAs: pool}
	c.SetURLDialer(func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, addr.String())
	})
	t.Cleanup(func() { c.Close() })
	return c
}

func TestManualCertsReloadWhileServing(t *testing.T) {
	dir := t.TempDir()
	clock := newFileClock()
	first, second, third := newPair(t, testHost), newPair(t, testHost), newPair(t, testHost)
	clock.writePair(t, dir, testHost, first)
	crtPath, keyPath := relay.CertPaths(dir, testHost)

	logs := &testutil.LogRecorder{}
	certs, err := relay.LoadManualCerts(dir, testHost, slog.New(logs))
	if err != nil {
		t.Fatal(err)
	}
	s := startRelay(t, certs)
	addr := s.LocalAddr().String()
	mustPresent(t, addr, first.Cert, "at start")

	// A renewal: both files replaced. The next handshake has it.
	clock.writePair(t, dir, testHost, second)
	mustPresent(t, addr, second.Cert, "after replacing both files")
	if got, want := mustCurrent(t, certs).CertName, relay.CertName(second.Cert.Raw); got != want {
		t.Errorf("Current().CertName = %s, want %s", got, want)
	}
	if logs.Count(slog.LevelInfo, "reloaded") != 1 {
		t.Errorf("want one info line about the reload, got %d", logs.Count(slog.LevelInfo, "reloaded"))
	}
	// A real client that trusts only the new certificate connects.
	early := watch(clientVia(t, testHost, s.LocalAddr(), second.Cert))
	early.mustBeAdmitted(t)

	// Broken replacements keep the last good certificate, with one
	// warning per broken version (not one per handshake).
	broken := []struct {
		name     string
		crt, key []byte
	}{
		{"garbage certificate", []byte("-----BEGIN CERTIFICATE-----\nnot base64 at all\n"), second.KeyPEM},
		{"key of another certificate", third.CertPEM, second.KeyPEM},
		{"empty key file", second.CertPEM, nil},
	}
	for i, b := range broken {
		clock.replace(t, crtPath, b.crt)
		clock.replace(t, keyPath, b.key)
		for range 3 {
			mustPresent(t, addr, second.Cert, b.name)
		}
		if got := logs.Count(slog.LevelWarn, "still serving the previous certificate"); got != i+1 {
			t.Errorf("%s: %d warnings so far, want %d (one per broken version)", b.name, got, i+1)
		}
	}

	// Fixed: the next handshake has the new pair.
	clock.writePair(t, dir, testHost, third)
	mustPresent(t, addr, third.Cert, "after fixing the files")
	// A new client trusting only the third certificate connects, and the
	// one connected before all of this is still connected.
	watch(clientVia(t, testHost, s.LocalAddr(), third.Cert)).mustBeAdmitted(t)
	select {
	case err := <-early.err:
		t.Errorf("client connected before the replacements was cut off: %v", err)
	default:
	}
}

func mustCurrent(t *testing.T, certs *relay.ManualCerts) relay.CertInfo {
	t.Helper()
	info, ok := certs.Current()
	if !ok {
		t.Fatal("Current() not ok")
	}
	return info
}

// serveManualPair puts p where manual mode looks for hostname's files in
// a new directory, and starts a relay serving them (LoadManualCerts). It
// returns the relay and the directory.
func serveManualPair(t *testing.T, hostname string, p *testutil.Cert) (*relay.Server, string) {
	t.Helper()
	dir := t.TempDir()
	newFileClock().writePair(t, dir, hostname, p)
	certs, err := relay.LoadManualCerts(dir, hostname, nil)
	if err != nil {
		t.Fatal(err)
	}
	return startRelay(t, certs), dir
}

func TestManualCertsVanishedFilesKeepServing(t *testing.T) {
	// Mid-renewal a tool may delete before it writes: keep serving.
	p := newPair(t, testHost)
	s, dir := serveManualPair(t, testHost, p)
	crt, key := relay.CertPaths(dir, testHost)
	os.Remove(crt)
	os.Remove(key)
	mustPresent(t, s.LocalAddr().String(), p.Cert, "with the files gone")
}

func TestLoadManualCertsErrors(t *testing.T) {
	a, b := newPair(t, testHost), newPair(t, testHost)
	other := newPair(t, "other.test.example")
	tests := []struct {
		name     string
		hostname string
		crt, key []byte // nil: file absent
		// want are substrings of the error; "$crt" and "$key" stand for
		// the two paths.
		want []string
	}{
		{"mismatched certificate and key", testHost, a.CertPEM, b.KeyPEM,
			[]string{"$crt", "$key", "private key does not match"}},
		{"certificate for another name", testHost, other.CertPEM, other.KeyPEM,
			[]string{testHost, "$crt", "not valid for"}},
		{"certificate without the IP", "192.0.2.10", a.CertPEM, a.KeyPEM,
			[]string{"192.0.2.10", "not valid for"}},
		{"no files", testHost, nil, nil,
			[]string{"$crt", "no such file"}},
		{"no key file", testHost, a.CertPEM, nil,
			[]string{"$key", "no such file"}},
		{"no certificate file", testHost, nil, a.KeyPEM,
			[]string{"$crt", "no such file"}},
		{"garbage certificate", testHost, []byte("hello"), a.KeyPEM,
			[]string{"$crt"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			crt, key := relay.CertPaths(dir, tt.hostname)
			if tt.crt != nil {
				os.WriteFile(crt, tt.crt, 0o644)
			}
			if tt.key != nil {
				os.WriteFile(key, tt.key, 0o600)
			}
			certs, err := relay.LoadManualCerts(dir, tt.hostname, nil)
			if err == nil {
				t.Fatalf("LoadManualCerts succeeded (serving %v), want an error", mustCurrent(t, certs).Subject)
			}
			for _, w := range tt.want {
				w = strings.NewReplacer("$crt", crt, "$key", key).Replace(w)
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not mention %q:\n%v", w, err)
				}
			}
			// A library speaks in values; the program names its settings.
			if strings.Contains(err.Error(), " -") {
				t.Errorf("error names a command-line flag: %v", err)
			}
		})
	}
}

func TestCertPathsMatchDerper(t *testing.T) {
	// derper's layout, so a directory set up for derper works unchanged.
	tests := []struct{ host, base string }{
		{"derp.example.com", "derp.example.com"},
		{"203.0.113.7", "203.0.113.7"},
		{"2001:db8::1", "2001db81"},
		{"../../etc/passwd", "....etcpasswd"},
	}
	for _, tt := range tests {
		crt, key := relay.CertPaths("/certs", tt.host)
		if want := filepath.Join("/certs", tt.base+".crt"); crt != want {
			t.Errorf("CertPaths(%q) crt = %s, want %s", tt.host, crt, want)
		}
		if want := filepath.Join("/certs", tt.base+".key"); key != want {
			t.Errorf("CertPaths(%q) key = %s, want %s", tt.host, key, want)
		}
	}
}

func TestManualCertsSNI(t *testing.T) {
	p := newPair(t, testHost)
	s, _ := serveManualPair(t, testHost, p)
	tests := []struct {
		sni    string
		served bool
	}{
		{testHost, true},
		// Scanners and clients dialing the IP send no name: served, so
		// they are not a log line each.
		{"", true},
		// DNS names are case-insensitive (RFC 4343); an operator's
		// derpMap may spell the name with capitals.
		{strings.ToUpper(testHost), true},
		{"other.test.example", false},
		{"derp.test.example.evil", false},
		{"sub." + testHost, false},
	}
	for _, tt := range tests {
		t.Run("sni="+tt.sni, func(t *testing.T) {
			leaf, err := presented(t, s.LocalAddr().String(), tt.sni)
			switch {
			case tt.served && err != nil:
				t.Errorf("handshake refused: %v", err)
			case tt.served && !bytes.Equal(leaf.Raw, p.Cert.Raw):
				t.Errorf("served another certificate: %v", leaf.Subject)
			case !tt.served && err == nil:
				t.Errorf("served %v, want the handshake refused", leaf.Subject)
			}
		})
	}
}

func TestManualCertsHostnameCase(t *testing.T) {
	// -hostname typed with capitals (TAILSCALE_DERP_HOSTNAME=Derp.Example.com)
	// loads: certificate name checks ignore case. Clients then send the name
	// in whatever case their derpMap has, usually lower: they must be served.
	const typed = "DERP.Test.Example"
	s, _ := serveManualPair(t, typed, newPair(t, testHost))
	for _, sni := range []string{testHost, typed} {
		if _, err := presented(t, s.LocalAddr().String(), sni); err != nil {
			t.Errorf("-hostname %s, SNI %s: handshake refused: %v", typed, sni, err)
		}
	}
}

// TestManualCertsReload: Reload (what main calls on SIGHUP) picks up new
// files even when a copy kept the old files' times and sizes, so the
// per-handshake check cannot see the change; it reports an unchanged
// certificate as unchanged, and a broken pair as an error while the last
// good certificate keeps serving.
func TestManualCertsReload(t *testing.T) {
	dir := t.TempDir()
	first, second := newPair(t, testHost), newPair(t, testHost)
	crt, key := relay.CertPaths(dir, testHost)
	write := func(crtPEM, keyPEM []byte) {
		t.Helper()
		// Pad both files to fixed sizes and fix their times: the stamp
		// the handshake check compares stays the same.
		pad := func(b []byte, n int) []byte { return append(b, bytes.Repeat([]byte("\n"), n-len(b))...) }
		stamp := time.Now().Add(-time.Hour).Truncate(time.Second)
		for _, f := range []struct {
			path string
			data []byte
		}{{crt, pad(crtPEM, 2048)}, {key, pad(keyPEM, 1024)}} {
			if err := os.WriteFile(f.path, f.data, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chtimes(f.path, stamp, stamp); err != nil {
				t.Fatal(err)
			}
		}
	}
	write(first.CertPEM, first.KeyPEM)
	certs, err := relay.LoadManualCerts(dir, testHost, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := startRelay(t, certs)
	addr := s.LocalAddr().String()

	write(second.CertPEM, second.KeyPEM)
	mustPresent(t, addr, first.Cert, "same times and sizes: the handshake check sees no change")
	if changed, err := certs.Reload(); !changed || err != nil {
		t.Fatalf("Reload = %v, %v; want changed", changed, err)
	}
	mustPresent(t, addr, second.Cert, "after Reload")
	if changed, err := certs.Reload(); changed || err != nil {
		t.Errorf("Reload of the same files = %v, %v; want unchanged, no error", changed, err)
	}

	write(first.CertPEM, second.KeyPEM) // a key of another certificate
	if changed, err := certs.Reload(); changed || err == nil {
		t.Errorf("Reload of a mismatched pair = %v, %v; want an error", changed, err)
	} else if !strings.Contains(err.Error(), "still serving the previous one") {
		t.Errorf("Reload error %q does not say the old certificate serves", err)
	}
	mustPresent(t, addr, second.Cert, "after a failed Reload")
}

// A reload to a certificate outside its validity period keeps the valid
// one serving, at error level, once per version of the files; a
// certificate not valid yet is taken once its NotBefore has passed.
func TestManualCertsReloadRefusesInvalidDates(t *testing.T) {
	dir := t.TempDir()
	clock := newFileClock()
	now := time.Now()
	good := newPair(t, testHost)
	clock.writePair(t, dir, testHost, good)
	logs := &testutil.LogRecorder{}
	certs, err := relay.LoadManualCerts(dir, testHost, slog.New(logs))
	if err != nil {
		t.Fatal(err)
	}
	s := startRelay(t, certs)
	addr := s.LocalAddr().String()
	mustPresent(t, addr, good.Cert, "at start")
	client := watch(clientVia(t, testHost, s.LocalAddr(), good.Cert))
	client.mustBeAdmitted(t)

	const refused = "clients would refuse it, so the previous certificate is still served"
	expired := newPairSpan(t, now.Add(-365*24*time.Hour), now.Add(-time.Hour), testHost)
	clock.writePair(t, dir, testHost, expired)
	for range 3 {
		mustPresent(t, addr, good.Cert, "after an expired certificate replaced it")
	}
	if got := logs.Count(slog.LevelError, "the new certificate expired "); got != 1 {
		t.Errorf("%d error lines about the expired certificate, want 1", got)
	}
	if got := mustCurrent(t, certs).CertName; got != relay.CertName(good.Cert.Raw) {
		t.Errorf("Current() = %s, want the valid certificate", got)
	}

	// Not valid for another 2.5 s: refused, then taken once valid, with
	// no file change.
	soon := newPairSpan(t, now.Add(2500*time.Millisecond), now.Add(365*24*time.Hour), testHost)
	clock.writePair(t, dir, testHost, soon)
	mustPresent(t, addr, good.Cert, "before the new certificate is valid")
	if got := logs.Count(slog.LevelError, "the new certificate not valid until"); got != 1 {
		t.Errorf("%d error lines about the certificate not valid yet, want 1", got)
	}
	if got := logs.Count(slog.LevelError, refused); got != 2 {
		t.Errorf("%d error lines saying the previous certificate is still served, want 2", got)
	}
	time.Sleep(time.Until(soon.Cert.NotBefore.Add(100 * time.Millisecond)))
	mustPresent(t, addr, soon.Cert, "once the new certificate is valid")

	// The client connected before is still connected.
	select {
	case err := <-client.err:
		t.Errorf("client connected before the replacements was cut off: %v", err)
	default:
	}

	// An expired certificate replacing an expired one is taken: nothing
	// valid is lost, and the files are what the operator says.
	dir2 := t.TempDir()
	clock.writePair(t, dir2, testHost, expired)
	certs2, err := relay.LoadManualCerts(dir2, testHost, nil)
	if err != nil {
		t.Fatalf("an expired certificate at load: %v, want it loaded (the relay says what is wrong)", err)
	}
	s2 := startRelay(t, certs2)
	other := newPairSpan(t, now.Add(-400*24*time.Hour), now.Add(-2*time.Hour), testHost)
	clock.writePair(t, dir2, testHost, other)
	got, err := presented(t, s2.LocalAddr().String(), testHost)
	if err != nil || !bytes.Equal(got.Raw, other.Cert.Raw) {
		t.Errorf("expired → expired: presented %v (%v), want the new one", got.SerialNumber, err)
	}
}
