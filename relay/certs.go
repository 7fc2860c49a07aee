package relay

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"github.com/tailderp/tailderp/internal/relayrules"
	"net/http"
	"path/filepath"
	"regexp"
)

// Certificates is where the relay's TLS certificates come from. Each
// certificate mode (ACME, manual files, self-signed) is one implementation.
//
// It is the shape of autocert.Manager: GetCertificate goes into a
// tls.Config and is called on every handshake, so an implementation can
// swap certificates (renewal, reload) without a restart; HTTPHandler wraps
// the port-80 handler so ACME HTTP-01 challenges can be answered.
type Certificates interface {
	// GetCertificate returns the certificate for a TLS handshake.
	GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error)
	// HTTPHandler returns a handler for port 80 that answers the
	// certificate authority's HTTP-01 challenges and passes every other
	// request to fallback.
	HTTPHandler(fallback http.Handler) http.Handler
	// Current describes the certificate being served, for metrics, logs
	// and the derpMap snippet; ok is false before there is one (ACME
	// before its first issuance).
	Current() (info CertInfo, ok bool)
}

// alpnCertificates is implemented by Certificates that need extra TLS
// ALPN protocols offered (ACME's TLS-ALPN-01 uses "acme-tls/1").
type alpnCertificates interface {
	ALPNProtocols() []string
}

// unsafeFileChars are stripped from a hostname to name its files, as
// derper does, so a certificate laid out for derper is found here too.
var unsafeFileChars = regexp.MustCompile(`[^a-zA-Z0-9-.]`)

// CertPaths returns where manual mode looks for the certificate and key
// of hostname in dir: <dir>/<hostname>.crt and <dir>/<hostname>.key.
func CertPaths(dir, hostname string) (crt, key string) {
	base := unsafeFileChars.ReplaceAllString(hostname, "")
	return filepath.Join(dir, base+".crt"), filepath.Join(dir, base+".key")
}

// leafOf returns the parsed leaf of c.
func leafOf(c *tls.Certificate) (*x509.Certificate, error) {
	if c.Leaf != nil {
		return c.Leaf, nil
	}
	if len(c.Certificate) == 0 {
		return nil, fmt.Errorf("no certificate in chain")
	}
	return x509.ParseCertificate(c.Certificate[0])
}

// The certificate facts are relayrules' (shared with `tailderp check`).
type (
	CertInfo    = relayrules.CertInfo
	CertProblem = relayrules.CertProblem
)

// The problems a certificate's dates can have (relayrules).
const (
	CertOK          = relayrules.CertOK
	CertExpiring    = relayrules.CertExpiring
	CertExpired     = relayrules.CertExpired
	CertNotYetValid = relayrules.CertNotYetValid
	CertWarnBefore  = relayrules.CertWarnBefore
)

// CertInfoOf describes leaf (relayrules.CertInfoOf).
func CertInfoOf(leaf *x509.Certificate) CertInfo { return relayrules.CertInfoOf(leaf) }

// CertName is the CertName pin of a DER certificate (relayrules.CertName).
func CertName(der []byte) string { return relayrules.CertName(der) }
