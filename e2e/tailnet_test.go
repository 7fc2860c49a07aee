package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/tsnet"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/check"
	"github.com/tailderp/tailderp/debugsrv"
	"github.com/tailderp/tailderp/internal/testtailnet"
)

// tailnetWithRelay starts tailderp in a fresh tailnet and waits for its
// node to be up. env and args go to tailderp.
func tailnetWithRelay(t *testing.T, o relayOpts) (*relayProc, *testtailnet.Control) {
	t.Helper()
	testtailnet.SetTestEnv(t)
	p := newRelay(t, o)
	ctl := testtailnet.NewControl(t, testtailnet.DERPRegion(p.HTTPSPort, p.STUNPort, p.CertName))
	p.cmd.Env = append(p.cmd.Env, "TAILSCALE_AUTH_KEY="+ctl.AuthKey, "TAILSCALE_CONTROL_URL="+ctl.URL)
	p.start()
	p.waitNodeRunning()
	return p, ctl
}

// serveHello serves "hello from <name>" over HTTP on node's tailnet port 80.
func serveHello(t *testing.T, n *tsnet.Server, name string) {
	t.Helper()
	ln, err := n.Listen("tcp", ":80")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello from "+name)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

// sayHello asks from for to's hello page (see serveHello) over the
// tailnet and checks the answer: it returns once the two talk through the
// relay, or the error that says why not.
func sayHello(ctx context.Context, from, to *tsnet.Server, name string) error {
	ip, _ := to.TailscaleIPs()
	body, err := fetchOverTailnet(ctx, from, "http://"+ip.String()+"/")
	if err != nil {
		return fmt.Errorf("hello from %s: %w", name, err)
	}
	if want := "hello from " + name; body != want {
		return fmt.Errorf("hello from %s: body %q, want %q", name, body, want)
	}
	return nil
}

// mustSayHello serves hello on to (as name) and fetches it from from,
// through the relay once from sees to as a peer; it fails the test if
// either does not happen within ctx.
func mustSayHello(ctx context.Context, t *testing.T, from, to *tsnet.Server, name string) {
	t.Helper()
	serveHello(t, to, name)
	if err := testtailnet.AwaitPeer(ctx, from, testtailnet.NodeKey(t, to)); err != nil {
		t.Fatal(err)
	}
	if err := sayHello(ctx, from, to, name); err != nil {
		t.Fatal(err)
	}
}

// fetchOverTailnet GETs url through node, retrying until it answers 200 or
// ctx ends: the relay must first have both ends connected.
func fetchOverTailnet(ctx context.Context, node *tsnet.Server, url string) (string, error) {
	c := node.HTTPClient()
	var lastErr error
	for ctx.Err() == nil {
		rctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		req, _ := http.NewRequestWithContext(rctx, "GET", url, nil)
		res, err := c.Do(req)
		if err == nil {
			b, rerr := io.ReadAll(res.Body)
			res.Body.Close()
			cancel()
			if rerr == nil && res.StatusCode == 200 {
				return string(b), nil
			}
			lastErr = fmt.Errorf("status %d, read %v", res.StatusCode, rerr)
		} else {
			cancel()
			lastErr = err
		}
		time.Sleep(100 * time.Millisecond)
	}
	return "", fmt.Errorf("GET %s: %w (last error: %v)", url, ctx.Err(), lastErr)
}

// relayTailnetIP finds tailderp's node among node's peers.
func relayTailnetIP(ctx context.Context, t *testing.T, node *tsnet.Server) string {
	t.Helper()
	return peerIP(ctx, t, node, "127-0-0-1")
}

// peerIP finds the peer named hostname among node's peers and returns its
// tailnet IPv4 address.
func peerIP(ctx context.Context, t *testing.T, node *tsnet.Server, hostname string) string {
	t.Helper()
	lc, err := node.LocalClient()
	if err != nil {
		t.Fatal(err)
	}
	for ctx.Err() == nil {
		st, err := lc.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range st.Peer {
			if p.HostName == hostname && len(p.TailscaleIPs) > 0 {
				return p.TailscaleIPs[0].String()
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("peer %s never appeared among the peers", hostname)
	return ""
}

// metric returns the value of the Prometheus sample name in body, or -1.
func metric(body, name string) float64 {
	for line := range strings.SplitSeq(body, "\n") {
		if rest, ok := strings.CutPrefix(line, name+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err == nil {
				return v
			}
		}
	}
	return -1
}

// strangerRefused connects a derphttp client with a fresh key to the
// relay and reports whether the relay closed it without relaying.
func connectStranger(ctx context.Context, t *testing.T, p *relayProc) (key.NodePublic, error) {
	t.Helper()
	k := key.NewNode()
	// Dial the way a Tailscale client does: by DERP region, with the
	// relay's self-signed certificate pinned by CertName.
	region := testtailnet.DERPRegion(p.HTTPSPort, p.STUNPort, p.CertName).Regions[testtailnet.RegionID]
	c := derphttp.NewRegionClient(k, t.Logf, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	defer c.Close()
	// The relay decides after the client sends its key: an admitted
	// client gets ServerInfo, a refused one is disconnected. 10 s is longer
	// than verify's DefaultNotReadyWait: a relay whose node has no live map
	// yet holds a stranger up to 4 s before refusing.
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return k.Public(), check.ConnectDERP(cctx, c)
}

// TestTailnetThroughTailderp is the heart of tailderp: two nodes of the
// tailnet talk through it (no direct path), strangers and another
// tailnet's node are refused, and /debug is on the tailnet only.
func TestTailnetThroughTailderp(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	p, ctl := tailnetWithRelay(t, relayOpts{httpPort: true})

	a := ctl.NewNode(t, "a")
	b := ctl.NewNode(t, "b")
	mustSayHello(ctx, t, b, a, "a")

	// /debug from the tailnet.
	relayIP := relayTailnetIP(ctx, t, b)
	varz, err := fetchOverTailnet(ctx, b, "http://"+relayIP+"/debug/varz")
	if err != nil {
		t.Fatal(err)
	}
	if got := metric(varz, `tailderp_admission_admitted{tailnet="default"}`); got < 2 {
		t.Errorf("tailderp_admission_admitted{tailnet=default} = %v, want >= 2 (a and b)\n%s", got, varz)
	}
	for _, m := range []string{`tailderp_node_control_reachable`, `tailderp_node_admission_source{source="live"}`} {
		if got := metric(varz, m); got != 1 {
			t.Errorf("%s = %v, want 1", m, got)
		}
	}
	if got := metric(varz, "tailderp_relay_derp_packets_sent"); got <= 0 {
		t.Errorf("tailderp_relay_derp_packets_sent = %v, want > 0: traffic did not go through the relay", got)
	}
	if got := metric(varz, `tailderp_node_state{state="running"}`); got != 1 {
		t.Errorf(`node state running = %v, want 1`, got)
	}
	if _, err := fetchOverTailnet(ctx, b, "http://"+relayIP+"/metrics"); err != nil {
		t.Errorf("/metrics on the tailnet: %v", err)
	}
	clients, err := fetchOverTailnet(ctx, b, "http://"+relayIP+"/debug/clients")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(clients, testtailnet.NodeKey(t, a).ShortString()) {
		t.Errorf("/debug/clients does not list a:\n%s", clients)
	}

	// The status page, at a glance and as JSON.
	page, err := fetchOverTailnet(ctx, b, "http://"+relayIP+"/debug/")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"All is well", "Clients connected now", "Certificate", "127.0.0.1, valid until", testtailnet.NodeKey(t, a).ShortString()} {
		if !strings.Contains(page, want) {
			t.Errorf("/debug/ does not show %q:\n%s", want, page)
		}
	}
	stJSON, err := fetchOverTailnet(ctx, b, "http://"+relayIP+"/debug/status")
	if err != nil {
		t.Fatal(err)
	}
	var st debugsrv.Status
	if err := json.Unmarshal([]byte(stJSON), &st); err != nil {
		t.Fatalf("/debug/status: %v\n%s", err, stJSON)
	}
	if len(st.Tailnets) != 1 || st.Tailnets[0].State != "running" || !st.Tailnets[0].ControlReachable || st.Tailnets[0].AdmissionFrom != "live" ||
		!st.Certificate.Serving || st.Certificate.DaysLeft < 300 || len(st.Problems) != 0 || st.Admission.Admitted < 2 {
		t.Errorf("/debug/status: %s", stJSON)
	}

	// /debug is not public, whatever the request claims.
	pc := publicClient()
	for _, u := range []string{p.url("/debug/varz"), p.url("/debug/"), p.url("/metrics"),
		fmt.Sprintf("http://127.0.0.1:%d/debug/varz", p.HTTPPort), fmt.Sprintf("http://127.0.0.1:%d/metrics", p.HTTPPort)} {
		for _, xff := range []string{"", "100.64.0.1"} {
			code, _ := get(ctx, t, pc, u, "X-Forwarded-For", xff)
			if code != 404 {
				t.Errorf("GET %s (X-Forwarded-For %q) = %d, want 404", u, xff, code)
			}
		}
	}

	// A stranger with a random key is refused.
	stranger, err := connectStranger(ctx, t, p)
	if err == nil {
		t.Fatal("stranger's connection stayed open: not refused")
	}
	p.waitLog("reason="+"not_in_tailnet", 5*time.Second)
	if !strings.Contains(p.proc.Output.String(), stranger.ShortString()) {
		t.Errorf("refusal log does not name the stranger's key %s", stranger.ShortString())
	}

	// A node of another tailnet whose DERP map also names tailderp is refused.
	other := testtailnet.NewControl(t, testtailnet.DERPRegion(p.HTTPSPort, p.STUNPort, p.CertName))
	foreign := other.NewNode(t, "foreign")
	fk := testtailnet.NodeKey(t, foreign)
	p.waitLog("key="+fk.ShortString(), 15*time.Second)

	varz, err = fetchOverTailnet(ctx, b, "http://"+relayIP+"/debug/varz")
	if err != nil {
		t.Fatal(err)
	}
	if got := metric(varz, `tailderp_admission_refused{reason="not_in_tailnet"}`); got < 2 {
		t.Errorf("refused not_in_tailnet = %v, want >= 2 (stranger and foreign node)", got)
	}
	if got := metric(varz, `tailderp_admission_refused{reason="not_in_tailnet"}`); got < 0 {
		t.Logf("varz:\n%s", varz)
	}

	// SIGTERM: a clean, prompt exit.
	start := time.Now()
	if err := p.stop(); err != nil {
		t.Fatalf("exit after SIGTERM: %v", err)
	}
	if d := time.Since(start); d > 6*time.Second {
		t.Errorf("took %v to exit after SIGTERM", d)
	}
}
