package testutil

import (
	"encoding/json"
	"strings"
	"testing"

	"tailscale.com/tailcfg"
)

// derpMapBanner starts the line tailderp prints above its derpMap snippet
// when it serves; a line "---" ends the snippet.
const derpMapBanner = "--- derpMap"

// DERPMapRegion reads the derpMap snippet tailderp prints (between its
// banner lines in a server's output; all of `tailderp derpmap`'s standard
// output) from out, and returns its region. It fails the test unless the
// snippet is there, is JSON, and has exactly one region with one node.
func DERPMapRegion(t testing.TB, out string) *tailcfg.DERPRegion {
	t.Helper()
	r := DERPMapFleetRegion(t, out)
	if len(r.Nodes) != 1 {
		t.Fatalf("derpMap region has %d nodes, want 1:\n%s", len(r.Nodes), out)
	}
	return r
}

// DERPMapFleetRegion is DERPMapRegion for a fleet's region: one region
// with any number of nodes (at least one). Both fail the test unless the
// region's RegionID is the key it is listed under.
func DERPMapFleetRegion(t testing.TB, out string) *tailcfg.DERPRegion {
	t.Helper()
	js := out
	if i := strings.Index(out, derpMapBanner); i >= 0 {
		rest := out[i:]
		rest = rest[strings.Index(rest, "\n")+1:]
		end := strings.Index(rest, "\n---")
		if end < 0 {
			t.Fatalf("derpMap snippet not terminated in:\n%s", out)
		}
		js = rest[:end]
	}
	var policy struct {
		DERPMap tailcfg.DERPMap `json:"derpMap"`
	}
	if err := json.Unmarshal([]byte(js), &policy); err != nil {
		t.Fatalf("derpMap snippet: %v\n%s", err, js)
	}
	if len(policy.DERPMap.Regions) != 1 {
		t.Fatalf("derpMap snippet has %d regions, want 1:\n%s", len(policy.DERPMap.Regions), js)
	}
	for id, r := range policy.DERPMap.Regions {
		if r.RegionID != id {
			t.Fatalf("derpMap region %d has RegionID %d:\n%s", id, r.RegionID, js)
		}
		if len(r.Nodes) == 0 {
			t.Fatalf("derpMap region has no nodes:\n%s", js)
		}
		return r
	}
	panic("unreachable")
}
