package relay

import (
	"testing"

	"tailscale.com/tailcfg"
)

func TestNodeName(t *testing.T) {
	for i, want := range map[int]string{0: "900a", 1: "900b", 25: "900z", 26: "900aa", 27: "900ab", 701: "900zz", 702: "900aaa"} {
		if got := nodeName(900, i); got != want {
			t.Errorf("nodeName(900, %d) = %q, want %q", i, got, want)
		}
	}
}

// TestFleetRegion: the fleet's region lists the relays in the order of the
// mesh list, this relay where its entry stands (first if the list leaves
// it out), each peer with what its entry says.
func TestFleetRegion(t *testing.T) {
	self := DERPRegion(RegionConfig{RegionID: 901, RegionCode: "fra", RegionName: "Frankfurt"},
		NodeInfo{HostName: "derp1.example.com", IPv4: "198.51.100.1", DERPPort: 443, STUNPort: 3478})
	var peers []MeshPeer
	for _, s := range []string{"derp1.example.com", "[2001:db8::2]:8443", "sha256-raw:" + hex64 + "@203.0.113.3/10.0.0.3"} {
		p, err := ParseMeshPeer(s)
		if err != nil {
			t.Fatal(err)
		}
		peers = append(peers, p)
	}
	want := []tailcfg.DERPNode{
		{Name: "901a", RegionID: 901, HostName: "derp1.example.com", IPv4: "198.51.100.1"},
		{Name: "901b", RegionID: 901, HostName: "2001:db8::2", IPv6: "2001:db8::2", DERPPort: 8443},
		{Name: "901c", RegionID: 901, HostName: "203.0.113.3", IPv4: "203.0.113.3", CertName: "sha256-raw:" + hex64},
	}
	check := func(name string, r *tailcfg.DERPRegion, want []tailcfg.DERPNode) {
		t.Helper()
		if r.RegionID != 901 || r.RegionCode != "fra" || r.RegionName != "Frankfurt" || len(r.Nodes) != len(want) {
			t.Fatalf("%s: %+v", name, r)
		}
		for i := range want {
			if *r.Nodes[i] != want[i] {
				t.Errorf("%s: node %d = %+v, want %+v", name, i, *r.Nodes[i], want[i])
			}
		}
	}
	check("self listed first", FleetRegion(self, peers, 0), want)

	// Where its entry stands.
	mid := []MeshPeer{peers[1], peers[0], peers[2]}
	wantMid := []tailcfg.DERPNode{want[1], want[0], want[2]}
	for i, n := range []string{"901a", "901b", "901c"} {
		wantMid[i].Name = n
	}
	check("self in the middle", FleetRegion(self, mid, 1), wantMid)
	// Not listed: this relay first, then the peers.
	check("self not listed", FleetRegion(self, peers[1:], -1), want)
	if self.Nodes[0].Name != "901a" || len(self.Nodes) != 1 {
		t.Errorf("FleetRegion changed its argument: %+v", self)
	}
}

const hex64 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
