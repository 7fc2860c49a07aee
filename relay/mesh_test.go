package relay

import (
	"context"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
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
