package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/disco"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/debugsrv"
	"github.com/tailderp/tailderp/internal/testtailnet"
)

// twoTailnets makes p serve tailnet A (the default: ctlA) and tailnet "b"
// (ctlB, from a -tailnets file), its nodes named hostA and hostB.
func twoTailnets(t *testing.T, p *relayProc, ctlA, ctlB *testtailnet.Control, hostA, hostB string) {
	t.Helper()
	dir := t.TempDir()
	keyB := filepath.Join(dir, "b.key")
	if err := os.WriteFile(keyB, []byte(ctlB.AuthKey+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "tailnets.hujson")
	if err := os.WriteFile(file, fmt.Appendf(nil, `{"tailnets": [{"name": "b", "control_url": %q, "auth_key_file": %q, "hostname": %q}]}`,
		ctlB.URL, keyB, hostB), 0o600); err != nil {
		t.Fatal(err)
	}
	p.cmd.Args = append(p.cmd.Args, "-tailnet-hostname", hostA)
	p.cmd.Env = append(p.cmd.Env, "TAILSCALE_AUTH_KEY="+ctlA.AuthKey, "TAILSCALE_CONTROL_URL="+ctlA.URL, "TAILNETS_FILE="+file)
}

// twoClientsEach makes two clients of tailnet A (named *.acorp.example.)
// and two of B (*.bcorp.example.), registered with their control servers.
func twoClientsEach(t *testing.T, ctlA, ctlB *testtailnet.Control) (kA1, kA2, kB1, kB2 key.NodePrivate) {
	t.Helper()
	kA1, kA2, kB1, kB2 = key.NewNode(), key.NewNode(), key.NewNode(), key.NewNode()
	ctlA.AddNode(t, kA1.Public(), "alpha1.acorp.example.")
	ctlA.AddNode(t, kA2.Public(), "alpha2.acorp.example.")
	ctlB.AddNode(t, kB1.Public(), "beta1.bcorp.example.")
	ctlB.AddNode(t, kB2.Public(), "beta2.bcorp.example.")
	return kA1, kA2, kB1, kB2
}

// discoLike is a payload derpserver takes for a disco message: the only
// kind it answers with PeerGone when the destination is not there.
func discoLike(tag byte) []byte {
	p := make([]byte, len(disco.Magic)+32+disco.NonceLen+8)
	copy(p, disco.Magic)
	p[len(p)-1] = tag
	return p
}

// nextMsg is dp's next packet or PeerGone answer, within 10 s.
func nextMsg(t *testing.T, dp *derpPeer) derp.ReceivedMessage {
	t.Helper()
	select {
	case m := <-dp.msgs:
		return m
	case <-dp.closed:
		t.Fatalf("client %v: connection ended: %v", dp.key.Public().ShortString(), dp.err)
	case <-time.After(10 * time.Second):
		t.Fatalf("client %v: nothing received within 10s", dp.key.Public().ShortString())
	}
	return nil
}

// mustDeliver sends from from to to until to receives it (the mesh may
// still be joining), bounded by ctx, and checks the source.
func mustDeliver(ctx context.Context, t *testing.T, from, to *derpPeer) {
	t.Helper()
	for {
		if err := from.c.Send(to.key.Public(), []byte("hello "+to.key.Public().ShortString())); err != nil {
			t.Fatal(err)
		}
		select {
		case m := <-to.msgs:
			p, ok := m.(derp.ReceivedPacket)
			if !ok || p.Source != from.key.Public() {
				t.Fatalf("%v received %#v, want a packet from %v", to.key.Public().ShortString(), m, from.key.Public().ShortString())
			}
			return
		case <-to.closed:
			t.Fatalf("%v: connection ended: %v", to.key.Public().ShortString(), to.err)
		case <-ctx.Done():
			t.Fatalf("%v never received from %v", to.key.Public().ShortString(), from.key.Public().ShortString())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// mustNotReach sends from from to other, a connected key of another
// tailnet, and to a key nobody has: both must be answered PeerGone "not
// here", the same answer.
func mustNotReach(t *testing.T, from *derpPeer, other key.NodePublic) {
	t.Helper()
	absent := key.NewNode().Public()
	if err := from.c.Send(other, discoLike(1)); err != nil {
		t.Fatal(err)
	}
	if err := from.c.Send(absent, discoLike(2)); err != nil {
		t.Fatal(err)
	}
	gone := map[key.NodePublic]derp.PeerGoneReasonType{}
	for len(gone) < 2 {
		switch m := nextMsg(t, from).(type) {
		case derp.PeerGoneMessage:
			gone[m.Peer] = m.Reason
		default:
			t.Fatalf("%v received %#v, want PeerGone answers", from.key.Public().ShortString(), m)
		}
	}
	if gone[other] != derp.PeerGoneReasonNotHere || gone[absent] != derp.PeerGoneReasonNotHere {
		t.Fatalf("PeerGone: other tailnet's connected key %v, absent key %v; want NotHere for both", gone[other], gone[absent])
	}
}

// TestTenantIsolation: one relay, tailnets A and B (each its own control
// server). A client of A reaches A's clients; a connected client of B is,
// to it, an absent key (and receives nothing from it); B's clients reach
// each other; a key both tailnets list is refused. B's /debug pages name
// nothing of A (its control URL, name, clients, node), and the
// process-wide pages are A's (the first tailnet's) only.
func TestTenantIsolation(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	testtailnet.SetTestEnv(t)
	p := newRelay(t, relayOpts{args: []string{"-max-conns-per-tailnet", "50"}})
	derpMap := testtailnet.DERPRegion(p.HTTPSPort, p.STUNPort, p.CertName)
	ctlA, ctlB := testtailnet.NewControl(t, derpMap), testtailnet.NewControl(t, derpMap)
	twoTailnets(t, p, ctlA, ctlB, "relay-acorp", "relay-bcorp")
	p.start()
	p.waitLog(`debug: serving on the tailnet only" tailnet=default`, 30*time.Second)
	p.waitLog(`debug: serving on the tailnet only" tailnet=b`, 30*time.Second)

	kA1, kA2, kB1, kB2 := twoClientsEach(t, ctlA, ctlB)
	kBoth := key.NewNode()
	ctlA.AddNode(t, kBoth.Public(), "both.acorp.example.")
	ctlB.AddNode(t, kBoth.Public(), "both.bcorp.example.")
	a1, a2 := mustAdmit(ctx, t, p, kA1), mustAdmit(ctx, t, p, kA2)
	b1, b2 := mustAdmit(ctx, t, p, kB1), mustAdmit(ctx, t, p, kB2)

	mustDeliver(ctx, t, a1, a2)
	mustNotReach(t, a1, kB1.Public())
	mustNotReach(t, b2, kA2.Public())
	mustDeliver(ctx, t, b2, b1) // b1's first message: a1's never arrived
	mustDeliver(ctx, t, b1, b2)
	mustRefuse(ctx, t, p, kBoth, "a key of both tailnets")
	p.waitLog(`reason=in_two_tailnets`, 10*time.Second)

	// /debug as each tailnet sees it.
	viewA, viewB := ctlA.NewNode(t, "viewer-a"), ctlB.NewNode(t, "viewer-b")
	relayA, relayB := peerIP(ctx, t, viewA, "relay-acorp"), peerIP(ctx, t, viewB, "relay-bcorp")
	pagesB := map[string]string{}
	for _, path := range []string{"/debug/", "/debug/status", "/debug/vars", "/metrics", "/debug/clients", "/debug/mesh", "/debug/check"} {
		body, err := fetchOverTailnet(ctx, viewB, "http://"+relayB+path)
		if err != nil {
			t.Fatalf("B's %s: %v", path, err)
		}
		pagesB[path] = body
	}
	for path, body := range pagesB {
		// (kBoth is B's too: B's pages may show it, by B's name.)
		for _, a := range []string{ctlA.URL, `"default"`, "tailnet=default", `tailnet="default"`, "acorp", kA1.Public().ShortString(), kA2.Public().ShortString()} {
			if strings.Contains(body, a) {
				t.Errorf("B's %s names %q, of tailnet A:\n%.2000s", path, a, body)
			}
		}
		for _, proc := range []string{"process_start_unix_time", `"cmdline"`, `"memstats":`, "\nmemstats_", "pprof"} {
			if strings.Contains(body, proc) {
				t.Errorf("B's %s shows the process-wide %q", path, proc)
			}
		}
	}
	var stB debugsrv.Status
	if err := json.Unmarshal([]byte(pagesB["/debug/status"]), &stB); err != nil {
		t.Fatal(err)
	}
	if stB.Tailnet != "b" || len(stB.Tailnets) != 1 || stB.Tailnets[0].Name != "b" || !strings.Contains(pagesB["/debug/status"], kB1.Public().ShortString()) {
		t.Errorf("B's status does not show B and its client:\n%.2000s", pagesB["/debug/status"])
	}
	// B's share: its own connections (b1, b2, its viewer, the relay's B
	// node), never A's.
	if c := stB.Caps; c.MaxConnsPerTailnet != 50 || len(c.Tailnets) != 1 || c.Tailnets[0].Name != "b" || c.Tailnets[0].Conns < 3 || c.TopSources != nil {
		t.Errorf("B's caps %+v, want its own share only", c)
	}
	// pprof: not on B, on A (the first tailnet: the operator's).
	// B's /debug is up (fetched above): one request says.
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+relayB+"/debug/pprof/", nil)
	res, err := viewB.HTTPClient().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusNotFound {
		t.Errorf("B's /debug/pprof/: status %d, want 404", res.StatusCode)
	}
	if body, err := fetchOverTailnet(ctx, viewA, "http://"+relayA+"/debug/pprof/"); err != nil || !strings.Contains(body, "goroutine") {
		t.Errorf("A's /debug/pprof/: %v %.200s", err, body)
	}
	// `check URL` proves a member of B is admitted (routed to B's server
	// and admitted there), as it does for a relay of one tailnet.
	url := args(p.url(""), "-cert-name", p.CertName, "-stun-port", fmt.Sprint(p.STUNPort), "-pings", "3")
	r := runCheck(t, []string{"TAILSCALE_AUTH_KEY=" + ctlB.AuthKey}, append(url, "-control-url", ctlB.URL)...)
	if r.code != 0 || lastLineOf(r.out) != "all good" || !strings.Contains(lineWith(r.out, "✓ member: "), "a member of the tailnet is admitted") {
		t.Errorf("check URL with B's auth key: exit %d:\n%s", r.code, r.out)
	}
	statusA, err := fetchOverTailnet(ctx, viewA, "http://"+relayA+"/debug/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{ctlB.URL, "bcorp", kB1.Public().ShortString()} {
		if strings.Contains(statusA, b) {
			t.Errorf("A's status names %q, of tailnet B", b)
		}
	}
}

// TestTenantIsolationMeshed: two meshed relays, each serving tailnets A
// and B. A client of A on one relay reaches a client of A on the other
// (through A's mesh link); a connected client of B on the other relay is,
// to it, an absent key; B's clients reach each other across the relays.
func TestTenantIsolationMeshed(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	testtailnet.SetTestEnv(t)
	meshKey := newMeshKeyFile(t)
	r1 := newRelay(t, relayOpts{args: []string{"-mesh-psk-file", meshKey}})
	r2 := newRelay(t, relayOpts{args: []string{"-mesh-psk-file", meshKey}})
	fleet := fmt.Sprintf("%s@127.0.0.1:%d,%s@127.0.0.1:%d", r1.CertName, r1.HTTPSPort, r2.CertName, r2.HTTPSPort)
	derpMap := testtailnet.DERPRegion(r1.HTTPSPort, r1.STUNPort, r1.CertName)
	ctlA, ctlB := testtailnet.NewControl(t, derpMap), testtailnet.NewControl(t, derpMap)
	twoTailnets(t, r1, ctlA, ctlB, "relay1-a", "relay1-b")
	twoTailnets(t, r2, ctlA, ctlB, "relay2-a", "relay2-b")
	for _, p := range []*relayProc{r1, r2} {
		p.cmd.Args = append(p.cmd.Args, "-mesh-with", fleet)
		p.start()
	}
	for _, p := range []*relayProc{r1, r2} {
		p.waitLog(`debug: serving on the tailnet only" tailnet=default`, 30*time.Second)
		p.waitLog(`debug: serving on the tailnet only" tailnet=b`, 30*time.Second)
	}

	kA1, kA2, kB1, kB2 := twoClientsEach(t, ctlA, ctlB)
	a1, b1 := mustAdmit(ctx, t, r1, kA1), mustAdmit(ctx, t, r1, kB1)
	a2, b2 := mustAdmit(ctx, t, r2, kA2), mustAdmit(ctx, t, r2, kB2)

	mustDeliver(ctx, t, a1, a2) // through A's mesh link
	mustDeliver(ctx, t, b2, b1) // through B's
	mustDeliver(ctx, t, a2, a1)
	mustNotReach(t, a1, kB2.Public())
	mustNotReach(t, b1, kA2.Public())
	mustNotReach(t, a2, kB1.Public())
	// One link per tailnet and peer, each up.
	for _, p := range []*relayProc{r1, r2} {
		p.waitLog(`relay: mesh peer connected" tailnet=b`, 10*time.Second)
	}

	// B's /debug on relay1: its own mesh link, nothing of A.
	viewB := ctlB.NewNode(t, "viewer-b")
	relay1B := peerIP(ctx, t, viewB, "relay1-b")
	for _, path := range []string{"/debug/status", "/debug/mesh", "/debug/vars"} {
		body, err := fetchOverTailnet(ctx, viewB, "http://"+relay1B+path)
		if err != nil {
			t.Fatalf("B's %s on relay1: %v", path, err)
		}
		for _, a := range []string{ctlA.URL, `"default"`, "tailnet=default", "acorp", kA1.Public().ShortString(), kA2.Public().ShortString()} {
			if strings.Contains(body, a) {
				t.Errorf("B's %s on relay1 names %q, of tailnet A", path, a)
			}
		}
		if path == "/debug/status" {
			var st debugsrv.Status
			if err := json.Unmarshal([]byte(body), &st); err != nil {
				t.Fatal(err)
			}
			if len(st.Mesh) != 1 || st.Mesh[0].State != "connected" || !strings.Contains(st.Mesh[0].Peer, fmt.Sprint(r2.HTTPSPort)) {
				t.Errorf("B's mesh links on relay1: %+v, want its one link to relay2, connected", st.Mesh)
			}
		}
	}
}
