package debugsrv

import (
	"encoding/json"
	"fmt"
	"html"
	"io"
	"maps"
	"net/http"
	"slices"
	"time"

	"github.com/tailderp/tailderp/internal/readiness"
)

// Status is what an operator wants at a glance: what is wrong (with the
// fix), the tailnets' nodes, the clients connected now, admission, the
// certificate, the mesh. /debug/ shows it as a page, /debug/status as
// JSON for scripts.
//
// It is built for one viewer: the tailnet the page is served on. On a
// relay of one tailnet it shows the whole relay; on a relay of several,
// each tailnet's shows that tailnet only (its node, clients, admissions,
// mesh links, share of the caps), so a tailnet never sees another's node
// keys, names, addresses, control server or counts. The operator's view
// (-debug-listen) is the whole relay.
type Status struct {
	Version string    `json:"version"`
	Started time.Time `json:"started"`
	Uptime  string    `json:"uptime"`
	// Tailnet is the tailnet this status is served on.
	Tailnet string `json:"tailnet"`
	// Ready is whether the relay does its job now, as `tailderp check
	// -local` judges it; Readiness is that judgement, part by part.
	Ready     bool                `json:"ready"`
	Readiness []readiness.Finding `json:"readiness"`
	// Problems say what is wrong now, each with what to do; empty when
	// all is well.
	Problems []string        `json:"problems"`
	Tailnets []TailnetStatus `json:"tailnets"`
	// Clients are the viewer's tailnet's clients connected now;
	// ClientsTotal counts every tailnet's, except on a tailnet's own page
	// of a relay of several (its own).
	Clients      []Client     `json:"clients"`
	ClientsTotal int          `json:"clients_total"`
	Admission    Admission    `json:"admission"`
	Certificate  Certificate  `json:"certificate"`
	Mesh         []MeshPeer   `json:"mesh_peers,omitempty"`
	Caps         Caps         `json:"caps"`
	Links        []StatusLink `json:"-"`
}

// Caps are the connection caps and what they refused, as the viewer may
// see them: on a relay of several tailnets a tailnet sees its own share
// only, not the sources (addresses of every tailnet's clients).
type Caps struct {
	MaxConnsPerIP      int            `json:"max_conns_per_ip"` // 0: no cap
	RefusedPerIP       int64          `json:"refused_per_ip"`
	TopSources         []SourceConns  `json:"top_sources,omitempty"`
	MaxConnsPerTailnet int            `json:"max_conns_per_tailnet"` // 0: no cap
	Tailnets           []TailnetConns `json:"tailnets,omitempty"`
}

// SourceConns is a client source (an address, or an IPv6 prefix) and its
// open connections.
type SourceConns struct {
	Source string `json:"source"`
	Conns  int    `json:"conns"`
}

// TailnetConns is a tailnet's share of the relay: its client connections
// open, and those refused because its share was used up.
type TailnetConns struct {
	Name        string `json:"name"`
	Conns       int    `json:"conns"`
	RefusedFull int64  `json:"refused_full"`
}

// TailnetStatus is one tailnet's embedded node, as an operator needs it.
type TailnetStatus struct {
	Name             string    `json:"name"`
	State            string    `json:"state"` // starting, needs-login, running, stopped
	ControlURL       string    `json:"control_url"`
	ControlReachable bool      `json:"control_reachable"`
	ControlSince     time.Time `json:"control_since"`
	// AdmissionFrom is where its answers come from: "live" (the
	// current network map), "cache" (the known-peers cache), or "none".
	AdmissionFrom  string    `json:"admission_from"`
	NetmapReceived time.Time `json:"netmap_received,omitzero"`
	Peers          int       `json:"peers"`
	// Admits is whom the tailnet admits now: "members" (live map),
	// "cache" (the known-peers cache) or "nobody".
	Admits string `json:"admits"`
	// Problem is what is wrong with this tailnet, with the fix; "" if
	// nothing is.
	Problem string `json:"problem,omitempty"`
}

// Client is a connected client of the viewer's tailnet.
type Client struct {
	Name  string    `json:"name"` // its node's tailnet name
	Key   string    `json:"key"`  // short form
	From  string    `json:"from"` // source address
	Since time.Time `json:"since"`
}

// Admission is what admission decided: counts, and the last decisions
// the viewer may see.
type Admission struct {
	// Admitted counts the viewer's tailnet's clients admitted;
	// AdmittedAll every tailnet's (its own on a tailnet's page of a relay
	// of several, where Refused, not attributable, is left out).
	Admitted    int64            `json:"admitted"`
	AdmittedAll int64            `json:"admitted_all_tailnets"`
	Refused     map[string]int64 `json:"refused_by_reason"`
	// Revoked counts the viewer's tailnet's connections closed because
	// their key stopped being admissible, by reason.
	Revoked map[string]int64 `json:"revoked_by_reason"`
	Recent  []Decision       `json:"recent"`
}

// Decision is one admission decision.
type Decision struct {
	At     time.Time `json:"at"`
	What   string    `json:"what"` // admitted, refused, revoked
	Reason string    `json:"reason,omitempty"`
	Name   string    `json:"name,omitempty"`
	Key    string    `json:"key,omitempty"`
	From   string    `json:"from,omitempty"`
}

// Certificate is the certificate the relay serves.
type Certificate struct {
	Serving  bool      `json:"serving"`
	Subject  string    `json:"subject,omitempty"`
	CertName string    `json:"cert_name,omitempty"`
	NotAfter time.Time `json:"not_after,omitzero"`
	DaysLeft int       `json:"days_left"`
	Problem  string    `json:"problem,omitempty"`
	Fix      string    `json:"fix,omitempty"`
}

// MeshPeer is one mesh peer's link.
type MeshPeer struct {
	Peer      string    `json:"peer"`
	Tailnet   string    `json:"tailnet,omitempty"` // whose link, on a relay of several tailnets
	State     string    `json:"state"`
	Since     time.Time `json:"since"`
	LastError string    `json:"last_error,omitempty"`
}

// StatusLink is a page of /debug, listed on the status page.
type StatusLink struct{ Path, What string }

// serveStatusJSON writes the status as JSON.
func serveStatusJSON(w http.ResponseWriter, st Status) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(st)
}

// serveStatusPage writes the status as the /debug/ page.
func serveStatusPage(w http.ResponseWriter, st Status) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	e := html.EscapeString
	p := func(format string, args ...any) { fmt.Fprintf(w, format, args...) }
	p("<!doctype html><html><head><title>tailderp %s</title></head><body>\n", e(st.Version))
	p("<h1>tailderp</h1>\n<p>version %s, up %s (since %s); this page is served on tailnet %s (<a href=\"/debug/status\">as JSON</a>)</p>\n",
		e(st.Version), e(st.Uptime), st.Started.UTC().Format(time.RFC3339), e(st.Tailnet))
	ready := "ready"
	if !st.Ready {
		ready = "NOT READY"
	}
	p("<h2>Readiness: %s</h2>\n<ul>\n", ready)
	for _, f := range st.Readiness {
		p("<li>%s %s: %s</li>\n", e(string(f.Severity)), e(f.Name), e(f.Text))
	}
	p("</ul>\n")
	if len(st.Problems) == 0 {
		p("<h2>All is well</h2>\n")
	} else {
		p("<h2>Problems</h2>\n<ul>\n")
		for _, pr := range st.Problems {
			p("<li>%s</li>\n", e(pr))
		}
		p("</ul>\n")
	}

	p("<h2>Tailnets</h2>\n<table border=1><tr><th>tailnet</th><th>node</th><th>control server</th><th>admission answered from</th><th>peers seen</th><th>problem</th></tr>\n")
	for _, t := range st.Tailnets {
		ctl := "reachable"
		if !t.ControlReachable {
			ctl = "NOT reachable"
		}
		from := t.AdmissionFrom
		if !t.NetmapReceived.IsZero() {
			from += fmt.Sprintf(" (network map of %s, %s ago)", t.NetmapReceived.UTC().Format(time.RFC3339), time.Since(t.NetmapReceived).Round(time.Second))
		}
		p("<tr><td>%s</td><td>%s</td><td>%s %s for %s</td><td>%s</td><td>%d</td><td>%s</td></tr>\n",
			e(t.Name), e(t.State), e(t.ControlURL), ctl, time.Since(t.ControlSince).Round(time.Second), e(from), t.Peers, e(t.Problem))
	}
	p("</table>\n")

	p("<h2>Clients connected now</h2>\n<p>%d of tailnet %s; %d in all.</p>\n", len(st.Clients), e(st.Tailnet), st.ClientsTotal)
	if len(st.Clients) > 0 {
		p("<table border=1><tr><th>node</th><th>key</th><th>from</th><th>since</th></tr>\n")
		for _, c := range st.Clients {
			p("<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>\n", e(c.Name), e(c.Key), e(c.From), c.Since.UTC().Format(time.RFC3339))
		}
		p("</table>\n")
	}

	a := st.Admission
	p("<h2>Admission</h2>\n<p>admitted: %d of tailnet %s (%d in all)</p>\n", a.Admitted, e(st.Tailnet), a.AdmittedAll)
	if a.Refused != nil {
		writeCounts(w, "refused (all tailnets)", a.Refused)
	}
	writeCounts(w, "connections closed when their key stopped being admissible", a.Revoked)
	if len(a.Recent) > 0 {
		p("<table border=1><tr><th>when</th><th>what</th><th>reason</th><th>node</th><th>key</th><th>from</th></tr>\n")
		for _, d := range a.Recent {
			p("<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>\n",
				d.At.UTC().Format(time.RFC3339), e(d.What), e(d.Reason), e(d.Name), e(d.Key), e(d.From))
		}
		p("</table>\n")
	}

	c := st.Certificate
	p("<h2>Certificate</h2>\n")
	if !c.Serving {
		p("<p>none yet</p>\n")
	} else {
		p("<p>%s, valid until %s (%d days left)%s</p>\n", e(c.Subject), c.NotAfter.UTC().Format(time.RFC3339), c.DaysLeft, e(problemText(c.Problem, c.Fix)))
	}
	if len(st.Mesh) > 0 {
		p("<h2>Mesh peers</h2>\n<table border=1><tr><th>peer</th><th>tailnet</th><th>state</th><th>since</th><th>last error</th></tr>\n")
		for _, m := range st.Mesh {
			p("<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>\n", e(m.Peer), e(m.Tailnet), e(m.State), m.Since.UTC().Format(time.RFC3339), e(m.LastError))
		}
		p("</table>\n")
	}
	if cp := st.Caps; cp.MaxConnsPerIP > 0 || cp.MaxConnsPerTailnet > 0 {
		p("<h2>Caps</h2>\n")
		if cp.MaxConnsPerIP > 0 {
			p("<p>%d connections per address: %d refused over it.", cp.MaxConnsPerIP, cp.RefusedPerIP)
			for _, src := range cp.TopSources {
				p(" %s %d;", e(src.Source), src.Conns)
			}
			p("</p>\n")
		}
		if cp.MaxConnsPerTailnet > 0 {
			p("<p>%d connections per tailnet:", cp.MaxConnsPerTailnet)
			for _, tc := range cp.Tailnets {
				p(" %s %d open, %d refused over it;", e(tc.Name), tc.Conns, tc.RefusedFull)
			}
			p("</p>\n")
		}
	}
	p("<h2>More</h2>\n<ul>\n")
	for _, l := range st.Links {
		p("<li><a href=\"%s\">%s</a>: %s</li>\n", e(l.Path), e(l.Path), e(l.What))
	}
	p("</ul>\n</body></html>\n")
}

func problemText(problem, fix string) string {
	if problem == "" { // relay.CertOK
		return ""
	}
	return fmt.Sprintf(": %s; %s", problem, fix)
}

func writeCounts(w io.Writer, what string, m map[string]int64) {
	fmt.Fprintf(w, "<p>%s:", html.EscapeString(what))
	if len(m) == 0 {
		io.WriteString(w, " none")
	}
	for _, k := range slices.Sorted(maps.Keys(m)) {
		fmt.Fprintf(w, " %s %d;", html.EscapeString(k), m[k])
	}
	io.WriteString(w, "</p>\n")
}
