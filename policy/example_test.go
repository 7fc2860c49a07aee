package policy_test

import (
	"context"
	"fmt"
	"log"

	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/policy"
)

// Put this relay's region into the tailnet policy file: read, edit,
// validate, write with If-Match, and again on a concurrent edit.
func ExampleClient_Apply() {
	c := &policy.Client{
		// BaseURL defaults to https://api.tailscale.com, Tailnet to "-".
		Credentials: policy.Credentials{APIKey: "tskey-api-…"}, // or OAuthClientID + OAuthClientSecret
	}
	region := &tailcfg.DERPRegion{
		RegionID: 900, RegionCode: "tailderp", RegionName: "tailderp",
		Nodes: []*tailcfg.DERPNode{{Name: "900a", RegionID: 900, HostName: "relay.example.com"}},
	}
	dryRun := false
	res, err := c.Apply(context.Background(), policy.SetRegion(region), dryRun)
	if err != nil {
		log.Fatal(err) // one line, e.g. "policy: write the policy file: 403 Forbidden: …"
	}
	switch {
	case !res.Changed:
		fmt.Println("the policy file already has this region; nothing written")
	case res.Written:
		fmt.Printf("region 900 written (%d attempts)\n%s", res.Attempts, res.Diff)
	default:
		fmt.Print(res.Diff) // a dry run
	}
	// To take this relay out again (and the region with its last node):
	// c.Apply(ctx, policy.RemoveNode(900, "relay.example.com", 443), false)
}
