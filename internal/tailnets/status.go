package tailnets

import (
	"context"
	"expvar"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"tailscale.com/metrics"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/debugsrv"
	"github.com/tailderp/tailderp/internal/readiness"
	"github.com/tailderp/tailderp/node"
	"github.com/tailderp/tailderp/relay"
	"github.com/tailderp/tailderp/verify"
)

// Debug is what /debug and its status page are made of: the relay's
// parts (Relay: the tailnets, admission, the server, readiness) and the
// pages' own settings. Each tailnet gets /debug on its own address; what
// it shows is config's to say.
type Debug struct {
	*Relay
	Port    int // -debug-port
	Version string
}

// Serve serves /debug on t's tailnet address until ctx ends: on the
// node's listener, and on a new one when the node logged in again as a
// new node (whose old listener is gone). It says it serves once the node
// is on the tailnet, not before.
func (d *Debug) Serve(ctx context.Context, t *Tailnet, logger *slog.Logger) {
	h := debugsrv.Handler(d.config(t))
	said := false
	for {
		ln, err := t.Node.Listen(ctx, "tcp", ":"+strconv.Itoa(d.Port))
		if err != nil {
			if ctx.Err() == nil {
				logger.Warn("debug: not served", "tailnet", t.Name, "err", err)
			}
			return
		}
		if !said {
			said = true
			go d.sayServing(ctx, t, logger)
		}
		stop := context.AfterFunc(ctx, func() { ln.Close() })
		debugsrv.Serve(ln, h)
		stop()
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second): // no hot loop if Listen keeps failing
		}
	}
}

// sayServing logs where /debug is served once t's node is on the tailnet.
func (d *Debug) sayServing(ctx context.Context, t *Tailnet, logger *slog.Logger) {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for t.Node.State() != node.StateRunning {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
	logger.Info("debug: serving on the tailnet only", "tailnet", t.Name, "port", d.Port)
}

// config is /debug as viewer's tailnet sees it; nil viewer is the operator
// on this machine (-debug-listen): the whole relay.
//
// A relay of one tailnet shows it everything. On a relay of several
// (which keeps them apart: one DERP server each), a tailnet's pages show
// that tailnet only: its DERP server, its clients, its node, its mesh
// links, its admissions; the process-wide pages (pprof, Go runtime, the
// command line) are the first tailnet's and loopback's, the operator's.
func (d *Debug) config(viewer *Tailnet) debugsrv.Config {
	whole := viewer == nil || len(d.Tailnets) <= 1
	c := debugsrv.Config{
		ProcessWide: viewer == nil || viewer == d.Tailnets[0],
		Vars:        map[string]expvar.Var{},
		Status:      func() debugsrv.Status { return d.Status(viewer) },
		NodeName:    d.nodeName(viewer),
		Connected:   d.Server.Connected,
		MeshPeers:   func() []relay.MeshPeerStatus { return d.meshPeers(viewer) },
	}
	if d.Verifier != nil {
		c.Recent = func() []verify.Admission { return d.recent(viewer) }
	}
	if whole {
		c.Vars["tailderp_relay"] = d.Server.ExpVar()
		c.DERP = d.Server.DERP()
		if d.Verifier != nil {
			c.Vars["tailderp_admission"] = d.Verifier.ExpVar()
		}
		if len(d.Tailnets) > 0 {
			c.Vars["tailderp_node"] = d.Tailnets[0].Node.ExpVar()
			c.Vars["tailderp_tailnet"] = d.tailnetVars(d.Tailnets)
		}
		return c
	}
	c.Vars["tailderp_relay"] = d.Server.TenantExpVar(viewer.Name)
	c.DERP = d.Server.TenantDERP(viewer.Name)
	c.Vars["tailderp_admission"] = d.Verifier.TailnetExpVar(viewer.Name)
	c.Vars["tailderp_node"] = viewer.Node.ExpVar()
	c.Vars["tailderp_tailnet"] = d.tailnetVars([]*Tailnet{viewer})
	return c
}

// isolated reports whether viewer sees only its own tailnet: one of
// several, on its own address.
func (d *Debug) isolated(viewer *Tailnet) bool { return viewer != nil && len(d.Tailnets) > 1 }

// meshPeers are the mesh links viewer may see: its tailnet's, on a relay
// of several.
func (d *Debug) meshPeers(viewer *Tailnet) []relay.MeshPeerStatus {
	all := d.Server.MeshPeers()
	if !d.isolated(viewer) {
		return all
	}
	var out []relay.MeshPeerStatus
	for _, m := range all {
		if m.Tenant == viewer.Name {
			out = append(out, m)
		}
	}
	return out
}

// LocalHandler is /debug for the operator on this machine
// (-debug-listen): the whole relay, every tailnet's clients; an open
// relay's only /debug.
func (d *Debug) LocalHandler() http.Handler { return debugsrv.Handler(d.config(nil)) }

// nodeName names a client by viewer's tailnet, or any tailnet's for nil.
func (d *Debug) nodeName(viewer *Tailnet) func(key.NodePublic) string {
	if viewer != nil {
		return viewer.Node.NodeName
	}
	return func(k key.NodePublic) string {
		for _, t := range d.Tailnets {
			if n := t.Node.NodeName(k); n != "" {
				return n
			}
		}
		return ""
	}
}

// owns reports whether k is a node of viewer's tailnet: what its pages
// may show.
func owns(viewer *Tailnet, k key.NodePublic) bool {
	if viewer == nil {
		return true // the operator on this machine
	}
	known, _ := viewer.Node.KnowsNodeKey(k)
	return known
}

// recent lists the admissions of viewer's tailnet.
func (d *Debug) recent(viewer *Tailnet) []verify.Admission {
	var out []verify.Admission
	for _, a := range d.Verifier.Recent() {
		if owns(viewer, a.Key) || a.Tailnet == viewer.Name {
			out = append(out, a)
		}
	}
	return out
}

// Status is the status page for viewer.
func (d *Debug) Status(viewer *Tailnet) debugsrv.Status {
	now := time.Now()
	st := debugsrv.Status{
		Version: d.Version,
		Started: d.Started.UTC(),
		Uptime:  now.Sub(d.Started).Round(time.Second).String(),
	}
	st.Tailnet = "(loopback: the whole relay)"
	if viewer != nil {
		st.Tailnet = viewer.Name
	}
	rd := d.Readiness()
	shown := d.Tailnets
	if d.isolated(viewer) {
		// Its own tailnet's part only; the relay's (certificate, URL,
		// draining) are everyone's.
		for i, t := range d.Tailnets {
			if t == viewer {
				rd.Tailnets = rd.Tailnets[i : i+1]
			}
		}
		if rd.Mesh != nil {
			mesh := *rd.Mesh
			mesh.Peers = nil
			for _, p := range rd.Mesh.Peers {
				if p.Tailnet == viewer.Name {
					mesh.Peers = append(mesh.Peers, p)
				}
			}
			rd.Mesh = &mesh
		}
		shown = []*Tailnet{viewer}
	}
	st.Readiness = rd.Judge(now)
	st.Ready = rd.Ready(now)
	for _, f := range st.Readiness {
		// The tailnets' and the certificate's problems are said below.
		if f.Severity != readiness.OK && (f.Name == "admission URL" || f.Name == "draining" || f.Name == "mesh") {
			st.Problems = append(st.Problems, f.Name+": "+f.Text)
		}
	}
	for i, t := range shown {
		ts := d.tailnetStatus(t, rd.Tailnets[i], now) // one part per tailnet, in order
		st.Tailnets = append(st.Tailnets, ts)
		if ts.Problem != "" {
			st.Problems = append(st.Problems, "tailnet "+t.Name+": "+ts.Problem)
		}
	}

	clients := d.Server.Clients()
	for _, c := range clients {
		if owns(viewer, c.Key) && (!d.isolated(viewer) || c.Tenant == viewer.Name) {
			st.Clients = append(st.Clients, debugsrv.Client{Name: d.nodeName(viewer)(c.Key), Key: c.Key.ShortString(), From: c.From.String(), Since: c.Since.UTC()})
		}
	}
	st.ClientsTotal = len(clients)
	if d.isolated(viewer) {
		st.ClientsTotal = len(st.Clients)
	}

	if d.Verifier != nil {
		d.admission(&st, viewer)
	}
	d.certAndMesh(&st, viewer)
	st.Caps = d.caps(viewer)
	return st
}

// admission fills in what admission decided, as viewer may see it.
func (d *Debug) admission(st *debugsrv.Status, viewer *Tailnet) {
	v := d.Verifier
	st.Admission = debugsrv.Admission{AdmittedAll: v.Admitted(), Refused: v.RefusedByReason()}
	switch {
	case d.isolated(viewer):
		// The relay's totals would tell of the other tailnets.
		st.Admission.AdmittedAll, st.Admission.Refused = v.AdmittedBy(viewer.Name), nil
		st.Admission.Admitted, st.Admission.Revoked = v.AdmittedBy(viewer.Name), v.RevokedBy(viewer.Name)
	case viewer != nil:
		st.Admission.Admitted, st.Admission.Revoked = v.AdmittedBy(viewer.Name), v.RevokedBy(viewer.Name)
	default:
		st.Admission.Admitted = v.Admitted()
	}
	for _, e := range v.Events() {
		dec := debugsrv.Decision{At: e.At.UTC(), What: e.What, Reason: e.Reason}
		switch {
		case d.isolated(viewer) && e.Tailnet != "" && e.Tailnet != viewer.Name:
			continue // another tailnet's decision
		case owns(viewer, e.Key) || e.Tailnet == viewer.Name:
			dec.Name, dec.Key, dec.From = e.Name, e.Key.ShortString(), addrString(e.From)
			if d.isolated(viewer) {
				// As the viewer's tailnet names it, never another's name
				// for a key both list.
				dec.Name = viewer.Node.NodeName(e.Key)
			}
		case e.What != "refused":
			continue // another tailnet's client
		case len(d.Tailnets) == 1:
			dec.Key, dec.From = e.Key.ShortString(), addrString(e.From) // a stranger
		}
		// Otherwise a refusal on a relay of several tailnets: it may be
		// another tailnet's node, so it is shown without key or address.
		st.Admission.Recent = append(st.Admission.Recent, dec)
	}
}

// caps are the connection caps as viewer may see them: on a relay of
// several tailnets, its own share only.
func (d *Debug) caps(viewer *Tailnet) debugsrv.Caps {
	rc := d.Server.Caps()
	c := debugsrv.Caps{MaxConnsPerIP: rc.MaxConnsPerIP, MaxConnsPerTailnet: rc.MaxConnsPerTenant}
	if !d.isolated(viewer) {
		c.RefusedPerIP = rc.RefusedPerIP
		for _, src := range rc.TopSources {
			c.TopSources = append(c.TopSources, debugsrv.SourceConns{Source: src.Source.String(), Conns: src.Conns})
		}
	}
	for _, tc := range rc.Tenants {
		if !d.isolated(viewer) || tc.Name == viewer.Name {
			c.Tailnets = append(c.Tailnets, debugsrv.TailnetConns{Name: tc.Name, Conns: tc.Conns, RefusedFull: tc.RefusedFull})
		}
	}
	return c
}

// certAndMesh fills in the certificate, with its problem, and the mesh
// links viewer may see.
func (d *Debug) certAndMesh(st *debugsrv.Status, viewer *Tailnet) {
	cs := d.Server.CertStatus()
	st.Certificate = debugsrv.Certificate{Serving: cs.Serving, Subject: cs.Subject, CertName: cs.CertName, NotAfter: cs.NotAfter.UTC(),
		DaysLeft: cs.DaysLeft, Problem: string(cs.Problem), Fix: cs.Fix}
	if cs.Serving && cs.Problem != relay.CertOK {
		st.Problems = append(st.Problems, fmt.Sprintf("certificate %s (valid until %s): %s; %s", cs.Subject, cs.NotAfter.UTC().Format(time.RFC3339), cs.Problem, cs.Fix))
	}
	// A link that is down is a problem through readiness's "mesh" part.
	for _, m := range d.meshPeers(viewer) {
		st.Mesh = append(st.Mesh, debugsrv.MeshPeer{Peer: m.Peer.String(), Tailnet: m.Tenant, State: string(m.State), Since: m.Since.UTC(), LastError: m.LastError})
	}
}

// tailnetStatus says how t's node is, and what is wrong with it: its
// readiness judged (r is t's part of the relay's readiness), and a login
// that stopped it for good.
func (d *Debug) tailnetStatus(t *Tailnet, r readiness.Tailnet, now time.Time) debugsrv.TailnetStatus {
	ns := t.Node.Status()
	ts := debugsrv.TailnetStatus{
		Name: t.Name, State: string(ns.State), ControlURL: ns.ControlURL, ControlReachable: ns.Control,
		ControlSince: ns.ControlSince.UTC(), AdmissionFrom: string(ns.Source), Peers: ns.Peers, Admits: string(r.Admits),
	}
	if !ns.Netmap.IsZero() {
		ts.NetmapReceived = ns.Netmap.UTC()
	}
	var problems []string
	if err := t.Failed(); err != nil {
		problems = append(problems, fmt.Sprintf("stopped: %v; %s", err, t.Advice(node.ProblemLoginRejected)))
	} else if !ns.Control && now.Sub(ns.ControlSince) > 30*time.Second {
		// Said even while the answers are still live: the map will not
		// be for long.
		problems = append(problems, fmt.Sprintf("control server %s not reachable for %s; %s", ns.ControlURL, now.Sub(ns.ControlSince).Round(time.Second),
			t.Advice(node.ProblemControlUnreachable)))
	}
	for _, f := range (&readiness.Readiness{Tailnets: []readiness.Tailnet{r}}).Judge(now) {
		if f.Severity != readiness.OK {
			problems = append(problems, f.Text)
		}
	}
	ts.Problem = strings.Join(problems, "; ")
	return ts
}

func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// tailnetVars are the tailnets' node metrics, labelled by tailnet: peers
// seen, whether control answers, the age of the network map, where
// admission answers come from, and whether the node stopped.
func (d *Debug) tailnetVars(tns []*Tailnet) expvar.Var {
	type tn struct {
		Tailnet string `prom:"tailnet"`
	}
	type tnSource struct {
		Tailnet string `prom:"tailnet"`
		Source  string `prom:"source"`
	}
	peers := &metrics.MultiLabelMap[tn]{Type: "gauge", Help: "nodes of the tailnet its node sees"}
	control := &metrics.MultiLabelMap[tn]{Type: "gauge", Help: "1 while the tailnet's control server answers"}
	age := &metrics.MultiLabelMap[tn]{Type: "gauge", Help: "seconds since the network map behind admission arrived; -1 before one"}
	stopped := &metrics.MultiLabelMap[tn]{Type: "gauge", Help: "1 once the tailnet's node stopped for good (login rejected)"}
	source := &metrics.MultiLabelMap[tnSource]{Type: "gauge", Help: "1 for where admission answers come from: live, cache or none"}
	for _, t := range tns {
		k := tn{t.Name}
		peers.Set(k, expvar.Func(func() any { return t.Node.PeerCount() }))
		control.Set(k, expvar.Func(func() any { return b2i(t.Node.Status().Control) }))
		age.Set(k, expvar.Func(func() any {
			if st := t.Node.Status(); !st.Netmap.IsZero() {
				return int64(time.Since(st.Netmap).Seconds())
			}
			return -1
		}))
		stopped.Set(k, expvar.Func(func() any { return b2i(t.Failed() != nil) }))
		for _, s := range []node.Source{node.SourceLive, node.SourceCache, node.SourceNone} {
			source.Set(tnSource{t.Name, string(s)}, expvar.Func(func() any { return b2i(t.Node.Status().Source == s) }))
		}
	}
	m := new(metrics.Set)
	m.Set("peers", peers)
	m.Set("control_reachable", control)
	m.Set("netmap_age_seconds", age)
	m.Set("stopped", stopped)
	m.Set("admission_source", source)
	return m
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}
