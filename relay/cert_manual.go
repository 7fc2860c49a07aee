package relay

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tailderp/tailderp/internal/logs"
)

// ManualCerts serves a certificate and key kept in files, the way certbot,
// acme.sh or an operator leave them, and picks up new files without a
// restart: every handshake checks whether either file changed (a stat of
// each, microseconds next to the handshake) and, if so, loads the pair. A
// pair that does not load, or is not valid for the hostname, is logged and
// the last good certificate keeps serving. So is a pair outside its
// validity period (expired, or not valid yet) while the certificate
// being served is within its own: clients refuse such a certificate, and
// swapping it in would cut off every new connection at once, while the
// old one still works until its NotAfter; a not-yet-valid pair is taken
// once its NotBefore has passed.
//
// Use LoadManualCerts to make one.
type ManualCerts struct {
	hostname string
	crtPath  string
	keyPath  string
	isIP     bool
	logger   *slog.Logger

	cur      atomic.Pointer[loadedCert]
	reloadMu sync.Mutex // serializes reloads; handshakes never wait on it
	// bad is the last pair that failed to load or was refused, so a
	// broken file is reported once, not on every handshake.
	bad atomic.Pointer[badPair]
	// changed receives (without blocking) when a reload swapped the
	// certificate, so the Server's expiry watch judges it at once.
	changed chan struct{}
}

// badPair is a version of the files that is not served.
type badPair struct {
	stamp pairStamp
	// retryAt, if set, is when to load it again: the NotBefore of a
	// certificate that was not valid yet.
	retryAt time.Time
}

type loadedCert struct {
	cert  *tls.Certificate
	info  CertInfo
	stamp pairStamp
}

// pairStamp identifies a version of the two files: which files they are
// (a renewal that renames new files into place makes new ones), and their
// times and sizes (one that writes over them in place). The file identity
// matters: a file's time has the kernel's clock tick for resolution
// (milliseconds), so a pair written just after the one it replaces can
// carry the same times and sizes.
type pairStamp struct {
	crt, key os.FileInfo
}

// same reports whether st and o are the same version of the files.
func (st pairStamp) same(o pairStamp) bool {
	return sameVersion(st.crt, o.crt) && sameVersion(st.key, o.key)
}

func sameVersion(a, b os.FileInfo) bool {
	if a == nil || b == nil {
		return a == b
	}
	return os.SameFile(a, b) && a.ModTime().Equal(b.ModTime()) && a.Size() == b.Size()
}

// LoadManualCerts loads <dir>/<hostname>.crt and .key (see CertPaths) and
// checks that they belong together and that the certificate is valid for
// hostname. The errors name both paths and what to do.
func LoadManualCerts(dir, hostname string, logger *slog.Logger) (*ManualCerts, error) {
	if logger == nil {
		logger = logs.Discard()
	}
	crt, key := CertPaths(dir, hostname)
	m := &ManualCerts{
		hostname: hostname,
		crtPath:  crt,
		keyPath:  key,
		isIP:     net.ParseIP(hostname) != nil,
		logger:   logger,
		changed:  make(chan struct{}, 1),
	}
	st, err := m.stat()
	if err != nil {
		return nil, fmt.Errorf("relay: manual certificate: %w", err)
	}
	lc, err := m.load(st)
	if err != nil {
		return nil, fmt.Errorf("relay: manual certificate: %w", err)
	}
	m.cur.Store(lc)
	return m, nil
}

// Current describes the certificate being served now.
func (m *ManualCerts) Current() (CertInfo, bool) { return m.cur.Load().info, true }

// Paths returns the certificate and key file paths.
func (m *ManualCerts) Paths() (crt, key string) { return m.crtPath, m.keyPath }

func (m *ManualCerts) stat() (pairStamp, error) {
	c, err := os.Stat(m.crtPath)
	if err != nil {
		return pairStamp{}, fmt.Errorf("certificate %w", err)
	}
	k, err := os.Stat(m.keyPath)
	if err != nil {
		return pairStamp{}, fmt.Errorf("key %w", err)
	}
	return pairStamp{crt: c, key: k}, nil
}

func (m *ManualCerts) load(st pairStamp) (*loadedCert, error) {
	cert, info, err := loadPair(m.crtPath, m.keyPath, m.hostname)
	if err != nil {
		return nil, err
	}
	return &loadedCert{cert: cert, info: info, stamp: st}, nil
}

// loadPair loads the certificate file crt and its key file key, and checks
// that they belong together and that the certificate is valid for
// hostname.
func loadPair(crt, key, hostname string) (*tls.Certificate, CertInfo, error) {
	cert, err := tls.LoadX509KeyPair(crt, key)
	if err != nil {
		return nil, CertInfo{}, fmt.Errorf("load %s and %s: %w", crt, key, err)
	}
	leaf, err := leafOf(&cert)
	if err != nil {
		return nil, CertInfo{}, fmt.Errorf("parse %s: %w", crt, err)
	}
	cert.Leaf = leaf
	if err := leaf.VerifyHostname(hostname); err != nil {
		return nil, CertInfo{}, fmt.Errorf("%s is not valid for %s: %w", crt, hostname, err)
	}
	info := CertInfoOf(leaf)
	info.File = crt
	return &cert, info, nil
}

// ReadCertPair describes the certificate in the file crt after checking
// that the key in the file key belongs to it and that it is valid for
// hostname (a DNS name or IP address). It does not judge its dates.
func ReadCertPair(crt, key, hostname string) (CertInfo, error) {
	_, info, err := loadPair(crt, key, hostname)
	if err != nil {
		return CertInfo{}, fmt.Errorf("relay: %w", err)
	}
	return info, nil
}

// GetCertificate implements Certificates.
func (m *ManualCerts) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if !m.isIP && hello.ServerName != "" && !strings.EqualFold(strings.TrimSuffix(hello.ServerName, "."), m.hostname) {
		// Refuse names we do not serve: a scanner learns nothing, and a
		// misconfigured client fails loudly instead of on a name check.
		return nil, fmt.Errorf("relay: no certificate for %q", hello.ServerName)
	}
	cur := m.maybeReload()
	c := *cur.cert
	c.Certificate = slices.Clip(c.Certificate)
	return &c, nil
}

// maybeReload returns the certificate to serve, loading the files first
// if they changed since the last load.
func (m *ManualCerts) maybeReload() *loadedCert {
	cur := m.cur.Load()
	st, err := m.stat()
	if err != nil || st.same(cur.stamp) {
		// A file that vanished mid-renewal is not worth a log line per
		// handshake; the old certificate keeps serving.
		return cur
	}
	now := time.Now()
	if bad := m.bad.Load(); bad != nil && bad.stamp.same(st) && (bad.retryAt.IsZero() || now.Before(bad.retryAt)) {
		return cur
	}
	if !m.reloadMu.TryLock() {
		return cur // another handshake is reloading; serve the old one meanwhile
	}
	defer m.reloadMu.Unlock()
	if cur = m.cur.Load(); cur.stamp.same(st) {
		return cur
	}
	next, err := m.load(st)
	if err != nil {
		m.bad.Store(&badPair{stamp: st})
		m.logger.Warn("relay: new certificate files do not load; still serving the previous certificate",
			"err", err, "serving_until", cur.info.NotAfter.Format(time.RFC3339))
		return cur
	}
	if cur.info.ValidAt(now) && !next.info.ValidAt(now) {
		m.refuse(st, cur.info, next.info, now)
		return cur
	}
	m.serve(next)
	return next
}

// Reload loads the files now, even if their size and time did not change
// (a copy that kept the time), and serves them if they hold a certificate
// other than the one served: what a program does on SIGHUP. It reports
// whether the certificate changed; if the files do not load, or hold a
// certificate clients would refuse while the served one is valid, the
// error says why and the last good certificate keeps serving.
func (m *ManualCerts) Reload() (changed bool, err error) {
	m.reloadMu.Lock()
	defer m.reloadMu.Unlock()
	cur := m.cur.Load()
	st, err := m.stat()
	if err != nil {
		return false, fmt.Errorf("relay: manual certificate: %w", err)
	}
	next, err := m.load(st)
	if err != nil {
		m.bad.Store(&badPair{stamp: st})
		return false, fmt.Errorf("relay: manual certificate: %w; still serving the previous one, valid until %s", err, cur.info.NotAfter.Format(time.RFC3339))
	}
	if next.info.CertName == cur.info.CertName {
		if !st.same(cur.stamp) {
			m.cur.Store(next) // the same certificate; remember the files' new stamp
		}
		return false, nil
	}
	if now := time.Now(); cur.info.ValidAt(now) && !next.info.ValidAt(now) {
		m.refuse(st, cur.info, next.info, now)
		return false, fmt.Errorf("relay: manual certificate %s is outside its validity period (%s to %s); still serving the previous one, valid until %s",
			m.crtPath, next.info.NotBefore.Format(time.RFC3339), next.info.NotAfter.Format(time.RFC3339), cur.info.NotAfter.Format(time.RFC3339))
	}
	m.serve(next)
	return true, nil
}

// serve swaps in next, a certificate that loaded and is valid, and tells
// the watchers of changes. The caller holds reloadMu.
func (m *ManualCerts) serve(next *loadedCert) {
	m.cur.Store(next)
	m.bad.Store(nil)
	select {
	case m.changed <- struct{}{}:
	default:
	}
	m.logger.Info("relay: certificate reloaded", "path", m.crtPath, "not_after", next.info.NotAfter.Format(time.RFC3339))
}

// refuse keeps serving cur instead of next, a pair outside its validity
// period, and says so at error level: the files on disk are what a
// restart would serve.
func (m *ManualCerts) refuse(st pairStamp, cur, next CertInfo, now time.Time) {
	bad := &badPair{stamp: st}
	what := "expired " + next.NotAfter.Format(time.RFC3339)
	if next.Problem(now) == CertNotYetValid {
		bad.retryAt = next.NotBefore
		what = "not valid until " + next.NotBefore.Format(time.RFC3339)
	}
	m.bad.Store(bad)
	m.logger.Error("relay: the new certificate "+what+"; clients would refuse it, so the previous certificate is still served (replace the files with a certificate valid now; a restart would serve the new one)",
		"path", m.crtPath, "not_before", next.NotBefore.Format(time.RFC3339), "not_after", next.NotAfter.Format(time.RFC3339),
		"serving_until", cur.NotAfter.Format(time.RFC3339))
}

// refresh reloads the files if they changed, so a renewal is noticed
// (and judged) when no client connects.
func (m *ManualCerts) refresh() { m.maybeReload() }

// changes receives when a reload swapped the certificate.
func (m *ManualCerts) changes() <-chan struct{} { return m.changed }

// HTTPHandler implements Certificates; manual certificates need no
// challenges, so it returns fallback.
func (m *ManualCerts) HTTPHandler(fallback http.Handler) http.Handler { return fallback }

// isNotExist reports whether err says a file is missing.
func isNotExist(err error) bool { return errors.Is(err, fs.ErrNotExist) }
