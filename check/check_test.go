package check_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/check"
	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/relay"
	"github.com/tailderp/tailderp/stun"
)

// testRelay is a tailderp relay in this process on 127.0.0.1.
type testRelay struct {
	node tailcfg.DERPNode // as a derpMap would describe it
	pin  string           // CertName of its certificate
}

type relayOpts struct {
	certs   relay.Certificates // default: self-signed for 127.0.0.1
	admit   relay.Admitter     // nil: open relay
	meshKey string
	noSTUN  bool
}

// denyAll refuses every client, like a verifying relay refuses strangers.
type denyAll struct{}

func (denyAll) Admit(context.Context, key.NodePublic, netip.Addr) bool { return false }

// memCert serves one certificate held in memory.
type memCert struct{ c *tls.Certificate }

func (m memCert) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) { return m.c, nil }
func (m memCert) HTTPHandler(h http.Handler) http.Handler                       { return h }
func (m memCert) Current() (relay.CertInfo, bool)                               { return relay.CertInfo{}, false }

func startRelay(t *testing.T, o relayOpts) *testRelay {
	t.Helper()
	tr := &testRelay{}
	if o.certs == nil {
		sc, err := relay.NewSelfSigned("127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		info, _ := sc.Current()
		tr.pin = info.CertName
		o.certs = sc
	}
	s := &relay.Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: o.certs, PrivateKey: key.NewNode(), Admitter: o.admit}
	if o.meshKey != "" {
		mk, err := key.ParseDERPMesh(o.meshKey)
		if err != nil {
			t.Fatal(err)
		}
		s.MeshKey = mk
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Close(ctx)
	})
	tr.node = tailcfg.DERPNode{
		Name: "900t", RegionID: 900, HostName: "127.0.0.1", IPv4: "127.0.0.1", IPv6: "none",
		DERPPort: s.LocalAddr().(*net.TCPAddr).Port, STUNPort: -1, CertName: tr.pin,
	}
	if !o.noSTUN {
		ss := &stun.Server{Addr: "127.0.0.1:0"}
		if err := ss.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ss.Close() })
		tr.node.STUNPort = ss.LocalAddr().(*net.UDPAddr).Port
	}
	return tr
}

func run(t *testing.T, tg check.Target) check.Report {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r := check.Run(ctx, tg)
	var buf bytes.Buffer
	r.WriteText(&buf)
	t.Logf("report:\n%s", buf.String())
	return r
}

func result(t *testing.T, r check.Report, name string) check.Result {
	t.Helper()
	for _, res := range r {
		if res.Name == name {
			return res
		}
	}
	t.Fatalf("no %q result in %+v", name, r)
	return check.Result{}
}

// wantOnlyFailure checks that name is the one line marked ✗ (or ⚠), with
// errSubstr in it, and the report fails.
func wantOnlyFailure(t *testing.T, r check.Report, name, mark, errSubstr string) {
	t.Helper()
	if r.OK() {
		t.Fatal("report OK, want a failure")
	}
	failed := r.Failed()
	if len(failed) != 1 || failed[0].Name != name {
		t.Fatalf("failed lines %+v, want only %q", failed, name)
	}
	if got := failed[0].Mark(); got != mark {
		t.Errorf("%s marked %s, want %s", name, got, mark)
	}
	if !strings.Contains(failed[0].Err, errSubstr) {
		t.Errorf("%s error %q, want it to contain %q", name, failed[0].Err, errSubstr)
	}
	var buf bytes.Buffer
	r.WriteText(&buf)
	if !strings.Contains(buf.String(), mark+" "+name+": ") {
		t.Errorf("text report does not mark the line %s %s:\n%s", mark, name, buf.String())
	}
}

func TestRunOpenRelayPinned(t *testing.T) {
	tr := startRelay(t, relayOpts{})
	r := run(t, check.Target{Node: tr.node, Pings: 5, Expect: check.ExpectOpen})
	if !r.OK() {
		t.Fatalf("report failed: %+v", r.Failed())
	}
	names := []string{check.NameDNS, check.NameTLS, check.NameCertificate, check.NameGenerate204, check.NameAdmission, check.NameMember, check.NameRelay, check.NameLatency, check.NameSTUN}
	if len(r) != len(names) {
		t.Fatalf("%d results, want %d", len(r), len(names))
	}
	for i, n := range names {
		if r[i].Name != n || r[i].Mark() != "✓" {
			t.Errorf("result %d = %s %s, want ✓ %s", i, r[i].Mark(), r[i].Name, n)
		}
	}
	if v := result(t, r, check.NameRelay).Value; !strings.Contains(v, "exchanged 5 packets") {
		t.Errorf("relay value %q", v)
	}
	if v := result(t, r, check.NameAdmission).Value; !strings.Contains(v, "open relay") {
		t.Errorf("admission value %q", v)
	}
	// An open relay admits any key: members too, without a member key.
	if m := result(t, r, check.NameMember); !strings.Contains(m.Value, "admits any key") || r.Member() != check.MemberAdmitted || !r.AllGood() {
		t.Errorf("member = %+v, outcome %q, AllGood %v; want admitted (an open relay)", m, r.Member(), r.AllGood())
	}
	var js bytes.Buffer
	if err := r.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var decoded struct {
		OK      bool
		Member  string
		AllGood bool `json:"all_good"`
		Results []check.Result
	}
	if err := json.Unmarshal(js.Bytes(), &decoded); err != nil || !decoded.OK || decoded.Member != "admitted" || !decoded.AllGood || len(decoded.Results) != len(names) {
		t.Fatalf("JSON %s: %v", js.String(), err)
	}
}

func TestRunRefusesStrangers(t *testing.T) {
	tr := startRelay(t, relayOpts{admit: denyAll{}})
	r := run(t, check.Target{Node: tr.node, Expect: check.ExpectRefused, Pings: 3})
	if !r.OK() {
		t.Fatalf("report failed: %+v", r.Failed())
	}
	adm := result(t, r, check.NameAdmission)
	if adm.Mark() != "✓" || !strings.Contains(adm.Value, "refuses clients outside the tailnet") {
		t.Errorf("admission = %+v", adm)
	}
	if rel := result(t, r, check.NameRelay); !rel.Skipped || !rel.OK || !strings.Contains(rel.Value, "-mesh-key-file") {
		t.Errorf("relay = %+v, want skipped (not applicable) with a hint", rel)
	}
	// No member key: the report passes, but does not claim members get in.
	if m := result(t, r, check.NameMember); m.Mark() != "–" || !strings.Contains(m.Value, "not tested") {
		t.Errorf("member = %+v, want skipped: not tested", m)
	}
	if r.Member() != check.MemberNotTested || r.AllGood() {
		t.Errorf("outcome %q, AllGood %v; want not-tested, not all good", r.Member(), r.AllGood())
	}
}

// admitKeys admits the keys in it, each only from its after-th connect
// (counted per key) on: before that it refuses them, as a relay whose node
// has not yet received the map with them does. Everyone else is refused.
type admitKeys struct {
	after int
	mu    sync.Mutex
	seen  map[key.NodePublic]int
	keys  map[key.NodePublic]bool
}

func newAdmitKeys(after int, ks ...key.NodePublic) *admitKeys {
	a := &admitKeys{after: after, seen: map[key.NodePublic]int{}, keys: map[key.NodePublic]bool{}}
	for _, k := range ks {
		a.keys[k] = true
	}
	return a
}

func (a *admitKeys) Admit(_ context.Context, k key.NodePublic, _ netip.Addr) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.seen[k]++
	return a.keys[k] && a.seen[k] >= a.after
}

func (a *admitKeys) connects(k key.NodePublic) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.seen[k]
}

func TestRunMemberAdmitted(t *testing.T) {
	member := key.NewNode()
	tr := startRelay(t, relayOpts{admit: newAdmitKeys(1, member.Public())})
	r := run(t, check.Target{Node: tr.node, Expect: check.ExpectRefused, MemberKey: member, Pings: 3})
	if !r.OK() || !r.AllGood() || r.Member() != check.MemberAdmitted {
		t.Fatalf("OK %v, AllGood %v, member %q; want all good: %+v", r.OK(), r.AllGood(), r.Member(), r.Failed())
	}
	want := "a member of the tailnet is admitted (node " + member.Public().ShortString() + ")"
	if m := result(t, r, check.NameMember); m.Mark() != "✓" || m.Value != want {
		t.Errorf("member = %+v, want ✓ %q", m, want)
	}
	var buf bytes.Buffer
	r.WriteText(&buf)
	if !strings.Contains(buf.String(), "✓ member: "+want) {
		t.Errorf("text report:\n%s", buf.String())
	}
}

// TestRunMemberLearntLate: a member refused at first (the relay's node has
// not yet got the map that has it) is retried, and admitted.
func TestRunMemberLearntLate(t *testing.T) {
	member := key.NewNode()
	adm := newAdmitKeys(3, member.Public())
	tr := startRelay(t, relayOpts{admit: adm})
	r := run(t, check.Target{Node: tr.node, MemberKey: member, Pings: 3})
	if !r.AllGood() {
		t.Fatalf("report not all good: %+v", r.Failed())
	}
	if m := result(t, r, check.NameMember); !strings.Contains(m.Value, "after 2 refusals") {
		t.Errorf("member = %+v, want it to say it was admitted after 2 refusals", m)
	}
	if n := adm.connects(member.Public()); n != 3 {
		t.Errorf("the member connected %d times, want 3", n)
	}
}

func TestRunMemberRefused(t *testing.T) {
	member := key.NewNode()
	adm := newAdmitKeys(1) // knows no key: a relay whose node has no map
	tr := startRelay(t, relayOpts{admit: adm})
	r := run(t, check.Target{Node: tr.node, MemberKey: member, MemberWait: 600 * time.Millisecond, Pings: 3})
	wantOnlyFailure(t, r, check.NameMember, "✗", "a member of the tailnet is refused (node "+member.Public().ShortString())
	m := result(t, r, check.NameMember)
	for _, cause := range []string{"not logged in or cannot reach its control server", "tailderp check -local", "another tailnet", "policy hides this member"} {
		if !strings.Contains(m.Err, cause) {
			t.Errorf("member error %q does not name the cause %q", m.Err, cause)
		}
	}
	if r.Member() != check.MemberRefused || r.AllGood() {
		t.Errorf("outcome %q, AllGood %v", r.Member(), r.AllGood())
	}
	// Retried within MemberWait (every 250 ms), not given up at once.
	if n := adm.connects(member.Public()); n < 2 {
		t.Errorf("the member connected %d times, want retries", n)
	}
}

func TestRunMeshKeyOnVerifyingRelay(t *testing.T) {
	mk, meshKey := testutil.NewMeshKey(t)
	tr := startRelay(t, relayOpts{admit: denyAll{}, meshKey: mk})
	r := run(t, check.Target{Node: tr.node, Expect: check.ExpectRefused, MeshKey: meshKey, Pings: 3})
	if !r.OK() {
		t.Fatalf("report failed: %+v", r.Failed())
	}
	if rel := result(t, r, check.NameRelay); rel.Skipped || !strings.Contains(rel.Value, "mesh-key clients") {
		t.Errorf("relay = %+v, want an exchange by mesh clients", rel)
	}
}

// TestRunOpenRelayFailsByDefault: an open relay is a finding unless the
// check is told it is meant to be open.
func TestRunOpenRelayFailsByDefault(t *testing.T) {
	tr := startRelay(t, relayOpts{})
	r := run(t, check.Target{Node: tr.node, Pings: 3}) // the zero Expect
	wantOnlyFailure(t, r, check.NameAdmission, "✗", "open to anyone")
}

// TestRunExpectOpenOnVerifyingRelay: told to expect an open relay, the
// check fails on one that refuses strangers.
func TestRunExpectOpenOnVerifyingRelay(t *testing.T) {
	tr := startRelay(t, relayOpts{admit: denyAll{}})
	r := run(t, check.Target{Node: tr.node, Expect: check.ExpectOpen, Pings: 3})
	if adm := result(t, r, check.NameAdmission); adm.OK || !strings.Contains(adm.Err, "expected to be open") {
		t.Errorf("admission = %+v, want a failure saying the relay was expected to be open", adm)
	}
}

func TestRunWrongPin(t *testing.T) {
	tr := startRelay(t, relayOpts{})
	n := tr.node
	n.CertName = "sha256-raw:" + strings.Repeat("ab", 32)
	r := run(t, check.Target{Node: n, Pings: 3, Expect: check.ExpectOpen})
	wantOnlyFailure(t, r, check.NameCertificate, "✗", "pin mismatch: the relay presents "+tr.pin)
	if adm := result(t, r, check.NameAdmission); !adm.Skipped {
		t.Errorf("admission = %+v, want skipped (no client can connect)", adm)
	}
}

func TestRunSelfSignedWithoutPin(t *testing.T) {
	tr := startRelay(t, relayOpts{})
	n := tr.node
	n.CertName = ""
	r := run(t, check.Target{Node: n, Pings: 3, Expect: check.ExpectOpen})
	wantOnlyFailure(t, r, check.NameCertificate, "✗", `self-signed: Tailscale clients accept it only pinned, with CertName "`+tr.pin+`"`)
}

func TestRunTrustOnFirstUse(t *testing.T) {
	tr := startRelay(t, relayOpts{})
	n := tr.node
	n.CertName = ""
	r := run(t, check.Target{Node: n, TrustOnFirstUse: true, Pings: 3, Expect: check.ExpectOpen})
	if !r.OK() {
		t.Fatalf("report failed: %+v", r.Failed())
	}
	if v := result(t, r, check.NameCertificate).Value; !strings.Contains(v, tr.pin) {
		t.Errorf("certificate value %q does not show the pin %s", v, tr.pin)
	}
}

// startCASignedRelay starts a relay serving a certificate for relay.test
// from a new private CA ("tailderp test CA"), valid for validFor from an
// hour ago, and returns it with the CA.
func startCASignedRelay(t *testing.T, validFor time.Duration) (*testRelay, *testutil.Cert) {
	t.Helper()
	return startCASignedRelaySpan(t, time.Time{}, time.Now().Add(validFor))
}

// startCASignedRelaySpan is startCASignedRelay for a certificate valid
// from notBefore (zero: an hour ago) to notAfter.
func startCASignedRelaySpan(t *testing.T, notBefore, notAfter time.Time) (*testRelay, *testutil.Cert) {
	t.Helper()
	ca := testutil.NewCert(t, testutil.CertOptions{CommonName: "tailderp test CA", IsCA: true})
	leaf := testutil.NewCert(t, testutil.CertOptions{Names: []string{"relay.test"}, CA: ca, NotBefore: notBefore, NotAfter: notAfter})
	return startRelay(t, relayOpts{certs: memCert{&leaf.TLS}}), ca
}

func TestRunCASignedCertificate(t *testing.T) {
	tr, ca := startCASignedRelay(t, 90*24*time.Hour)
	// As the derpMap would have it: the name, and the address to dial
	// (so nothing is resolved).
	n := tr.node
	n.HostName, n.CertName = "relay.test", ""
	r := run(t, check.Target{Node: n, RootCAs: ca.Pool(), Pings: 3, Expect: check.ExpectOpen})
	if !r.OK() {
		t.Fatalf("report failed: %+v", r.Failed())
	}
	if v := result(t, r, check.NameCertificate).Value; !strings.Contains(v, "valid for relay.test, issued by tailderp test CA") {
		t.Errorf("certificate value %q", v)
	}
}

func TestRunWrongCertName(t *testing.T) {
	tr, ca := startCASignedRelay(t, 90*24*time.Hour)
	n := tr.node // HostName 127.0.0.1: not on the certificate
	n.CertName = ""
	r := run(t, check.Target{Node: n, RootCAs: ca.Pool(), Pings: 3, Expect: check.ExpectOpen})
	wantOnlyFailure(t, r, check.NameCertificate, "✗", "the certificate is for relay.test, not 127.0.0.1")
}

func TestRunCertificateExpiresSoon(t *testing.T) {
	// A 90-day certificate whose renewal did not happen: 20 days left.
	day := 24 * time.Hour
	tr, ca := startCASignedRelaySpan(t, time.Now().Add(-70*day), time.Now().Add(20*day))
	n := tr.node
	n.HostName, n.CertName = "relay.test", ""
	r := run(t, check.Target{Node: n, RootCAs: ca.Pool(), Pings: 3, Expect: check.ExpectOpen})
	wantOnlyFailure(t, r, check.NameCertificate, "⚠", "then Tailscale clients refuse it; renew it: with -certmode letsencrypt the relay renews by itself")
	if v := result(t, r, check.NameCertificate).Value; !strings.Contains(v, "(in 19 days)") {
		t.Errorf("certificate value %q does not say the days left", v)
	}
	// A warning still lets clients in, so the relay is still tested.
	if rel := result(t, r, check.NameRelay); rel.Mark() != "✓" {
		t.Errorf("relay = %+v", rel)
	}
}

// A short-lived certificate (Let's Encrypt's six-day profile, its IP
// certificates) renewed on schedule is not a warning at any age the
// renewal leaves it: renewal tools renew at a third of the lifetime.
func TestRunShortLivedCertificateNotWarned(t *testing.T) {
	tr, ca := startCASignedRelaySpan(t, time.Now().Add(-3*24*time.Hour), time.Now().Add(3*24*time.Hour))
	n := tr.node
	n.HostName, n.CertName = "relay.test", ""
	r := run(t, check.Target{Node: n, RootCAs: ca.Pool(), Pings: 3, Expect: check.ExpectOpen})
	if c := result(t, r, check.NameCertificate); c.Mark() != "✓" {
		t.Errorf("6-day certificate half way through: %+v, want ✓", c)
	}
}

func TestRunSTUNClosed(t *testing.T) {
	tr := startRelay(t, relayOpts{noSTUN: true})
	n := tr.node
	n.STUNPort = testutil.FreePort(t, "udp")
	r := run(t, check.Target{Node: n, Pings: 3, Expect: check.ExpectOpen})
	wantOnlyFailure(t, r, check.NameSTUN, "✗", "no answer")
}

func TestRunSTUNOff(t *testing.T) {
	tr := startRelay(t, relayOpts{noSTUN: true}) // STUNPort -1: the derpMap says no STUN
	r := run(t, check.Target{Node: tr.node, Pings: 3, Expect: check.ExpectOpen})
	if !r.OK() {
		t.Fatalf("report failed: %+v", r.Failed())
	}
	if s := result(t, r, check.NameSTUN); !s.Skipped || s.Mark() != "–" {
		t.Errorf("stun = %+v, want skipped", s)
	}
}

func TestRunStopped(t *testing.T) {
	n := tailcfg.DERPNode{HostName: "127.0.0.1", IPv4: "127.0.0.1", IPv6: "none", DERPPort: testutil.FreePort(t, "tcp"), STUNPort: testutil.FreePort(t, "udp")}
	r := run(t, check.Target{Node: n, Pings: 3, Expect: check.ExpectOpen})
	if r.OK() {
		t.Fatal("report OK against a stopped relay")
	}
	if tl := result(t, r, check.NameTLS); tl.Mark() != "✗" || !strings.Contains(tl.Err, "connection refused") {
		t.Errorf("tls = %+v", tl)
	}
	for _, name := range []string{check.NameCertificate, check.NameGenerate204, check.NameAdmission, check.NameMember, check.NameRelay, check.NameLatency} {
		if res := result(t, r, name); !res.Skipped || res.OK {
			t.Errorf("%s = %+v, want skipped", name, res)
		}
	}
}

func TestParseURL(t *testing.T) {
	tests := []struct {
		in      string
		want    tailcfg.DERPNode
		wantErr string
	}{
		{in: "https://derp.example.com", want: tailcfg.DERPNode{HostName: "derp.example.com"}},
		{in: "derp.example.com:8443", want: tailcfg.DERPNode{HostName: "derp.example.com", DERPPort: 8443}},
		{in: "https://derp.example.com:443/", want: tailcfg.DERPNode{HostName: "derp.example.com"}},
		{in: "https://192.0.2.1:3340", want: tailcfg.DERPNode{HostName: "192.0.2.1", IPv4: "192.0.2.1", IPv6: "none", DERPPort: 3340}},
		{in: "https://[2001:db8::1]", want: tailcfg.DERPNode{HostName: "2001:db8::1", IPv4: "none", IPv6: "2001:db8::1"}},
		{in: "http://derp.example.com", wantErr: "want https"},
		{in: "https://derp.example.com/some/path", wantErr: "without a path"},
		{in: "https://derp.example.com:99999", wantErr: "bad port"},
	}
	for _, tt := range tests {
		got, err := check.ParseURL(tt.in)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("ParseURL(%q) error %v, want %q", tt.in, err, tt.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseURL(%q): %v", tt.in, err)
			continue
		}
		got.Name, got.RegionID = "", 0
		if got != tt.want {
			t.Errorf("ParseURL(%q) = %+v, want %+v", tt.in, got, tt.want)
		}
	}
}

func TestPercentiles(t *testing.T) {
	var ds []time.Duration
	for i := 100; i >= 1; i-- {
		ds = append(ds, time.Duration(i))
	}
	p := check.Percentiles(ds)
	if p.P50 != 50 || p.P99 != 99 || p.Max != 100 || p.N != 100 {
		t.Errorf("Percentiles = %+v", p)
	}
	if ds[0] != 100 {
		t.Error("Percentiles sorted its input")
	}
	if p := check.Percentiles([]time.Duration{7}); p.P50 != 7 || p.P99 != 7 {
		t.Errorf("one value: %+v", p)
	}
}

func TestLocal(t *testing.T) {
	tr := startRelay(t, relayOpts{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r := check.Local(ctx, check.LocalTarget{
		HTTPSAddr: net.JoinHostPort("", strconv.Itoa(tr.node.DERPPort)),
		STUNAddr:  net.JoinHostPort("0.0.0.0", strconv.Itoa(tr.node.STUNPort)),
	})
	if !r.OK() || len(r) != 2 {
		t.Fatalf("Local = %+v", r)
	}
	r = check.Local(ctx, check.LocalTarget{HTTPSAddr: net.JoinHostPort("", strconv.Itoa(tr.node.DERPPort)), STUNAddr: net.JoinHostPort("", strconv.Itoa(testutil.FreePort(t, "udp")))})
	if r.OK() || r[1].OK {
		t.Fatalf("Local with STUN closed = %+v", r)
	}
}

// Load.

func TestLoadSmoke(t *testing.T) {
	tr := startRelay(t, relayOpts{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	n := tr.node
	res, err := check.Load(ctx, check.LoadConfig{
		Region:           &tailcfg.DERPRegion{RegionID: 900, Nodes: []*tailcfg.DERPNode{&n}},
		Pairs:            []int{1, 2},
		Sizes:            []int{64, 1200},
		InFlight:         4,
		Duration:         300 * time.Millisecond,
		MaxPackets:       50,
		Connects:         3,
		ParallelConnects: 4,
		Concurrency:      2,
		Idle:             3,
		PID:              os.Getpid(), // the relay runs in this process
		STUNWorkers:      2,
		Progress:         t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	res.WriteText(&buf)
	t.Logf("load:\n%s", buf.String())
	if res.Idle == nil || res.Idle.N != 3 || res.Idle.RSSBefore <= 0 || res.Idle.RSSAfter <= 0 {
		t.Errorf("idle = %+v", res.Idle)
	}
	if res.ConnectSeq == nil || res.ConnectSeq.N+res.ConnectSeq.Errors == 0 || res.ConnectSeq.Errors != 0 {
		t.Errorf("connect sequential = %+v", res.ConnectSeq)
	}
	if res.ConnectPar == nil || res.ConnectPar.Concurrency != 2 || res.ConnectPar.Errors != 0 {
		t.Errorf("connect concurrent = %+v", res.ConnectPar)
	}
	if len(res.Throughput) != 4 {
		t.Fatalf("throughput = %+v, want 2 pair counts × 2 sizes", res.Throughput)
	}
	for _, tp := range res.Throughput {
		if tp.Packets <= 0 || tp.Packets > int64(tp.Pairs*50) || tp.Bytes != tp.Packets*int64(tp.Size) {
			t.Errorf("throughput %+v: want 1 to %d packets of %d bytes", tp, tp.Pairs*50, tp.Size)
		}
	}
	if res.STUN == nil || res.STUN.Answers <= 0 {
		t.Errorf("stun = %+v", res.STUN)
	}
	buf.Reset()
	if err := res.WriteJSON(&buf); err != nil || !strings.Contains(buf.String(), `"mbps"`) {
		t.Errorf("JSON %v: %s", err, buf.String())
	}
}

func TestLoadRefusesNonLoopback(t *testing.T) {
	n := &tailcfg.DERPNode{HostName: "192.0.2.1", IPv4: "192.0.2.1"} // TEST-NET-1: never dialled
	_, err := check.Load(context.Background(), check.LoadConfig{Region: &tailcfg.DERPRegion{RegionID: 900, Nodes: []*tailcfg.DERPNode{n}}})
	if !errors.Is(err, check.ErrNotLoopback) {
		t.Fatalf("Load = %v, want ErrNotLoopback", err)
	}
}

func TestLoadVerifyingRelay(t *testing.T) {
	mk, meshKey := testutil.NewMeshKey(t)
	tr := startRelay(t, relayOpts{admit: denyAll{}, meshKey: mk})
	n := tr.node
	cfg := check.LoadConfig{
		Region: &tailcfg.DERPRegion{RegionID: 900, Nodes: []*tailcfg.DERPNode{&n}},
		Pairs:  []int{1}, Sizes: []int{64}, InFlight: 2, Duration: 200 * time.Millisecond, MaxPackets: 10,
		Connects: 1, ParallelConnects: 2, Concurrency: 2, Idle: -1, Skip: []string{"stun"},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := check.Load(ctx, cfg); err == nil || !strings.Contains(err.Error(), "-mesh-key-file") {
		t.Fatalf("Load with fresh keys on a verifying relay = %v, want a refusal naming -mesh-key-file", err)
	}
	cfg.MeshKey = meshKey
	res, err := check.Load(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Throughput) != 1 || res.Throughput[0].Packets == 0 || res.Idle != nil || res.STUN != nil {
		t.Errorf("result = %+v", res)
	}
}
