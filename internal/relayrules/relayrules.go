// Package relayrules holds the rules a relay and a client checking it
// must apply alike, so `tailderp check` judges a relay exactly as the relay
// judges itself: a certificate's facts and when its dates are a problem,
// its CertName pin, and the form of a fleet's mesh key. It is a leaf:
// it imports nothing of tailderp.
package relayrules

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"time"

	"tailscale.com/types/key"
)

// CertName returns the pin a Tailscale client uses to accept a
// certificate no public CA signed: "sha256-raw:" and the hex SHA-256 of
// the DER bytes. It goes into the DERP node's CertName field.
func CertName(der []byte) string {
	return fmt.Sprintf("sha256-raw:%x", sha256.Sum256(der))
}

// CertInfo describes the certificate a relay is serving, for logs,
// metrics, status pages and the derpMap snippet.
type CertInfo struct {
	Subject   string
	NotBefore time.Time
	NotAfter  time.Time
	// CertName is the pin of the leaf ("sha256-raw:<hex>"); clients need
	// it only for a certificate no public CA signed.
	CertName string
	// SelfSigned is true for a certificate signed by its own key: nothing
	// renews it but the operator (IP mode, -dev).
	SelfSigned bool
	// File is the certificate file it was loaded from; empty when it was
	// not loaded from a file of the operator's (ACME, in memory).
	File string
}

// CertInfoOf describes leaf.
func CertInfoOf(leaf *x509.Certificate) CertInfo {
	subject := leaf.Subject.CommonName
	// Newer CA profiles (Let's Encrypt's tlsserver, shortlived) leave the
	// common name empty; the names are in the SANs.
	switch {
	case subject != "":
	case len(leaf.DNSNames) > 0:
		subject = leaf.DNSNames[0]
	case len(leaf.IPAddresses) > 0:
		subject = leaf.IPAddresses[0].String()
	}
	selfSigned := bytes.Equal(leaf.RawIssuer, leaf.RawSubject) &&
		leaf.CheckSignature(leaf.SignatureAlgorithm, leaf.RawTBSCertificate, leaf.Signature) == nil
	return CertInfo{Subject: subject, NotBefore: leaf.NotBefore, NotAfter: leaf.NotAfter,
		CertName: CertName(leaf.Raw), SelfSigned: selfSigned}
}

// CertWarnBefore is the longest a certificate is warned about before it
// expires: renewal tools renew when 30 days are left (autocert, certbot
// and acme.sh for 90-day certificates), and a self-signed certificate,
// which nothing renews, leaves its operator a month.
const CertWarnBefore = 30 * 24 * time.Hour

// WarnFrom is when the certificate becomes worth a warning. Renewal tools
// renew a certificate when min(30 days, a third of its lifetime) is left
// (autocert: x/crypto/acme/autocert/renewal.go; certbot and acme.sh the
// same for 90-day certificates). A self-signed certificate is warned
// about from that moment. One a CA issued is warned about a tenth of that
// window later (at most a day: autocert's jitter is under an hour and it
// retries every 30 to 60 minutes; certbot runs twice a day), so a renewal
// on schedule never warns, and a short-lived certificate (Let's Encrypt's
// six-day IP certificates) does not warn all its life.
func (i CertInfo) WarnFrom() time.Time {
	window := min(CertWarnBefore, i.NotAfter.Sub(i.NotBefore)/3)
	if !i.SelfSigned {
		window -= min(window/10, 24*time.Hour)
	}
	return i.NotAfter.Add(-window)
}

// DaysLeft is the number of whole days from now until NotAfter; negative
// once it has expired.
func (i CertInfo) DaysLeft(now time.Time) int {
	d := i.NotAfter.Sub(now)
	if d < 0 {
		return -int((-d + 24*time.Hour - 1) / (24 * time.Hour))
	}
	return int(d / (24 * time.Hour))
}

// CertProblem is what is wrong with a certificate's dates.
type CertProblem string

// The problems a certificate's dates can have. Tailscale clients refuse a
// certificate outside its validity period (tlsdial checks NotBefore and
// NotAfter even for a pinned one), so the last two stop the relay.
const (
	CertOK          CertProblem = ""
	CertExpiring    CertProblem = "expiring"      // past WarnFrom, still valid
	CertExpired     CertProblem = "expired"       // past NotAfter
	CertNotYetValid CertProblem = "not-yet-valid" // before NotBefore
)

// Problem judges the certificate's dates at now.
func (i CertInfo) Problem(now time.Time) CertProblem {
	switch {
	case now.After(i.NotAfter):
		return CertExpired
	case now.Before(i.NotBefore):
		return CertNotYetValid
	case !now.Before(i.WarnFrom()):
		return CertExpiring
	}
	return CertOK
}

// ValidAt reports whether clients accept the certificate's dates at now.
func (i CertInfo) ValidAt(now time.Time) bool {
	p := i.Problem(now)
	return p == CertOK || p == CertExpiring
}

// ParseMeshKey parses a fleet's mesh key as a key file holds it: 64 hex
// digits, surrounding space ignored. Empty and all-zero keys are refused:
// the relay would refuse them, and an all-zero key is no secret.
func ParseMeshKey(s string) (key.DERPMesh, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return key.DERPMesh{}, ErrEmptyMeshKey
	}
	k, err := key.ParseDERPMesh(s)
	if err != nil {
		return key.DERPMesh{}, fmt.Errorf("%v (want 64 hex digits, e.g. from `openssl rand -hex 32`)", err)
	}
	if k.IsZero() {
		return key.DERPMesh{}, ErrZeroMeshKey
	}
	return k, nil
}

// The mesh keys ParseMeshKey refuses for their form.
var (
	ErrEmptyMeshKey = errors.New("empty: put the fleet's mesh key in it, 64 hex digits (e.g. from `openssl rand -hex 32`), the same on every relay of the fleet")
	ErrZeroMeshKey  = errors.New("a key of all zeros, which is no secret: make one with `openssl rand -hex 32`")
)
