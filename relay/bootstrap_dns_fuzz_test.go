package relay

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/tailderp/tailderp/internal/logs"
	"github.com/tailderp/tailderp/internal/testutil"
)

// FuzzBootstrapDNS: /bootstrap-dns, with any names configured (published
// and unpublished, as -bootstrap-dns-names and its unpublished twin give
// them) and any query string, answers a JSON object of configured names
// and their addresses; an unpublished name is in it only when the query
// asks for exactly that name; a query for a configured name answers that
// name alone. Names it refuses are refused with one line.
func FuzzBootstrapDNS(f *testing.F) {
	for _, s := range []struct{ pub, unpub, query string }{
		{"derp.example.com,controlplane.tailscale.com", "headscale.example.com", "q=headscale.example.com"},
		{"derp.example.com", "headscale.example.com", "q=HEADSCALE.example.com."},
		{"derp.example.com", "headscale.example.com", ""},
		{"derp.example.com", "headscale.example.com", "q=derp.example.com&q=headscale.example.com"},
		{"derp.example.com", "headscale.example.com", "q=headscale.example.com%00"},
		{"derp.example.com", "headscale.example.com", "q=%zz;q=headscale.example.com"},
		{"Derp.Example.com., derp.example.com", "", "q=derp.example.com"},
		{"", "", "q=unknown.example.com"},
		{"203.0.113.7", "", ""},
		{"https://derp.example.com/", "", ""},
		{"a..b", "", ""},
	} {
		f.Add(s.pub, s.unpub, s.query)
	}
	// Every name resolves, to one documentation address, so the fuzz test
	// resolves its names without the network.
	dns := testutil.StartDNS(f, nil)
	dns.SetDefault(netip.MustParseAddr("192.0.2.53"), netip.MustParseAddr("2001:db8::53"))
	resolver := dns.Resolver()
	f.Fuzz(func(t *testing.T, pub, unpub, query string) {
		s := &Server{BootstrapDNSNames: strings.Split(pub, ","), UnpublishedBootstrapDNSNames: strings.Split(unpub, ","), Resolver: resolver, Logger: logs.Discard()}
		b, err := newBootstrapDNS(s)
		if err != nil {
			if strings.ContainsAny(err.Error(), "\n\r") {
				t.Fatalf("error is not one line: %q", err)
			}
			return
		}
		for _, n := range append(slices.Clone(b.published), b.unpublished...) {
			if !ValidBootstrapDNSName(n) || n != strings.ToLower(n) || strings.HasSuffix(n, ".") || !isASCII(n) {
				t.Fatalf("configured name %q", n)
			}
		}
		b.resolveAll(context.Background())

		req := &http.Request{Method: http.MethodGet, URL: &url.URL{Path: "/bootstrap-dns", RawQuery: query}, Header: http.Header{}}
		rec := httptest.NewRecorder()
		b.ServeHTTP(rec, req)
		var got map[string][]netip.Addr
		if rec.Code != http.StatusOK || json.Unmarshal(rec.Body.Bytes(), &got) != nil || got == nil {
			t.Fatalf("answer %d %q", rec.Code, rec.Body.String())
		}
		q := strings.ToLower(strings.TrimSuffix(req.URL.Query().Get("q"), "."))
		asked := q != "" && len(b.answers.Load().addrs[q]) > 0
		if asked && (len(got) != 1 || len(got[q]) == 0) {
			t.Fatalf("query for %q answered %v", q, got)
		}
		for name, addrs := range got {
			switch {
			case len(addrs) == 0:
				t.Fatalf("%q listed without addresses", name)
			case slices.Contains(b.published, name):
			case slices.Contains(b.unpublished, name):
				if name != q {
					t.Fatalf("unpublished %q listed for query %q (q=%q)", name, query, q)
				}
			default:
				t.Fatalf("%q is not a configured name: %v", name, got)
			}
		}
	})
}
