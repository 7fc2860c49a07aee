package relay

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/testutil"
)

// refuseAll is an Admitter that refuses everyone and counts the calls.
type refuseAll struct{ calls atomic.Int64 }

func (r *refuseAll) Admit(context.Context, key.NodePublic, netip.Addr) bool {
	r.calls.Add(1)
	return false
}

// TestMeshPeersSkipAdmission: a client presenting the fleet's mesh key is
// admitted without asking the Admitter (derpserver's rule, as in derper:
// a mesh peer is not a node of the tailnet); one without it is refused.
func TestMeshPeersSkipAdmission(t *testing.T) {
	const meshHex = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	meshKey, err := key.ParseDERPMesh(meshHex)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := NewSelfSigned("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	adm := &refuseAll{}
	s := &Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: certs, PrivateKey: key.NewNode(), Admitter: adm, MeshKey: meshKey}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(context.Background()) })
	info, _ := certs.Current()
	region := &tailcfg.DERPRegion{RegionID: 900, Nodes: []*tailcfg.DERPNode{{
		Name: "900a", RegionID: 900, HostName: "127.0.0.1", IPv4: "127.0.0.1", IPv6: "none",
		DERPPort: s.LocalAddr().(*net.TCPAddr).Port, CertName: info.CertName,
	}}}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dial := func(k key.NodePrivate, mesh bool) (*derphttp.Client, error) {
		c := derphttp.NewRegionClient(k, t.Logf, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
		t.Cleanup(func() { c.Close() })
		if mesh {
			c.MeshKey = meshKey
		}
		if err := c.Connect(ctx); err != nil {
			return c, err
		}
		_, err := c.Recv() // ServerInfo for an admitted client; an error for a refused one
		return c, err
	}
	peerKey := key.NewNode()
	peer, err := dial(peerKey, true)
	if err != nil {
		t.Fatalf("mesh peer refused: %v", err)
	}
	if n := adm.calls.Load(); n != 0 {
		t.Fatalf("Admitter asked %d times about a mesh peer", n)
	}
	// Never asked about, never tracked: Revoke cannot close a mesh peer.
	if n := s.Revoke(peerKey.Public()); n != 0 || s.Connected(peerKey.Public()) {
		t.Errorf("Revoke of a mesh peer closed %d connections (connected=%v), want 0", n, s.Connected(peerKey.Public()))
	}
	if err := peer.SendPing([8]byte{1}); err != nil {
		t.Errorf("mesh peer's connection after Revoke: %v", err)
	}
	if _, err := dial(key.NewNode(), false); err == nil {
		t.Fatal("client without the mesh key admitted by a refuse-all Admitter")
	}
	if n := adm.calls.Load(); n != 1 {
		t.Fatalf("Admitter asked %d times, want 1", n)
	}
}

func TestParseMeshPeer(t *testing.T) {
	pin := "sha256-raw:" + strings.Repeat("ab", 32)
	for _, tc := range []struct {
		in   string
		want MeshPeer
		str  string
	}{
		{"derp2.example.com", MeshPeer{Host: "derp2.example.com"}, "derp2.example.com"},
		{"derp2.example.com:443", MeshPeer{Host: "derp2.example.com"}, "derp2.example.com"},
		{"DERP2.Example.com.", MeshPeer{Host: "derp2.example.com"}, "derp2.example.com"},
		{"derp2.example.com:8443", MeshPeer{Host: "derp2.example.com", Port: 8443}, "derp2.example.com:8443"},
		{"203.0.113.7", MeshPeer{Host: "203.0.113.7"}, "203.0.113.7"},
		{"2001:db8::2", MeshPeer{Host: "2001:db8::2"}, "[2001:db8::2]"},
		{"[2001:db8::2]", MeshPeer{Host: "2001:db8::2"}, "[2001:db8::2]"},
		{"[2001:db8::2]:8443", MeshPeer{Host: "2001:db8::2", Port: 8443}, "[2001:db8::2]:8443"},
		{pin + "@203.0.113.7:8443", MeshPeer{Host: "203.0.113.7", Port: 8443, CertName: pin}, "203.0.113.7:8443"},
		{"derp.example.com@203.0.113.7", MeshPeer{Host: "203.0.113.7", CertName: "derp.example.com"}, "203.0.113.7"},
		{"derp2.example.com/10.0.0.2", MeshPeer{Host: "derp2.example.com", DialIP: netip.MustParseAddr("10.0.0.2")}, "derp2.example.com"},
		{"derp2.example.com:8443/fd00::2", MeshPeer{Host: "derp2.example.com", Port: 8443, DialIP: netip.MustParseAddr("fd00::2")}, "derp2.example.com:8443"},
	} {
		got, err := ParseMeshPeer(tc.in)
		if err != nil {
			t.Errorf("ParseMeshPeer(%q): %v", tc.in, err)
			continue
		}
		if got != tc.want {
			t.Errorf("ParseMeshPeer(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
		if got.String() != tc.str {
			t.Errorf("ParseMeshPeer(%q).String() = %q, want %q", tc.in, got.String(), tc.str)
		}
	}
	for _, tc := range []struct{ in, want string }{
		{"", "no host"},
		{"https://derp2.example.com/derp", "not a URL"},
		{"derp2.example.com:0", "port"},
		{"derp2.example.com:99999", "port"},
		{"derp2.example.com:https", "port"},
		{"derp_2.example.com", "neither a DNS name nor an IP address"},
		{"derp2.example.com/derp2.internal", "must be an IP address"},
		{"sha256-raw:abcd@203.0.113.7", "64 hex digits"},
		{"[2001:db8::2", "[ipv6]"},
	} {
		_, err := ParseMeshPeer(tc.in)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), fmt.Sprintf("%q", tc.in)) {
			t.Errorf("ParseMeshPeer(%q) error %v, want one naming the entry and saying %q", tc.in, err, tc.want)
		}
	}
}

// TestMeshRetryWait: after a failure the next dial comes after 5 s (the
// watch loop's own wait), then 10, 20, and every 30 s at most.
func TestMeshRetryWait(t *testing.T) {
	want := []time.Duration{5 * time.Second, 10 * time.Second, 20 * time.Second, 30 * time.Second, 30 * time.Second}
	for i, w := range want {
		if got := meshRetryWait(i + 1); got != w {
			t.Errorf("after %d failures: wait %v, want %v", i+1, got, w)
		}
	}
	if got := meshRetryWait(1000); got != meshRetryMax {
		t.Errorf("after 1000 failures: wait %v, want %v", got, meshRetryMax)
	}
}

// TestMeshPinnedPeer: a peer with a self-signed certificate (IP mode) is
// reached only by its CertName pin; without the pin the certificate is
// checked against the CAs and refused, with a wrong pin too.
func TestMeshPinnedPeer(t *testing.T) {
	meshKey, err := key.ParseDERPMesh("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
	if err != nil {
		t.Fatal(err)
	}
	start := func(certs Certificates, peers ...MeshPeer) *Server {
		s := &Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: certs, PrivateKey: key.NewNode(), MeshKey: meshKey, MeshWith: peers}
		if err := s.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close(context.Background()) })
		return s
	}
	peerCerts, err := NewSelfSigned("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	peer := start(peerCerts)
	port := peer.LocalAddr().(*net.TCPAddr).Port
	info, _ := peerCerts.Current()
	wrongPin := "sha256-raw:" + strings.Repeat("00", 32)

	mine, _ := NewSelfSigned("127.0.0.1")
	s := start(mine,
		MeshPeer{Host: "127.0.0.1", Port: port, CertName: info.CertName},
		MeshPeer{Host: "127.0.0.1", Port: port},
		MeshPeer{Host: "127.0.0.1", Port: port, CertName: wrongPin},
	)
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := s.MeshPeers()
		if st[0].State == MeshConnected && st[1].LastError != "" && st[2].LastError != "" {
			if st[0].ServerKey != peer.PrivateKey.Public() {
				t.Errorf("pinned link: server key %v, want the peer's", st[0].ServerKey.ShortString())
			}
			if st[1].State == MeshConnected || !strings.Contains(st[1].LastError, "certificate") {
				t.Errorf("unpinned link to a self-signed peer: %+v, want a certificate error", st[1])
			}
			if st[2].State == MeshConnected || !strings.Contains(st[2].LastError, "hash") {
				t.Errorf("wrongly pinned link: %+v, want a hash mismatch", st[2])
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 10s: %+v", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(s.ExpVar().String(), `"gauge_mesh_peers_connected": 1`) {
		t.Errorf("metrics: %s", s.ExpVar())
	}
}

// TestMeshUnpinnedSelfSignedPeer: a peer without a pin that presents a
// self-signed certificate is a warning at the first failed dial (not the
// generic one after 30 s), naming the pin and the peer entry with it, which
// ParseMeshPeer reads back as the pinned peer.
func TestMeshUnpinnedSelfSignedPeer(t *testing.T) {
	meshKey, err := key.ParseDERPMesh("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
	if err != nil {
		t.Fatal(err)
	}
	peerCerts, err := NewSelfSigned("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	peer := &Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: peerCerts, PrivateKey: key.NewNode(), MeshKey: meshKey}
	if err := peer.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { peer.Close(context.Background()) })
	port := peer.LocalAddr().(*net.TCPAddr).Port
	info, _ := peerCerts.Current()

	rec := &testutil.LogRecorder{}
	mine, _ := NewSelfSigned("127.0.0.1")
	unpinned := MeshPeer{Host: "127.0.0.1", Port: port, DialIP: netip.MustParseAddr("127.0.0.1")}
	s := &Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: mine, PrivateKey: key.NewNode(), MeshKey: meshKey,
		MeshWith: []MeshPeer{unpinned}, Logger: slog.New(rec)}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(context.Background()) })

	// The generic warning comes only after meshWarnAfter (30 s): a warning
	// before it can only be the pin's.
	const msg = "self-signed and not pinned"
	deadline := time.Now().Add(10 * time.Second)
	for rec.Count(slog.LevelWarn, msg) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no warning about the missing pin within 10 s:\n%s", strings.Join(rec.Take(), "\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
	var line string
	for _, l := range rec.Take() {
		if strings.HasPrefix(l, "WARN ") && strings.Contains(l, msg) {
			line = l
		}
	}
	wantEntry := fmt.Sprintf("%s@127.0.0.1:%d/127.0.0.1", info.CertName, port)
	if !strings.Contains(line, "pin="+info.CertName) || !strings.Contains(line, "pinned_peer="+wantEntry) {
		t.Errorf("warning %q should name the pin %s and the entry %s", line, info.CertName, wantEntry)
	}
	pinned, err := ParseMeshPeer(wantEntry)
	if err != nil {
		t.Fatalf("the entry the warning suggests: %v", err)
	}
	if want := (MeshPeer{Host: "127.0.0.1", Port: port, DialIP: unpinned.DialIP, CertName: info.CertName}); pinned != want {
		t.Errorf("the suggested entry parses as %+v, want %+v", pinned, want)
	}
	if st := s.MeshPeers()[0]; st.State == MeshConnected || !strings.Contains(st.LastError, info.CertName) {
		t.Errorf("unpinned link: %+v, want not connected, its last error naming the pin", st)
	}
}

// TestMeshPinWarnSchedule: the missing pin is said at the first failure,
// then after 1, 2, 4 and 8 minutes, then every 10 minutes while it lasts.
func TestMeshPinWarnSchedule(t *testing.T) {
	m := &meshLink{}
	t0 := time.Now()
	var said []time.Duration
	for d := time.Duration(0); d <= 45*time.Minute; d += 5 * time.Second {
		if m.pinWarnDue(t0.Add(d)) {
			said = append(said, d)
		}
	}
	want := []time.Duration{0, time.Minute, 3 * time.Minute, 7 * time.Minute, 15 * time.Minute, 25 * time.Minute, 35 * time.Minute, 45 * time.Minute}
	if fmt.Sprint(said) != fmt.Sprint(want) {
		t.Errorf("said at %v, want %v", said, want)
	}
}

// TestMeshNeedsKey: peers without a mesh key is a Start error.
func TestMeshNeedsKey(t *testing.T) {
	certs, _ := NewSelfSigned("127.0.0.1")
	s := &Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: certs, PrivateKey: key.NewNode(), MeshWith: []MeshPeer{{Host: "127.0.0.1", Port: 1}}}
	if err := s.Start(); err == nil || !strings.Contains(err.Error(), "mesh key") {
		s.Close(context.Background())
		t.Fatalf("Start = %v, want a mesh key error", err)
	}
}
