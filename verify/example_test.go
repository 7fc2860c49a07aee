package verify_test

import (
	"context"
	"fmt"
	"net/netip"

	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/verify"
)

// tailnet is a KeyChecker over a fixed set of node keys; in tailderp the
// embedded node (node.Node) is the KeyChecker.
type tailnet map[key.NodePublic]bool

func (t tailnet) KnowsNodeKey(k key.NodePublic) (known, ready bool) { return t[k], true }

func ExampleVerifier() {
	member, stranger := key.NewNode().Public(), key.NewNode().Public()
	v := &verify.Verifier{
		Tailnets: []verify.Tailnet{{Name: "default", Keys: tailnet{member: true}}},
		// URL: "https://headscale.example.com/verify" would ask an
		// admission controller too.
	}
	src := netip.MustParseAddr("198.51.100.7")
	fmt.Println("member:", v.Admit(context.Background(), member, src))
	fmt.Println("stranger:", v.Admit(context.Background(), stranger, src))
	fmt.Println("refused as not in the tailnet:", v.Refused(verify.ReasonNotInTailnet))
	// Output:
	// member: true
	// stranger: false
	// refused as not in the tailnet: 1
}
