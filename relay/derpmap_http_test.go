package relay_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net/http"
	"reflect"
	"slices"
	"testing"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/testutil"
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

// fleetMember starts a tailderp relay of a fleet test that exchanges
// derpMap nodes every poll and forgets a peer after ttl, and publishes
// its own region as package main does.
func fleetMember(t *testing.T, ca *fleetCA, port int, mk key.DERPMesh, peers []relay.MeshPeer, poll, ttl time.Duration) *relay.Server {
	t.Helper()
	return startTailderpWith(t, ca, port, key.NewNode(), mk, peers, func(s *relay.Server) {
		s.FleetPollEvery, s.FleetPeerTTL = poll, ttl
		if err := s.PublishRegion(relay.DERPRegion(relay.RegionConfig{RegionID: 900, RegionCode: "fleet", RegionName: "fleet"},
			relay.NodeInfo{HostName: "127.0.0.1", DERPPort: port, STUNPort: -1})); err != nil {
			t.Fatal(err)
		}
	}).Server
}

// regionPorts are the DERP ports of the nodes s publishes, in order.
func regionPorts(t *testing.T, s *relay.Server, pool *x509.CertPool) []int {
	t.Helper()
	res, body := getDERPMap(t, s, pool, http.MethodGet, nil)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("%s: %s", relay.DERPMapPath, res.Status)
	}
	m := decodeDERPMapStrictly(t, body)
	var ports []int
	names := map[string]bool{}
	for _, n := range m.Regions[900].Nodes {
		if names[n.Name] {
			t.Fatalf("node name %q twice in %s", n.Name, body)
		}
		names[n.Name] = true
		ports = append(ports, n.DERPPort)
	}
	return ports
}

// awaitRegion polls every relay's region until each lists exactly want
// (sorted ports), within a bound; it returns how long that took.
func awaitRegion(t *testing.T, pool *x509.CertPool, within time.Duration, want []int, relays ...*relay.Server) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		ok := true
		var got [][]int
		for _, s := range relays {
			p := regionPorts(t, s, pool)
			slices.Sort(p)
			got = append(got, p)
			ok = ok && slices.Equal(p, want)
		}
		if ok {
			return time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("after %v the regions list %v, want %v each", within, got, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestFleetRegionAssembles: two meshed relays list each other; a third,
// started later with the first two in its -mesh-with (theirs unchanged),
// appears in both; stopped, it leaves all of them after the TTL.
func TestFleetRegionAssembles(t *testing.T) {
	ca := newFleetCA(t)
	mk, _ := newMeshKey(t)
	pa, pb, pc := testutil.FreePort(t, "tcp"), testutil.FreePort(t, "tcp"), testutil.FreePort(t, "tcp")
	const poll, ttl = 200 * time.Millisecond, 2 * time.Second
	a := fleetMember(t, ca, pa, mk, meshPeers(t, pb), poll, ttl)
	b := fleetMember(t, ca, pb, mk, meshPeers(t, pa), poll, ttl)
	two := []int{pa, pb}
	slices.Sort(two)
	t.Logf("two relays list each other after %v", awaitRegion(t, ca.pool, 30*time.Second, two, a, b))

	c := fleetMember(t, ca, pc, mk, meshPeers(t, pa, pb), poll, ttl)
	three := []int{pa, pb, pc}
	slices.Sort(three)
	t.Logf("a third relay appears in all after %v", awaitRegion(t, ca.pool, 30*time.Second, three, a, b, c))

	// Every relay publishes the same region: same nodes, same names.
	ra, rb := regionBody(t, a, ca.pool), regionBody(t, b, ca.pool)
	if !bytes.Equal(ra, rb) {
		t.Fatalf("relays publish different regions:\n%s\n%s", ra, rb)
	}

	c.Close(context.Background())
	left := awaitRegion(t, ca.pool, ttl+30*time.Second, two, a, b)
	t.Logf("the stopped relay left after %v (TTL %v)", left, ttl)
	if left < ttl/2 {
		t.Fatalf("the stopped relay left after %v, before its TTL %v could pass", left, ttl)
	}
}

func regionBody(t *testing.T, s *relay.Server, pool *x509.CertPool) []byte {
	t.Helper()
	_, b := getDERPMap(t, s, pool, http.MethodGet, nil)
	return b
}

// TestFleetNodeNeedsMeshKey: a relay with another mesh key cannot add a
// node to the region, and gets no node back.
func TestFleetNodeNeedsMeshKey(t *testing.T) {
	ca := newFleetCA(t)
	mk, _ := newMeshKey(t)
	other, _ := newMeshKey(t)
	pa, pb := testutil.FreePort(t, "tcp"), testutil.FreePort(t, "tcp")
	const poll, ttl = 100 * time.Millisecond, 2 * time.Second
	a := fleetMember(t, ca, pa, mk, meshPeers(t, pb), poll, ttl)
	b := fleetMember(t, ca, pb, other, meshPeers(t, pa), poll, ttl)
	time.Sleep(10 * poll) // many exchanges' worth: none may succeed
	if got := regionPorts(t, a, ca.pool); !slices.Equal(got, []int{pa}) {
		t.Fatalf("relay A lists %v, want only itself (%d)", got, pa)
	}
	if got := regionPorts(t, b, ca.pool); !slices.Equal(got, []int{pb}) {
		t.Fatalf("relay B lists %v, want only itself (%d)", got, pb)
	}
}

// TestFleetNodeKeepsOnlyWhatARelaySays: a signed node is taken with its
// address, ports and pin only: a peer cannot turn off the clients' TLS
// checks (InsecureForTests) or make itself STUN-only in the region.
func TestFleetNodeKeepsOnlyWhatARelaySays(t *testing.T) {
	ca := newFleetCA(t)
	mk, _ := newMeshKey(t)
	pa := testutil.FreePort(t, "tcp")
	a := fleetMember(t, ca, pa, mk, nil, time.Hour, time.Hour)
	evil := &tailcfg.DERPNode{RegionID: 900, HostName: "127.0.0.9", DERPPort: 443, InsecureForTests: true, STUNOnly: true, CanPort80: true, STUNTestIP: "127.0.0.10"}
	signed, err := relay.SignFleetNodeForTest(mk, evil)
	if err != nil {
		t.Fatal(err)
	}
	res, _ := getDERPMap(t, a, ca.pool, http.MethodGet, map[string]string{relay.FleetNodeHeader: signed})
	if res.StatusCode != http.StatusOK || res.Header.Get(relay.FleetNodeHeader) == "" {
		t.Fatalf("a signed node was not taken: %s", res.Status)
	}
	_, body := getDERPMap(t, a, ca.pool, http.MethodGet, nil)
	m := decodeDERPMapStrictly(t, body)
	var found bool
	for _, n := range m.Regions[900].Nodes {
		if n.HostName != "127.0.0.9" {
			continue
		}
		found = true
		if n.InsecureForTests || n.STUNOnly || n.CanPort80 || n.STUNTestIP != "" {
			t.Errorf("the peer's node kept fields a relay may not set for others: %+v", n)
		}
	}
	if !found {
		t.Fatalf("the peer's node is not in the region: %s", body)
	}
}
