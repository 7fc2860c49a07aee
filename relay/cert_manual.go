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
// the last good certificate keeps serving.
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
	// badStamp is the stamp of the last pair that failed to load, so a
	// broken file is reported once, not on every handshake.
	badStamp atomic.Pointer[pairStamp]
}

type loadedCert struct {
	cert  *tls.Certificate
	info  CertInfo
	stamp pairStamp
}

// pairStamp identifies a version of the two files.
type pairStamp struct {
	crtMod, keyMod   time.Time
	crtSize, keySize int64
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
	return pairStamp{crtMod: c.ModTime(), keyMod: k.ModTime(), crtSize: c.Size(), keySize: k.Size()}, nil
}

func (m *ManualCerts) load(st pairStamp) (*loadedCert, error) {
	cert, err := tls.LoadX509KeyPair(m.crtPath, m.keyPath)
	if err != nil {
		return nil, fmt.Errorf("load %s and %s: %w", m.crtPath, m.keyPath, err)
	}
	leaf, err := leafOf(&cert)
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", m.crtPath, err)
	}
	cert.Leaf = leaf
	if err := leaf.VerifyHostname(m.hostname); err != nil {
		return nil, fmt.Errorf("%s is not valid for %s: %w", m.crtPath, m.hostname, err)
	}
	return &loadedCert{cert: &cert, info: certInfo(leaf), stamp: st}, nil
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
	if err != nil || st == cur.stamp {
		// A file that vanished mid-renewal is not worth a log line per
		// handshake; the old certificate keeps serving.
		return cur
	}
	if bad := m.badStamp.Load(); bad != nil && *bad == st {
		return cur
	}
	if !m.reloadMu.TryLock() {
		return cur // another handshake is reloading; serve the old one meanwhile
	}
	defer m.reloadMu.Unlock()
	if cur = m.cur.Load(); cur.stamp == st {
		return cur
	}
	next, err := m.load(st)
	if err != nil {
		m.badStamp.Store(&st)
		m.logger.Warn("relay: new certificate files do not load; still serving the previous certificate",
			"err", err, "serving_until", cur.info.NotAfter.Format(time.RFC3339))
		return cur
	}
	m.cur.Store(next)
	m.logger.Info("relay: certificate reloaded", "path", m.crtPath, "not_after", next.info.NotAfter.Format(time.RFC3339))
	return next
}

// Reload loads the files now, even if their size and time did not change
// (a copy that kept the time), and serves them if they hold a certificate
// other than the one served: what a program does on SIGHUP. It reports
// whether the certificate changed; if the files do not load, the error
// says why and the last good certificate keeps serving.
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
		m.badStamp.Store(&st)
		return false, fmt.Errorf("relay: manual certificate: %w; still serving the previous one, valid until %s", err, cur.info.NotAfter.Format(time.RFC3339))
	}
	if next.info.CertName == cur.info.CertName {
		if st != cur.stamp {
			m.cur.Store(next) // the same certificate; remember the files' new stamp
		}
		return false, nil
	}
	m.cur.Store(next)
	m.logger.Info("relay: certificate reloaded", "path", m.crtPath, "not_after", next.info.NotAfter.Format(time.RFC3339))
	return true, nil
}

// HTTPHandler implements Certificates; manual certificates need no
// challenges, so it returns fallback.
func (m *ManualCerts) HTTPHandler(fallback http.Handler) http.Handler { return fallback }

// isNotExist reports whether err says a file is missing.
func isNotExist(err error) bool { return errors.Is(err, fs.ErrNotExist) }
