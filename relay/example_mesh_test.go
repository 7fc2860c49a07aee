package relay_test

import (
	"fmt"

	"github.com/tailderp/tailderp/relay"
)

// The forms of a -mesh-with entry: a peer by name, on another port, a
// self-signed peer pinned by its CertName, and a peer dialed at a private
// address while its certificate is checked for its name.
func ExampleParseMeshPeer() {
	for _, s := range []string{
		"derp2.example.com",
		"derp3.example.com:8443",
		"sha256-raw:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef@203.0.113.7",
		"derp4.example.com/10.0.0.4",
	} {
		p, err := relay.ParseMeshPeer(s)
		if err != nil {
			fmt.Println(err)
			continue
		}
		fmt.Printf("%s pinned=%v dial=%v\n", p, p.CertName != "", p.DialIP)
	}
	// Output:
	// derp2.example.com pinned=false dial=invalid IP
	// derp3.example.com:8443 pinned=false dial=invalid IP
	// 203.0.113.7 pinned=true dial=invalid IP
	// derp4.example.com pinned=false dial=10.0.0.4
}
