package relay_test

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net/http"
	"reflect"
	"testing"

	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/relay"
)

// getDERPMap fetches /derpmap.json from s with the headers given.
func getDERPMap(t *testing.T, s *relay.Server, pool *x509.CertPool, method string, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}, Timeout: waitFor}
	defer c.CloseIdleConnections()
	req, err := http.NewRequest(method, "https://"+s.LocalAddr().String()+relay.DERPMapPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	res, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return res, b
}

// decodeDERPMapStrictly decodes b into a DERPMap, refusing unknown fields
// and trailing data: what a strict consumer (Headscale) would accept.
func decodeDERPMapStrictly(t *testing.T, b []byte) *tailcfg.DERPMap {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var m tailcfg.DERPMap
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	if dec.More() {
		t.Fatalf("more after the derpMap: %s", b)
	}
	return &m
}

func TestDERPMapPublished(t *testing.T) {
	certs, pool := selfSigned(t)
	s := startRelay(t, certs)

	// Before the region is known: 503 with a retry hint, never an empty map.
	res, _ := getDERPMap(t, s, pool, http.MethodGet, nil)
	if res.StatusCode != http.StatusServiceUnavailable || res.Header.Get("Retry-After") == "" {
		t.Fatalf("before PublishRegion: %s, Retry-After %q; want 503 with Retry-After", res.Status, res.Header.Get("Retry-After"))
	}

	region := relay.DERPRegion(relay.RegionConfig{RegionID: 901, RegionCode: "t", RegionName: "test"},
		relay.NodeInfo{HostName: "127.0.0.1", IPv4: "127.0.0.1", DERPPort: 8443, STUNPort: 3479, CertName: "sha256-raw:00"})
	if err := s.PublishRegion(region); err != nil {
		t.Fatal(err)
	}
	res, body := getDERPMap(t, s, pool, http.MethodGet, nil)
	if res.StatusCode != http.StatusOK || res.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("GET: %s %q", res.Status, res.Header.Get("Content-Type"))
	}
	got := decodeDERPMapStrictly(t, body)
	if want := relay.DERPMapOf(region); !reflect.DeepEqual(got, want) {
		t.Fatalf("published %+v, want %+v", got, want)
	}
	etag := res.Header.Get("ETag")
	if etag == "" || res.Header.Get("Last-Modified") == "" {
		t.Fatalf("no ETag/Last-Modified: %v", res.Header)
	}

	// A poller with the ETag gets 304 and no body; HEAD gets the headers.
	if res, b := getDERPMap(t, s, pool, http.MethodGet, map[string]string{"If-None-Match": etag}); res.StatusCode != http.StatusNotModified || len(b) != 0 {
		t.Fatalf("If-None-Match current: %s, %d bytes; want 304, none", res.Status, len(b))
	}
	if res, b := getDERPMap(t, s, pool, http.MethodHead, nil); res.StatusCode != http.StatusOK || len(b) != 0 || res.Header.Get("ETag") != etag {
		t.Fatalf("HEAD: %s, %d bytes, ETag %q", res.Status, len(b), res.Header.Get("ETag"))
	}
	if res, _ := getDERPMap(t, s, pool, http.MethodPost, nil); res.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST: %s, want 405", res.Status)
	}

	// The same region again changes nothing a poller sees.
	same := relay.DERPRegion(relay.RegionConfig{RegionID: 901, RegionCode: "t", RegionName: "test"},
		relay.NodeInfo{HostName: "127.0.0.1", IPv4: "127.0.0.1", DERPPort: 8443, STUNPort: 3479, CertName: "sha256-raw:00"})
	if err := s.PublishRegion(same); err != nil {
		t.Fatal(err)
	}
	if res, _ := getDERPMap(t, s, pool, http.MethodGet, map[string]string{"If-None-Match": etag}); res.StatusCode != http.StatusNotModified {
		t.Fatalf("after republishing the same region: %s, want 304", res.Status)
	}

	// A new pin is served at once, under a new ETag.
	region.Nodes[0].CertName = "sha256-raw:11"
	if err := s.PublishRegion(region); err != nil {
		t.Fatal(err)
	}
	res, body = getDERPMap(t, s, pool, http.MethodGet, map[string]string{"If-None-Match": etag})
	if res.StatusCode != http.StatusOK || res.Header.Get("ETag") == etag {
		t.Fatalf("after a pin change: %s, ETag %q (old %q)", res.Status, res.Header.Get("ETag"), etag)
	}
	if got := decodeDERPMapStrictly(t, body); got.Regions[901].Nodes[0].CertName != "sha256-raw:11" {
		t.Fatalf("after a pin change: %+v", got.Regions[901].Nodes[0])
	}
}
