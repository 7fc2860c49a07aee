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
		{"member", &Verifier{Tailnet: tailnet}, in, true, ""},
		{"stranger", &Verifier{Tailnet: tailnet}, out, false, ReasonNotInTailnet},
		{"node not ready fails closed", &Verifier{Tailnet: notReady}, in, false, ReasonTailnetNotReady},
		{"node not ready fail-open", &Verifier{Tailnet: notReady, FailOpen: true}, in, true, ""},
		{"fail-open still refuses strangers", &Verifier{Tailnet: tailnet, FailOpen: true}, out, false, ReasonNotInTailnet},
		{"url allows member", &Verifier{Tailnet: tailnet, URL: allowIn.URL}, in, true, ""},
		{"url denies member", &Verifier{Tailnet: tailnet, URL: denyAll.URL}, in, false, ReasonURLDenied},
		{"url non-200 is a refusal", &Verifier{URL: err500.URL}, in, false, ReasonURLDenied},
		{"url down fails closed", &Verifier{Tailnet: tailnet, URL: downURL}, in, false, ReasonURLUnreachable},
		{"url down fail-open", &Verifier{Tailnet: tailnet, URL: downURL, FailOpen: true}, in, true, ""},
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
	v := &Verifier{Tailnet: &members{keys: map[key.NodePublic]bool{in: true}}, URL: srv.URL}
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
	v := &Verifier{Tailnet: &members{keys: map[key.NodePublic]bool{}}, Logger: logger}
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
	v := &Verifier{Tailnet: &members{keys: map[key.NodePublic]bool{a: true, b: true}}}
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
	v := &Verifier{Tailnet: &members{keys: keys}}
	b.ReportAllocs()
	for b.Loop() {
		if !v.Admit(context.Background(), k, src) {
			b.Fatal("refused")
		}
	}
}
