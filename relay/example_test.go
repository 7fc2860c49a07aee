package relay_test

import (
	"context"
	"fmt"
	"log"
	"net"
	"net/http"
	"net/netip"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/tailderp/tailderp/relay"
)

// allowList is an Admitter over a fixed set of keys.
type allowList map[key.NodePublic]bool

func (a allowList) Admit(_ context.Context, k key.NodePublic, _ netip.Addr) bool { return a[k] }

// A relay on loopback with a self-signed certificate, admitting one
// client, which a DERP client then reaches by the certificate's pin.
func ExampleServer() {
	// Once per process, before any relay with an Admitter starts.
	if err := relay.RegisterAdmissionScheme(http.DefaultTransport); err != nil {
		log.Fatal(err)
	}
	certs, err := relay.NewSelfSigned("127.0.0.1")
	if err != nil {
		log.Fatal(err)
	}
	member := key.NewNode()
	s := &relay.Server{
		Addr:       "127.0.0.1:0",
		HTTPPort:   -1, // no plain-HTTP port
		Certs:      certs,
		PrivateKey: key.NewNode(), // a real relay keeps it: relay.LoadOrCreateKey
		Admitter:   allowList{member.Public(): true},
	}
	if err := s.Start(); err != nil {
		log.Fatal(err)
	}
	defer s.Close(context.Background())

	// The derpMap node clients are given: the address and the pin.
	info, _ := certs.Current()
	region := relay.DERPRegion(relay.RegionConfig{RegionID: 900, RegionCode: "example"}, relay.NodeInfo{
		HostName: "127.0.0.1", IPv4: "127.0.0.1", IPv6: "none",
		DERPPort: s.LocalAddr().(*net.TCPAddr).Port, STUNPort: -1, CertName: info.CertName,
	})
	c := derphttp.NewRegionClient(member, logger.Discard, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		log.Fatal(err)
	}
	if m, err := c.Recv(); err == nil {
		_, admitted := m.(derp.ServerInfoMessage)
		fmt.Println("admitted:", admitted)
	}
	// Output: admitted: true
}
