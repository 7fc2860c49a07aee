package readiness

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestJudge(t *testing.T) {
	now := time.Date(2026, 12, 6, 12, 0, 0, 0, time.UTC)
	live := Tailnet{Name: "default", ControlURL: "https://hs.example", Admits: AdmitsMembers, Since: now.Add(-time.Hour)}
	cache := Tailnet{Name: "default", ControlURL: "https://hs.example", Admits: AdmitsFromCache, Problem: "node-removed",
		Since: now.Add(-90 * time.Second), Netmap: now.Add(-2 * time.Minute), Until: now.Add(time.Hour), Fix: "re-add the node"}
	nobody := Tailnet{Name: "staging", ControlURL: "http://127.0.0.1:1", Admits: AdmitsNobody, Problem: "control-unreachable",
		Since: now.Add(-7 * time.Second), Fix: "check that this server reaches http://127.0.0.1:1"}

	up := func(p string) MeshPeer {
		return MeshPeer{Peer: p, Connected: true, ConnectedOnce: true, Since: now.Add(-time.Second)}
	}
	never := func(p string) MeshPeer {
		return MeshPeer{Peer: p, Since: now.Add(-3 * time.Second), Err: "connection refused"}
	}
	lost := func(p string) MeshPeer {
		return MeshPeer{Peer: p, ConnectedOnce: true, Since: now.Add(-2 * time.Second), Err: "EOF"}
	}

	tests := []struct {
		name  string
		r     Readiness
		ready bool
		want  []string // "severity name: text fragment", in order
	}{
		{"one live tailnet", Readiness{Tailnets: []Tailnet{live}}, true,
			[]string{"ok tailnet default: admits its members"}},
		{"cache warns", Readiness{Tailnets: []Tailnet{cache}}, true,
			[]string{"warn tailnet default: from the known-peers cache", "warn tailnet default: no longer knows this node", "warn tailnet default: for 1m30s", "warn tailnet default: 2m0s old", "warn tailnet default: fix: re-add the node"}},
		{"one tailnet of two admits nobody", Readiness{Tailnets: []Tailnet{live, nobody}}, false,
			[]string{"ok tailnet default:", "fail tailnet staging: refuses every member: the control server does not answer (control http://127.0.0.1:1) for 7s", "fail tailnet staging: fix: check that"}},
		{"open relay", Readiness{Open: true}, true, []string{"ok admission: open relay"}},
		{"URL down, fail-closed", Readiness{Tailnets: []Tailnet{live}, AdmissionURL: &URL{Asked: true, Since: now.Add(-time.Minute), Err: "connection refused"}}, false,
			[]string{"ok tailnet default:", "fail admission URL: unreachable for 1m0s: every client is refused: connection refused"}},
		{"URL down, fail-open", Readiness{Open: true, AdmissionURL: &URL{Asked: true, FailOpen: true, Since: now.Add(-time.Minute)}}, true,
			[]string{"ok admission:", "warn admission URL: admitted unverified"}},
		{"URL not asked", Readiness{Open: true, AdmissionURL: &URL{}}, true, []string{"ok admission:", "ok admission URL: not asked yet"}},
		{"certificate expired", Readiness{Tailnets: []Tailnet{live}, Cert: Cert{Problem: "expired", NotAfter: now.Add(-time.Hour), Fix: "renew"}}, false,
			[]string{"ok tailnet default:", "fail certificate: expired: clients refuse it"}},
		{"certificate expiring", Readiness{Tailnets: []Tailnet{live}, Cert: Cert{Problem: "expiring", NotAfter: now.Add(48 * time.Hour)}}, true,
			[]string{"ok tailnet default:", "warn certificate: expires 2026-12-08T12:00:00Z"}},
		{"mesh up", Readiness{Tailnets: []Tailnet{live}, Mesh: &Mesh{Started: now.Add(-time.Second), Peers: []MeshPeer{up("a"), up("b")}}}, true,
			[]string{"ok tailnet default:", "ok mesh: connected to every peer (2)"}},
		{"mesh peer not yet connected", Readiness{Tailnets: []Tailnet{live}, Mesh: &Mesh{Started: now.Add(-3 * time.Second), Peers: []MeshPeer{up("a"), never("b")}}}, false,
			[]string{"ok tailnet default:", "fail mesh: 1 of 2 peers connected; waiting for b to connect (for 3s of at most 15s", "fail mesh: last error: connection refused"}},
		{"mesh peer never connected, after the wait", Readiness{Tailnets: []Tailnet{live}, Mesh: &Mesh{Started: now.Add(-MeshReadyWait), Peers: []MeshPeer{never("a"), never("b")}}}, true,
			[]string{"ok tailnet default:", "warn mesh: 0 of 2 peers connected; a, b never connected in 15s: ready anyway"}},
		{"mesh peer lost after connecting, within the wait", Readiness{Tailnets: []Tailnet{live}, Mesh: &Mesh{Started: now.Add(-5 * time.Second), Peers: []MeshPeer{up("a"), lost("b")}}}, true,
			[]string{"ok tailnet default:", "warn mesh: 1 of 2 peers connected; not connected now: b (down for 2s)"}},
		{"mesh links of two tailnets", Readiness{Tailnets: []Tailnet{live}, Mesh: &Mesh{Started: now.Add(-time.Minute), Peers: []MeshPeer{
			{Peer: "p:443", Tailnet: "default", Connected: true, ConnectedOnce: true}, {Peer: "p:443", Tailnet: "b", Since: now.Add(-time.Minute)}}}}, true,
			[]string{"ok tailnet default:", "warn mesh: 1 of 2 peers connected; p:443 (tailnet b) never connected in 1m0s"}},
		{"mesh of itself only", Readiness{Tailnets: []Tailnet{live}, Mesh: &Mesh{Started: now}}, true,
			[]string{"ok tailnet default:"}},
		{"draining", Readiness{Tailnets: []Tailnet{live}, Draining: true, DrainingSince: now.Add(-2 * time.Second)}, false,
			[]string{"fail draining: the relay is stopping (for 2s)", "ok tailnet default:"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.r.Judge(now)
			if r := tt.r.Ready(now); r != tt.ready {
				t.Errorf("Ready = %v, want %v: %+v", r, tt.ready, got)
			}
			var findings []string
			for _, f := range got {
				findings = append(findings, string(f.Severity)+" "+f.Name+": "+f.Text)
			}
			// Each wanted fragment is in the finding with its severity and
			// name; findings appear in the wanted order.
			i := 0
			for _, w := range tt.want {
				sev, rest, _ := strings.Cut(w, " ")
				name, frag, _ := strings.Cut(rest, ":")
				frag = strings.TrimSpace(frag)
				for i < len(got) && !(string(got[i].Severity) == sev && got[i].Name == name) {
					i++
				}
				if i == len(got) || !strings.Contains(got[i].Text, frag) {
					t.Fatalf("no %q in order in:\n%s", w, strings.Join(findings, "\n"))
				}
			}
			if strings.Count(strings.Join(findings, "\n"), "\n")+1 != len(got) {
				t.Errorf("a finding spans lines:\n%s", strings.Join(findings, "\n"))
			}
		})
	}
}

// TestJSONRoundTrip: what the server writes is what check reads.
func TestJSONRoundTrip(t *testing.T) {
	now := time.Now().UTC().Truncate(time.Second)
	r := Readiness{Tailnets: []Tailnet{{Name: "a", ControlURL: "u", Admits: AdmitsFromCache, Problem: "node-removed", Since: now, Netmap: now, Until: now.Add(time.Hour), Fix: "f"}},
		AdmissionURL: &URL{Asked: true, Since: now, Err: "e"},
		Mesh:         &Mesh{Started: now, Peers: []MeshPeer{{Peer: "p:1", ConnectedOnce: true, Since: now, Err: "x"}}}, Cert: Cert{Problem: "expiring", NotAfter: now}, Draining: true, DrainingSince: now}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var back Readiness
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(r, back) {
		t.Fatalf("round trip:\n%+v\n%+v", r, back)
	}
}
