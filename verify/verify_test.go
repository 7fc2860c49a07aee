package verify

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/testutil"
)

// members is a KeyChecker over a fixed set, standing in for a tailnet.
type members struct {
	keys     map[key.NodePublic]bool
	notReady bool
	calls    atomic.Int64
}

func (m *members) KnowsNodeKey(k key.NodePublic) (known, ready bool) {
	m.calls.Add(1)
	if m.notReady {
		return false, false
	}
	return m.keys[k], true
}

func (m *members) PeerCount() int { return len(m.keys) }

// one is a single tailnet named "default" with the keys of k.
func one(k KeyChecker) []Tailnet { return []Tailnet{{Name: "default", Keys: k}} }

// admissionServer is a real HTTP admission controller in derper's format
// that allows the keys in allow.
func admissionServer(t *testing.T, allow map[key.NodePublic]bool, status int) (*httptest.Server, *atomic.Int64) {
	var calls atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		var req tailcfg.DERPAdmitClientRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		if status != 200 {
			w.WriteHeader(status)
			return
		}
		json.NewEncoder(w).Encode(tailcfg.DERPAdmitClientResponse{Allow: allow[req.NodePublic]})
	}))
	t.Cleanup(srv.Close)
	return srv, &calls
}

var src = netip.MustParseAddr("198.51.100.7")

func TestAdmit(t *testing.T) {
	in, out := key.NewNode().Public(), key.NewNode().Public()
	tailnet := &members{keys: map[key.NodePublic]bool{in: true}}
	notReady := &members{notReady: true}
	allowIn, _ := admissionServer(t, map[key.NodePublic]bool{in: true}, 200)
	denyAll, _ := admissionServer(t, nil, 200)
	err500, _ := admissionServer(t, nil, 500)
	down := httptest.NewServer(http.NotFoundHandler())
	downURL := down.URL
	down.Close()

	tests := []struct {
		name       string
		v          *Verifier
		key        key.NodePublic
		want       bool
		wantReason string
	}{
		{"member", &Verifier{Tailnets: one(tailnet)}, in, true, ""},
		{"stranger", &Verifier{Tailnets: one(tailnet)}, out, false, ReasonNotInTailnet},
		{"node not ready fails closed", &Verifier{Tailnets: one(notReady)}, in, false, ReasonTailnetNotReady},
		{"node not ready fail-open", &Verifier{Tailnets: one(notReady), FailOpen: true}, in, true, ""},
		{"fail-open still refuses strangers", &Verifier{Tailnets: one(tailnet), FailOpen: true}, out, false, ReasonNotInTailnet},
		{"url allows member", &Verifier{Tailnets: one(tailnet), URL: allowIn.URL}, in, true, ""},
		{"url denies member", &Verifier{Tailnets: one(tailnet), URL: denyAll.URL}, in, false, ReasonURLDenied},
		{"url non-200 is a refusal", &Verifier{URL: err500.URL}, in, false, ReasonURLDenied},
		{"url down fails closed", &Verifier{Tailnets: one(tailnet), URL: downURL}, in, false, ReasonURLUnreachable},
		{"url down fail-open", &Verifier{Tailnets: one(tailnet), URL: downURL, FailOpen: true}, in, true, ""},
		{"url alone", &Verifier{URL: allowIn.URL}, in, true, ""},
		{"url alone denies", &Verifier{URL: allowIn.URL}, out, false, ReasonURLDenied},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.v.Admit(context.Background(), tt.key, src)
			if got != tt.want {
				t.Fatalf("Admit = %v, want %v", got, tt.want)
			}
			for _, r := range []string{ReasonNotInTailnet, ReasonTailnetNotReady, ReasonURLDenied, ReasonURLUnreachable} {
				want := int64(0)
				if r == tt.wantReason {
					want = 1
				}
				if n := tt.v.Refused(r); n != want {
					t.Errorf("Refused(%s) = %d, want %d", r, n, want)
				}
			}
			if wantAdmitted := map[bool]int64{true: 1, false: 0}[tt.want]; tt.v.Admitted() != wantAdmitted {
				t.Errorf("Admitted = %d, want %d", tt.v.Admitted(), wantAdmitted)
			}
		})
	}
}

func TestURLNotAskedForStrangers(t *testing.T) {
	in, out := key.NewNode().Public(), key.NewNode().Public()
	srv, calls := admissionServer(t, map[key.NodePublic]bool{in: true, out: true}, 200)
	v := &Verifier{Tailnets: one(&members{keys: map[key.NodePublic]bool{in: true}}), URL: srv.URL}
	if v.Admit(context.Background(), out, src) {
		t.Fatal("stranger admitted")
	}
	if calls.Load() != 0 {
		t.Fatalf("admission URL called %d times for a client the tailnet refused", calls.Load())
	}
	if !v.Admit(context.Background(), in, src) || calls.Load() != 1 {
		t.Fatalf("member: calls = %d, want 1", calls.Load())
	}
}

func TestRefusalLogIsRateLimitedAndNamesKeyAndSource(t *testing.T) {
	var buf testutil.Buffer
	logger := slog.New(slog.NewTextHandler(&buf, nil))
	v := &Verifier{Tailnets: one(&members{keys: map[key.NodePublic]bool{}}), Logger: logger}
	k := key.NewNode().Public()
	const n = 1000
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range n / 4 {
				v.Admit(context.Background(), k, src)
			}
		})
	}
	wg.Wait()
	out := buf.String()
	refusals := strings.Count(out, "client refused")
	if refusals == 0 || refusals > 20 {
		t.Fatalf("%d refusal lines for %d refusals; want between 1 and 20:\n%s", refusals, n, out)
	}
	first := out[:strings.Index(out, "\n")]
	for _, want := range []string{k.ShortString(), "198.51.100.7", ReasonNotInTailnet} {
		if !strings.Contains(first, want) {
			t.Errorf("refusal line %q does not name %q", first, want)
		}
	}
	if got := v.Refused(ReasonNotInTailnet); got != n {
		t.Errorf("counted %d refusals, want %d (every refusal is counted, logged or not)", got, n)
	}
	if !strings.Contains(out, "sees almost no peers") {
		t.Errorf("no hint about a suspiciously small netmap:\n%s", out)
	}
}

func TestRecentAdmissions(t *testing.T) {
	a, b := key.NewNode().Public(), key.NewNode().Public()
	v := &Verifier{Tailnets: one(&members{keys: map[key.NodePublic]bool{a: true, b: true}})}
	v.Admit(context.Background(), a, src)
	v.Admit(context.Background(), b, src)
	v.Admit(context.Background(), a, src)
	got := v.Recent()
	if len(got) != 2 || got[0].Key != a || got[1].Key != b {
		t.Fatalf("Recent = %+v, want a then b", got)
	}
}

func BenchmarkAdmitTailnet(b *testing.B) {
	keys := map[key.NodePublic]bool{}
	var k key.NodePublic
	for range 1000 {
		k = key.NewNode().Public()
		keys[k] = true
	}
	v := &Verifier{Tailnets: one(&members{keys: keys})}
	b.ReportAllocs()
	for b.Loop() {
		if !v.Admit(context.Background(), k, src) {
			b.Fatal("refused")
		}
	}
}

// connSet is a Conns over a set of connected keys, counting closes.
type connSet struct {
	mu     sync.Mutex
	conns  map[key.NodePublic]int
	closed map[key.NodePublic]int
}

func newConnSet(keys ...key.NodePublic) *connSet {
	c := &connSet{conns: map[key.NodePublic]int{}, closed: map[key.NodePublic]int{}}
	for _, k := range keys {
		c.conns[k]++
	}
	return c
}

func (c *connSet) Revoke(k key.NodePublic) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.conns[k]
	delete(c.conns, k)
	c.closed[k] += n
	return n
}

func (c *connSet) ConnectedKeys() []key.NodePublic {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []key.NodePublic
	for k := range c.conns {
		out = append(out, k)
	}
	return out
}

// TestSeveralTailnets: a key any tailnet knows is admitted, and counted
// under that tailnet; one no ready tailnet knows is a stranger, even while
// another tailnet cannot answer.
func TestSeveralTailnets(t *testing.T) {
	a, b, stranger := key.NewNode().Public(), key.NewNode().Public(), key.NewNode().Public()
	v := &Verifier{Tailnets: []Tailnet{
		{Name: "a", Keys: &members{keys: map[key.NodePublic]bool{a: true}}},
		{Name: "down", Keys: &members{notReady: true}},
		{Name: "b", Keys: &members{keys: map[key.NodePublic]bool{b: true}}},
	}}
	for k, want := range map[key.NodePublic]bool{a: true, b: true, stranger: false} {
		if got := v.Admit(context.Background(), k, src); got != want {
			t.Errorf("Admit(%v) = %v, want %v", k.ShortString(), got, want)
		}
	}
	if v.admitted.Get("a").Value() != 1 || v.admitted.Get("b").Value() != 1 {
		t.Errorf("admitted by tailnet: a=%d b=%d, want 1 each", v.admitted.Get("a").Value(), v.admitted.Get("b").Value())
	}
	if v.Refused(ReasonNotInTailnet) != 1 {
		t.Errorf("refused not_in_tailnet = %d, want 1", v.Refused(ReasonNotInTailnet))
	}
	// With every tailnet unable to answer, the client is "not ready".
	down := &Verifier{Tailnets: []Tailnet{{Name: "x", Keys: &members{notReady: true}}}}
	if down.Admit(context.Background(), a, src) || down.Refused(ReasonTailnetNotReady) != 1 {
		t.Error("a verifier with no ready tailnet admitted, or refused for another reason")
	}
}

// TestRevoke: a revocation closes the key's connections, counts and logs
// them with the node's name, and leaves the key alone while another
// tailnet still admits it.
func TestRevoke(t *testing.T) {
	gone, moved, stays := key.NewNode().Public(), key.NewNode().Public(), key.NewNode().Public()
	conns := newConnSet(gone, gone, moved, stays)
	var logBuf testutil.Buffer
	tn1 := &members{keys: map[key.NodePublic]bool{stays: true}}
	tn2 := &members{keys: map[key.NodePublic]bool{moved: true}}
	v := &Verifier{Tailnets: []Tailnet{{Name: "one", Keys: tn1}, {Name: "two", Keys: tn2}}, Conns: conns,
		Logger: slog.New(slog.NewTextHandler(&logBuf, nil))}

	if n := v.Revoke(Revocation{Key: gone, Name: "gone.example.ts.net.", Tailnet: "one", Reason: "removed"}); n != 2 {
		t.Errorf("Revoke(gone) closed %d connections, want 2", n)
	}
	// "moved" is dropped by tailnet one but tailnet two has it.
	if n := v.Revoke(Revocation{Key: moved, Tailnet: "one", Reason: "not_in_netmap"}); n != 0 {
		t.Errorf("Revoke(moved) closed %d connections of a key tailnet two admits", n)
	}
	if v.Revoked("removed") != 2 {
		t.Errorf("revoked{removed} = %d, want 2", v.Revoked("removed"))
	}
	for _, want := range []string{"gone.example.ts.net.", "reason=removed", "connections=2", gone.ShortString()} {
		if !strings.Contains(logBuf.String(), want) {
			t.Errorf("log does not mention %q:\n%s", want, logBuf.String())
		}
	}
	ev := v.Events()
	if len(ev) != 1 || ev[0].What != "revoked" || ev[0].Name != "gone.example.ts.net." || ev[0].Reason != "removed" {
		t.Errorf("events %+v, want one revocation of gone.example.ts.net.", ev)
	}
	if conns.closed[stays] != 0 || conns.closed[moved] != 0 {
		t.Errorf("closed %v; only gone's connections should be", conns.closed)
	}
}

// TestSweep: the sweep closes what no tailnet admits any more, keeps the
// rest, and with no tailnet able to answer closes everything unless
// fail-open.
func TestSweep(t *testing.T) {
	a, b := key.NewNode().Public(), key.NewNode().Public()
	tn := &members{keys: map[key.NodePublic]bool{a: true, b: true}}
	conns := newConnSet(a, b)
	v := &Verifier{Tailnets: one(tn), Conns: conns}
	if n := v.Sweep(); n != 0 {
		t.Fatalf("sweep closed %d with everyone admissible", n)
	}
	delete(tn.keys, b)
	// The first sweep that finds b inadmissible leaves it to Revoke; the
	// next one closes it.
	if n := v.Sweep(); n != 0 {
		t.Fatalf("first sweep after b left closed %d, want 0 (Revoke goes first)", n)
	}
	if n := v.Sweep(); n != 1 || conns.closed[b] != 1 || v.Revoked(RevokeNotAdmissible) != 1 {
		t.Fatalf("second sweep after b left: closed %d (b: %d), want b's one", n, conns.closed[b])
	}
	tn.notReady = true
	open := &Verifier{Tailnets: one(tn), Conns: conns, FailOpen: true}
	if n := open.Sweep(); n != 0 {
		t.Errorf("fail-open sweep with no answers closed %d", n)
	}
	v.Sweep()
	if n := v.Sweep(); n != 1 || v.Revoked(RevokeNoAnswer) != 1 {
		t.Errorf("fail-closed sweeps with no answers closed %d, want 1 (no_answer)", n)
	}
}

func TestURLHealth(t *testing.T) {
	in := key.NewNode().Public()
	allowIn, _ := admissionServer(t, map[key.NodePublic]bool{in: true}, 200)
	err500, _ := admissionServer(t, nil, 500)
	down := httptest.NewServer(http.NotFoundHandler())
	downURL := down.URL
	down.Close()

	v := &Verifier{URL: downURL}
	if h := v.URLHealth(); h.Asked {
		t.Fatalf("before any call: %+v, want not asked", h)
	}
	v.Admit(context.Background(), in, src)
	h := v.URLHealth()
	if !h.Asked || h.Reachable || h.Err == "" || h.Since.IsZero() {
		t.Fatalf("after a call to a closed port: %+v, want asked, unreachable, with the error", h)
	}
	firstDown := h.Since
	v.Admit(context.Background(), in, src)
	if h := v.URLHealth(); h.Since != firstDown || h.At.Before(firstDown) {
		t.Fatalf("a second failure moved Since: %+v (first %v)", h, firstDown)
	}

	// A refusal (non-200) is an answer: the URL is reachable.
	v.URL = err500.URL
	v.Admit(context.Background(), in, src)
	if h := v.URLHealth(); !h.Reachable || h.Err != "" || h.Since.Before(firstDown) {
		t.Fatalf("after a 500: %+v, want reachable", h)
	}
	v.URL = allowIn.URL
	if !v.Admit(context.Background(), in, src) {
		t.Fatal("member refused by an allowing URL")
	}
	if h := v.URLHealth(); !h.Reachable {
		t.Fatalf("after an allowing answer: %+v", h)
	}
}

// TestFewPeersHintOnlyWhenTrue: the hint about a node that sees almost no
// peers is said only when it is true: with one tailnet, when its node sees
// ≤ 1 peer; with several, only when every one does.
func TestFewPeersHintOnlyWhenTrue(t *testing.T) {
	keys := func(n int) *members {
		m := &members{keys: map[key.NodePublic]bool{}}
		for range n {
			m.keys[key.NewNode().Public()] = true
		}
		return m
	}
	for _, tt := range []struct {
		name     string
		tailnets []Tailnet
		want     string // the tailnet named, "" for no hint
	}{
		{"one healthy", []Tailnet{{Name: "a", Keys: keys(5)}}, ""},
		{"one small", []Tailnet{{Name: "a", Keys: keys(1)}}, "tailnet=a "},
		{"one small beside a healthy one", []Tailnet{{Name: "a", Keys: keys(5)}, {Name: "b", Keys: keys(0)}}, ""},
		{"all small", []Tailnet{{Name: "a", Keys: keys(1)}, {Name: "b", Keys: keys(0)}}, "tailnet=a,b "},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var buf testutil.Buffer
			v := &Verifier{Tailnets: tt.tailnets, Logger: slog.New(slog.NewTextHandler(&buf, nil))}
			v.Admit(context.Background(), key.NewNode().Public(), src)
			out := buf.String()
			hint := testutil.Lines(out, "sees almost no peers")
			switch {
			case tt.want == "" && len(hint) > 0:
				t.Errorf("hint said: %v", hint)
			case tt.want != "" && (len(hint) != 1 || !strings.Contains(hint[0], tt.want)):
				t.Errorf("hint %v, want one naming %q; log:\n%s", hint, tt.want, out)
			}
		})
	}
}
