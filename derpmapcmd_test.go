package main

import (
	"testing"

	"github.com/tailderp/tailderp/internal/testutil"
)

// TestDERPMapBothFamilies: `tailderp derpmap` with -ipv4 and -ipv6 puts
// both addresses in the node, so clients dial either family without DNS
// (issue 20, item 5); no auth key or certificate is needed for a DNS
// name.
func TestDERPMapBothFamilies(t *testing.T) {
	code, stdout, stderr := runMain(t, nil, "derpmap", "-hostname", "derp.example.com", "-ipv4", "192.0.2.1", "-ipv6", "2001:db8::1", "-state-dir", t.TempDir())
	if code != 0 {
		t.Fatalf("derpmap exit %d:\n%s", code, stderr)
	}
	r := testutil.DERPMapRegion(t, stdout)
	if len(r.Nodes) != 1 {
		t.Fatalf("%d nodes, want 1:\n%s", len(r.Nodes), stdout)
	}
	if n := r.Nodes[0]; n.HostName != "derp.example.com" || n.IPv4 != "192.0.2.1" || n.IPv6 != "2001:db8::1" {
		t.Errorf("node %s, IPv4 %q, IPv6 %q; want derp.example.com with 192.0.2.1 and 2001:db8::1:\n%s", n.HostName, n.IPv4, n.IPv6, stdout)
	}
}
