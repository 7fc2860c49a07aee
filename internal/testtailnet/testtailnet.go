// Package testtailnet brings up a real tailnet inside one test process, for
// end-to-end tests of the tailderp DERP relay.
//
// Nothing in it is fake: the coordination server is Tailscale's own test
// control server ([testcontrol.Server]) behind an [httptest.Server], and the
// nodes are real [tsnet.Server]s (userspace WireGuard, magicsock, netstack).
// The DERP map handed out by the control server names only the relay under
// test, and [SetTestEnv] takes UDP away from the nodes, so every packet
// between two nodes crosses that relay. Bringing up control and two nodes
// takes well under 100 ms.
//
// A typical test:
//
//	testtailnet.SetTestEnv(t) // first: some knobs only count before nodes start
//	relay := startRelay(t)    // the relay under test, on 127.0.0.1
//	ctl := testtailnet.NewControl(t, testtailnet.DERPRegion(relay.DERPPort, relay.STUNPort, ""))
//	a := ctl.NewNode(t, "a")
//	b := ctl.NewNode(t, "b")
//	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
//	defer cancel()
//	if err := testtailnet.AwaitPeer(ctx, b, testtailnet.NodeKey(t, a)); err != nil {
//		t.Fatal(err)
//	}
//	// Wait until the relay has both nodes connected (its own hook), then
//	// dial a's Tailscale IP with b.HTTPClient() or b.Dial.
//
// Before sending, wait until the relay has both nodes connected: a relay
// drops packets for a node that is not connected yet, and WireGuard retries
// its handshake only after 5 s. NewNode returns once the node is Running,
// which means it has chosen the relay as its home, not that it has finished
// connecting to it (observed both ways round), let alone passed any
// admission check.
//
// The nodes never use the relay's STUN port: they have no UDP socket, and
// control marks them only-tcp-443, so their netcheck measures the relay over
// HTTPS. Test the relay's STUN directly.
//
// Everything dials loopback only and binds loopback only, save one
// vestigial listener per node (see [SetTestEnv]).
//
// Set TAILDERP_TEST_VERBOSE=1 (or run with -v) to see the control server's and
// the nodes' logs through t.Logf.
//
// Limits of the test control server worth knowing: every node sees every other
// node (one tailnet, allow-all packet filter), and ephemeral nodes are not
// deleted when they go away. To simulate a node being removed, push a map with
// PeersRemoved via Control.Server.AddRawMapResponse.
package testtailnet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"tailscale.com/client/local"
	"tailscale.com/envknob"
	"tailscale.com/tailcfg"
	"tailscale.com/tsnet"
	"tailscale.com/tstest/integration/testcontrol"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// RegionID is the DERP region ID used by [DERPRegion]. IDs 900 and up are the
// conventional range for custom (self-hosted) regions.
const RegionID = 900

// upTimeout bounds how long [Control.NewNode] waits for a node to log in.
const upTimeout = 30 * time.Second

// verboseEnv is the environment variable that turns on harness logging even
// without -v.
const verboseEnv = "TAILDERP_TEST_VERBOSE"

// DERPRegion returns a DERP map with one region (RegionID 900, code "test")
// whose single node is a relay on 127.0.0.1 at derpPort (HTTPS) and stunPort
// (UDP).
//
// If certName is non-empty it is set as the node's CertName; for a relay with
// a self-signed certificate on an IP address that is the pin
// "sha256-raw:<hex of SHA-256 of the DER certificate>". Otherwise
// InsecureForTests is set, and clients skip TLS verification of the relay.
//
// HostName and IPv4 are "127.0.0.1" and IPv6 is "none", so no client ever
// resolves a name or tries IPv6 for the relay.
func DERPRegion(derpPort, stunPort int, certName string) *tailcfg.DERPMap {
	n := &tailcfg.DERPNode{
		Name:     "900t",
		RegionID: RegionID,
		HostName: "127.0.0.1",
		IPv4:     "127.0.0.1",
		IPv6:     "none",
		DERPPort: derpPort,
		STUNPort: stunPort,
	}
	if certName != "" {
		n.CertName = certName
	} else {
		n.InsecureForTests = true
	}
	return &tailcfg.DERPMap{
		Regions: map[int]*tailcfg.DERPRegion{
			RegionID: {
				RegionID:   RegionID,
				RegionCode: "test",
				RegionName: "tailderp test relay",
				Nodes:      []*tailcfg.DERPNode{n},
			},
		},
	}
}

// Control is a running testcontrol server behind httptest on 127.0.0.1.
type Control struct {
	// Server is the control server itself, for tests that need to change
	// the tailnet (UpdateNode, AddRawMapResponse, SetJailed, ...).
	Server *testcontrol.Server
	// URL is the base URL to use as a tsnet ControlURL (http://127.0.0.1:port).
	URL string
	// AuthKey is the only auth key this control server accepts
	// (testcontrol's RequireAuthKey). Any other key makes registration fail
	// with the error "invalid authkey".
	AuthKey string

	// mu orders SetRequireAuthKey before the requests that follow it:
	// every request passes through mu before reaching Server.
	mu sync.Mutex

	hsMu   sync.Mutex
	hs     *httptest.Server // nil while stopped
	conns  *connTracker     // every connection hs accepted
	addr   string           // where it serves, kept across Stop/Resume
	nextID tailcfg.NodeID   // for AddNode
}

// SetRequireAuthKey changes the key the control server demands ("" for
// none) for requests that arrive from now on. testcontrol demands it on
// every registration, even the re-registration of a known node that
// Tailscale's control server accepts without a key; a restart test lifts
// it this way. Writing Server.RequireAuthKey directly would race with the
// server's goroutines.
func (c *Control) SetRequireAuthKey(k string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.Server.RequireAuthKey = k
}

// NewControl starts a control server on 127.0.0.1 that requires AuthKey
// (random, "tskey-auth-test-<hex>") and hands out derpMap in every map
// response; derpMap must not be empty. It is closed by t.Cleanup.
//
// Every node sees every other node, whether or not they belong to the same
// user: testcontrol puts all nodes in one tailnet's netmap with an allow-all
// packet filter.
func NewControl(t testing.TB, derpMap *tailcfg.DERPMap) *Control {
	t.Helper()
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatalf("testtailnet: random auth key: %v", err)
	}
	return NewControlOn(t, nil, derpMap, "tskey-auth-test-"+hex.EncodeToString(b[:]))
}

// NewControlOn is NewControl serving on ln (nil: a new 127.0.0.1:0
// listener) and requiring authKey. A test uses it to bring control up on a
// port a node is already trying, e.g. to show that the node logs in once
// control comes back.
func NewControlOn(t testing.TB, ln net.Listener, derpMap *tailcfg.DERPMap, authKey string) *Control {
	t.Helper()
	if derpMap == nil || len(derpMap.Regions) == 0 {
		// testcontrol documents a nil map as "use the production DERP map".
		t.Fatal("testtailnet: NewControl needs a DERP map (see DERPRegion)")
	}
	c := &Control{AuthKey: authKey}
	c.Server = &testcontrol.Server{
		DERPMap:                 derpMap,
		RequireAuthKey:          c.AuthKey,
		DefaultNodeCapabilities: nodeCapabilities(),
		Logf:                    testLogf(t),
	}
	// httptest listens on 127.0.0.1:0 (falling back to [::1]:0).
	c.serve(ln)
	c.Server.HTTPTestServer = c.hs
	// Nodes created after this point are closed first (cleanups run last
	// in, first out).
	t.Cleanup(c.Stop)
	c.URL = c.hs.URL
	c.addr = c.hs.Listener.Addr().String()
	return c
}

// serve starts serving c.Server on ln (nil: a new 127.0.0.1:0 listener).
func (c *Control) serve(ln net.Listener) {
	hs := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		//lint:ignore SA2001 an empty critical section is the point: it orders SetRequireAuthKey before this request
		c.mu.Unlock()
		c.Server.ServeHTTP(w, r)
	}))
	if ln != nil {
		hs.Listener.Close()
		hs.Listener = ln
	}
	conns := &connTracker{Listener: hs.Listener}
	hs.Listener = conns
	hs.Start()
	c.hsMu.Lock()
	c.hs, c.conns = hs, conns
	c.hsMu.Unlock()
}

// connTracker is a listener that remembers every connection it accepted,
// so Stop can close them all: the nodes' map polls run on connections the
// server hijacked (Tailscale's Noise protocol), which httptest's
// CloseClientConnections does not know.
type connTracker struct {
	net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func (l *connTracker) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.mu.Lock()
		l.conns = append(l.conns, c)
		l.mu.Unlock()
	}
	return c, err
}

func (l *connTracker) closeAll() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range l.conns {
		c.Close()
	}
	l.conns = nil
}

// Stop takes the control server off the network, as an outage would: its
// listener and every connection are closed, so nodes find it unreachable.
// What it knows (nodes, keys) is kept for Resume.
func (c *Control) Stop() {
	c.hsMu.Lock()
	hs, conns := c.hs, c.conns
	c.hs, c.conns = nil, nil
	c.hsMu.Unlock()
	if hs != nil {
		// Dropping every connection still open (long map polls, hijacked
		// ones too) keeps Close from waiting on them, and is what an
		// outage does to the nodes.
		conns.closeAll()
		hs.CloseClientConnections()
		hs.Close()
	}
}

// Resume serves the control server again on the address it had, after
// Stop.
func (c *Control) Resume(t testing.TB) {
	t.Helper()
	ln, err := net.Listen("tcp", c.addr)
	if err != nil {
		t.Fatalf("testtailnet: Resume on %s: %v", c.addr, err)
	}
	c.serve(ln)
}

// AddNode registers a node holding the node key k in the tailnet, as the
// control server would once it logged in, and tells every connected node.
// It is how a test makes a plain DERP client (derphttp, with the private
// half of k) one of the tailnet's clients. name is its tailnet name
// (e.g. "laptop.tailnet.example."). The node's ID is unique in c.
func (c *Control) AddNode(t testing.TB, k key.NodePublic, name string) *tailcfg.Node {
	t.Helper()
	c.hsMu.Lock()
	c.nextID++
	id := 2_000_000 + c.nextID
	first := c.nextID == 1
	c.hsMu.Unlock()
	addr := netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 80, byte(id >> 8), byte(id)}), 32)
	n := &tailcfg.Node{
		ID:                id,
		StableID:          tailcfg.StableNodeID(fmt.Sprintf("ADDED%06d", id)),
		Name:              name,
		User:              tailcfg.UserID(id),
		Key:               k,
		Machine:           key.NewMachine().Public(),
		DiscoKey:          key.NewDisco().Public(),
		MachineAuthorized: true,
		Addresses:         []netip.Prefix{addr},
		AllowedIPs:        []netip.Prefix{addr},
	}
	if first {
		// UpdateNode needs testcontrol's node table, which only a
		// registration or AddFakeNode creates (the fake node is one more
		// peer nobody uses).
		c.Server.AddFakeNode()
	}
	c.Server.UpdateNode(n)
	return n
}

// nodeCapabilities is testcontrol's default node capability map plus
// [tailcfg.NodeAttrOnlyTCP443].
//
// With TS_DEBUG_ALWAYS_USE_DERP a node has no UDP socket, yet its first
// netcheck would still plan STUN probes and wait out their 3s timeout before
// measuring the relay over HTTPS; a node reaches state Running (and Up
// returns) only once it has a home DERP, so every node would take over 3s to
// come up. OnlyTCP443 tells the node that only TCP is possible: netcheck goes
// straight to the HTTPS probe of the relay, and the node is up in tens of
// milliseconds. It also disables port mapping and the peer-relay client,
// neither of which this harness wants.
func nodeCapabilities() *tailcfg.NodeCapMap {
	return &tailcfg.NodeCapMap{
		tailcfg.CapabilityHTTPS:                           nil,
		tailcfg.NodeAttrFunnel:                            nil,
		tailcfg.CapabilityFileSharing:                     nil,
		tailcfg.CapabilityFunnelPorts + "?ports=8080,443": nil,
		tailcfg.NodeAttrOnlyTCP443:                        nil,
	}
}

// NewNode starts a tsnet node named hostname on c and waits for it to log in.
//
// The node is Ephemeral, keeps its state in a fresh t.TempDir(), and uses
// c.AuthKey. Its logs (Logf and UserLogf) go to t.Logf only when the test
// runs with -v or TAILDERP_TEST_VERBOSE is set; otherwise they are discarded.
// Up is bounded by 30s. The node is closed by t.Cleanup. Any error is fatal.
//
// [SetTestEnv] must have been called first (NewNode fails the test
// otherwise).
func (c *Control) NewNode(t testing.TB, hostname string) *tsnet.Server {
	t.Helper()
	if !envknob.Bool("TS_DEBUG_ALWAYS_USE_DERP") {
		// Without it the nodes find a direct UDP path on this host and the
		// relay under test carries (almost) nothing: a silently wrong test.
		t.Fatalf("testtailnet: NewNode(%q): call SetTestEnv(t) before starting nodes", hostname)
	}
	logf := testLogf(t)
	s := &tsnet.Server{
		Dir:        t.TempDir(),
		Hostname:   hostname,
		ControlURL: c.URL,
		AuthKey:    c.AuthKey,
		Ephemeral:  true,
		Logf:       logf,
		UserLogf:   logf,
	}
	// Register Close before Up: Up starts the node, and a failed Up leaves
	// it running (retrying its login) until closed.
	t.Cleanup(func() { s.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), upTimeout)
	defer cancel()
	if _, err := s.Up(ctx); err != nil {
		t.Fatalf("testtailnet: node %q: %v", hostname, err)
	}
	return s
}

// testKnobs are the environment knobs [SetTestEnv] sets, with why.
//
// Several are read by envknob.RegisterBool in a package-level var, that is
// once at program start, so t.Setenv alone would be too late for them;
// SetTestEnv therefore also updates envknob's cache (envknob.Setenv).
var testKnobs = []struct{ name, value string }{
	// No log uploads to log.tailscale.com (tsnet already skips its logtail
	// in tests; this also covers anything else consulting logpolicy).
	// Read lazily.
	{"TS_NO_LOGS_NO_SUPPORT", "true"},

	// Force all peer traffic through DERP: all nodes share one host, so a
	// direct UDP path would otherwise win and the relay would carry no
	// data. magicsock then binds no UDP socket at all (it uses a
	// block-forever conn), so nodes also never listen on 0.0.0.0/[::] and
	// never send disco pings or STUN over UDP. (Paired with the
	// only-tcp-443 node attribute NewControl hands out, netcheck measures
	// the relay over HTTPS at once; see nodeCapabilities.)
	// Read once at init: needs envknob.Setenv.
	{"TS_DEBUG_ALWAYS_USE_DERP", "true"},

	// No NAT-PMP/PCP/UPnP probes of the default gateway or the SSDP
	// multicast group (outside loopback). testcontrol's DisableUPnP node
	// attribute covers UPnP only, and only once a netmap has arrived.
	// Read once at init: needs envknob.Setenv.
	{"TS_DISABLE_PORTMAPPER", "true"},

	// magicsock sets netcheck's SkipExternalNetwork from this: netcheck
	// must not reach anything but localhost (no port-map probing; the
	// LAN's router is left alone). Read when a node starts.
	{"IN_TS_TEST", "1"},

	// Guard: a node that somehow ends up with the default control URL
	// panics instead of dialing controlplane.tailscale.com. Read lazily.
	{"TS_PANIC_IF_HIT_MAIN_CONTROL", "1"},
}

// SetTestEnv sets the environment every end-to-end test needs, for the rest
// of the test and its cleanups. Call it BEFORE starting any node: magicsock
// reads some knobs only when a node starts.
//
//   - TS_NO_LOGS_NO_SUPPORT=true: no log uploads to log.tailscale.com.
//   - TS_DEBUG_ALWAYS_USE_DERP=true: all node-to-node traffic is relayed
//     (everything runs on one host, so a direct path would otherwise win);
//     nodes bind no UDP sockets at all.
//   - TS_DISABLE_PORTMAPPER=true: no NAT-PMP/PCP/UPnP probes of the gateway.
//   - IN_TS_TEST=1: netcheck skips everything but localhost.
//   - TS_PANIC_IF_HIT_MAIN_CONTROL=1: a node pointed at Tailscale's real
//     control server panics rather than dial it.
//
// TS_DEBUG_ALWAYS_USE_DERP and TS_DISABLE_PORTMAPPER are read by
// envknob.RegisterBool in package variables, once at program start: a plain
// t.Setenv or os.Setenv in a test comes too late and is silently ignored
// (measured: nodes then talk directly over UDP and the relay sees almost no
// data). SetTestEnv therefore sets every knob through envknob.Setenv
// (which sets the process environment too, so subprocesses inherit it),
// once per test process, and leaves it set: the knobs are process-wide.
//
// Not covered by any knob (for whoever audits a test's network use):
//   - each tsnet node opens a kernel TCP listener for its peer API on
//     0.0.0.0 (port 32768 + a hash of its Tailscale IP, else random); tsnet
//     serves the peer API through netstack anyway, so nothing reaches it,
//     but it is the one non-loopback bind. Run tests in an empty network
//     namespace if that matters.
//   - util/cloudenv probes 169.254.169.254 on Linux hosts whose DMI data
//     says Azure/Hyper-V or old GCP; only the ts_omit_cloud build tag turns
//     that off.
func SetTestEnv(t testing.TB) {
	t.Helper()
	for _, k := range testKnobs {
		// Set once and kept for the rest of the test process: the process
		// environment remembers that it was done. Restoring (or setting
		// again) would write envknob's registered values while goroutines
		// that tsnet leaves behind after Close (the port mapper's, say)
		// still read them: a data race, found by -race in CI.
		if os.Getenv(k.name) == k.value {
			continue
		}
		envknob.Setenv(k.name, k.value)
	}
}

// AwaitPeer waits, bounded by ctx, until node's netmap shows a peer with the
// node key peer, that is until node's LocalClient().WhoIsNodeKey succeeds.
// It polls every 10ms. It returns early with any error other than
// [local.ErrPeerNotFound].
func AwaitPeer(ctx context.Context, node *tsnet.Server, peer key.NodePublic) error {
	lc, err := node.LocalClient()
	if err != nil {
		return fmt.Errorf("testtailnet: AwaitPeer: %w", err)
	}
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		_, err := lc.WhoIsNodeKey(ctx, peer)
		if err == nil {
			return nil
		}
		if !errors.Is(err, local.ErrPeerNotFound) {
			if ctx.Err() != nil {
				return fmt.Errorf("testtailnet: AwaitPeer %v: %w", peer.ShortString(), ctx.Err())
			}
			return fmt.Errorf("testtailnet: AwaitPeer %v: %w", peer.ShortString(), err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("testtailnet: AwaitPeer %v: not in netmap: %w", peer.ShortString(), ctx.Err())
		case <-tick.C:
		}
	}
}

// NodeKey returns the node's current public node key, from
// LocalClient().StatusWithoutPeers. Any error is fatal.
func NodeKey(t testing.TB, node *tsnet.Server) key.NodePublic {
	t.Helper()
	lc, err := node.LocalClient()
	if err != nil {
		t.Fatalf("testtailnet: NodeKey: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := lc.StatusWithoutPeers(ctx)
	if err != nil {
		t.Fatalf("testtailnet: NodeKey: %v", err)
	}
	if st.Self == nil || st.Self.PublicKey.IsZero() {
		t.Fatalf("testtailnet: NodeKey: node has no key yet (state %s)", st.BackendState)
	}
	return st.Self.PublicKey
}

// verbose reports whether the harness passes logs to t.Logf: the test runs
// with -v, or TAILDERP_TEST_VERBOSE is set.
func verbose() bool {
	return testing.Verbose() || os.Getenv(verboseEnv) != ""
}

// testLogf returns logger.Discard unless verbose, else a logger that writes
// to t.Logf until t's cleanups reach the point where it was created, and
// drops lines after that. Tailscale components may log from background
// goroutines after Close returns; t.Logf after the test has completed
// panics.
func testLogf(t testing.TB) logger.Logf {
	if !verbose() {
		return logger.Discard
	}
	var (
		mu   sync.RWMutex
		done bool
	)
	// Registered before the component using this logger registers its
	// Close, so it runs after that Close.
	t.Cleanup(func() {
		mu.Lock()
		done = true
		mu.Unlock()
	})
	return func(format string, args ...any) {
		mu.RLock()
		defer mu.RUnlock()
		if !done {
			t.Logf(format, args...)
		}
	}
}

// ForgetNode makes the control server stop knowing the node that holds
// node key k, the way a node deleted in Headscale finds it: every map
// request of that node is refused from now on, with testcontrol's 400
// "node doesn't match machine key" (Headscale answers 404 "node not
// found"; both fail controlclient's map request with "initial fetch
// failed"), while the other nodes go on.
//
// testcontrol has no call to delete a node, and it keeps answering a map
// poll that is already open. So ForgetNode gives the node's entry another
// machine key (UpdateNode; k's owner cannot prove it), then drops every
// open connection (Stop, Resume): the other nodes reconnect as after a
// control restart, the forgotten one is refused at each retry. The entry
// stays in the other nodes' maps; remove it from them with
// AddRawMapResponse (PeersRemoved) when a test needs that too.
func (c *Control) ForgetNode(t testing.TB, k key.NodePublic) {
	t.Helper()
	n := c.Server.Node(k)
	if n == nil {
		t.Fatalf("testtailnet: ForgetNode: control does not know %v", k.ShortString())
	}
	n.Machine = key.NewMachine().Public()
	c.Server.UpdateNode(n)
	c.Stop()
	c.Resume(t)
}

// RemoveNode ends the membership of the node holding k, as deleting it in
// the control server does for the others: every node connected now is sent
// a map with PeersRemoved, and since testcontrol cannot delete a node, its
// entry stays with its key expired, so that a node that logs in (or polls
// again) later does not admit it either. To refuse the node's own map
// requests as well, see ForgetNode.
func (c *Control) RemoveNode(t testing.TB, k key.NodePublic) {
	t.Helper()
	n := c.Server.Node(k)
	if n == nil {
		t.Fatalf("testtailnet: RemoveNode: control does not know %v", k.ShortString())
	}
	for _, other := range c.Server.AllNodes() {
		if other.Key != k {
			c.Server.AddRawMapResponse(other.Key, &tailcfg.MapResponse{PeersRemoved: []tailcfg.NodeID{n.ID}})
		}
	}
	n.KeyExpiry = time.Now().Add(-time.Minute)
	n.Expired = true
	c.Server.UpdateNode(n)
}
