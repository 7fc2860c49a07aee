package relay

import (
	"encoding/json"
	"fmt"
	"net/netip"

	"tailscale.com/tailcfg"
)

// RegionConfig names the DERP region this relay serves, for the derpMap
// snippet an operator pastes into the tailnet policy.
type RegionConfig struct {
	RegionID   int    // 900 or above: the range Tailscale leaves to custom relays
	RegionCode string // short code shown by `tailscale netcheck`
	RegionName string // human name
}

// NodeInfo is what a client needs to reach this relay.
type NodeInfo struct {
	HostName string // DNS name or IP address clients dial and check the certificate against
	IPv4     string // optional: skip DNS ("" unknown, "none" disables)
	IPv6     string // optional, as IPv4
	DERPPort int    // HTTPS port; 0 means 443
	STUNPort int    // UDP port; -1 means STUN disabled
	CertName string // certificate pin for self-signed certificates; empty for CA-signed
}

// DERPRegion returns the derpMap region for a single relay node.
func DERPRegion(rc RegionConfig, n NodeInfo) *tailcfg.DERPRegion {
	node := &tailcfg.DERPNode{
		Name:     nodeName(rc.RegionID, 0),
		RegionID: rc.RegionID,
		HostName: n.HostName,
		IPv4:     n.IPv4,
		IPv6:     n.IPv6,
		CertName: n.CertName,
		STUNPort: n.STUNPort,
	}
	if n.DERPPort != 443 {
		node.DERPPort = n.DERPPort
	}
	if n.STUNPort == 3478 {
		node.STUNPort = 0 // the default; keep the snippet short
	}
	return &tailcfg.DERPRegion{
		RegionID:   rc.RegionID,
		RegionCode: rc.RegionCode,
		RegionName: rc.RegionName,
		Nodes:      []*tailcfg.DERPNode{node},
	}
}

// PolicySnippet renders the region as the "derpMap" section of a tailnet
// policy file, ready to paste. OmitDefaultRegions is false: Tailscale's
// relays stay as a fallback until the operator decides otherwise.
func PolicySnippet(r *tailcfg.DERPRegion) ([]byte, error) {
	type policy struct {
		DERPMap struct {
			OmitDefaultRegions bool                           `json:"OmitDefaultRegions"`
			Regions            map[string]*tailcfg.DERPRegion `json:"Regions"`
		} `json:"derpMap"`
	}
	var p policy
	p.DERPMap.Regions = map[string]*tailcfg.DERPRegion{fmt.Sprint(r.RegionID): r}
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("relay: derpMap snippet: %w", err)
	}
	return b, nil
}

// FleetRegion returns the derpMap region of a fleet: self's node (self is
// this relay's region, as DERPRegion made it) and one node per mesh peer,
// in the order of peers with this relay at selfIndex (first when
// selfIndex < 0), so every relay given the same list describes the same
// region. Clients connect to the first node they can reach, in order.
//
// What a peer's node can say comes from its MeshPeer: its host and port,
// its CertName pin, and its address when Host is an IP address (DialIP is
// a private address for the relays, not for clients). Peers are assumed
// to serve STUN on the same port as this relay.
func FleetRegion(self *tailcfg.DERPRegion, peers []MeshPeer, selfIndex int) *tailcfg.DERPRegion {
	me := *self.Nodes[0]
	var nodes []*tailcfg.DERPNode
	if selfIndex < 0 || selfIndex >= len(peers) {
		nodes = append(nodes, &me)
	}
	for i, p := range peers {
		if i == selfIndex {
			nodes = append(nodes, &me)
			continue
		}
		n := &tailcfg.DERPNode{RegionID: self.RegionID, HostName: p.Host, DERPPort: p.Port, CertName: p.CertName, STUNPort: me.STUNPort}
		if ip, err := netip.ParseAddr(p.Host); err == nil {
			if ip.Is4() {
				n.IPv4 = p.Host
			} else {
				n.IPv6 = p.Host
			}
		}
		nodes = append(nodes, n)
	}
	for i, n := range nodes {
		n.Name = nodeName(self.RegionID, i)
	}
	out := *self
	out.Nodes = nodes
	return &out
}

// nodeName names the i-th node of a region: 900a, 900b, … 900z, 900aa, ….
func nodeName(regionID, i int) string {
	suffix := ""
	for i++; i > 0; i = (i - 1) / 26 {
		suffix = string(rune('a'+(i-1)%26)) + suffix
	}
	return fmt.Sprintf("%d%s", regionID, suffix)
}
