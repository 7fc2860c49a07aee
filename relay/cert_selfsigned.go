package relay

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"tailscale.com/atomicfile"
)

// selfSignedValidity is one year: longer is refused by some platforms
// (macOS), and Tailscale clients pin the exact certificate anyway.
const selfSignedValidity = 365 * 24 * time.Hour

// generateSelfSigned makes a P-256 key and a self-signed server
// certificate for names (DNS names or IP addresses). It returns both in
// PEM.
func generateSelfSigned(names ...string) (certPEM, keyPEM []byte, err error) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, nil, fmt.Errorf("generate serial: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: names[0]},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(selfSignedValidity),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		return nil, nil, fmt.Errorf("create certificate: %w", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(priv)
	if err != nil {
		return nil, nil, fmt.Errorf("marshal key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), nil
}

// EnsureSelfSignedIPCert makes sure dir holds a certificate and key for
// the IP address ip (see CertPaths), generating a self-signed pair the
// first time. The key is written with mode 0600, each file atomically, so
// an interrupted start leaves either no pair or a whole one. It reports
// whether it generated a new pair; serve the files with LoadManualCerts.
func EnsureSelfSignedIPCert(dir, ip string) (created bool, err error) {
	if net.ParseIP(ip) == nil {
		return false, fmt.Errorf("relay: self-signed IP certificate: %q is not an IP address", ip)
	}
	crt, key := CertPaths(dir, ip)
	_, crtErr := os.Stat(crt)
	_, keyErr := os.Stat(key)
	switch {
	case crtErr == nil && keyErr == nil:
		return false, nil
	case crtErr == nil || keyErr == nil:
		return false, fmt.Errorf("relay: %s holds only one of %s and %s; restore the other, or remove both to generate a new self-signed pair (clients must then be given the new CertName)", dir, crt, key)
	case !isNotExist(crtErr):
		return false, fmt.Errorf("relay: self-signed certificate: %w", crtErr)
	case !isNotExist(keyErr):
		return false, fmt.Errorf("relay: self-signed certificate: %w", keyErr)
	}
	// Neither file: the first start, unless a switch to the next pair was
	// interrupted. A new pair then would silently change the pin.
	for _, p := range append(pairOf(NextCertPaths(dir, ip)), pairOf(PrevCertPaths(dir, ip))...) {
		if _, err := os.Stat(p); err == nil {
			ncrt, nkey := NextCertPaths(dir, ip)
			return false, fmt.Errorf("relay: %s holds no %s and %s but %s: a switch to the next certificate was interrupted; move %s to %s and %s to %s (or the .prev pair back), rather than generating a certificate with a new pin", dir, filepath.Base(crt), filepath.Base(key), p, ncrt, crt, nkey, key)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, fmt.Errorf("relay: self-signed certificate: %w", err)
	}
	certPEM, keyPEM, err := generateSelfSigned(ip)
	if err != nil {
		return false, fmt.Errorf("relay: self-signed certificate for %s: %w", ip, err)
	}
	if err := atomicfile.WriteFile(key, keyPEM, 0o600); err != nil {
		return false, fmt.Errorf("relay: self-signed certificate: %w", err)
	}
	if err := atomicfile.WriteFile(crt, certPEM, 0o644); err != nil {
		os.Remove(key)
		return false, fmt.Errorf("relay: self-signed certificate: %w", err)
	}
	return true, nil
}

func pairOf(crt, key string) []string { return []string{crt, key} }

// NextCertPaths returns where the next self-signed certificate of hostname
// waits in dir until it is activated: <dir>/<hostname>.next.crt and .key.
// Nothing serves it from there.
func NextCertPaths(dir, hostname string) (crt, key string) {
	return pairPaths(dir, hostname, ".next")
}

// PrevCertPaths returns where ActivateNextCert keeps the pair it
// replaced: <dir>/<hostname>.prev.crt and .key.
func PrevCertPaths(dir, hostname string) (crt, key string) {
	return pairPaths(dir, hostname, ".prev")
}

func pairPaths(dir, hostname, infix string) (crt, key string) {
	crt, key = CertPaths(dir, hostname)
	return strings.TrimSuffix(crt, ".crt") + infix + ".crt", strings.TrimSuffix(key, ".key") + infix + ".key"
}

// WriteNextSelfSignedIPCert generates the next self-signed certificate for
// the IP address ip and writes it to NextCertPaths, beside the current
// pair (which must exist) and without touching it: a running relay keeps
// serving the current one. The key is written 0600, each file atomically,
// and both get the owner of the current certificate file (so a root
// shell renewing for a service user leaves files the service can read).
func WriteNextSelfSignedIPCert(dir, ip string) (CertInfo, error) {
	if net.ParseIP(ip) == nil {
		return CertInfo{}, fmt.Errorf("relay: self-signed IP certificate: %q is not an IP address", ip)
	}
	crt, _ := CertPaths(dir, ip)
	cur, err := os.Stat(crt)
	if err != nil {
		return CertInfo{}, fmt.Errorf("relay: current certificate: %w", err)
	}
	certPEM, keyPEM, err := generateSelfSigned(ip)
	if err != nil {
		return CertInfo{}, fmt.Errorf("relay: self-signed certificate for %s: %w", ip, err)
	}
	ncrt, nkey := NextCertPaths(dir, ip)
	for _, f := range []struct {
		path string
		data []byte
		mode os.FileMode
	}{{nkey, keyPEM, 0o600}, {ncrt, certPEM, 0o644}} {
		if err := atomicfile.WriteFile(f.path, f.data, f.mode); err != nil {
			os.Remove(nkey)
			return CertInfo{}, fmt.Errorf("relay: next certificate: %w", err)
		}
		if err := chownLike(f.path, cur); err != nil {
			os.Remove(ncrt)
			os.Remove(nkey)
			return CertInfo{}, fmt.Errorf("relay: next certificate: %w", err)
		}
	}
	return ReadCertPair(ncrt, nkey, ip)
}

// chownLike gives path the owner of like, when it differs: only a root
// process can, and only a root process writes files the service user
// could not read.
func chownLike(path string, like os.FileInfo) error {
	st, ok := like.Sys().(*syscall.Stat_t)
	if !ok || os.Geteuid() != 0 {
		return nil
	}
	mine, err := os.Stat(path)
	if err != nil {
		return err
	}
	if m, ok := mine.Sys().(*syscall.Stat_t); ok && m.Uid == st.Uid && m.Gid == st.Gid {
		return nil
	}
	return os.Chown(path, int(st.Uid), int(st.Gid))
}

// ActivateNextCert makes the pair at NextCertPaths the current one (see
// CertPaths) and keeps the one it replaces at PrevCertPaths. A running
// relay in manual mode serves it from its next handshake, and keeps the
// connections it has. The next pair must load, be for hostname and be
// valid now.
//
// The current pair is moved aside before the next one moves in: while a
// file is missing a running relay keeps serving what it has without a
// word, where a new key beside the old certificate would be a mismatch
// to warn about.
func ActivateNextCert(dir, hostname string) (CertInfo, error) {
	ncrt, nkey := NextCertPaths(dir, hostname)
	info, err := ReadCertPair(ncrt, nkey, hostname)
	if err != nil {
		return CertInfo{}, err
	}
	if now := time.Now(); !info.ValidAt(now) {
		return CertInfo{}, fmt.Errorf("relay: %s is %s (valid %s to %s)", ncrt, info.Problem(now),
			info.NotBefore.UTC().Format(time.RFC3339), info.NotAfter.UTC().Format(time.RFC3339))
	}
	crt, key := CertPaths(dir, hostname)
	pcrt, pkey := PrevCertPaths(dir, hostname)
	for _, mv := range [][2]string{{crt, pcrt}, {key, pkey}, {nkey, key}, {ncrt, crt}} {
		if err := os.Rename(mv[0], mv[1]); err != nil && !(isNotExist(err) && mv[0] != ncrt && mv[0] != nkey) {
			return CertInfo{}, fmt.Errorf("relay: activate the next certificate: %w", err)
		}
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync() // the renames, durable before the caller tells clients the new pin
		d.Close()
	}
	info.File = crt
	return info, nil
}

// StaticCert serves one certificate held in memory. -dev uses it with a
// fresh self-signed certificate for localhost.
type StaticCert struct {
	cert *tls.Certificate
	info CertInfo
}

// NewSelfSigned returns a StaticCert holding a new self-signed
// certificate for names (DNS names or IP addresses; at least one).
func NewSelfSigned(names ...string) (*StaticCert, error) {
	if len(names) == 0 {
		return nil, fmt.Errorf("relay: self-signed certificate needs a name")
	}
	certPEM, keyPEM, err := generateSelfSigned(names...)
	if err != nil {
		return nil, fmt.Errorf("relay: self-signed certificate: %w", err)
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("relay: self-signed certificate: %w", err)
	}
	leaf, err := leafOf(&c)
	if err != nil {
		return nil, fmt.Errorf("relay: self-signed certificate: %w", err)
	}
	c.Leaf = leaf
	return &StaticCert{cert: &c, info: CertInfoOf(leaf)}, nil
}

// Current describes the certificate.
func (s *StaticCert) Current() (CertInfo, bool) { return s.info, true }

// Leaf returns the certificate, for tests and clients that trust it.
func (s *StaticCert) Leaf() *x509.Certificate { return s.cert.Leaf }

// GetCertificate implements Certificates.
func (s *StaticCert) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c := *s.cert
	return &c, nil
}

// HTTPHandler implements Certificates; it returns fallback.
func (s *StaticCert) HTTPHandler(fallback http.Handler) http.Handler { return fallback }
