package testutil

import (
	"cmp"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// KeyFormat is how [Cert.KeyPEM] encodes the private key.
type KeyFormat int

const (
	// PKCS8 is a "PRIVATE KEY" PEM block (x509.MarshalPKCS8PrivateKey).
	PKCS8 KeyFormat = iota
	// EC is an "EC PRIVATE KEY" PEM block, SEC 1 (x509.MarshalECPrivateKey),
	// as `openssl ecparam -genkey` writes it.
	EC
)

// CertOptions says what certificate [NewCert] makes. The zero value is a
// self-signed certificate for no name, valid for a day.
type CertOptions struct {
	// Names are the DNS names and IP addresses the certificate is for.
	Names []string
	// CommonName is the subject's common name; by default the first of
	// Names.
	CommonName string
	// ValidFor is how long the certificate is valid from now; 0 means 24
	// hours. It is valid from an hour ago on, so small clock differences
	// do not matter.
	ValidFor time.Duration
	// NotBefore and NotAfter, when set, are the validity period instead
	// (e.g. a certificate already expired, or not valid yet).
	NotBefore, NotAfter time.Time
	// CA signs the certificate; nil makes it self-signed.
	CA *Cert
	// IsCA makes a certificate authority, which can be the CA of others,
	// instead of a TLS server certificate.
	IsCA bool
	// KeyFormat is the encoding of KeyPEM; PKCS8 by default.
	KeyFormat KeyFormat
}

// Cert is a certificate with its P-256 key, in every form a test needs.
type Cert struct {
	// Cert is the parsed certificate.
	Cert *x509.Certificate
	// Key is its private key.
	Key *ecdsa.PrivateKey
	// CertPEM is the certificate, a "CERTIFICATE" PEM block.
	CertPEM []byte
	// KeyPEM is the key, in the CertOptions' KeyFormat.
	KeyPEM []byte
	// TLS is the certificate (without its CA) and key for a tls.Config.
	TLS tls.Certificate
}

// NewCert makes a certificate as o says, with a new key and a random
// serial number. A server certificate (not IsCA) is for digital
// signatures and server authentication, as a CA issues them.
func NewCert(t testing.TB, o CertOptions) *Cert {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatal(err)
	}
	if o.ValidFor == 0 {
		o.ValidFor = 24 * time.Hour
	}
	cn := o.CommonName
	if cn == "" && len(o.Names) > 0 {
		cn = o.Names[0]
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    cmp.Or(o.NotBefore, now.Add(-time.Hour)),
		NotAfter:     cmp.Or(o.NotAfter, now.Add(o.ValidFor)),
	}
	if o.IsCA {
		tmpl.KeyUsage = x509.KeyUsageCertSign
		tmpl.BasicConstraintsValid = true
		tmpl.IsCA = true
	} else {
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	}
	for _, n := range o.Names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	parent, signer := tmpl, any(key)
	if o.CA != nil {
		parent, signer = o.CA.Cert, o.CA.Key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, signer)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	var keyBlock *pem.Block
	switch o.KeyFormat {
	case EC:
		b, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		keyBlock = &pem.Block{Type: "EC PRIVATE KEY", Bytes: b}
	default:
		b, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		keyBlock = &pem.Block{Type: "PRIVATE KEY", Bytes: b}
	}
	return &Cert{
		Cert:    cert,
		Key:     key,
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  pem.EncodeToMemory(keyBlock),
		TLS:     tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert},
	}
}

// Pool returns a certificate pool that trusts this certificate alone: the
// roots of a client of this CA, or of a server using this self-signed
// certificate.
func (c *Cert) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c.Cert)
	return p
}

// WriteFiles writes CertPEM to crtPath (mode 0644) and KeyPEM to keyPath
// (mode 0600), as an operator's tooling leaves them, creating their
// directories (mode 0700) as needed.
func (c *Cert) WriteFiles(t testing.TB, crtPath, keyPath string) {
	t.Helper()
	for _, f := range []struct {
		path string
		data []byte
		mode os.FileMode
	}{{crtPath, c.CertPEM, 0o644}, {keyPath, c.KeyPEM, 0o600}} {
		if err := os.MkdirAll(filepath.Dir(f.path), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f.path, f.data, f.mode); err != nil {
			t.Fatal(err)
		}
	}
}
