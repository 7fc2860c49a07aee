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
	return &StaticCert{cert: &c, info: certInfo(leaf)}, nil
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
