package testtailnet

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"tailscale.com/derp/derpserver"
	"tailscale.com/net/stunserver"
	"tailscale.com/tsnet"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// startDERP runs upstream's DERP server (derpserver.Handler over HTTPS with
// httptest's self-signed certificate) and a STUN server, both on 127.0.0.1,
// standing in for the relay under test. Both are closed by t.Cleanup, after
// any node started later.
func startDERP(t *testing.T) (d *derpserver.Server, derpPort, stunPort int) {
	t.Helper()
	logf := testLogf(t)

	d = derpserver.New(key.NewNode(), logf)
	hs := httptest.NewUnstartedServer(derpserver.Handler(d))
	hs.Config.ErrorLog = logger.StdLogger(logf)
	// DERP is an HTTP/1.1 Upgrade; make sure HTTP/2 is never negotiated.
	hs.Config.TLSNextProto = map[string]func(*http.Server, *tls.Conn, http.Handler){}
	hs.StartTLS()
	t.Cleanup(func() {
		hs.CloseClientConnections()
		hs.Close()
		d.Close()
	})

	ctx, cancel := context.WithCancel(context.Background())
	stun := stunserver.New(ctx)
	if err := stun.Listen("127.0.0.1:0"); err != nil {
		cancel()
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		stun.Serve()
	}()
	t.Cleanup(func() {
		cancel() // closes the UDP socket, which ends Serve
		<-served
	})

	derpPort = hs.Listener.Addr().(*net.TCPAddr).Port
	stunPort = stun.LocalAddr().(*net.UDPAddr).Port
	return d, derpPort, stunPort
}

// packetsRelayed returns how many non-disco packets (WireGuard data) d has
// received from clients, from its "counter_packets_received_kind" metric.
func packetsRelayed(t *testing.T, d *derpserver.Server) int64 {
	t.Helper()
	var vars struct {
		Kinds map[string]int64 `json:"counter_packets_received_kind"`
	}
	if err := json.Unmarshal([]byte(d.ExpVar(false).String()), &vars); err != nil {
		t.Fatalf("derp metrics: %v", err)
	}
	return vars.Kinds["other"]
}

func TestTwoNodesThroughDERP(t *testing.T) {
	SetTestEnv(t)
	d, derpPort, stunPort := startDERP(t)

	start := time.Now()
	ctl := NewControl(t, DERPRegion(derpPort, stunPort, ""))
	a := ctl.NewNode(t, "a")
	tA := time.Since(start)
	b := ctl.NewNode(t, "b")
	tUp := time.Since(start)

	ka, kb := NodeKey(t, a), NodeKey(t, b)
	if ka == kb {
		t.Fatalf("both nodes have key %v", ka)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := AwaitPeer(ctx, a, kb); err != nil {
		t.Fatal(err)
	}
	if err := AwaitPeer(ctx, b, ka); err != nil {
		t.Fatal(err)
	}
	tPeers := time.Since(start)

	// Both nodes make the only region their home and connect to it. Wait
	// for that before sending: a packet for a node not yet connected is
	// dropped by the relay, and WireGuard would only retry its handshake
	// after 5s.
	for !d.IsClientConnectedForTest(ka) || !d.IsClientConnectedForTest(kb) {
		if ctx.Err() != nil {
			t.Fatalf("DERP server never saw both nodes: a=%v b=%v",
				d.IsClientConnectedForTest(ka), d.IsClientConnectedForTest(kb))
		}
		time.Sleep(5 * time.Millisecond)
	}
	tDERP := time.Since(start)

	// Node a serves HTTP on its tailnet port 80 and tells the caller who it
	// is, as seen through a's netmap.
	lcA, err := a.LocalClient()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := a.Listen("tcp", ":80")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		who, err := lcA.WhoIs(r.Context(), r.RemoteAddr)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprintf(w, "hello %s from a", who.Node.Key)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	before := packetsRelayed(t, d)
	ipA, _ := a.TailscaleIPs()
	if !ipA.IsValid() {
		t.Fatal("node a has no Tailscale IPv4")
	}
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+ipA.String()+"/", nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := b.HTTPClient().Do(req)
	if err != nil {
		t.Fatalf("b -> a: %v", err)
	}
	body, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	tFetch := time.Since(start)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("b -> a: %s: %s", res.Status, body)
	}
	if want := fmt.Sprintf("hello %s from a", kb); string(body) != want {
		t.Fatalf("b -> a: body %q, want %q", body, want)
	}

	// The fetch crossed the DERP server: it relayed WireGuard packets.
	if after := packetsRelayed(t, d); after <= before {
		t.Errorf("DERP server relayed no data packets during the fetch (before %d, after %d)", before, after)
	} else {
		t.Logf("DERP server relayed %d data packets for the fetch", after-before)
	}

	t.Logf("timings from start: control + node a up %v; + node b up %v; peers in both netmaps %v; both on DERP %v; HTTP fetch done %v",
		tA.Round(time.Millisecond), tUp.Round(time.Millisecond), tPeers.Round(time.Millisecond),
		tDERP.Round(time.Millisecond), tFetch.Round(time.Millisecond))
}

func TestWrongAuthKey(t *testing.T) {
	SetTestEnv(t)
	_, derpPort, stunPort := startDERP(t)
	ctl := NewControl(t, DERPRegion(derpPort, stunPort, ""))

	logf := testLogf(t)
	s := &tsnet.Server{
		Dir:        t.TempDir(),
		Hostname:   "intruder",
		ControlURL: ctl.URL,
		AuthKey:    "tskey-auth-wrong",
		Ephemeral:  true,
		Logf:       logf,
		UserLogf:   logf,
	}
	t.Cleanup(func() { s.Close() })

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	_, err := s.Up(ctx)
	elapsed := time.Since(start)
	if err == nil {
		t.Fatal("Up with a wrong auth key succeeded")
	}
	t.Logf("Up failed after %v: %v", elapsed.Round(time.Millisecond), err)
	// testcontrol answers the register request with Error "invalid
	// authkey"; the control client passes it up as a user-visible error
	// and tsnet.Up returns it at once instead of waiting out ctx.
	if errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
		t.Fatalf("Up timed out instead of failing on the refusal: %v", err)
	}
	if want := "tsnet.Up: backend: invalid authkey"; err.Error() != want {
		t.Errorf("Up error = %q, want %q", err, want)
	}
	if n := ctl.Server.NumNodes(); n != 0 {
		t.Errorf("control registered %d nodes, want 0", n)
	}
}

func TestDERPRegion(t *testing.T) {
	insecure := DERPRegion(1234, 5678, "")
	n := insecure.Regions[RegionID].Nodes[0]
	if !n.InsecureForTests || n.CertName != "" {
		t.Errorf("no certName: InsecureForTests=%v CertName=%q", n.InsecureForTests, n.CertName)
	}
	if n.HostName != "127.0.0.1" || n.IPv4 != "127.0.0.1" || n.IPv6 != "none" ||
		n.DERPPort != 1234 || n.STUNPort != 5678 || n.RegionID != RegionID {
		t.Errorf("node = %+v", n)
	}
	if r := insecure.Regions[RegionID]; r.RegionCode != "test" || len(insecure.Regions) != 1 {
		t.Errorf("regions = %+v", insecure.Regions)
	}

	pin := "sha256-raw:" + strings.Repeat("ab", 32)
	pinned := DERPRegion(1234, 5678, pin).Regions[RegionID].Nodes[0]
	if pinned.InsecureForTests || pinned.CertName != pin {
		t.Errorf("certName: InsecureForTests=%v CertName=%q", pinned.InsecureForTests, pinned.CertName)
	}
}
