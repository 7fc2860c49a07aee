package relay

import (
	"errors"
	"net"
	"net/url"
	"strings"

	"golang.org/x/crypto/acme"
)

// acmeFailure is what a failed issuance needs to be explained: the name
// asked for, the CA, and the ports it may validate on.
type acmeFailure struct {
	name      string // the DNS name or IP address of the certificate
	isIP      bool
	directory string // the CA's directory URL; "" is Let's Encrypt's
	http01    bool   // the plain-HTTP port is served: HTTP-01 is offered
}

// hint names the likely causes of err, in the relay's words (values, not
// settings): as narrowly as the error allows — the CA not reached, a rate
// limit, a validation the CA could not complete — and all of them when
// the error says nothing more.
func (f acmeFailure) hint(err error) string {
	dir := f.directory
	if dir == "" {
		dir = acme.LetsEncryptURL
	}
	unreachable := "the CA (" + dir + ") unreachable from this server (outbound HTTPS blocked by a firewall or proxy, its name not resolving here, or the CA down)"
	rateLimit := "the CA's rate limits (too many certificates or failed validations for this name or account lately; they lift with time, and keeping the cache directory avoids new requests at each start)"
	ports := "port 443 (TLS-ALPN-01)"
	if f.http01 {
		ports = "port 443 (TLS-ALPN-01) or port 80 (HTTP-01)"
	}
	var validation string
	if f.isIP {
		validation = "the CA could not validate " + f.name + ": it must reach this address from the internet on " + ports +
			" (a firewall, a missing port forward, or the address not this server's public one), and offer IP address certificates"
	} else {
		validation = "the CA could not validate " + f.name + ": its DNS records (A/AAAA) must point to this server, and the CA must reach it from the internet on " +
			ports + " (a firewall or a missing port forward)"
	}

	if _, ok := acme.RateLimit(asACMEError(err)); ok {
		return "rate limited: " + rateLimit
	}
	if caUnreachable(err) {
		return unreachable
	}
	if validationFailed(err) {
		return validation
	}
	if f.isIP {
		return "likely causes: " + validation + "; " + unreachable + "; or " + rateLimit
	}
	return "likely causes: " + f.name + "'s DNS records not pointing to this server; a firewall or a missing port forward on " +
		ports + "; " + unreachable + "; or " + rateLimit
}

// asACMEError is the *acme.Error in err's chain, or err.
func asACMEError(err error) error {
	var ae *acme.Error
	if errors.As(err, &ae) {
		return ae
	}
	return err
}

// caUnreachable reports whether err is a failure to talk to the CA at
// all (a dial, a DNS lookup, a TLS handshake, a timeout), rather than an
// answer from it.
func caUnreachable(err error) bool {
	var ae *acme.Error
	if errors.As(err, &ae) {
		return false // the CA answered
	}
	var ue *url.Error
	var oe *net.OpError
	var de *net.DNSError
	return errors.As(err, &ue) || errors.As(err, &oe) || errors.As(err, &de)
}

// validationFailed reports whether err says the CA tried to validate and
// could not: an ACME problem about DNS, a connection, TLS or the
// challenge's answer, a failed authorization or order, or autocert
// running out of challenge types to try.
func validationFailed(err error) bool {
	var ae *acme.Error
	if errors.As(err, &ae) {
		for _, p := range []string{":dns", ":connection", ":tls", ":unauthorized", ":incorrectResponse", ":caa"} {
			if strings.HasSuffix(ae.ProblemType, p) {
				return true
			}
		}
	}
	var ze *acme.AuthorizationError
	var oe *acme.OrderError
	return errors.As(err, &ze) || errors.As(err, &oe) || strings.Contains(err.Error(), "no viable challenge type")
}
