package relay_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/relay"
)

func addrs(t *testing.T, ss ...string) []netip.Addr {
	t.Helper()
	var out []netip.Addr
	for _, s := range ss {
		out = append(out, netip.MustParseAddr(s))
	}
	return out
}

// bootstrapRelay starts a relay serving bootstrap DNS, and a client
// trusting its certificate.
func bootstrapRelay(t *testing.T, s *relay.Server) (*http.Client, string) {
	t.Helper()
	certs, err := relay.NewSelfSigned("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	s.Addr, s.HTTPPort, s.Certs, s.PrivateKey = "127.0.0.1:0", -1, certs, key.NewNode()
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(context.Background()) })
	pool := x509.NewCertPool()
	pool.AddCert(certs.Leaf())
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	return c, "https://" + s.LocalAddr().String() + "/bootstrap-dns"
}

// getBootstrap fetches url and decodes the answer as a client does
// (net/dnsfallback's dnsMap).
func getBootstrap(t *testing.T, c *http.Client, url string) (map[string][]netip.Addr, *http.Response, []byte) {
	t.Helper()
	res, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	if res.StatusCode != 200 {
		t.Fatalf("GET %s: %s", url, res.Status)
	}
	m := map[string][]netip.Addr{}
	if err := json.Unmarshal(body, &m); err != nil {
		t.Fatalf("GET %s: %v in %q", url, err, body)
	}
	return m, res, body
}

// waitBootstrap polls url until ok holds for the answer, for at most 10 s.
func waitBootstrap(t *testing.T, c *http.Client, url string, what string, ok func(map[string][]netip.Addr) bool) map[string][]netip.Addr {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		m, _, _ := getBootstrap(t, c, url)
		if ok(m) {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10s; last answer %v", what, m)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func sameAddrs(a, b []netip.Addr) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.SortFunc(a, netip.Addr.Compare)
	slices.SortFunc(b, netip.Addr.Compare)
	return slices.Equal(a, b)
}

// TestBootstrapDNS: /bootstrap-dns answers as derper does, from a cache
// the relay fills through its resolver (a DNS server on loopback here):
// the published names with ?q= or without, an unpublished name only to
// ?q= for it, at most 16 addresses a name.
func TestBootstrapDNS(t *testing.T) {
	var many []netip.Addr
	for i := range 20 {
		many = append(many, netip.AddrFrom4([4]byte{192, 0, 2, byte(100 + i)}))
	}
	dns := testutil.StartDNS(t, map[string][]netip.Addr{
		"a.test.example":       addrs(t, "192.0.2.1", "2001:db8::1"),
		"b.test.example":       addrs(t, "192.0.2.2"),
		"many.test.example":    many,
		"control.test.example": addrs(t, "192.0.2.9"),
	})
	s := &relay.Server{
		BootstrapDNSNames:            []string{"a.test.example", "B.test.example.", "many.test.example", "gone.test.example"},
		UnpublishedBootstrapDNSNames: []string{"control.test.example"},
		Resolver:                     dns.Resolver(),
	}
	c, url := bootstrapRelay(t, s)

	all := waitBootstrap(t, c, url, "published names", func(m map[string][]netip.Addr) bool { return len(m) > 0 })
	if len(all) != 3 {
		t.Errorf("published names: %v, want a, b and many (gone does not resolve)", all)
	}
	if !sameAddrs(all["a.test.example"], addrs(t, "192.0.2.1", "2001:db8::1")) {
		t.Errorf("a.test.example = %v, want both its addresses", all["a.test.example"])
	}
	if !sameAddrs(all["b.test.example"], addrs(t, "192.0.2.2")) {
		t.Errorf("b.test.example (configured as B.test.example.) = %v", all["b.test.example"])
	}
	if got := all["many.test.example"]; len(got) != 16 {
		t.Errorf("many.test.example has %d addresses, want the first 16 of 20", len(got))
	}
	if _, ok := all["control.test.example"]; ok {
		t.Error("the unpublished name is in the published list")
	}

	_, res, body := getBootstrap(t, c, url)
	if ct := res.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q", ct)
	}
	if !res.Close {
		t.Error("the connection is kept; derper closes it (each client asks once)")
	}
	// 4 names × 16 addresses × ~45 bytes bounds it; far less here.
	if len(body) > 4*16*45 {
		t.Errorf("answer is %d bytes", len(body))
	}

	for _, tc := range []struct {
		q    string
		want map[string][]netip.Addr
	}{
		{"control.test.example", map[string][]netip.Addr{"control.test.example": addrs(t, "192.0.2.9")}},
		{"CONTROL.test.example.", map[string][]netip.Addr{"control.test.example": addrs(t, "192.0.2.9")}},
		{"a.test.example", map[string][]netip.Addr{"a.test.example": all["a.test.example"]}},
		// Anything else: the published list, as derper answers.
		{"unknown.test.example", all},
		{"gone.test.example", all},
		{strings.Repeat("x", 5000), all},
	} {
		m, _, _ := getBootstrap(t, c, url+"?q="+tc.q)
		if len(m) != len(tc.want) {
			t.Errorf("?q=%.30s: %v, want %v", tc.q, m, tc.want)
			continue
		}
		for name, want := range tc.want {
			if !sameAddrs(m[name], want) {
				t.Errorf("?q=%.30s: %s = %v, want %v", tc.q, name, m[name], want)
			}
		}
	}
	vars := s.ExpVar().String()
	for _, want := range []string{`"counter_bootstrap_dns_hits": 3`, `"counter_bootstrap_dns_misses": 3`} {
		if !strings.Contains(vars, want) {
			t.Errorf("metrics lack %s:\n%s", want, vars)
		}
	}
}

// TestBootstrapDNSRefresh: the names are resolved again every
// BootstrapDNSRefresh; a name that stops resolving keeps its last answer
// (a client with broken DNS is better served by a recent address than by
// none), and a new answer replaces it.
func TestBootstrapDNSRefresh(t *testing.T) {
	dns := testutil.StartDNS(t, map[string][]netip.Addr{"control.test.example": addrs(t, "192.0.2.9")})
	s := &relay.Server{
		BootstrapDNSNames:   []string{"control.test.example"},
		Resolver:            dns.Resolver(),
		BootstrapDNSRefresh: 50 * time.Millisecond,
	}
	c, url := bootstrapRelay(t, s)
	q := url + "?q=control.test.example"
	waitBootstrap(t, c, q, "first answer", func(m map[string][]netip.Addr) bool {
		return sameAddrs(m["control.test.example"], addrs(t, "192.0.2.9"))
	})

	dns.Set("control.test.example", addrs(t, "192.0.2.10"), true)
	before := dns.Queries()
	deadline := time.Now().Add(10 * time.Second)
	for dns.Queries() < before+6 { // several failed refreshes
		if time.Now().After(deadline) {
			t.Fatal("no refresh within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if m, _, _ := getBootstrap(t, c, q); !sameAddrs(m["control.test.example"], addrs(t, "192.0.2.9")) {
		t.Errorf("while the name fails: %v, want its last answer 192.0.2.9", m)
	}

	dns.Set("control.test.example", addrs(t, "192.0.2.10"), false)
	waitBootstrap(t, c, q, "the new answer", func(m map[string][]netip.Addr) bool {
		return sameAddrs(m["control.test.example"], addrs(t, "192.0.2.10"))
	})
}

// TestBootstrapDNSNoNames: with no names, {} (derper answers an empty
// body, which a client cannot decode).
func TestBootstrapDNSNoNames(t *testing.T) {
	c, url := bootstrapRelay(t, &relay.Server{})
	for _, u := range []string{url, url + "?q=control.test.example"} {
		if m, _, body := getBootstrap(t, c, u); len(m) != 0 || string(body) != "{}" {
			t.Errorf("GET %s = %q, want {}", u, body)
		}
	}
}

// TestBootstrapDNSBadNames: names that are not DNS names, or too many of
// them, stop Start with the value named.
func TestBootstrapDNSBadNames(t *testing.T) {
	var tooMany []string
	for i := range relay.MaxBootstrapDNSNames + 1 {
		tooMany = append(tooMany, fmt.Sprintf("n%d.test.example", i))
	}
	for _, tc := range []struct {
		pub, unpub []string
		want       string
	}{
		{[]string{"https://control.test.example"}, nil, `"https://control.test.example"`},
		{nil, []string{"192.0.2.1"}, `"192.0.2.1"`},
		{tooMany, nil, "at most 32"},
	} {
		certs, _ := relay.NewSelfSigned("127.0.0.1")
		s := &relay.Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: certs, PrivateKey: key.NewNode(),
			BootstrapDNSNames: tc.pub, UnpublishedBootstrapDNSNames: tc.unpub}
		err := s.Start()
		if err == nil {
			s.Close(context.Background())
			t.Errorf("%v %v: started", tc.pub, tc.unpub)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("error %q does not say %s", err, tc.want)
		}
	}
}
