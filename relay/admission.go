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
	"strings"

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
// derpserver's only per-connection hook is its admission URL: it POSTs a
// tailcfg.DERPAdmitClientRequest through http.DefaultClient, with the
// request context of the /derp upgrade, and admits on {"Allow": true}. We
// give it a URL with a scheme of our own, registered once on
// http.DefaultTransport, whose RoundTripper answers in process: it finds
// the Admitter in the request context (put there by the /derp handler)
// and never touches the network. So each decision costs a map lookup and a
// little JSON, not a TCP connection; several relays in one process each
// use their own Admitter; and if the scheme were somehow missing,
// derpserver's request fails and, with fail-open off, the client is
// refused.
const admissionScheme = "tailderp-admission"

// admissionURL is what derpserver is told to POST to.
const admissionURL = admissionScheme + "://in-process/admit"

type admitterCtxKey struct{}

// withAdmitter returns h with a in its requests' contexts.
func withAdmitter(a Admitter, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), admitterCtxKey{}, a)))
	})
}

// admissionRoundTripper answers derpserver's admission requests in process.
// It holds no state: the Admitter comes with each request.
type admissionRoundTripper struct{}

func (admissionRoundTripper) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Body != nil {
		defer req.Body.Close()
	}
	a, _ := req.Context().Value(admitterCtxKey{}).(Admitter)
	if a == nil {
		return nil, errors.New("relay: admission request without an admitter")
	}
	var ar tailcfg.DERPAdmitClientRequest
	if err := json.NewDecoder(io.LimitReader(req.Body, 4<<10)).Decode(&ar); err != nil {
		return nil, fmt.Errorf("relay: decode admission request: %w", err)
	}
	allow := a.Admit(req.Context(), ar.NodePublic, ar.Source)
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

// installAdmission points s at the in-process admission hook, registering
// the scheme on http.DefaultTransport the first time in the process.
func installAdmission(s *derpserver.Server) error {
	tr, ok := http.DefaultTransport.(*http.Transport)
	if !ok {
		return fmt.Errorf("relay: http.DefaultTransport is a %T, not *http.Transport; cannot install client admission", http.DefaultTransport)
	}
	if err := registerOnce(tr); err != nil {
		return err
	}
	s.SetVerifyClientURL(admissionURL)
	s.SetVerifyClientURLFailOpen(false)
	return nil
}

// registerOnce registers the admission scheme on tr unless it already is.
// RegisterProtocol panics on a second registration; the registered
// RoundTripper is stateless, so the first one serves every relay and the
// panic only tells us it is there.
func registerOnce(tr *http.Transport) (err error) {
	defer func() {
		if r := recover(); r != nil {
			if msg := fmt.Sprint(r); !strings.Contains(msg, "already registered") {
				err = fmt.Errorf("relay: register admission scheme: %v", r)
			}
		}
	}()
	tr.RegisterProtocol(admissionScheme, admissionRoundTripper{})
	return nil
}
