package relay

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

// FuzzReadCertPair: a manual certificate pair holding anything (PEM as an
// operator or a renewal tool leaves it, or any DER wrapped in PEM, when
// the low bits of der say so) loads or is refused, the same way through
// ReadCertPair (`tailderp cert`, the checks) and LoadManualCerts (the
// server). A pair that loads has a key that belongs to its certificate,
// is valid for the hostname, is served to a client asking for that name
// as a client sends it, and is described truly: its pin is the served
// certificate's, and the days left agree with the expiry. A refusal never
// quotes the private key.
func FuzzReadCertPair(f *testing.F) {
	seedPairs(f)
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), "derp.example.com", uint8(0))
	f.Add([]byte(""), []byte(""), "", uint8(0))
	f.Add([]byte{0x30, 0x03, 0x02, 0x01, 0x01}, []byte{0x30, 0x00}, "203.0.113.7", uint8(3))

	dir := f.TempDir() // one worker runs one input at a time
	f.Fuzz(func(t *testing.T, crt, key []byte, hostname string, der uint8) {
		start := time.Now()
		defer func() {
			if d := time.Since(start); d > 500*time.Millisecond {
				os.WriteFile(fmt.Sprintf("/tmp/slow-%d", start.UnixNano()), []byte(fmt.Sprintf("%v\n%q\n%q\n%q\n%d\n", d, crt, key, hostname, der)), 0o644)
			}
		}()
		if der&1 != 0 {
			crt = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: crt})
		}
		if der&2 != 0 {
			key = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key})
		}
		crtPath, keyPath := CertPaths(dir, hostname)
		os.Remove(crtPath)
		os.Remove(keyPath)
		if err := os.WriteFile(crtPath, crt, 0o600); err != nil {
			t.Skip("hostname makes no file name here:", err)
		}
		if err := os.WriteFile(keyPath, key, 0o600); err != nil {
			t.Fatal(err)
		}

		info, err := ReadCertPair(crtPath, keyPath, hostname)
		m, mErr := LoadManualCerts(dir, hostname, nil)
		if (err == nil) != (mErr == nil) {
			t.Fatalf("ReadCertPair: %v; LoadManualCerts: %v", err, mErr)
		}
		if err != nil {
			for _, line := range strings.Split(string(key), "\n") {
				if line = strings.TrimSpace(line); len(line) >= 16 && !strings.HasPrefix(line, "-----") &&
					(strings.Contains(err.Error(), line) || strings.Contains(mErr.Error(), line)) {
					t.Fatalf("refusal quotes the key file: %v", err)
				}
			}
			return
		}

		pair, err := tls.X509KeyPair(crt, key)
		if err != nil {
			t.Fatalf("ReadCertPair accepted a pair tls does not: %v", err)
		}
		leaf, err := x509.ParseCertificate(pair.Certificate[0])
		if err != nil {
			t.Fatalf("ReadCertPair accepted an unparsable leaf: %v", err)
		}
		if err := leaf.VerifyHostname(hostname); err != nil {
			t.Fatalf("ReadCertPair accepted a certificate not valid for %q: %v", hostname, err)
		}
		if info.CertName != CertName(leaf.Raw) || info.File != crtPath || !info.NotAfter.Equal(leaf.NotAfter) || !info.NotBefore.Equal(leaf.NotBefore) {
			t.Fatalf("ReadCertPair describes %+v, the leaf is %s, %v to %v", info, CertName(leaf.Raw), leaf.NotBefore, leaf.NotAfter)
		}
		if cur, _ := m.Current(); cur != info {
			t.Fatalf("LoadManualCerts describes %+v, ReadCertPair %+v", cur, info)
		}
		now := time.Now()
		if expired := now.After(info.NotAfter); (info.DaysLeft(now) < 0) != expired || (info.Problem(now) == CertExpired) != expired {
			t.Fatalf("NotAfter %v at %v: expired %v, but %d days left, problem %q", info.NotAfter, now, expired, info.DaysLeft(now), info.Problem(now))
		}

		// Served to a client asking for the hostname, as crypto/tls sends
		// it (no trailing dot; no name at all for an IP address).
		sni := strings.TrimSuffix(hostname, ".")
		if net.ParseIP(hostname) != nil {
			sni = ""
		}
		got, err := m.GetCertificate(&tls.ClientHelloInfo{ServerName: sni})
		if err != nil {
			t.Fatalf("GetCertificate(%q) for hostname %q: %v", sni, hostname, err)
		}
		if CertName(got.Certificate[0]) != info.CertName {
			t.Fatalf("served %s, described %s", CertName(got.Certificate[0]), info.CertName)
		}
	})
}

// seedPairs adds good pairs of every key type tls takes, for a DNS name
// and an IP address, as PEM and as DER, and a chain, an expired one and a
// mismatched one.
func seedPairs(f *testing.F) {
	now := time.Now()
	type pair struct{ crt, key []byte }
	make1 := func(pub, priv any, names []string, from, until time.Time, parent *x509.Certificate, parentKey any) (*x509.Certificate, pair) {
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(now.UnixNano()),
			Subject:      pkix.Name{CommonName: names[0]},
			NotBefore:    from, NotAfter: until,
			KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
			ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			BasicConstraintsValid: true,
			IsCA:                  parent == nil,
		}
		for _, n := range names {
			if ip := net.ParseIP(n); ip != nil {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			} else {
				tmpl.DNSNames = append(tmpl.DNSNames, n)
			}
		}
		if parent == nil {
			parent, parentKey = tmpl, priv
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, parentKey)
		if err != nil {
			f.Fatal(err)
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(priv)
		if err != nil {
			f.Fatal(err)
		}
		c, _ := x509.ParseCertificate(der)
		return c, pair{der, keyDER}
	}
	pemOf := func(typ string, der ...[]byte) []byte {
		var out []byte
		for _, d := range der {
			out = append(out, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: d})...)
		}
		return out
	}
	edPub, edPriv, _ := ed25519.GenerateKey(rand.Reader)
	rsaPriv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		f.Fatal(err)
	}
	// The P-256 pairs tailderp itself makes.
	for _, name := range []string{"derp.example.com", "203.0.113.7", "2001:db8::7"} {
		crt, key, err := generateSelfSigned(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(crt, key, name, uint8(0))
		f.Add(crt, key, strings.ToUpper(name), uint8(0))
	}
	_, ed := make1(edPub, edPriv, []string{"derp.example.com", "*.example.org"}, now.Add(-time.Hour), now.Add(90*24*time.Hour), nil, nil)
	f.Add(pemOf("CERTIFICATE", ed.crt), pemOf("PRIVATE KEY", ed.key), "x.example.org", uint8(0))
	f.Add(ed.crt, ed.key, "derp.example.com", uint8(3))
	ca, caPair := make1(&rsaPriv.PublicKey, rsaPriv, []string{"Test CA"}, now.Add(-time.Hour), now.Add(3650*24*time.Hour), nil, nil)
	_, leaf := make1(edPub, edPriv, []string{"derp.example.com"}, now.Add(-time.Hour), now.Add(24*time.Hour), ca, rsaPriv)
	f.Add(pemOf("CERTIFICATE", leaf.crt, caPair.crt), pemOf("PRIVATE KEY", leaf.key), "derp.example.com", uint8(0))
	_, old := make1(edPub, edPriv, []string{"derp.example.com"}, now.Add(-48*time.Hour), now.Add(-24*time.Hour), nil, nil)
	f.Add(pemOf("CERTIFICATE", old.crt), pemOf("PRIVATE KEY", old.key), "derp.example.com", uint8(0))
	f.Add(pemOf("CERTIFICATE", old.crt), pemOf("RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(rsaPriv)), "derp.example.com", uint8(0))
}
