package relay

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"

	"golang.org/x/crypto/acme"
)

// TestACMEHint: the hint after a failed issuance names the cause the error
// shows — a rate limit, the CA not reached, a failed validation — and
// every likely cause when the error shows none. (The cases a real CA can
// produce on loopback are checked against Pebble in TestACMEBackoff,
// TestACMEIPBackoff and TestACMEUnreachableCA.)
func TestACMEHint(t *testing.T) {
	dns := acmeFailure{name: "derp.example.com", http01: true}
	ip := acmeFailure{name: "203.0.113.7", isIP: true, directory: "https://ca.example/dir"}
	rateLimited := &acme.Error{StatusCode: http.StatusTooManyRequests, ProblemType: "urn:ietf:params:acme:error:rateLimited", Header: http.Header{}}
	dial := &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")}
	for _, tc := range []struct {
		name     string
		f        acmeFailure
		err      error
		want     []string
		dontWant []string
	}{
		{"rate limit", dns, fmt.Errorf("acme/autocert: %w", rateLimited), []string{"rate limited", "rate limits"}, []string{"DNS records", "unreachable"}},
		{"CA down", dns, fmt.Errorf("get directory: %w", dial), []string{"the CA (" + acme.LetsEncryptURL + ") unreachable from this server", "firewall or proxy"}, []string{"DNS records", "rate limits"}},
		{"CA name", ip, &net.DNSError{Err: "no such host", Name: "ca.example"}, []string{"the CA (https://ca.example/dir) unreachable"}, []string{"could not validate"}},
		{"DNS problem", dns, &acme.Error{ProblemType: "urn:ietf:params:acme:error:dns"}, []string{"could not validate derp.example.com", "DNS records (A/AAAA)", "port 443 (TLS-ALPN-01) or port 80 (HTTP-01)", "firewall"}, []string{"unreachable", "rate limits"}},
		{"no challenge left", dns, errors.New(`acme/autocert: unable to satisfy "x" for domain "derp.example.com": no viable challenge type found`), []string{"could not validate derp.example.com"}, []string{"rate limits"}},
		{"IP validation", ip, &acme.AuthorizationError{URI: "https://ca.example/authz/1"}, []string{"could not validate 203.0.113.7", "port 443 (TLS-ALPN-01)", "IP address certificates"}, []string{"DNS records", "port 80"}},
		{"unknown", dns, errors.New("something else"), []string{"likely causes", "derp.example.com's DNS records", "firewall", "port 80", "unreachable from this server", "rate limits"}, nil},
		{"unknown IP", ip, errors.New("something else"), []string{"likely causes", "could not validate 203.0.113.7", "unreachable from this server", "rate limits"}, []string{"DNS records"}},
	} {
		got := tc.f.hint(tc.err)
		for _, w := range tc.want {
			if !strings.Contains(got, w) {
				t.Errorf("%s: hint %q does not say %q", tc.name, got, w)
			}
		}
		for _, w := range tc.dontWant {
			if strings.Contains(got, w) {
				t.Errorf("%s: hint %q says %q", tc.name, got, w)
			}
		}
	}
}
