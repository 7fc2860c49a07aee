package relay_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"expvar"
	"fmt"
	"net/http/httptest"
	"net/netip"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/disco"
	"tailscale.com/tsweb/varz"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/relay"
)

// tenantBook says which tenant (tailnet) each node key belongs to, as the
// tailnets' network maps would: TenantOf for the relay, and each tenant's
// Admitter admits only its own keys.
type tenantBook struct {
	mu    sync.Mutex
	owner map[key.NodePublic]string
	route map[key.NodePublic]string // what TenantOf says, if not owner's
	asked map[string]int            // Admit calls by tenant
}

func newTenantBook() *tenantBook {
	return &tenantBook{owner: map[key.NodePublic]string{}, route: map[key.NodePublic]string{}, asked: map[string]int{}}
}

// add makes a key of tenant name.
func (b *tenantBook) add(name string) key.NodePrivate {
	k := key.NewNode()
	b.mu.Lock()
	b.owner[k.Public()] = name
	b.mu.Unlock()
	return k
}

func (b *tenantBook) tenantOf(_ context.Context, k key.NodePublic, _ netip.Addr) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if n, ok := b.route[k]; ok {
		return n
	}
	return b.owner[k]
}

// tenantAdmitter admits the keys of one tenant.
type tenantAdmitter struct {
	b    *tenantBook
	name string
}

func (a tenantAdmitter) Admit(_ context.Context, k key.NodePublic, _ netip.Addr) bool {
	a.b.mu.Lock()
	defer a.b.mu.Unlock()
	a.b.asked[a.name]++
	return a.b.owner[k] == a.name
}

func (b *tenantBook) tenants(names ...string) []relay.Tenant {
	var out []relay.Tenant
	for _, n := range names {
		out = append(out, relay.Tenant{Name: n, Admitter: tenantAdmitter{b, n}})
	}
	return out
}

// withTenants serves tenants "a" and "b" of book.
func withTenants(book *tenantBook) func(*relay.Server) {
	return func(s *relay.Server) {
		s.Tenants = book.tenants("a", "b")
		s.TenantOf = book.tenantOf
	}
}

// discoLike is a payload derpserver treats as disco, the only kind it
// answers with PeerGone (derpserver.go:970-977).
func discoLike(tag byte) []byte {
	p := make([]byte, len(disco.Magic)+32+disco.NonceLen+8)
	copy(p, disco.Magic)
	p[len(p)-1] = tag
	return p
}

// peerGone waits for the PeerGone answers about n keys.
func (in *inbox) peerGone(t *testing.T, n int) map[key.NodePublic]derp.PeerGoneReasonType {
	t.Helper()
	out := map[key.NodePublic]derp.PeerGoneReasonType{}
	timeout := time.After(waitFor)
	for len(out) < n {
		select {
		case m := <-in.msgs:
			switch m := m.(type) {
			case derp.PeerGoneMessage:
				out[m.Peer] = m.Reason
			case derp.ReceivedPacket:
				t.Fatalf("got a packet from %v, want only PeerGone answers", m.Source.ShortString())
			}
		case err := <-in.err:
			t.Fatalf("connection ended: %v", err)
		case <-timeout:
			t.Fatalf("PeerGone answers %v after %v, want %d", out, waitFor, n)
		}
	}
	return out
}

// mustBeIsolated sends from "from" to a connected key of another tenant
// and to a key nobody has, and fails unless both get the same answer,
// PeerGone "not here".
func mustBeIsolated(t *testing.T, from sender, fromIn *inbox, other key.NodePublic) {
	t.Helper()
	absent := key.NewNode().Public()
	if err := from.Send(other, discoLike(1)); err != nil {
		t.Fatal(err)
	}
	if err := from.Send(absent, discoLike(2)); err != nil {
		t.Fatal(err)
	}
	gone := fromIn.peerGone(t, 2)
	if gone[other] != derp.PeerGoneReasonNotHere || gone[absent] != derp.PeerGoneReasonNotHere {
		t.Fatalf("PeerGone answers: other tenant's connected key %v, absent key %v; want NotHere for both",
			gone[other], gone[absent])
	}
}

// TestTenantIsolation: two tailnets on one relay. A client of A reaches A's
// keys; a connected key of B is, to it, exactly an absent key; B's clients
// reach each other and receive nothing from A. Over WebSocket too.
func TestTenantIsolation(t *testing.T) {
	certs, pool := selfSigned(t)
	book := newTenantBook()
	s := startRelay(t, certs, withTenants(book))

	kA1, kA2, kB1, kB2 := book.add("a"), book.add("a"), book.add("b"), book.add("b")
	a1, a2, b1 := newClientWithKey(t, s, pool, kA1), newClientWithKey(t, s, pool, kA2), newClientWithKey(t, s, pool, kB1)
	a1In, a2In, b1In := watch(a1), watch(a2), watch(b1)
	a1In.mustBeAdmitted(t)
	a2In.mustBeAdmitted(t)
	b1In.mustBeAdmitted(t)
	// b2 over WebSocket: the same routing.
	b2, err := dialWebSocket(t, s, pool, kB2)
	if err != nil {
		t.Fatal(err)
	}
	b2In := watch(b2)
	b2In.mustBeAdmitted(t)

	exchange(t, a1, kA1.Public(), a1In, a2, kA2.Public(), a2In)
	mustBeIsolated(t, a1, a1In, kB1.Public())
	mustBeIsolated(t, b2, b2In, kA2.Public())
	// b1's first packet is b2's: a1's disco message to it was dropped.
	exchange(t, b1, kB1.Public(), b1In, b2, kB2.Public(), b2In)

	for _, c := range s.Clients() {
		if want := book.tenantOf(context.Background(), c.Key, netip.Addr{}); c.Tenant != want {
			t.Errorf("client %v listed in tenant %q, want %q", c.Key.ShortString(), c.Tenant, want)
		}
	}
	if got := s.ConnectedTenant(kB2.Public()); got != "b" {
		t.Errorf("ConnectedTenant(b2) = %q, want b", got)
	}
	if s.TenantDERP("a") == s.TenantDERP("b") || s.TenantDERP("a") != s.DERP() || s.TenantDERP("c") != nil {
		t.Error("TenantDERP: want one server per tenant, the first tenant's as DERP(), nil for no tenant")
	}
}

// TestTenantRefusals: a key no tenant names is closed without any tenant
// being asked; a key routed to a tenant whose Admitter refuses it is
// closed; a client that knows the server key (Derp-Fast-Start, no 101) is
// routed too.
func TestTenantRefusals(t *testing.T) {
	certs, pool := selfSigned(t)
	book := newTenantBook()
	s := startRelay(t, certs, withTenants(book))

	stranger := newClientWithKey(t, s, pool, key.NewNode())
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if ok, err := watch(stranger).admitted(ctx); ok || err != nil {
		t.Fatalf("a key of no tenant: admitted=%v err=%v, want closed", ok, err)
	}
	book.mu.Lock()
	asked := len(book.asked)
	book.mu.Unlock()
	if asked != 0 {
		t.Fatalf("tenants asked %v about a key no tenant has", book.asked)
	}

	fast := func(k key.NodePrivate) (derp.ReceivedMessage, error) {
		conn, err := tls.Dial("tcp", s.LocalAddr().String(), &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(waitFor))
		brw := bufio.NewReadWriter(bufio.NewReader(conn), bufio.NewWriter(conn))
		fmt.Fprintf(brw, "GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n%s: 1\r\n\r\n", derp.FastStartHeader)
		c, err := derp.NewClient(k, conn, brw, logger.Discard, derp.ServerPublicKey(s.DERP().PublicKey()))
		if err != nil {
			t.Fatal(err)
		}
		return c.Recv()
	}
	if m, err := fast(book.add("b")); err != nil {
		t.Fatalf("fast start, key of b: %v", err)
	} else if _, ok := m.(derp.ServerInfoMessage); !ok {
		t.Fatalf("fast start, key of b: got %#v, want ServerInfo", m)
	}
	// A tenant's Admitter decides: a key of a, routed to b, is refused by
	// b's Admitter.
	misrouted := book.add("a")
	book.mu.Lock()
	book.route[misrouted.Public()] = "b"
	book.mu.Unlock()
	if m, err := fast(misrouted); err == nil {
		t.Fatalf("a key of a routed to b: got %#v, want refused by b's Admitter", m)
	}
	// A tenant this relay does not serve: closed.
	elsewhere := book.add("c")
	if m, err := fast(elsewhere); err == nil {
		t.Fatalf("a key of tenant c (not served): got %#v, want closed", m)
	}
	book.mu.Lock()
	defer book.mu.Unlock()
	if book.asked["b"] != 2 || book.asked["a"] != 0 {
		t.Errorf("Admit calls by tenant %v, want b asked twice (the fast-start client, the misrouted key), a never", book.asked)
	}
}

// TestTenantCap: with MaxConnsPerTenant 2, a tenant's third client is
// refused while the other tenant's clients connect; a slot freed is
// usable again.
func TestTenantCap(t *testing.T) {
	certs, pool := selfSigned(t)
	book := newTenantBook()
	s := startRelay(t, certs, withTenants(book), func(s *relay.Server) { s.MaxConnsPerTenant = 2 })

	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	var aKeys []key.NodePublic
	for i := range 2 {
		k := book.add("a")
		if ok, err := watch(newClientWithKey(t, s, pool, k)).admitted(ctx); !ok || err != nil {
			t.Fatalf("a's client %d: admitted=%v err=%v", i+1, ok, err)
		}
		aKeys = append(aKeys, k.Public())
	}
	third := newClientWithKey(t, s, pool, book.add("a"))
	if ok, err := watch(third).admitted(ctx); ok || err != nil {
		t.Fatalf("a's third client: admitted=%v err=%v, want refused", ok, err)
	}
	for i := range 2 {
		if ok, err := watch(newClientWithKey(t, s, pool, book.add("b"))).admitted(ctx); !ok || err != nil {
			t.Fatalf("b's client %d while a is full: admitted=%v err=%v", i+1, ok, err)
		}
	}
	if c := s.Caps(); c.MaxConnsPerTenant != 2 || len(c.Tenants) != 2 ||
		c.Tenants[0] != (relay.TenantConns{Name: "a", Conns: 2, RefusedFull: 1}) || c.Tenants[1] != (relay.TenantConns{Name: "b", Conns: 2}) {
		t.Errorf("Caps() = %+v, want a: 2 open, 1 refused; b: 2 open", c)
	}
	// One of a's clients leaves: a new one fits.
	if n := s.Revoke(aKeys[0]); n != 1 {
		t.Fatalf("Revoke closed %d", n)
	}
	// The relay counts the slot free once the closed connection's
	// handler returns: poll, bounded.
	deadline := time.Now().Add(waitFor)
	for {
		in := watch(newClientWithKey(t, s, pool, book.add("a")))
		ok, err := in.admitted(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a's client refused after one of its clients left")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestTenantMeshKey: the first tenant's mesh key is the fleet's; the
// others' are derived, different, and the same on every relay.
func TestTenantMeshKey(t *testing.T) {
	base, _ := newMeshKey(t)
	if got := relay.TenantMeshKey(base, "a", true); !got.Equal(base) {
		t.Error("first tenant's mesh key is not the fleet's")
	}
	b1, b2, c := relay.TenantMeshKey(base, "b", false), relay.TenantMeshKey(base, "b", false), relay.TenantMeshKey(base, "c", false)
	if !b1.Equal(b2) || b1.Equal(base) || b1.Equal(c) || b1.IsZero() {
		t.Errorf("derived keys: b %v, b again %v, c %v, base %v", b1, b2, c, base)
	}
	if !relay.TenantMeshKey(key.DERPMesh{}, "b", false).IsZero() {
		t.Error("no fleet mesh key, but a tenant mesh key")
	}
}

// TestTenantMesh: two meshed relays serving tenants a and b. A client of a
// on one relay reaches a client of a on the other; b's clients on the
// other relay are, to it, absent keys; b's clients reach each other
// across the relays.
func TestTenantMesh(t *testing.T) {
	ca := newFleetCA(t)
	mk, _ := newMeshKey(t)
	book := newTenantBook()
	p1, p2 := testutil.FreePort(t, "tcp"), testutil.FreePort(t, "tcp")
	start := func(port int, peers []relay.MeshPeer) *fleetRelay {
		r := startTailderpWith(t, ca, port, key.NewNode(), mk, peers, func(s *relay.Server) {
			s.Tenants = book.tenants("a", "b")
			s.TenantOf = book.tenantOf
		})
		return r
	}
	r1 := start(p1, meshPeers(t, p2))
	r2 := start(p2, meshPeers(t, p1))
	pool := ca.pool

	kA1, kA2, kB1, kB2 := book.add("a"), book.add("a"), book.add("b"), book.add("b")
	a1, b1 := newClientWithKey(t, r1.Server, pool, kA1), newClientWithKey(t, r1.Server, pool, kB1)
	a2, b2 := newClientWithKey(t, r2.Server, pool, kA2), newClientWithKey(t, r2.Server, pool, kB2)
	a1In, b1In, a2In, b2In := watch(a1), watch(b1), watch(a2), watch(b2)
	for _, in := range []*inbox{a1In, b1In, a2In, b2In} {
		in.mustBeAdmitted(t)
	}
	// Every link of every tenant up (each lists its peer's clients).
	waitMeshConnected(t, r1.Server, 2)
	waitMeshConnected(t, r2.Server, 2)

	exchange(t, a1, kA1.Public(), a1In, a2, kA2.Public(), a2In)
	exchange(t, b1, kB1.Public(), b1In, b2, kB2.Public(), b2In)
	mustBeIsolated(t, a1, a1In, kB2.Public())
	mustBeIsolated(t, b2, b2In, kA1.Public())
	for _, st := range r1.MeshPeers() {
		if st.Tenant != "a" && st.Tenant != "b" {
			t.Errorf("mesh link of tenant %q", st.Tenant)
		}
	}
}

// waitMeshConnected waits until s has n mesh links, all connected.
func waitMeshConnected(t *testing.T, s *relay.Server, n int) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for {
		peers := s.MeshPeers()
		up := 0
		for _, p := range peers {
			if p.State == relay.MeshConnected {
				up++
			}
		}
		if len(peers) == n && up == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("mesh links %+v, want %d connected", peers, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestTenantMetricNames: the whole relay's metrics of a relay with tenants
// are valid Prometheus names, a tailnet's dashes included, and each
// tenant's DERP server is in them.
func TestTenantMetricNames(t *testing.T) {
	certs, _ := selfSigned(t)
	book := newTenantBook()
	s := startRelay(t, certs, func(s *relay.Server) {
		s.Tenants = book.tenants("default", "my-corp")
		s.TenantOf = book.tenantOf
	})
	rec := httptest.NewRecorder()
	varz.ExpvarDoHandler(func(f func(expvar.KeyValue)) {
		f(expvar.KeyValue{Key: "tailderp_relay", Value: s.ExpVar()})
	})(rec, httptest.NewRequest("GET", "/metrics", nil))
	name := regexp.MustCompile(`^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? `)
	seen := map[string]bool{}
	for line := range strings.SplitSeq(rec.Body.String(), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if !name.MatchString(line) {
			t.Errorf("not a Prometheus sample line: %q", line)
		}
		for _, tn := range []string{"default", "my_corp"} {
			if strings.HasPrefix(line, "tailderp_relay_tenant_"+tn+"_derp_") {
				seen[tn] = true
			}
		}
	}
	if !seen["default"] || !seen["my_corp"] {
		t.Errorf("tenants' DERP metrics found: %v, want default and my_corp", seen)
	}
}
