package relay

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"

	"tailscale.com/derp/derpserver"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// Admitter decides whether a client may use the relay. It is called once
// per connection, after the client proved it holds the private half of
// clientKey and before it is registered; refusing closes the connection.
// Mesh peers holding the mesh key are admitted by derpserver without
// asking.
type Admitter interface {
	Admit(ctx context.Context, clientKey key.NodePublic, src netip.Addr) (ok bool)
}

// How admission plugs into derpserver without a fork:
//
// derpserver's only per-connection hook that needs no tailscaled is its
// admission URL: it POSTs a tailcfg.DERPAdmitClientRequest through
// http.DefaultClient, with the request context of the /derp upgrade, and
// admits on {"Allow": true}. We give it a URL with a scheme of our own,
// registered on http.DefaultTransport (RegisterAdmissionScheme), whose
// RoundTripper answers in process: it finds the connection's Admitter and
// tracking record in the request context (put there by the /derp handler)
// and never touches the network. So each decision costs a map lookup and a
// little JSON, not a TCP connection; several relays in one process each
// use their own Admitter; and if the scheme were missing, derpserver's
// request fails and, with fail-open off, the client is refused.
//
// That context is also why the same record can be closed later
// (revocation, see conns.go). If a later derpserver stopped passing the
// request's context to the admission call, this RoundTripper would find no
// record and refuse every client: TestAdmission and the revocation tests
// fail loudly rather than let clients in unchecked.
const admissionScheme = "tailderp-admission"

// admissionURL is what derpserver is told to POST to.
const admissionURL = admissionScheme + "://in-process/admit"

// errNoAdmitter is what the admission RoundTripper answers a request that
// did not come through a relay's /derp handler.
var errNoAdmitter = errors.New("relay: admission request without an admitter")

// RegisterAdmissionScheme registers tailderp's in-process admission scheme
// on rt, which must be http.DefaultTransport (derpserver calls its
// admission URL through http.DefaultClient, so no other transport is
// asked). It is process-wide and must happen once, before the first
// Server with an Admitter starts; calling it again is harmless. It fails
// if rt is not an *http.Transport.
//
// The scheme carries no state: each request brings its relay's Admitter in
// its context, so one registration serves every relay in the process.
func RegisterAdmissionScheme(rt http.RoundTripper) error {
	tr, ok := rt.(*http.Transport)
	if !ok {
		return fmt.Errorf("relay: register admission scheme: transport is a %T, not an *http.Transport", rt)
	}
	if admissionSchemeRegistered(tr) {
		return nil
	}
	tr.RegisterProtocol(admissionScheme, admissionRoundTripper{})
	return nil
}

// admissionSchemeRegistered asks rt for the admission URL without an
// Admitter: our RoundTripper answers errNoAdmitter; an unregistered scheme
// is net/http's "unsupported protocol scheme".
func admissionSchemeRegistered(rt http.RoundTripper) bool {
	req, err := http.NewRequest(http.MethodPost, admissionURL, http.NoBody)
	if err != nil {
		return false
	}
	_, err = rt.RoundTrip(req)
	return errors.Is(err, errNoAdmitter)
}

type admissionCtxKey struct{}

// admissionCtx is what the /derp handler hands the admission RoundTripper
// through the request context.
type admissionCtx struct {
	admitter Admitter     // with Tenants, set by the tenant handler
	conn     *trackedConn // this connection, to be registered under its key
	conns    *connTracker
}

// withAdmission returns h with each /derp request tracked (see conns.go)
// and admitted by a.
func withAdmission(a Admitter, conns *connTracker, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tc, w, ctx := conns.start(w, r)
		defer conns.remove(tc)
		ctx = context.WithValue(ctx, admissionCtxKey{}, &admissionCtx{admitter: a, conn: tc, conns: conns})
		h.ServeHTTP(w, r.WithContext(ctx))
	})
}

// admissionRoundTripper answers derpserver's admission requests in process.
// It holds no state: the Admitter comes with each request.
type admissionRoundTripper struct{}

func (admissionRoundTripper) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Body != nil {
		defer req.Body.Close()
	}
	ac, _ := req.Context().Value(admissionCtxKey{}).(*admissionCtx)
	if ac == nil {
		return nil, errNoAdmitter
	}
	var ar tailcfg.DERPAdmitClientRequest
	if err := json.NewDecoder(io.LimitReader(req.Body, 4<<10)).Decode(&ar); err != nil {
		return nil, fmt.Errorf("relay: decode admission request: %w", err)
	}
	// Registered under its key before the decision, so a revocation that
	// lands while the Admitter is deciding still finds (and closes) it.
	ac.conns.admitting(ac.conn, ar.NodePublic, ar.Source)
	// No admitter: a tenant relay's connection that no tenant took (the
	// tenant handler closes those first); refused.
	allow := ac.admitter != nil && ac.admitter.Admit(req.Context(), ar.NodePublic, ar.Source)
	if allow {
		ac.conns.admit(ac.conn)
	} else {
		ac.conns.remove(ac.conn)
	}
	body := `{"Allow":false}`
	if allow {
		body = `{"Allow":true}`
	}
	return &http.Response{
		StatusCode:    http.StatusOK,
		Status:        "200 OK",
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        http.Header{"Content-Type": {"application/json"}},
		Body:          io.NopCloser(bytes.NewReader([]byte(body))),
		ContentLength: int64(len(body)),
		Request:       req,
	}, nil
}

// useAdmission points s at the in-process admission hook, after checking
// that the scheme is registered.
func useAdmission(s *derpserver.Server) error {
	if !admissionSchemeRegistered(http.DefaultTransport) {
		return errors.New("relay: the admission scheme is not registered on http.DefaultTransport (call relay.RegisterAdmissionScheme once at program start)")
	}
	s.SetVerifyClientURL(admissionURL)
	s.SetVerifyClientURLFailOpen(false)
	return nil
}
