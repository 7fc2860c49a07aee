package relay

import (
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// SignFleetNodeForTest signs n as a fleet peer would, for the external
// tests (compiled into tests only).
func SignFleetNodeForTest(mk key.DERPMesh, n *tailcfg.DERPNode) (string, error) {
	return signNode(mk, n, time.Now())
}
