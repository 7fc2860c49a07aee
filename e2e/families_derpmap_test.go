package e2e

import (
	"context"
	"testing"
	"time"
)

// TestDERPMapJSONBothFamilies: a relay started with -ipv4 and -ipv6
// publishes both addresses in its node of /derpmap.json (issue 20, item
// 5), decoded strictly.
func TestDERPMapJSONBothFamilies(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p := newRelay(t, relayOpts{args: []string{"-verify-clients=false", "-ipv4", "127.0.0.1", "-ipv6", "::1"}})
	p.start()
	served, body := servedDERPMap(ctx, t, p)
	r := served.Regions[900]
	if r == nil || len(r.Nodes) != 1 {
		t.Fatalf("want region 900 with one node: %s", body)
	}
	if n := r.Nodes[0]; n.IPv4 != "127.0.0.1" || n.IPv6 != "::1" || n.DERPPort != p.HTTPSPort {
		t.Errorf("node IPv4 %q, IPv6 %q, port %d; want 127.0.0.1, ::1, %d: %s", n.IPv4, n.IPv6, n.DERPPort, p.HTTPSPort, body)
	}
}
