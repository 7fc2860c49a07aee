package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"os/exec"
	"reflect"
	"strings"
	"testing"
	"time"

	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/internal/testpolicy"
	"github.com/tailderp/tailderp/internal/testtailnet"
	"github.com/tailderp/tailderp/relay"
)

// decodeStrictly decodes b into v, refusing unknown fields and trailing
// data: a DERPMap as strict a consumer as Headscale would read it.
func decodeStrictly(t *testing.T, b []byte, v any) {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	if dec.More() {
		t.Fatalf("more after the JSON value: %s", b)
	}
}

// TestDERPMapJSONIsTheRegion: the running binary's /derpmap.json decodes
// strictly into a tailcfg.DERPMap, holds exactly the region `tailderp
// derpmap` prints inside "derpMap", and is all a tailnet needs: clients
// whose control server hands out only that map (nothing added by hand)
// reach each other through the relay.
// servedDERPMap is p's /derpmap.json, served over HTTPS and decoded
// strictly, and its text.
func servedDERPMap(ctx context.Context, t *testing.T, p *relayProc) (tailcfg.DERPMap, string) {
	t.Helper()
	status, body := get(ctx, t, publicClient(), p.url(relay.DERPMapPath))
	if status != http.StatusOK {
		t.Fatalf("GET %s: %d %s", relay.DERPMapPath, status, body)
	}
	var served tailcfg.DERPMap
	decodeStrictly(t, []byte(body), &served)
	return served, body
}

func TestDERPMapJSONIsTheRegion(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	testtailnet.SetTestEnv(t)
	p := newRelay(t, relayOpts{args: []string{"-verify-clients=false"}})
	p.start()

	served, body := servedDERPMap(ctx, t, p)

	// The same region as `tailderp derpmap` prints for this relay (it
	// finds the running server's serving.json in the state directory).
	cmd := exec.CommandContext(ctx, binary, "derpmap", "-state-dir", p.StateDir, "-hostname", "127.0.0.1", "-certmode", "manual", "-verify-clients=false")
	cmd.Env = append(cmd.Environ(), "TS_NO_LOGS_NO_SUPPORT=true")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("tailderp derpmap: %v\n%s", err, out)
	}
	var printed struct {
		DERPMap struct {
			OmitDefaultRegions bool
			Regions            map[int]*tailcfg.DERPRegion
		} `json:"derpMap"`
	}
	decodeStrictly(t, out, &printed)
	if !reflect.DeepEqual(served.Regions, printed.DERPMap.Regions) {
		t.Fatalf("/derpmap.json serves %s\nbut tailderp derpmap prints %s", body, out)
	}
	r := served.Regions[900]
	if r == nil || len(r.Nodes) != 1 || r.Nodes[0].CertName != p.CertName || r.Nodes[0].DERPPort != p.HTTPSPort || r.Nodes[0].STUNPort != p.STUNPort {
		t.Fatalf("region 900 %s: want one node with the relay's pin %s, DERP port %d, STUN port %d", body, p.CertName, p.HTTPSPort, p.STUNPort)
	}

	// A tailnet given only that map: its clients relay through tailderp
	// (SetTestEnv forces DERP; the map has no other relay).
	ctl := testtailnet.NewControl(t, &served)
	a := ctl.NewNode(t, "a")
	b := ctl.NewNode(t, "b")
	mustSayHello(ctx, t, b, a, "a")
	// Cheap to poll: the ETag answers 304.
	res, err := publicClient().Do(func() *http.Request {
		req, _ := http.NewRequestWithContext(ctx, "GET", p.url(relay.DERPMapPath), nil)
		return req
	}())
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if status, _ := get(ctx, t, publicClient(), p.url(relay.DERPMapPath), "If-None-Match", res.Header.Get("ETag")); status != http.StatusNotModified {
		t.Errorf("GET with the current ETag: %d, want 304", status)
	}
}

// TestRegisterKeepsThePolicyFile: a relay started with -register writes
// its region into the tailnet policy file through the API (a loopback
// stand-in built from the API's contract), keeping the rest of the file,
// says so in one line, and never prints the API key.
func TestRegisterKeepsThePolicyFile(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	api := testpolicy.New(t, testpolicy.PolicyFile)
	p := newRelay(t, relayOpts{
		args: []string{"-verify-clients=false", "-register", "-api-url", api.URL(), "-tailnet", testpolicy.Tailnet},
		env:  []string{"TAILSCALE_API_KEY=" + testpolicy.APIKey},
	})
	p.start()
	p.waitLog("policy file: region 900 written", 30*time.Second)

	status, body := get(ctx, t, publicClient(), p.url(relay.DERPMapPath))
	if status != http.StatusOK {
		t.Fatalf("GET %s: %d", relay.DERPMapPath, status)
	}
	var served tailcfg.DERPMap
	decodeStrictly(t, []byte(body), &served)
	written := testpolicy.Regions(t, []byte(api.File()))["900"]
	if !reflect.DeepEqual(written, served.Regions[900]) {
		t.Fatalf("the policy file holds region 900 %+v, the relay serves %s", written, body)
	}
	if n := api.Calls("written"); n != 1 {
		t.Errorf("%d writes, want 1", n)
	}
	// Everything else in the file is kept byte for byte: the file is the
	// stand-in's with region 900 added, which leaves its comments.
	if !strings.Contains(api.File(), "// Declare static groups of users.") {
		t.Error("the policy file lost its comments")
	}
	if strings.Contains(p.proc.Output.String(), testpolicy.APIKey) {
		t.Error("the relay's output holds the API key")
	}
}
