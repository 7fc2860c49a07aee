// Package readiness is what a running relay says about whether it does
// its job, in one value: per tailnet, whether its members are admitted
// (from a live network map, from the known-peers cache, or not at all,
// and why); whether the admission URL answers; with -mesh-with, whether
// the mesh is up; the certificate's dates; whether the relay is draining.
// The server publishes it (serving.json beside its state, /debug/status),
// and `tailderp check -local` judges it
// by the one rule here (Judge), so the container's healthcheck, the
// Kubernetes probes and the status page can never disagree.
//
// It is a leaf: it imports nothing of tailderp, so check and the server
// both use it.
package readiness

import (
	"fmt"
	"reflect"
	"strings"
	"time"
)

// Admits says whom a tailnet's node admits now. The values are node's
// (node.Admits): the server copies them.
type Admits string

// What a tailnet admits.
const (
	AdmitsMembers   Admits = "members" // from the live network map
	AdmitsFromCache Admits = "cache"   // from the last map kept: a warning
	AdmitsNobody    Admits = "nobody"  // every member is refused
)

// Tailnet is one tailnet's part.
type Tailnet struct {
	Name       string    `json:"name"`
	ControlURL string    `json:"control_url"`
	Admits     Admits    `json:"admits"`
	Problem    string    `json:"problem,omitempty"` // node.Problem: why not AdmitsMembers
	Since      time.Time `json:"since"`             // when Admits/Problem began
	Netmap     time.Time `json:"netmap,omitzero"`   // the map behind the answers was last live
	Until      time.Time `json:"until,omitzero"`    // AdmitsFromCache: when the cache stops admitting
	Fix        string    `json:"fix,omitempty"`     // what the operator should do, naming settings
}

// URL is the admission URL's part, as the last calls showed it: the URL is
// asked only when a client connects.
type URL struct {
	Asked     bool      `json:"asked"`
	Reachable bool      `json:"reachable"`
	Since     time.Time `json:"since,omitzero"`
	Err       string    `json:"err,omitempty"`
	// FailOpen: clients are admitted unverified while it is unreachable.
	FailOpen bool `json:"fail_open"`
}

// Cert is the certificate's part: relayrules.CertProblem's value ("" when
// its dates are fine).
type Cert struct {
	Problem  string    `json:"problem,omitempty"`
	NotAfter time.Time `json:"not_after,omitzero"`
	Fix      string    `json:"fix,omitempty"`
}

// MeshReadyWait is how long a relay with mesh peers (-mesh-with) waits,
// from its start, for each of them to connect before it says ready
// anyway. Until each peer has connected, packets for that peer's clients
// cannot be relayed, so a relay taking clients before would drop some;
// but a dead peer must not keep the whole fleet unready, so after this
// long a peer that never connected is a warning. Peers of a fleet
// started together connect within a second or two on a LAN.
const MeshReadyWait = 15 * time.Second

// Mesh is the mesh's part (-mesh-with): each peer's link, and when the
// relay started, from which MeshReadyWait counts (zero: peers are not
// waited for).
type Mesh struct {
	Started time.Time  `json:"started,omitzero"`
	Peers   []MeshPeer `json:"peers"`
}

// MeshPeer is one mesh link. A peer that turned out to be this relay
// itself is left out by the server.
type MeshPeer struct {
	Peer string `json:"peer"` // as -mesh-with names it
	// Tailnet is the tailnet whose link this is, on a relay of several
	// (one link per tailnet and peer); "" with one.
	Tailnet string `json:"tailnet,omitempty"`
	// Connected: the link is up now (the peer has listed its clients).
	Connected bool `json:"connected"`
	// ConnectedOnce: the link has been up at least once since the start.
	ConnectedOnce bool      `json:"connected_once"`
	Since         time.Time `json:"since"` // when Connected last changed (or the link began)
	Err           string    `json:"err,omitempty"`
}

// Readiness is the relay's whole answer.
type Readiness struct {
	// Open: no tailnet check (-verify-clients=false): anyone is admitted
	// (unless an admission URL refuses); Tailnets is empty.
	Open         bool      `json:"open"`
	Tailnets     []Tailnet `json:"tailnets,omitempty"`
	AdmissionURL *URL      `json:"admission_url,omitempty"`
	// Mesh is nil without mesh peers.
	Mesh *Mesh `json:"mesh,omitempty"`
	Cert Cert  `json:"cert"`
	// Draining: the relay is stopping (SIGTERM): it takes no new clients.
	Draining      bool      `json:"draining,omitempty"`
	DrainingSince time.Time `json:"draining_since,omitzero"`
}

// Equal reports whether r and o say the same.
func (r *Readiness) Equal(o *Readiness) bool { return reflect.DeepEqual(r, o) }

// Severity is how much a finding matters to readiness.
type Severity string

// Severities: a Fail makes the relay not ready.
const (
	OK   Severity = "ok"
	Warn Severity = "warn"
	Fail Severity = "fail"
)

// Finding is one judged part: its severity, a short name ("tailnet
// default", "admission URL", "certificate", "draining") and one line of
// text with the fix when there is one.
type Finding struct {
	Severity Severity `json:"severity"`
	Name     string   `json:"name"`
	Text     string   `json:"text"`
}

// Judge says, part by part, whether the relay does its job at now: a
// tailnet that admits nobody fails (every member would be refused); one
// admitting from the known-peers cache warns (members are admitted, but
// from a map that is not live, until Until); an unreachable admission URL
// that fails closed fails; with mesh peers, a peer that has never
// connected fails for MeshReadyWait from the start and warns after (a
// dead peer must not keep a fleet unready), one connected before but not
// now warns; a certificate clients refuse fails, one close to its end
// warns; draining fails.
func (r *Readiness) Judge(now time.Time) []Finding {
	var out []Finding
	if r.Draining {
		out = append(out, Finding{Fail, "draining", "the relay is stopping (for " + ago(now, r.DrainingSince) + "): it takes no new clients; its clients reconnect to another relay of the region"})
	}
	if r.Open {
		text := "open relay (-verify-clients=false): any client is admitted"
		if r.AdmissionURL != nil {
			text += " that the admission URL allows"
		}
		out = append(out, Finding{OK, "admission", text})
	}
	for _, t := range r.Tailnets {
		name := "tailnet " + t.Name
		switch t.Admits {
		case AdmitsMembers:
			out = append(out, Finding{OK, name, "admits its members (live network map from " + t.ControlURL + ")"})
		case AdmitsFromCache:
			out = append(out, Finding{Warn, name, fmt.Sprintf("admits its members from the known-peers cache, not a live network map: %s for %s; the last live map is %s old, admitted until %s%s",
				problemText(t.Problem), ago(now, t.Since), age(now, t.Netmap), t.Until.UTC().Format(time.RFC3339), fix(t.Fix))})
		default:
			out = append(out, Finding{Fail, name, fmt.Sprintf("refuses every member: %s (control %s) for %s%s",
				problemText(t.Problem), t.ControlURL, ago(now, t.Since), fix(t.Fix))})
		}
	}
	if u := r.AdmissionURL; u != nil {
		switch {
		case !u.Asked:
			out = append(out, Finding{OK, "admission URL", "not asked yet (it is asked when a client connects)"})
		case u.Reachable:
			out = append(out, Finding{OK, "admission URL", "answers"})
		case u.FailOpen:
			out = append(out, Finding{Warn, "admission URL", "unreachable for " + ago(now, u.Since) + ": clients are admitted unverified (fail-open): " + u.Err})
		default:
			out = append(out, Finding{Fail, "admission URL", "unreachable for " + ago(now, u.Since) + ": every client is refused: " + u.Err})
		}
	}
	if f, ok := r.Mesh.judge(now); ok {
		out = append(out, f)
	}
	switch r.Cert.Problem {
	case "":
	case "expiring":
		out = append(out, Finding{Warn, "certificate", "expires " + r.Cert.NotAfter.UTC().Format(time.RFC3339) + fix(r.Cert.Fix)})
	default:
		out = append(out, Finding{Fail, "certificate", r.Cert.Problem + ": clients refuse it (not after " + r.Cert.NotAfter.UTC().Format(time.RFC3339) + ")" + fix(r.Cert.Fix)})
	}
	return out
}

// Ready reports whether no part fails at now.
func (r *Readiness) Ready(now time.Time) bool {
	for _, f := range r.Judge(now) {
		if f.Severity == Fail {
			return false
		}
	}
	return true
}

// name is the link as a finding names it: the peer, and its tailnet on a
// relay of several.
func (p MeshPeer) name() string {
	if p.Tailnet == "" {
		return p.Peer
	}
	return p.Peer + " (tailnet " + p.Tailnet + ")"
}

// judge is the mesh's finding; none without peers.
func (m *Mesh) judge(now time.Time) (Finding, bool) {
	if m == nil || len(m.Peers) == 0 {
		return Finding{}, false
	}
	var never, down []string
	lastErr := ""
	for _, p := range m.Peers {
		switch {
		case p.Connected:
			continue
		case !p.ConnectedOnce:
			never = append(never, p.name())
		default:
			down = append(down, p.name()+" (down for "+ago(now, p.Since)+")")
		}
		if lastErr == "" && p.Err != "" {
			lastErr = "; last error: " + p.Err
		}
	}
	up := len(m.Peers) - len(never) - len(down)
	const name = "mesh"
	switch {
	case len(never) > 0 && !m.Started.IsZero() && now.Sub(m.Started) < MeshReadyWait:
		return Finding{Fail, name, fmt.Sprintf("%d of %d peers connected; waiting for %s to connect (for %s of at most %s after the start: packets for their clients are not relayed until then)%s",
			up, len(m.Peers), strings.Join(never, ", "), ago(now, m.Started), MeshReadyWait, lastErr)}, true
	case len(never) > 0:
		within := ""
		if !m.Started.IsZero() {
			within = " in " + ago(now, m.Started)
		}
		text := fmt.Sprintf("%d of %d peers connected; %s never connected%s: ready anyway, but packets for their clients are not relayed; check that they run and are reachable, have the same mesh key, and that their certificates are trusted",
			up, len(m.Peers), strings.Join(never, ", "), within)
		if len(down) > 0 {
			text += "; not connected now: " + strings.Join(down, ", ")
		}
		return Finding{Warn, name, text + lastErr}, true
	case len(down) > 0:
		return Finding{Warn, name, fmt.Sprintf("%d of %d peers connected; not connected now: %s: packets for their clients are not relayed until they are back%s",
			up, len(m.Peers), strings.Join(down, ", "), lastErr)}, true
	}
	return Finding{OK, name, fmt.Sprintf("connected to every peer (%d)", len(m.Peers))}, true
}

// problemText says a node.Problem in words.
func problemText(p string) string {
	switch p {
	case "starting":
		return "the node is logging in"
	case "needs-login":
		return "the node is not logged in"
	case "login-rejected":
		return "the control server rejected the auth key"
	case "logged-out":
		return "the node was logged out (key expired, or removed)"
	case "needs-approval":
		return "the node awaits approval in the admin console"
	case "control-unreachable":
		return "the control server does not answer"
	case "node-removed":
		return "the control server no longer knows this node (deleted?)"
	case "control-refused":
		return "the control server refuses this node (401/403)"
	case "relogin-failed":
		return "the node could not log in again as a new node"
	case "stopped":
		return "the node stopped"
	case "":
		return "no live network map"
	}
	return p
}

func fix(f string) string {
	if f == "" {
		return ""
	}
	return "; fix: " + f
}

// ago is how long before now t was, in whole seconds ("?" for none).
func ago(now, t time.Time) string {
	if t.IsZero() {
		return "?"
	}
	return now.Sub(t).Round(time.Second).String()
}

// age is how old t is at now ("never" for none).
func age(now, t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return now.Sub(t).Round(time.Second).String()
}
