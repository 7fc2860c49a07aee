package relay

import (
	"encoding/json"
	"fmt"

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
		Name:     fmt.Sprintf("%da", rc.RegionID),
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
