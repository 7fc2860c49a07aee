package node_test

import (
	"context"
	"log"
	"net/http"
	"os"
	"time"

	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/node"
)

// The embedded node: log in once with an auth key (its login then stays in
// Dir), answer "is this key one of ours?" from memory, and serve something
// on the tailnet only. This example is compiled, not run: it would log in
// to a real control server.
func ExampleNode() {
	n := &node.Node{
		Dir:        "/var/lib/tailderp/tailscale",
		Hostname:   "derp-example-com",
		AuthKey:    os.Getenv("TAILSCALE_AUTH_KEY"), // only needed for the first login
		ControlURL: "https://headscale.example.com", // "" for Tailscale
	}
	if err := n.Start(); err != nil { // returns at once; logs in in the background
		log.Fatal(err)
	}
	defer n.Close()

	// Admission: a map lookup; ready is false until the first network map.
	var clientKey key.NodePublic
	if known, ready := n.KnowsNodeKey(clientKey); ready && !known {
		log.Printf("%v is not a node of our tailnet", clientKey.ShortString())
	}

	// A listener reachable only from the tailnet.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ln, err := n.Listen(ctx, "tcp", ":80")
	if err != nil {
		log.Fatal(err)
	}
	go http.Serve(ln, http.NotFoundHandler())

	select {
	case err := <-n.Fatal(): // the control server rejected the auth key
		log.Fatal(err)
	case <-ctx.Done():
	}
}
