package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/internal/testtailnet"
	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/relay"
)

// fleetDERPMap runs `tailderp derpmap` with p's settings and returns the
// region it prints.
func fleetDERPMap(t *testing.T, p *relayProc) *tailcfg.DERPRegion {
	t.Helper()
	cmd := exec.Command(binary, append([]string{"derpmap"}, p.cmd.Args[1:]...)...)
	cmd.Env = p.cmd.Env
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("tailderp derpmap: %v", err)
	}
	r := testutil.DERPMapFleetRegion(t, string(out))
	if r.RegionID != testtailnet.RegionID {
		t.Fatalf("tailderp derpmap printed no region %d:\n%s", testtailnet.RegionID, out)
	}
	return r
}

// TestMeshedTailderps: two tailderp binaries meshed with one key, each
// admitting only the tailnet, are the two nodes of one derpMap region (as
// `tailderp derpmap` prints it from -mesh-with). Node b is homed on the
// second relay (the first was down when it came up, so its client moved
// on to the next node, as Tailscale clients do), node a on the first: they
// talk through the mesh. /debug/mesh on each relay shows the other
// connected, and each still refuses a stranger.
func TestMeshedTailderps(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	testtailnet.SetTestEnv(t)
	meshKey := filepath.Join(t.TempDir(), "mesh.key")
	if err := os.WriteFile(meshKey, []byte("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r1 := newRelay(t, relayOpts{args: []string{"-tailnet-hostname", "relay1", "-mesh-psk-file", meshKey}})
	r2 := newRelay(t, relayOpts{args: []string{"-tailnet-hostname", "relay2", "-mesh-psk-file", meshKey}})
	// One list for both, each pinned by its self-signed certificate (IP
	// mode); each relay skips its own entry.
	fleet := fmt.Sprintf("%s@127.0.0.1:%d,%s@127.0.0.1:%d", r1.CertName, r1.HTTPSPort, r2.CertName, r2.HTTPSPort)
	for _, p := range []*relayProc{r1, r2} {
		p.cmd.Args = append(p.cmd.Args, "-mesh-with", fleet)
	}
	region := fleetDERPMap(t, r1)
	if len(region.Nodes) != 2 || region.Nodes[0].DERPPort != r1.HTTPSPort || region.Nodes[1].DERPPort != r2.HTTPSPort ||
		region.Nodes[0].CertName != r1.CertName || region.Nodes[1].CertName != r2.CertName {
		t.Fatalf("tailderp derpmap with -mesh-with: %+v %+v, want relay1 then relay2 with their pins", region.Nodes[0], region.Nodes[len(region.Nodes)-1])
	}
	ctl := testtailnet.NewControl(t, &tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{testtailnet.RegionID: region}})
	for _, p := range []*relayProc{r1, r2} {
		p.cmd.Env = append(p.cmd.Env, "TAILSCALE_AUTH_KEY="+ctl.AuthKey, "TAILSCALE_CONTROL_URL="+ctl.URL)
	}

	// relay2 and node b first, while relay1 (the region's first node)
	// refuses connections: b's DERP client moves on to relay2.
	r2.start()
	r2.waitNodeRunning()
	b := ctl.NewNode(t, "b")
	r1.start()
	r1.waitNodeRunning()
	a := ctl.NewNode(t, "a")
	mustSayHello(ctx, t, b, a, "a")

	// Each node is on its own relay, and the packets crossed the mesh.
	aKey, bKey := testtailnet.NodeKey(t, a).ShortString(), testtailnet.NodeKey(t, b).ShortString()
	for _, tc := range []struct {
		name, host, on, notOn, peerPort string
	}{
		{"relay1", "relay1", aKey, bKey, fmt.Sprint(r2.HTTPSPort)},
		{"relay2", "relay2", bKey, aKey, fmt.Sprint(r1.HTTPSPort)},
	} {
		ip := peerIP(ctx, t, b, tc.host)
		clients, err := fetchOverTailnet(ctx, b, "http://"+ip+"/debug/clients")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(clients, tc.on) || strings.Contains(clients, tc.notOn) {
			t.Errorf("%s /debug/clients: want %s and not %s:\n%s", tc.name, tc.on, tc.notOn, clients)
		}
		mesh, err := fetchOverTailnet(ctx, b, "http://"+ip+"/debug/mesh")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(mesh, "127.0.0.1:"+tc.peerPort) || !strings.Contains(mesh, "<td>connected</td>") {
			t.Errorf("%s /debug/mesh does not show the other relay connected:\n%s", tc.name, mesh)
		}
		varz, err := fetchOverTailnet(ctx, b, "http://"+ip+"/debug/varz")
		if err != nil {
			t.Fatal(err)
		}
		if got := metric(varz, "tailderp_relay_mesh_peers_connected"); got != 1 {
			t.Errorf("%s: tailderp_relay_mesh_peers_connected = %v, want 1", tc.name, got)
		}
		if got := metric(varz, "tailderp_relay_derp_packets_forwarded_out"); got <= 0 {
			t.Errorf("%s: tailderp_relay_derp_packets_forwarded_out = %v: nothing crossed the mesh", tc.name, got)
		}
	}

	for _, p := range []*relayProc{r1, r2} {
		k, err := connectStranger(ctx, t, p)
		if err == nil {
			t.Errorf("relay on %d kept a stranger (%s) connected", p.HTTPSPort, k.ShortString())
		}
	}
	// Bootstrap DNS is on the public listener; this relay has no names
	// (its control server is an IP address): an empty answer.
	if code, body := get(ctx, t, publicClient(), r1.url("/bootstrap-dns?q=control.example.com")); code != 200 || body != "{}" {
		t.Errorf("/bootstrap-dns = %d %q, want 200 {}", code, body)
	}
	if !strings.Contains(r1.proc.Output.String(), "mesh: this relay's own entry in -mesh-with is skipped") {
		t.Error("relay1 did not say it skipped its own -mesh-with entry")
	}

	// The region assembles itself: each relay's /derpmap.json lists both,
	// as `tailderp derpmap` prints the fleet (same order, names, hosts,
	// ports, pins; each node's STUN port is its own relay's, where the
	// printed one assumes the fleet's are all this relay's), within a
	// minute (one exchange every 20 s by default).
	sameNodes := func(a, b *tailcfg.DERPRegion) bool {
		if a == nil || len(a.Nodes) != len(b.Nodes) {
			return false
		}
		for i, n := range a.Nodes {
			m := b.Nodes[i]
			if n.Name != m.Name || n.HostName != m.HostName || n.DERPPort != m.DERPPort || n.CertName != m.CertName || n.IPv4 != m.IPv4 {
				return false
			}
		}
		return true
	}
	stunPorts := map[int]int{r1.HTTPSPort: r1.STUNPort, r2.HTTPSPort: r2.STUNPort}
	start := time.Now()
	for _, p := range []*relayProc{r1, r2} {
		for {
			var m tailcfg.DERPMap
			status, body := get(ctx, t, publicClient(), p.url(relay.DERPMapPath))
			if status == 200 {
				decodeStrictly(t, []byte(body), &m)
				if got := m.Regions[testtailnet.RegionID]; sameNodes(got, region) {
					for _, n := range got.Nodes {
						if n.STUNPort != stunPorts[n.DERPPort] {
							t.Errorf("relay on %d publishes node %s with STUN port %d, its relay's is %d", p.HTTPSPort, n.Name, n.STUNPort, stunPorts[n.DERPPort])
						}
					}
					break
				}
			}
			if time.Since(start) > time.Minute {
				t.Fatalf("relay on %d: %s after %v; want the fleet's region %+v", p.HTTPSPort, body, time.Since(start).Round(time.Second), region)
			}
			time.Sleep(250 * time.Millisecond)
		}
	}
	t.Logf("both relays publish the whole region %v after both serve", time.Since(start).Round(time.Millisecond))
}
