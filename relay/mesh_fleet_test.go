package relay_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/tailderp/tailderp/check"
	"github.com/tailderp/tailderp/internal/logs"
	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/relay"
	"github.com/tailderp/tailderp/verify"
)

// A fleet in these tests: relays on 127.0.0.1 whose certificates a private
// CA signs. The tailderp relays trust it through MeshRootCAs, upstream
// derper through SSL_CERT_FILE (Go's system roots), the test clients
// through their TLS config: every certificate is really verified.

// fleetCA is the fleet's private certificate authority.
type fleetCA struct {
	ca      *testutil.Cert
	pool    *x509.CertPool
	pemPath string // the CA certificate, for derper's SSL_CERT_FILE
}

func newFleetCA(t *testing.T) *fleetCA {
	t.Helper()
	ca := testutil.NewCert(t, testutil.CertOptions{CommonName: "tailderp fleet test CA", IsCA: true})
	path := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(path, ca.CertPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	return &fleetCA{ca: ca, pool: ca.Pool(), pemPath: path}
}

// issue writes a certificate for host, signed by the CA, where manual mode
// (tailderp's and derper's) looks for it in dir.
func (ca *fleetCA) issue(t *testing.T, dir, host string) {
	t.Helper()
	crt, keyPath := relay.CertPaths(dir, host)
	testutil.NewCert(t, testutil.CertOptions{Names: []string{host}, CA: ca.ca}).WriteFiles(t, crt, keyPath)
}

// newMeshKey returns a random mesh key and a file holding it.
func newMeshKey(t *testing.T) (key.DERPMesh, string) {
	t.Helper()
	_, k := testutil.NewMeshKey(t)
	path := filepath.Join(t.TempDir(), "mesh.key")
	if err := os.WriteFile(path, []byte(k.String()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return k, path
}

func loopbackAddr(port int) string { return fmt.Sprintf("127.0.0.1:%d", port) }

// meshPeers parses host:port entries as -mesh-with would list them.
func meshPeers(t *testing.T, ports ...int) []relay.MeshPeer {
	t.Helper()
	var out []relay.MeshPeer
	for _, p := range ports {
		mp, err := relay.ParseMeshPeer(loopbackAddr(p))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, mp)
	}
	return out
}

// testLogger shows the relays' logs with -v only.
func testLogger() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return logs.Discard()
}

// fleetRelay is a tailderp relay.Server of a fleet test.
type fleetRelay struct {
	*relay.Server
	port int
	priv key.NodePrivate
}

// startTailderp starts a tailderp relay on port, meshed with peers.
func startTailderp(t *testing.T, ca *fleetCA, port int, priv key.NodePrivate, mk key.DERPMesh, peers []relay.MeshPeer, adm relay.Admitter) *fleetRelay {
	t.Helper()
	return startTailderpWith(t, ca, port, priv, mk, peers, func(s *relay.Server) {
		if adm != nil {
			s.Admitter = adm
		}
	})
}

// startTailderpWith is startTailderp with configure applied before Start.
func startTailderpWith(t *testing.T, ca *fleetCA, port int, priv key.NodePrivate, mk key.DERPMesh, peers []relay.MeshPeer, configure func(*relay.Server)) *fleetRelay {
	t.Helper()
	dir := t.TempDir()
	ca.issue(t, dir, "127.0.0.1")
	certs, err := relay.LoadManualCerts(dir, "127.0.0.1", nil)
	if err != nil {
		t.Fatal(err)
	}
	s := &relay.Server{
		Addr: loopbackAddr(port), HTTPPort: -1, Certs: certs, PrivateKey: priv,
		MeshKey: mk, MeshWith: peers, MeshRootCAs: ca.pool, Logger: testLogger(),
	}
	configure(s)
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(context.Background()) })
	return &fleetRelay{Server: s, port: port, priv: priv}
}

// startDerper runs upstream derper on port with the fleet's mesh key
// file, meshed with meshWith (its -mesh-with), trusting the fleet CA.
func startDerper(t *testing.T, ca *fleetCA, port int, meshKeyFile, meshWith string) {
	t.Helper()
	bin := relay.DerperBinary(t)
	dir := t.TempDir()
	ca.issue(t, dir, "127.0.0.1")
	cmd := exec.Command(bin,
		"-a", loopbackAddr(port), "-hostname", "127.0.0.1",
		"-certmode", "manual", "-certdir", dir, "-c", filepath.Join(dir, "derper.key"),
		"-http-port", "-1", "-stun=false",
		"-mesh-psk-file", meshKeyFile, "-mesh-with", meshWith)
	// derper's mesh client verifies peers against the system roots only.
	cmd.Env = append(os.Environ(), "SSL_CERT_FILE="+ca.pemPath)
	p := testutil.StartProcess(t, cmd, testutil.ProcessOptions{Name: "derper", StopGrace: 5 * time.Second})
	serving := func() bool {
		c, err := net.DialTimeout("tcp", loopbackAddr(port), time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	}
	if !testutil.Poll(20*time.Second, 50*time.Millisecond, p.Done(), serving) {
		if p.Exited() {
			t.Fatalf("derper exited (%v) before serving:\n%s", p.Err(), p.Output.String())
		}
		t.Fatalf("derper not serving on %d after 20s:\n%s", port, p.Output.String())
	}
}

// fleetClient is a DERP client of one relay that keeps receiving (and
// reconnecting, as Tailscale clients do) until the test ends.
type fleetClient struct {
	priv key.NodePrivate
	c    *derphttp.Client
	pkts chan []byte
}

func newFleetClient(t *testing.T, ca *fleetCA, port int) *fleetClient {
	t.Helper()
	return newFleetClientKey(t, ca, port, key.NewNode())
}

func newFleetClientKey(t *testing.T, ca *fleetCA, port int, priv key.NodePrivate) *fleetClient {
	t.Helper()
	c := newFleetClientKeyRaw(ca, port, priv)
	fc := &fleetClient{priv: priv, c: c, pkts: make(chan []byte, 256)}
	go func() {
		for {
			m, err := c.Recv()
			if errors.Is(err, derphttp.ErrClientClosed) {
				return
			}
			if err != nil {
				time.Sleep(50 * time.Millisecond) // the next Recv reconnects
				continue
			}
			if p, ok := m.(derp.ReceivedPacket); ok {
				select {
				case fc.pkts <- bytes.Clone(p.Data):
				default:
				}
			}
		}
	}()
	t.Cleanup(func() { c.Close() })
	return fc
}

// reach sends from → to until one packet arrives or within passes. A
// relay drops packets for a client it cannot place yet, so it retries
// every 200 ms.
func reach(from, to *fleetClient, within time.Duration) error {
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		var b [16]byte
		rand.Read(b[:])
		from.c.Send(to.priv.Public(), b[:]) // an error reconnects on the next try
		wait := time.NewTimer(200 * time.Millisecond)
	drain:
		for {
			select {
			case got := <-to.pkts:
				if bytes.Equal(got, b[:]) {
					wait.Stop()
					return nil
				}
			case <-wait.C:
				break drain
			}
		}
	}
	return fmt.Errorf("no packet from %v reached %v within %v", from.priv.Public().ShortString(), to.priv.Public().ShortString(), within)
}

// waitMeshUp waits until s reports want peers connected, the rest of its
// entries being itself.
func waitMeshUp(t *testing.T, name string, s *relay.Server, want int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		connected := 0
		for _, st := range s.MeshPeers() {
			if st.State == relay.MeshConnected {
				connected++
			}
		}
		if connected == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d of %d mesh peers connected after %v: %+v", name, connected, want, within, s.MeshPeers())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestMeshFleet: two tailderp relays and an upstream derper, meshed with
// one key and each given the whole fleet (itself included, as derper
// configurations list it). A client on any relay reaches a client on each
// of the others; a relay with another key cannot forward to the fleet; a
// restarted relay rejoins without the others being touched.
func TestMeshFleet(t *testing.T) {
	t.Parallel()
	ca := newFleetCA(t)
	mk, mkFile := newMeshKey(t)
	pA, pB, pD := testutil.FreePort(t, "tcp"), testutil.FreePort(t, "tcp"), testutil.FreePort(t, "tcp")
	fleet := meshPeers(t, pA, pB, pD)

	// derper first: the tailderps reach it at once; derper dials them
	// again 5 s after its first dials failed.
	startDerper(t, ca, pD, mkFile, fmt.Sprintf("127.0.0.1:%d,127.0.0.1:%d,127.0.0.1:%d", pA, pB, pD))
	a := startTailderp(t, ca, pA, key.NewNode(), mk, fleet, nil)
	b := startTailderp(t, ca, pB, key.NewNode(), mk, fleet, nil)

	// Each tailderp finds its own entry is itself and connects to the
	// other two.
	waitMeshUp(t, "a", a.Server, 2, 20*time.Second)
	waitMeshUp(t, "b", b.Server, 2, 20*time.Second)
	for _, st := range a.MeshPeers() {
		switch st.Peer.Port {
		case pA:
			if st.State != relay.MeshSelf {
				t.Errorf("a's own entry: state %s, want %s", st.State, relay.MeshSelf)
			}
		case pB:
			if st.ServerKey != b.priv.Public() {
				t.Errorf("a's link to b: server key %v, want b's %v", st.ServerKey.ShortString(), b.priv.Public().ShortString())
			}
		}
	}
	// b lists a's own mesh connection, and derper's once derper has
	// dialed b again: a learns of a connection to b as it comes.
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := a.MeshPeers()[1]
		if st.Clients >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a's link to b lists %d clients after 10s, want a's and derper's mesh connections", st.Clients)
		}
		time.Sleep(50 * time.Millisecond)
	}

	clients := map[string]*fleetClient{"a": newFleetClient(t, ca, pA), "b": newFleetClient(t, ca, pB), "derper": newFleetClient(t, ca, pD)}
	names := []string{"a", "b", "derper"}
	allPairs := func(within time.Duration, only string) error {
		for _, from := range names {
			for _, to := range names {
				if from == to || (only != "" && from != only && to != only) {
					continue
				}
				if err := reach(clients[from], clients[to], within); err != nil {
					return fmt.Errorf("client on %s → client on %s: %w", from, to, err)
				}
			}
		}
		return nil
	}
	if err := allPairs(20*time.Second, ""); err != nil {
		t.Fatal(err)
	}

	t.Run("wrong key cannot forward", func(t *testing.T) {
		other, _ := newMeshKey(t)
		pW := testutil.FreePort(t, "tcp")
		w := startTailderp(t, ca, pW, key.NewNode(), other, meshPeers(t, pA, pB, pD, pW), nil)
		cw := newFleetClient(t, ca, pW)
		// Wait until w has tried every peer and been refused, and found
		// its own entry.
		deadline := time.Now().Add(15 * time.Second)
		for {
			settled := 0
			for _, st := range w.MeshPeers() {
				if st.State == relay.MeshConnected {
					t.Fatalf("relay with another mesh key connected to %s", st.Peer)
				}
				if st.LastError != "" || st.State == relay.MeshSelf {
					settled++
				}
			}
			if settled == 4 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("relay with another mesh key: %d of 3 peers refused it (and itself found) after 15s: %+v", settled, w.MeshPeers())
			}
			time.Sleep(50 * time.Millisecond)
		}
		for _, st := range w.MeshPeers() {
			if st.State != relay.MeshSelf && !strings.Contains(st.LastError, "mesh key") {
				t.Errorf("link to %s: last error %q does not point at the mesh key", st.Peer, st.LastError)
			}
		}
		for _, to := range names {
			if err := reach(cw, clients[to], time.Second); err == nil {
				t.Errorf("a client on the relay with another mesh key reached the client on %s", to)
			}
			if err := reach(clients[to], cw, time.Second); err == nil {
				t.Errorf("the client on %s reached a client on the relay with another mesh key", to)
			}
		}
		// The fleet is unharmed.
		if err := allPairs(5*time.Second, ""); err != nil {
			t.Error(err)
		}
	})

	t.Run("restarted relay rejoins", func(t *testing.T) {
		if err := b.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
		restarted := time.Now()
		b2 := startTailderp(t, ca, pB, b.priv, mk, fleet, nil)
		if err := allPairs(15*time.Second, "b"); err != nil {
			t.Fatalf("after b restarted: %v", err)
		}
		t.Logf("the restarted relay rejoined the fleet (every client pair through it delivers) %v after it was stopped", time.Since(restarted).Round(10*time.Millisecond))
		waitMeshUp(t, "b restarted", b2.Server, 2, 5*time.Second)
		for _, st := range a.MeshPeers() {
			if st.Peer.Port == pB && (st.State != relay.MeshConnected || st.LastError == "") {
				t.Errorf("a's link to b after b's restart: %+v, want connected with the disconnect as last error", st)
			}
		}
	})
}

// keySet is a verify.KeyChecker over a fixed set: the tailnet of the
// admission tests.
type keySet map[key.NodePublic]bool

func (k keySet) KnowsNodeKey(nk key.NodePublic) (known, ready bool) { return k[nk], true }

// askedAdmitter records every key it is asked about.
type askedAdmitter struct {
	inner relay.Admitter
	mu    sync.Mutex
	asked map[key.NodePublic]int
}

func (a *askedAdmitter) Admit(ctx context.Context, k key.NodePublic, src netip.Addr) bool {
	a.mu.Lock()
	if a.asked == nil {
		a.asked = map[key.NodePublic]int{}
	}
	a.asked[k]++
	a.mu.Unlock()
	return a.inner.Admit(ctx, k, src)
}

func (a *askedAdmitter) times(k key.NodePublic) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.asked[k]
}

// refusedByRelay connects a client and reports whether the relay closed
// it (a refused client's first Recv fails) within 5 s.
func refusedByRelay(t *testing.T, ca *fleetCA, port int) bool {
	t.Helper()
	c := newFleetClientKeyRaw(ca, port, key.NewNode())
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return errors.Is(check.ConnectDERP(ctx, c), check.ErrRefused)
}

// newFleetClientKeyRaw is a bare derphttp client of the relay on port,
// without the receive loop of fleetClient (it would reconnect).
func newFleetClientKeyRaw(ca *fleetCA, port int, priv key.NodePrivate) *derphttp.Client {
	region := &tailcfg.DERPRegion{RegionID: 900, RegionCode: "fleet", Nodes: []*tailcfg.DERPNode{{
		Name: "900a", RegionID: 900, HostName: "127.0.0.1", IPv4: "127.0.0.1", IPv6: "none", DERPPort: port,
	}}}
	c := derphttp.NewRegionClient(priv, logger.Discard, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	c.TLSConfig = &tls.Config{RootCAs: ca.pool}
	return c
}

// TestMeshFleetAdmission: two tailderp relays admitting only their
// tailnet (verify.Verifier over a fixed set of keys), meshed. Tailnet
// clients on different relays reach each other; the relays admit each
// other by the mesh key alone (the Admitter is never asked about a relay);
// a stranger is refused on each.
func TestMeshFleetAdmission(t *testing.T) {
	t.Parallel()
	ca := newFleetCA(t)
	mk, _ := newMeshKey(t)
	pA, pB := testutil.FreePort(t, "tcp"), testutil.FreePort(t, "tcp")
	fleet := meshPeers(t, pA, pB)
	memberA, memberB := key.NewNode(), key.NewNode()
	tailnet := keySet{memberA.Public(): true, memberB.Public(): true}
	admA := &askedAdmitter{inner: &verify.Verifier{Tailnets: []verify.Tailnet{{Name: "default", Keys: tailnet}}}}
	admB := &askedAdmitter{inner: &verify.Verifier{Tailnets: []verify.Tailnet{{Name: "default", Keys: tailnet}}}}
	a := startTailderp(t, ca, pA, key.NewNode(), mk, fleet, admA)
	b := startTailderp(t, ca, pB, key.NewNode(), mk, fleet, admB)
	waitMeshUp(t, "a", a.Server, 1, 20*time.Second)
	waitMeshUp(t, "b", b.Server, 1, 20*time.Second)

	ca1, cb1 := newFleetClientKey(t, ca, pA, memberA), newFleetClientKey(t, ca, pB, memberB)
	if err := reach(ca1, cb1, 15*time.Second); err != nil {
		t.Errorf("tailnet client on a → tailnet client on b: %v", err)
	}
	if err := reach(cb1, ca1, 15*time.Second); err != nil {
		t.Errorf("tailnet client on b → tailnet client on a: %v", err)
	}
	if n := admA.times(b.priv.Public()); n != 0 {
		t.Errorf("a asked its Admitter about relay b %d times: mesh peers are admitted by the mesh key", n)
	}
	if n := admB.times(a.priv.Public()); n != 0 {
		t.Errorf("b asked its Admitter about relay a %d times: mesh peers are admitted by the mesh key", n)
	}
	for name, port := range map[string]int{"a": pA, "b": pB} {
		if !refusedByRelay(t, ca, port) {
			t.Errorf("relay %s admitted a stranger", name)
		}
	}
	// The stranger's refusal did not disturb the fleet.
	if err := reach(ca1, cb1, 5*time.Second); err != nil {
		t.Errorf("after the strangers: %v", err)
	}
}

// TestMeshVerifiesPeerName: a peer dialed by IP address must present a
// certificate for that address. derphttp checks the name only through the
// TLS server name, which Go leaves empty for an IP, so without the relay's
// own check a certificate the CA issued for any name would do, and its
// holder would learn the mesh key.
func TestMeshVerifiesPeerName(t *testing.T) {
	ca := newFleetCA(t)
	mk, _ := newMeshKey(t)
	dir := t.TempDir()
	ca.issue(t, dir, "127.0.0.2") // not the address it is dialed at
	certs, err := relay.LoadManualCerts(dir, "127.0.0.2", nil)
	if err != nil {
		t.Fatal(err)
	}
	impostor := &relay.Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: certs, PrivateKey: key.NewNode(), MeshKey: mk, Logger: testLogger()}
	if err := impostor.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { impostor.Close(context.Background()) })
	port := impostor.LocalAddr().(*net.TCPAddr).Port

	s := startTailderp(t, ca, testutil.FreePort(t, "tcp"), key.NewNode(), mk, meshPeers(t, port), nil)
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := s.MeshPeers()[0]
		if st.State == relay.MeshConnected {
			t.Fatal("connected to a peer whose certificate is for another address")
		}
		if st.LastError != "" {
			if !strings.Contains(st.LastError, "127.0.0.2") {
				t.Errorf("last error %q does not name the certificate's address", st.LastError)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no dial within 10s: %+v", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
