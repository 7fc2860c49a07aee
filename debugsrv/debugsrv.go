// Package debugsrv is tailderp's /debug: a status page at a glance
// (/debug/, and /debug/status as JSON), pprof, metrics (expvar JSON at
// /debug/vars, Prometheus text at /debug/varz and /metrics), derpserver's
// consistency and traffic checks, the list of admitted clients, and the
// mesh peers.
//
// It is served on a listener of the embedded tailnet node (see
// node.Node.Listen), never on the public relay: being on the tailnet is
// the access control. A relay without a tailnet (an open relay) can serve
// it on a loopback address instead (ListenLoopback): being on the host is
// the access control then.
package debugsrv

import (
	"expvar"
	"fmt"
	"html"
	"io"
	"net"
	"net/http"
	"net/netip"
	"time"

	"tailscale.com/derp/derpserver"
	"tailscale.com/tsweb"
	"tailscale.com/tsweb/varz"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/relay"
	"github.com/tailderp/tailderp/verify"
)

// Config is what the debug pages show. The pages are served to one
// tailnet: what lists clients lists only that tailnet's.
type Config struct {
	// ProcessWide serves what belongs to the whole process: pprof (whose
	// pages include the command line) and the process-wide expvars (Go
	// runtime, STUN, derpserver globals, the command line). Only for the
	// relay's operator: the one tailnet of a relay, the first of several,
	// or loopback. Another tailnet of a shared relay sees its own pages
	// only.
	ProcessWide bool
	// Vars are metric sets published under their names (after the
	// process-wide expvars, with ProcessWide).
	Vars map[string]expvar.Var
	// Status is the status page's content, built when it is asked for.
	Status func() Status
	// DERP, if set, is the viewer's DERP server, for /debug/check and
	// /debug/traffic, which list every client of that server: the
	// relay's, or one tenant's (relay.Server.TenantDERP).
	DERP *derpserver.Server
	// Recent, if set, lists the admissions shown at /debug/clients: the
	// viewing tailnet's.
	Recent func() []verify.Admission
	// NodeName names a client's node key on the tailnet ("" if unknown).
	NodeName func(key.NodePublic) string
	// Connected reports whether a client has an admitted connection open.
	Connected func(key.NodePublic) bool
	// MeshPeers, if set, lists the relay's mesh peers at /debug/mesh
	// (relay.Server.MeshPeers).
	MeshPeers func() []relay.MeshPeerStatus
}

// Handler returns the debug handler.
func Handler(c Config) http.Handler {
	inner := http.NewServeMux()
	links := []StatusLink{{"/debug/status", "this status as JSON"}}
	handle := func(name, _ string, h http.Handler) { inner.Handle("/debug/"+name, h) }
	if c.ProcessWide {
		d := tsweb.Debugger(inner)
		handle = d.Handle
		links = append(links, StatusLink{"/debug/pprof/", "Go profiles"})
	}
	links = append(links,
		StatusLink{"/metrics", "Prometheus metrics (also /debug/varz)"},
		StatusLink{"/debug/vars", "the metrics as JSON"},
	)
	// expvars is every metric served: the process's, then ours.
	expvars := func(f func(expvar.KeyValue)) {
		if c.ProcessWide {
			expvar.Do(f)
		}
		for name, v := range c.Vars {
			f(expvar.KeyValue{Key: name, Value: v})
		}
	}
	if c.DERP != nil {
		links = append(links, StatusLink{"/debug/check", "DERP consistency check"}, StatusLink{"/debug/traffic", "DERP traffic by connection"})
		handle("check", "DERP consistency check", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if err := c.DERP.ConsistencyCheck(); err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			io.WriteString(w, "derp.Server ConsistencyCheck okay\n")
		}))
		handle("traffic", "DERP traffic by connection", http.HandlerFunc(c.DERP.ServeDebugTraffic))
	}
	if c.Recent != nil {
		links = append(links, StatusLink{"/debug/clients", "recently admitted clients of this tailnet"})
		handle("clients", "Admitted clients", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			serveClients(w, c)
		}))
	}
	if c.MeshPeers != nil {
		links = append(links, StatusLink{"/debug/mesh", "mesh peers"})
		handle("mesh", "Mesh peers", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			io.WriteString(w, "<html><body><h1>Mesh peers</h1>\n")
			writeMeshTable(w, c.MeshPeers(), time.Now())
			io.WriteString(w, "</body></html>\n")
		}))
	}

	// The Prometheus endpoints must include our sets, which are not
	// published process-wide (several relays may share a process), so
	// they are served here ahead of tsweb's /debug/varz.
	prom := http.HandlerFunc(varz.ExpvarDoHandler(expvars))
	outer := http.NewServeMux()
	if c.Status != nil {
		status := func() Status {
			st := c.Status()
			st.Links = links
			return st
		}
		outer.Handle("/debug/{$}", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { serveStatusPage(w, status()) }))
		outer.Handle("/debug/status", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { serveStatusJSON(w, status()) }))
	}
	outer.Handle("/debug/varz", prom)
	outer.Handle("/metrics", prom)
	outer.Handle("/debug/vars", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		io.WriteString(w, "{")
		first := true
		write := func(kv expvar.KeyValue) {
			if !first {
				io.WriteString(w, ",")
			}
			first = false
			fmt.Fprintf(w, "\n%q: %s", kv.Key, kv.Value)
		}
		expvars(write)
		io.WriteString(w, "\n}\n")
	}))
	outer.Handle("/", inner)
	return outer
}

func serveClients(w http.ResponseWriter, c Config) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	io.WriteString(w, "<html><body><h1>Admitted clients</h1><table><tr><th>node key</th><th>tailnet name</th><th>from</th><th>admitted</th><th>connected</th></tr>\n")
	for _, a := range c.Recent() {
		name := ""
		if c.NodeName != nil {
			name = c.NodeName(a.Key)
		}
		connected := ""
		if c.Connected != nil && c.Connected(a.Key) {
			connected = "yes"
		}
		fmt.Fprintf(w, "<tr><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>\n",
			html.EscapeString(a.Key.ShortString()), html.EscapeString(name), html.EscapeString(a.From.String()),
			a.At.UTC().Format(time.RFC3339), connected)
	}
	io.WriteString(w, "</table></body></html>\n")
}

// writeMeshTable writes the mesh peers as an HTML table: one row a peer,
// with its state, for how long, its DERP key, how many clients it lists,
// and its last error.
func writeMeshTable(w io.Writer, peers []relay.MeshPeerStatus, now time.Time) {
	if len(peers) == 0 {
		io.WriteString(w, "<p>No mesh peers configured.</p>\n")
		return
	}
	io.WriteString(w, "<table><tr><th>peer</th><th>state</th><th>since</th><th>peer key</th><th>clients</th><th>last error</th></tr>\n")
	for _, p := range peers {
		peerKey, lastErr := "", ""
		if !p.ServerKey.IsZero() {
			peerKey = p.ServerKey.ShortString()
		}
		if p.LastError != "" {
			lastErr = fmt.Sprintf("%s (%s ago)", p.LastError, now.Sub(p.LastErrorAt).Round(time.Second))
		}
		fmt.Fprintf(w, "<tr><td>%s</td><td>%s</td><td>%s (%s)</td><td>%s</td><td>%d</td><td>%s</td></tr>\n",
			html.EscapeString(p.Peer.String()), html.EscapeString(string(p.State)),
			p.Since.UTC().Format(time.RFC3339), now.Sub(p.Since).Round(time.Second),
			html.EscapeString(peerKey), p.Clients, html.EscapeString(lastErr))
	}
	io.WriteString(w, "</table>\n")
}

// ListenLoopback listens on addr, which must be a loopback IP address and
// a port ("127.0.0.1:9090", "[::1]:9090"; port 0 picks one), for serving
// the debug handler to the host only. Any other address is refused, names
// included (a name may resolve elsewhere) and the unspecified address
// (0.0.0.0, ::, or no host: every interface), so a mistyped address can
// never publish /debug.
func ListenLoopback(addr string) (net.Listener, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("debugsrv: debug listen address %q: want a loopback IP address and port, such as 127.0.0.1:9090 or [::1]:9090", addr)
	}
	if !ap.Addr().Unmap().IsLoopback() {
		return nil, fmt.Errorf("debugsrv: debug listen address %q is not a loopback address: /debug is served to this host only (127.0.0.1 or ::1)", addr)
	}
	ln, err := net.Listen("tcp", ap.String())
	if err != nil {
		return nil, fmt.Errorf("debugsrv: debug listener: %w", err)
	}
	return ln, nil
}

// Serve serves h on ln until ln is closed.
func Serve(ln net.Listener, h http.Handler) error {
	srv := &http.Server{Handler: h, ReadTimeout: 30 * time.Second, WriteTimeout: 5 * time.Minute}
	return srv.Serve(ln)
}
