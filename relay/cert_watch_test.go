package relay

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tailderp/tailderp/internal/testutil"
	"tailscale.com/metrics"
	"tailscale.com/types/key"
)

const day = 24 * time.Hour

// span makes a certificate for name valid from notBefore to notAfter:
// self-signed, or signed by a throwaway CA when byCA.
func span(t *testing.T, name string, notBefore, notAfter time.Time, byCA bool) (certPEM, keyPEM []byte, leaf *x509.Certificate) {
	t.Helper()
	o := testutil.CertOptions{Names: []string{name}, NotBefore: notBefore, NotAfter: notAfter}
	if byCA {
		o.CA = testutil.NewCert(t, testutil.CertOptions{CommonName: "test CA", IsCA: true, NotBefore: notBefore, NotAfter: notAfter.Add(day)})
	}
	c := testutil.NewCert(t, o)
	return c.CertPEM, c.KeyPEM, c.Cert
}

func infoSpan(t *testing.T, notBefore, notAfter time.Time, byCA bool) CertInfo {
	_, _, leaf := span(t, "relay.test", notBefore, notAfter, byCA)
	return CertInfoOf(leaf)
}

// The warning starts where renewal tools renew (a third of the lifetime,
// at most 30 days), a grace later for a certificate a CA issued.
func TestCertWarnFrom(t *testing.T) {
	now := time.Now().Truncate(time.Second)
	for _, tc := range []struct {
		name     string
		lifetime time.Duration
		byCA     bool
		want     time.Duration // before NotAfter
	}{
		{"self-signed IP certificate, 365 days", 365 * day, false, 30 * day},
		{"self-signed, 20 days", 21 * day, false, 7 * day},
		{"Let's Encrypt, 90 days", 90 * day, true, 29 * day},
		{"private CA, one year", 365 * day, true, 29 * day},
		{"Let's Encrypt short-lived (IP), 160 hours", 160 * time.Hour, true, 48 * time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			info := infoSpan(t, now, now.Add(tc.lifetime), tc.byCA)
			if info.SelfSigned == tc.byCA {
				t.Fatalf("SelfSigned = %v for byCA %v", info.SelfSigned, tc.byCA)
			}
			if got := info.NotAfter.Sub(info.WarnFrom()); got != tc.want {
				t.Errorf("warned %v before NotAfter, want %v", got, tc.want)
			}
		})
	}
}

func TestCertProblemAndDaysLeft(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		name     string
		from, to time.Duration // from now
		want     CertProblem
		days     int
	}{
		{"fresh", -time.Hour, 365 * day, CertOK, 364},
		{"20 days left of a year", -345 * day, 20 * day, CertExpiring, 19},
		{"expired an hour ago", -365 * day, -time.Hour, CertExpired, -1},
		{"not valid for an hour", time.Hour, 365 * day, CertNotYetValid, 364},
	} {
		info := infoSpan(t, now.Add(tc.from), now.Add(tc.to), false)
		if got := info.Problem(now); got != tc.want {
			t.Errorf("%s: Problem = %q, want %q", tc.name, got, tc.want)
		}
		if got := info.DaysLeft(now); got != tc.days {
			t.Errorf("%s: DaysLeft = %d, want %d", tc.name, got, tc.days)
		}
	}
}

// fixedCerts serves whatever info it is set to (the watch only reads
// Current).
type fixedCerts struct {
	mu   sync.Mutex
	info CertInfo
}

func (f *fixedCerts) set(i CertInfo) { f.mu.Lock(); f.info = i; f.mu.Unlock() }
func (f *fixedCerts) Current() (CertInfo, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.info, true
}
func (f *fixedCerts) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return nil, os.ErrNotExist
}
func (f *fixedCerts) HTTPHandler(h http.Handler) http.Handler { return h }

// The watch says a problem at once, again only a day later while it
// lasts, at once when the certificate changes, and with the fix.
func TestCertWatchSaysProblems(t *testing.T) {
	t0 := time.Now()
	year := infoSpan(t, t0.Add(-345*day), t0.Add(20*day), false) // 20 days left
	certs := &fixedCerts{info: year}
	logs := &testutil.LogRecorder{}
	var changes []string
	s := &Server{Certs: certs, Logger: slog.New(logs),
		CertAdvice:   func(p CertProblem) string { return "fix for " + string(p) },
		OnCertChange: func(st CertStatus) { changes = append(changes, st.CertName) },
	}
	w := &certWatch{s: s}

	step := func(name string, at time.Time, want ...string) []string {
		t.Helper()
		w.check(at)
		got := logs.Take()
		if len(got) != len(want) {
			t.Fatalf("%s: logged %q, want %d lines like %q", name, got, len(want), want)
		}
		for i := range want {
			if !strings.Contains(got[i], want[i]) {
				t.Errorf("%s: line %q, want it to contain %q", name, got[i], want[i])
			}
		}
		return got
	}
	line := step("start", t0, "WARN relay: the certificate expires in 19 days")[0]
	for _, want := range []string{"fix=fix for expiring", "not_after=" + year.NotAfter.UTC().Format(time.RFC3339), "days_left=19", "cert_name=" + year.CertName, "subject=relay.test"} {
		if !strings.Contains(line, want) {
			t.Errorf("warning %q lacks %q", line, want)
		}
	}
	step("an hour later", t0.Add(time.Hour))
	step("23 hours later", t0.Add(23*time.Hour))
	step("a day later", t0.Add(25*time.Hour), "WARN relay: the certificate expires in 18 days")

	// A reload to another certificate that is also close to its end.
	other := infoSpan(t, t0.Add(-355*day), t0.Add(10*day), false)
	certs.set(other)
	step("changed", t0.Add(26*time.Hour), "WARN relay: the certificate expires in 8 days")
	// Renewed: said once, at info level.
	fresh := infoSpan(t, t0, t0.Add(365*day), false)
	certs.set(fresh)
	step("renewed", t0.Add(27*time.Hour), "INFO relay: the certificate was replaced; its dates are fine now")
	step("renewed, a day later", t0.Add(52*time.Hour))
	if want := []string{other.CertName, fresh.CertName}; strings.Join(changes, ",") != strings.Join(want, ",") {
		t.Errorf("OnCertChange got %q, want %q", changes, want)
	}

	// Past its end, or before its start: errors, with the fix.
	certs.set(infoSpan(t, t0.Add(-365*day), t0.Add(-time.Hour), false))
	step("expired", t0.Add(53*time.Hour), "ERROR relay: the certificate has expired")
	st := s.certStatus(t0.Add(53 * time.Hour))
	if st.Problem != CertExpired || st.Fix != "fix for expired" || st.DaysLeft >= 0 || !st.Serving {
		t.Errorf("CertStatus = %+v", st)
	}
	certs.set(infoSpan(t, t0.Add(100*day), t0.Add(465*day), false))
	step("not valid yet", t0.Add(54*time.Hour), "ERROR relay: the certificate is not valid yet")
}

// A watch with nothing to judge (ACME before its first certificate) says
// nothing.
func TestCertWatchBeforeACertificate(t *testing.T) {
	logs := &testutil.LogRecorder{}
	s := &Server{Certs: &noCertYet{}, Logger: slog.New(logs), CertAdvice: func(CertProblem) string { return "x" }}
	(&certWatch{s: s}).check(time.Now())
	if got := logs.Take(); len(got) != 0 {
		t.Errorf("logged %q", got)
	}
	if st := s.CertStatus(); st.Serving || st.Problem != CertOK {
		t.Errorf("CertStatus = %+v", st)
	}
}

type noCertYet struct{ fixedCerts }

func (*noCertYet) Current() (CertInfo, bool) { return CertInfo{}, false }

// A running relay notices manual files replaced on disk when no client
// connects, says at once that the new certificate is close to its end, and
// reports the change.
func TestServerWatchesManualFiles(t *testing.T) {
	const host = "relay.test"
	dir := t.TempDir()
	now := time.Now()
	writePair := func(notBefore, notAfter time.Time, mtime time.Time) *x509.Certificate {
		certPEM, keyPEM, leaf := span(t, host, notBefore, notAfter, true)
		crt, key := CertPaths(dir, host)
		for _, f := range []struct {
			path string
			data []byte
		}{{crt, certPEM}, {key, keyPEM}} {
			if err := os.WriteFile(f.path+".tmp", f.data, 0o600); err != nil {
				t.Fatal(err)
			}
			os.Chtimes(f.path+".tmp", mtime, mtime)
			if err := os.Rename(f.path+".tmp", f.path); err != nil {
				t.Fatal(err)
			}
		}
		return leaf
	}
	writePair(now.Add(-time.Hour), now.Add(89*day), now.Add(-2*time.Hour))
	logs := &testutil.LogRecorder{}
	certs, err := LoadManualCerts(dir, host, slog.New(logs))
	if err != nil {
		t.Fatal(err)
	}
	changed := make(chan CertStatus, 4)
	s := &Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: certs, PrivateKey: key.NewNode(), Logger: slog.New(logs),
		CertAdvice:     func(CertProblem) string { return "renew the files" },
		OnCertChange:   func(st CertStatus) { changed <- st },
		certCheckEvery: 20 * time.Millisecond,
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	defer s.Close(context.Background())
	for _, l := range logs.Take() {
		if !strings.HasPrefix(l, "INFO ") {
			t.Errorf("a fresh certificate logged %q", l)
		}
	}
	gauge := func() string { return s.ExpVar().(*metrics.Set).Get("gauge_cert_problem").String() }
	if g := gauge(); g != "0" {
		t.Errorf("cert_problem = %s for a fresh certificate, want 0", g)
	}

	// Replaced by a 90-day certificate with 20 days left: no handshake.
	leaf := writePair(now.Add(-70*day), now.Add(20*day), now.Add(-time.Hour))
	select {
	case st := <-changed:
		if st.CertName != CertName(leaf.Raw) || st.Problem != CertExpiring || st.Fix != "renew the files" || st.File == "" {
			t.Errorf("OnCertChange(%+v)", st)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("no OnCertChange 10s after the files changed; logs: %q", logs.Take())
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		var warned bool
		for _, l := range logs.Take() {
			warned = warned || (strings.HasPrefix(l, "WARN relay: the certificate expires in 19 days") && strings.Contains(l, "fix=renew the files"))
		}
		if warned {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no warning about the reloaded certificate")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if st := s.CertStatus(); st.CertName != CertName(leaf.Raw) || st.DaysLeft != 19 {
		t.Errorf("CertStatus = %+v", st)
	}
	if g := gauge(); g != "1" {
		t.Errorf("cert_problem = %s for a certificate with 20 days left, want 1", g)
	}
}
