// Package verify decides which clients may use the relay, at connect time
// and afterwards: a client is admitted when its node key belongs to one of
// our tailnets (asked of the embedded nodes, see package node) and, if an
// admission URL is configured, that URL admits it too. When a check cannot
// answer (no node has a network map yet, the URL is down) the client is
// refused, unless FailOpen is set; while a tailnet's answers are about to
// arrive (its node has just started), a client that would be refused is
// held for them first (NotReadyWait). When a key stops being admissible
// (Revoke, and a periodic Sweep as a safety net) its connections are
// closed.
//
// A tailnet is asked through an interface, KeyChecker, so this package is
// tested without a tailnet and asks several. See the Verifier example.
package verify

import (
	"bytes"
	"context"
	"encoding/json"
	"expvar"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/metrics"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/logs"
)

// KeyChecker reports whether a node key belongs to a tailnet.
type KeyChecker interface {
	// KnowsNodeKey reports whether k is a node of the tailnet; ready is
	// false when it cannot tell yet (no network map), and known is then
	// false too.
	KnowsNodeKey(k key.NodePublic) (known, ready bool)
}

// PeerCounter is optionally implemented by a KeyChecker that can say how
// many nodes it knows, so a refusal while it knows suspiciously few can say
// why that might be.
type PeerCounter interface {
	PeerCount() int
}

// Settling is optionally implemented by a KeyChecker whose answers are
// about to change: it cannot answer yet, or answers from an old copy (a
// cache), and expects its live answers soon (a node that has just
// started). Admit holds a client it would refuse meanwhile: see
// Verifier.NotReadyWait.
type Settling interface {
	// Settling returns a channel that is closed when the answers have
	// arrived, or nil when none are expected soon.
	Settling() <-chan struct{}
}

// Namer is optionally implemented by a KeyChecker that knows the tailnet
// names of node keys, for logs and the status page.
type Namer interface {
	NodeName(k key.NodePublic) string
}

// Conns is what Verifier needs of the relay to act on a revocation: its
// admitted connections (relay.Server).
type Conns interface {
	// Revoke closes every admitted connection of k and reports how many.
	Revoke(k key.NodePublic) int
	// ConnectedKeys lists the keys with an admitted connection open.
	ConnectedKeys() []key.NodePublic
}

// TenantConns is optionally implemented by a Conns that keeps tailnets
// apart (relay.Server with Tenants): it says which tailnet a client's
// connection was given to.
type TenantConns interface {
	// ConnectedTenant is the tailnet of k's admitted connection, "" if
	// none.
	ConnectedTenant(k key.NodePublic) string
}

// Tailnet is one tailnet whose clients are admitted.
type Tailnet struct {
	// Name labels the tailnet's metrics and log lines ("default" for the
	// one a single-tailnet relay serves).
	Name string
	// Keys says which node keys belong to it.
	Keys KeyChecker
}

// Reasons a client is refused, as counted in metrics and logged.
const (
	ReasonNotInTailnet    = "not_in_tailnet"
	ReasonTailnetNotReady = "tailnet_not_ready"
	ReasonURLDenied       = "url_denied"
	ReasonURLUnreachable  = "url_unreachable"
	// ReasonTwoTailnets: with Isolated, two tailnets know the key, so
	// neither can be sure the client is its own.
	ReasonTwoTailnets = "in_two_tailnets"
)

// Reasons the sweep closes a connection (Revoke takes the caller's).
const (
	// RevokeNotAdmissible: no tailnet admits the key any more.
	RevokeNotAdmissible = "not_admissible"
	// RevokeNoAnswer: no tailnet can answer at all any more (fail-closed).
	RevokeNoAnswer = "no_answer"
)

// URLTimeout bounds one call to the admission URL, as derper does.
const URLTimeout = 5 * time.Second

// DefaultSweepEvery is how often Watch re-checks connected clients.
const DefaultSweepEvery = time.Second

// Defaults for the Verifier fields of the same names.
const (
	// DefaultNotReadyWait stays below derpserver's 5 s bound on an
	// admission, so a client still unanswered then is refused by us, with
	// our reason, rather than cut off by derpserver's deadline.
	DefaultNotReadyWait = 4 * time.Second
	// DefaultMaxHeld bounds what held clients cost while a tailnet's
	// answers settle: each is a goroutine and a connection with its TLS
	// and DERP buffers (tens of KiB), for at most NotReadyWait.
	DefaultMaxHeld = 2048
)

// Verifier is the admission decision. Its exported fields may be changed
// until the first call to Admit.
type Verifier struct {
	// Tailnets are the tailnets whose clients are admitted: a key any of
	// them knows is admitted. Empty means no tailnet check (only URL).
	Tailnets []Tailnet

	// Isolated says the relay keeps the tailnets apart (one DERP server
	// each, relay.Server.Tenants): a client is admitted only by the one
	// tailnet it is routed to (TenantOf, ForTailnet), a key two tailnets
	// know is admitted by neither, and Revoke and Sweep close a client
	// that the tailnet it was given to no longer knows.
	Isolated bool

	// URL, if non-empty, is an admission controller in derper's format:
	// it is POSTed a tailcfg.DERPAdmitClientRequest and must answer 200
	// with a tailcfg.DERPAdmitClientResponse whose Allow is true.
	URL string

	// HTTPClient calls URL; nil means a client with URLTimeout that keeps
	// enough idle connections for bursts of connecting clients.
	HTTPClient *http.Client

	// FailOpen admits clients when a check cannot answer (the node is not
	// logged in yet, URL unreachable) instead of refusing them.
	FailOpen bool

	// URLFailOpen admits clients when URL is unreachable (derper's
	// -verify-client-url-fail-open), without FailOpen's tailnet part.
	URLFailOpen bool

	// NotReadyWait is how long Admit holds a client that no tailnet
	// admits while some tailnet's answers are settling (see Settling: the
	// embedded node has just started and has no live network map yet),
	// instead of refusing it at once. A refused client retries with a
	// growing backoff (magicsock's reaches seconds), each retry costing
	// the relay a TLS and a DERP handshake, and competing for CPU with the
	// node's login; a held client costs its goroutine and connection and
	// is decided the moment the answers arrive. The hold also ends with
	// ctx (derpserver bounds an admission at 5 s; a closing relay ends
	// it), and as soon as no tailnet is settling; the client is then
	// decided as it would have been at once, so admission still fails
	// closed. Clients that FailOpen admits unverified are not held. Zero
	// means DefaultNotReadyWait; negative, no hold.
	NotReadyWait time.Duration

	// MaxHeld bounds the clients held at once (see NotReadyWait); more
	// are decided at once. Zero means DefaultMaxHeld.
	MaxHeld int

	// Conns, if set, is the relay, whose connections Revoke and Sweep
	// close.
	Conns Conns

	// Logger receives one line per refusal and revocation (rate-limited);
	// nil discards.
	Logger *slog.Logger

	once        sync.Once
	client      *http.Client
	logLimit    *logs.Limiter
	hintLimit   *logs.Limiter
	recentMu    sync.Mutex
	recent      map[key.NodePublic]Admission
	events      []Event // ring of the last maxEvents
	nextEvent   int
	admitted    metrics.LabelMap // by tailnet
	failOpen    expvar.Int
	refused     metrics.LabelMap // by reason
	revoked     metrics.MultiLabelMap[revokedKey]
	lastRefusal expvar.String
	holding     atomic.Int64 // clients held now
	held        expvar.Int   // clients held, in all
	heldOver    expvar.Int   // clients not held: MaxHeld were

	urlMu     sync.Mutex
	urlHealth URLHealth

	sweepMu    sync.Mutex
	suspicious map[key.NodePublic]bool // inadmissible at the last sweep
}

func (v *Verifier) init() { v.once.Do(v.setup) }

func (v *Verifier) setup() {
	if v.Logger == nil {
		v.Logger = logs.Discard()
	}
	v.client = v.HTTPClient
	if v.client == nil {
		// Enough idle connections for bursts of connecting clients
		// (net/http keeps 2 per host by default).
		tr := &http.Transport{Proxy: http.ProxyFromEnvironment, MaxIdleConnsPerHost: 64, IdleConnTimeout: 90 * time.Second}
		if dt, ok := http.DefaultTransport.(*http.Transport); ok {
			tr = dt.Clone()
			tr.MaxIdleConnsPerHost = 64
		}
		v.client = &http.Client{Transport: tr, Timeout: URLTimeout}
	}
	v.logLimit = logs.NewLimiter(10, 10*time.Second)
	v.hintLimit = logs.NewLimiter(1, 10*time.Minute)
	v.admitted = metrics.LabelMap{Label: "tailnet"}
	v.refused = metrics.LabelMap{Label: "reason"}
	v.revoked.Type = "counter"
}

// lookup asks the tailnets about k: the first that knows it, and whether
// any could answer. With Isolated, a key two tailnets know is known by
// none (twice is then true).
func (v *Verifier) lookup(k key.NodePublic) (tn *Tailnet, anyReady bool) {
	tn, anyReady, _ = v.lookupAll(k)
	return tn, anyReady
}

func (v *Verifier) lookupAll(k key.NodePublic) (tn *Tailnet, anyReady, twice bool) {
	for i := range v.Tailnets {
		known, ready := v.Tailnets[i].Keys.KnowsNodeKey(k)
		anyReady = anyReady || ready || known
		if !known {
			continue
		}
		if tn != nil {
			return nil, true, true
		}
		tn = &v.Tailnets[i]
		if !v.Isolated {
			return tn, true, false
		}
	}
	return tn, anyReady, false
}

// name is k's tailnet name, from the first tailnet that names it.
func (v *Verifier) name(k key.NodePublic) string {
	for _, t := range v.Tailnets {
		if n, ok := t.Keys.(Namer); ok {
			if s := n.NodeName(k); s != "" {
				return s
			}
		}
	}
	return ""
}

// Admit reports whether the client holding clientKey, connecting from
// src, may use the relay: a node of any of the tailnets (with Isolated,
// of exactly one), then the URL.
func (v *Verifier) Admit(ctx context.Context, clientKey key.NodePublic, src netip.Addr) bool {
	return v.admit(ctx, clientKey, src, "")
}

// admit is Admit; only, if set, is the one tailnet that may admit.
func (v *Verifier) admit(ctx context.Context, clientKey key.NodePublic, src netip.Addr, only string) bool {
	v.init()
	tailnet := ""
	if len(v.Tailnets) > 0 {
		tn, anyReady, twice := v.find(ctx, clientKey)
		switch {
		case tn != nil && (only == "" || tn.Name == only):
			tailnet = tn.Name
		case tn != nil:
			// Routed to another tailnet than the one that knows it.
			v.refuse(clientKey, src, ReasonNotInTailnet, nil)
			return false
		case twice:
			v.refuse(clientKey, src, ReasonTwoTailnets, nil)
			return false
		case !anyReady && v.FailOpen:
			v.admitFailOpen(clientKey, src, "tailnet membership not known yet", nil)
		case !anyReady:
			v.refuse(clientKey, src, ReasonTailnetNotReady, nil)
			return false
		default:
			v.refuse(clientKey, src, ReasonNotInTailnet, nil)
			return false
		}
	}
	if v.URL != "" {
		allow, err := v.askURL(ctx, clientKey, src)
		v.noteURL(err)
		switch {
		case err != nil && (v.FailOpen || v.URLFailOpen):
			v.admitFailOpen(clientKey, src, "admission URL unreachable", err)
		case err != nil:
			v.refuse(clientKey, src, ReasonURLUnreachable, err)
			return false
		case !allow:
			v.refuse(clientKey, src, ReasonURLDenied, nil)
			return false
		}
	}
	if tailnet == "" {
		tailnet = only // admitted unverified (fail-open) into it
	}
	v.admitted.Add(tailnet, 1)
	v.noteAdmitted(clientKey, src, tailnet)
	return true
}

// find is the tailnet that knows k, as lookupAll says, after holding the
// client (hold) while answers that might know it settle.
func (v *Verifier) find(ctx context.Context, k key.NodePublic) (tn *Tailnet, anyReady, twice bool) {
	tn, anyReady, twice = v.lookupAll(k)
	if tn == nil && !twice {
		// Not known now; maybe once a tailnet's answers arrive.
		tn, anyReady = v.hold(ctx, k, anyReady)
		if tn == nil {
			_, _, twice = v.lookupAll(k)
		}
	}
	return tn, anyReady, twice
}

// TenantOf names the tailnet of the client announcing clientKey from src,
// for a relay that keeps the tailnets apart (relay.Server.TenantOf, with
// Isolated): the one tailnet that knows the key, holding the client as
// Admit does while answers settle. "" closes the connection: no tailnet
// knows the key, two do, or none can answer (then, with FailOpen, the
// first tailnet takes it unverified); the refusal is counted and logged
// as Admit's are. The chosen tailnet's Admitter (ForTailnet) then decides,
// with the URL.
func (v *Verifier) TenantOf(ctx context.Context, clientKey key.NodePublic, src netip.Addr) string {
	v.init()
	if len(v.Tailnets) == 0 {
		return ""
	}
	tn, anyReady, twice := v.find(ctx, clientKey)
	switch {
	case tn != nil:
		return tn.Name
	case twice:
		v.refuse(clientKey, src, ReasonTwoTailnets, nil)
	case !anyReady && v.FailOpen:
		return v.Tailnets[0].Name // admitted unverified by its Admitter
	case !anyReady:
		v.refuse(clientKey, src, ReasonTailnetNotReady, nil)
	default:
		v.refuse(clientKey, src, ReasonNotInTailnet, nil)
	}
	return ""
}

// TailnetAdmitter admits the clients of one tailnet of a Verifier: a
// relay.Tenant's Admitter.
type TailnetAdmitter struct {
	v    *Verifier
	name string
}

// ForTailnet is the Admitter of the tailnet called name, for a relay that
// keeps the tailnets apart (Isolated): it admits a client only if that
// tailnet, and no other, knows its key, and then asks the URL as Admit
// does.
func (v *Verifier) ForTailnet(name string) *TailnetAdmitter {
	return &TailnetAdmitter{v: v, name: name}
}

// Admit reports whether the client may relay as a member of the tailnet.
func (a *TailnetAdmitter) Admit(ctx context.Context, clientKey key.NodePublic, src netip.Addr) bool {
	return a.v.admit(ctx, clientKey, src, a.name)
}

// stillAdmissible reports whether k's connections may stay: some tailnet
// knows k (with Isolated: exactly one, the one its connection was given
// to), or none can answer and FailOpen admits.
func (v *Verifier) stillAdmissible(k key.NodePublic) (ok, anyReady bool) {
	tn, anyReady := v.lookup(k)
	if tn == nil {
		return !anyReady && v.FailOpen, anyReady
	}
	if tc, isTenants := v.Conns.(TenantConns); v.Isolated && isTenants {
		if got := tc.ConnectedTenant(k); got != "" && got != tn.Name {
			return false, true
		}
	}
	return true, true
}

// hold waits, while some tailnet's answers are settling, until one admits
// k, none is settling any more, NotReadyWait passed or ctx ended; then it
// asks the tailnets again. It returns at once, with the answer it was
// given, when there is nothing to wait for, when FailOpen admits anyway
// (no tailnet ready), or when MaxHeld clients are held already.
func (v *Verifier) hold(ctx context.Context, k key.NodePublic, anyReady bool) (*Tailnet, bool) {
	wait := v.NotReadyWait
	if wait == 0 {
		wait = DefaultNotReadyWait
	}
	if wait < 0 || (!anyReady && v.FailOpen) {
		return nil, anyReady
	}
	settling := v.settling()
	if len(settling) == 0 {
		return nil, anyReady
	}
	maxHeld := v.MaxHeld
	if maxHeld == 0 {
		maxHeld = DefaultMaxHeld
	}
	if v.holding.Add(1) > int64(maxHeld) {
		v.holding.Add(-1)
		v.heldOver.Add(1)
		return nil, anyReady
	}
	defer v.holding.Add(-1)
	v.held.Add(1)
	timeout := time.NewTimer(wait)
	defer timeout.Stop()
	for waitAny(ctx, timeout.C, settling) {
		// Which still settle first: answers arriving after this are
		// either seen by the lookup or wake the next wait at once.
		settling = v.settling()
		tn, anyReady := v.lookup(k)
		if tn != nil || len(settling) == 0 {
			return tn, anyReady
		}
	}
	return v.lookup(k)
}

// settling lists the channels of the tailnets whose answers are settling.
func (v *Verifier) settling() []<-chan struct{} {
	var out []<-chan struct{}
	for _, t := range v.Tailnets {
		if s, ok := t.Keys.(Settling); ok {
			if ch := s.Settling(); ch != nil {
				out = append(out, ch)
			}
		}
	}
	return out
}

// waitAny waits until one of chs is closed (true), or timeout fires or
// ctx ends (false).
func waitAny(ctx context.Context, timeout <-chan time.Time, chs []<-chan struct{}) bool {
	if len(chs) == 1 {
		select {
		case <-chs[0]:
			return true
		case <-timeout:
		case <-ctx.Done():
		}
		return false
	}
	cases := []reflect.SelectCase{
		{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(timeout)},
		{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(ctx.Done())},
	}
	for _, ch := range chs {
		cases = append(cases, reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(ch)})
	}
	i, _, _ := reflect.Select(cases)
	return i >= 2
}

// Admission records a client admitted to the relay.
type Admission struct {
	Key     key.NodePublic
	From    netip.Addr
	At      time.Time
	Tailnet string // the tailnet that knew it; "" without a tailnet check
}

// Event is one admission decision, for the status page.
type Event struct {
	At      time.Time
	Key     key.NodePublic
	Name    string // tailnet name of the node, "" if unknown
	From    netip.Addr
	Tailnet string
	What    string // "admitted", "refused" or "revoked"
	Reason  string // why refused or revoked
}

// maxRecent bounds the memory kept for the debug client list; maxEvents
// the decisions kept for the status page.
const (
	maxRecent = 1024
	maxEvents = 32
)

func (v *Verifier) noteAdmitted(k key.NodePublic, src netip.Addr, tailnet string) {
	v.note(Event{Key: k, From: src, Tailnet: tailnet, What: "admitted"})
	v.recentMu.Lock()
	defer v.recentMu.Unlock()
	if v.recent == nil {
		v.recent = make(map[key.NodePublic]Admission)
	}
	if _, ok := v.recent[k]; !ok && len(v.recent) >= maxRecent {
		var oldest key.NodePublic
		var at time.Time
		for k2, a := range v.recent {
			if at.IsZero() || a.At.Before(at) {
				oldest, at = k2, a.At
			}
		}
		delete(v.recent, oldest)
	}
	v.recent[k] = Admission{Key: k, From: src, At: time.Now(), Tailnet: tailnet}
}

// note adds a decision to the ring of recent ones.
func (v *Verifier) note(e Event) {
	e.At = time.Now()
	if e.Name == "" {
		e.Name = v.name(e.Key)
	}
	v.recentMu.Lock()
	defer v.recentMu.Unlock()
	if len(v.events) < maxEvents {
		v.events = append(v.events, e)
		return
	}
	v.events[v.nextEvent] = e
	v.nextEvent = (v.nextEvent + 1) % maxEvents
}

// Events returns the last decisions (at most 32), newest first.
func (v *Verifier) Events() []Event {
	v.recentMu.Lock()
	out := slices.Clone(v.events)
	v.recentMu.Unlock()
	slices.SortStableFunc(out, func(a, b Event) int { return b.At.Compare(a.At) })
	return out
}

// Recent returns the latest admission of each of the most recently
// admitted clients (at most 1024), newest first.
func (v *Verifier) Recent() []Admission {
	v.recentMu.Lock()
	out := make([]Admission, 0, len(v.recent))
	for _, a := range v.recent {
		out = append(out, a)
	}
	v.recentMu.Unlock()
	slices.SortFunc(out, func(a, b Admission) int { return b.At.Compare(a.At) })
	return out
}

// Revocation is a key a tailnet no longer admits.
type Revocation struct {
	Key     key.NodePublic
	Name    string // the node's tailnet name, "" if unknown
	Tailnet string // the tailnet that dropped it
	Reason  string // why, e.g. "removed", "key_rotated", "key_expired"
}

// Revoke closes the connections of r.Key unless another tailnet still
// admits it, counts them by reason and logs it (rate-limited). It returns
// how many connections it closed.
func (v *Verifier) Revoke(r Revocation) int {
	v.init()
	if v.Conns == nil {
		return 0
	}
	if ok, _ := v.stillAdmissible(r.Key); ok {
		return 0 // still a node of some tailnet (its own), or fail-open
	}
	return v.closeConns(r)
}

func (v *Verifier) closeConns(r Revocation) int {
	n := v.Conns.Revoke(r.Key)
	if n == 0 {
		return 0
	}
	if r.Name == "" {
		r.Name = v.name(r.Key)
	}
	v.revoked.Add(revokedKey{Tailnet: r.Tailnet, Reason: r.Reason}, int64(n))
	v.note(Event{Key: r.Key, Name: r.Name, Tailnet: r.Tailnet, What: "revoked", Reason: r.Reason})
	if v.allowLog() {
		v.Logger.Info("verify: client disconnected: its key is no longer admissible",
			"key", r.Key.ShortString(), "name", r.Name, "tailnet", r.Tailnet, "reason", r.Reason, "connections", n)
	}
	return n
}

// Sweep re-checks every connected client against the tailnets and closes
// the connections of those no tailnet admits any more; if no tailnet can
// answer at all, it closes them all unless FailOpen. A client is closed
// only when it was found inadmissible by the previous sweep too: Revoke,
// called as each change happens and with its reason, goes first; Sweep is
// the safety net for anything that changed without a word (and for
// Tailnets that report no drops). It returns how many connections it
// closed.
func (v *Verifier) Sweep() int {
	v.init()
	if v.Conns == nil || len(v.Tailnets) == 0 {
		return 0
	}
	v.sweepMu.Lock()
	defer v.sweepMu.Unlock()
	prev := v.suspicious
	v.suspicious = make(map[key.NodePublic]bool)
	closed := 0
	for _, k := range v.Conns.ConnectedKeys() {
		ok, anyReady := v.stillAdmissible(k)
		reason := RevokeNotAdmissible
		switch {
		case ok:
			continue
		case !anyReady:
			reason = RevokeNoAnswer
		}
		if !prev[k] {
			v.suspicious[k] = true
			continue
		}
		closed += v.closeConns(Revocation{Key: k, Tailnet: v.admittedBy(k), Reason: reason})
	}
	return closed
}

// admittedBy is the tailnet k was last admitted through.
func (v *Verifier) admittedBy(k key.NodePublic) string {
	v.recentMu.Lock()
	defer v.recentMu.Unlock()
	return v.recent[k].Tailnet
}

// Watch runs Sweep every interval (DefaultSweepEvery if zero) until ctx
// ends.
func (v *Verifier) Watch(ctx context.Context, every time.Duration) {
	if every == 0 {
		every = DefaultSweepEvery
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			v.Sweep()
		}
	}
}

func (v *Verifier) askURL(ctx context.Context, clientKey key.NodePublic, src netip.Addr) (bool, error) {
	body, err := json.Marshal(&tailcfg.DERPAdmitClientRequest{NodePublic: clientKey, Source: src})
	if err != nil {
		return false, fmt.Errorf("verify: encode admission request: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, URLTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, v.URL, bytes.NewReader(body))
	if err != nil {
		return false, fmt.Errorf("verify: admission URL: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	res, err := v.client.Do(req)
	if err != nil {
		return false, fmt.Errorf("verify: admission URL: %w", err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		// derper treats any non-200 as a refusal, not an outage.
		io.Copy(io.Discard, io.LimitReader(res.Body, 4<<10))
		return false, nil
	}
	var ar tailcfg.DERPAdmitClientResponse
	if err := json.NewDecoder(io.LimitReader(res.Body, 4<<10)).Decode(&ar); err != nil {
		return false, fmt.Errorf("verify: admission URL: bad answer: %w", err)
	}
	return ar.Allow, nil
}

// URLHealth is what the last calls to the admission URL showed: whether
// it answered (any HTTP answer counts; a refusal is an answer), since
// when, and the last failure. The URL is asked only when a client
// connects, so this is as fresh as the last connect (At).
type URLHealth struct {
	Asked     bool      // the URL was asked at least once
	Reachable bool      // the last call got an answer
	Since     time.Time // when Reachable last changed (or the first call)
	At        time.Time // the last call
	Err       string    // the last failure, when not Reachable
}

// URLHealth reports the admission URL's health as the last calls showed
// it; the zero value when there is no URL or it was never asked.
func (v *Verifier) URLHealth() URLHealth {
	v.urlMu.Lock()
	defer v.urlMu.Unlock()
	return v.urlHealth
}

// noteURL records the outcome of a call to the admission URL.
func (v *Verifier) noteURL(err error) {
	now := time.Now()
	v.urlMu.Lock()
	defer v.urlMu.Unlock()
	h := &v.urlHealth
	reachable := err == nil
	if !h.Asked || h.Reachable != reachable {
		h.Since = now
	}
	h.Asked, h.Reachable, h.At = true, reachable, now
	h.Err = ""
	if err != nil {
		h.Err = err.Error()
	}
}

func (v *Verifier) refuse(k key.NodePublic, src netip.Addr, reason string, err error) {
	v.refused.Add(reason, 1)
	v.lastRefusal.Set(time.Now().UTC().Format(time.RFC3339) + " " + reason)
	v.note(Event{Key: k, From: src, What: "refused", Reason: reason})
	if !v.allowLog() {
		return
	}
	attrs := []any{"key", k.ShortString(), "src", src.String(), "reason", reason}
	if err != nil {
		attrs = append(attrs, "err", err.Error())
	}
	v.Logger.Info("verify: client refused", attrs...)
	if reason == ReasonNotInTailnet {
		v.hintFewPeers()
	}
}

// hintFewPeers warns (rarely) when a stranger is refused while the
// relay's tailnet nodes see almost no peers (≤ 1): a policy that hides
// clients from the relay's node makes them look like strangers.
//
// A refused key belongs to no tailnet the relay knows, so which tailnet it
// "would" belong to cannot be told. With one tailnet the hint is said only
// when that tailnet's node really sees ≤ 1 peer; with several, only when
// every one of them does (then every tailnet is named): a single small
// tailnet beside a healthy one says nothing about a stranger, most likely
// a real one.
func (v *Verifier) hintFewPeers() {
	if len(v.Tailnets) == 0 {
		return
	}
	var names []string
	peers := 0
	for _, t := range v.Tailnets {
		pc, ok := t.Keys.(PeerCounter)
		if !ok {
			return
		}
		c := pc.PeerCount()
		if c > 1 {
			return
		}
		names = append(names, t.Name)
		peers += c
	}
	if ok, _ := v.hintLimit.Allow(time.Now()); ok {
		v.Logger.Warn("verify: the relay's tailnet node sees almost no peers; if your tailnet policy hides clients from it, they are refused as strangers (see docs: the relay node must be able to see every client)",
			"tailnet", strings.Join(names, ","), "peers_seen", peers)
	}
}

func (v *Verifier) admitFailOpen(k key.NodePublic, src netip.Addr, why string, err error) {
	v.failOpen.Add(1)
	if !v.allowLog() {
		return
	}
	attrs := []any{"key", k.ShortString(), "src", src.String(), "why", why}
	if err != nil {
		attrs = append(attrs, "err", err.Error())
	}
	v.Logger.Warn("verify: admitting unverified client (fail-open)", attrs...)
}

// allowLog reports whether a per-client line may be logged now, saying
// first how many were left out since the last one.
func (v *Verifier) allowLog() bool {
	ok, suppressed := v.logLimit.Allow(time.Now())
	if suppressed > 0 {
		v.Logger.Warn("verify: per-client lines not logged (rate limit)", "count", suppressed)
	}
	return ok
}

// ExpVar returns the admission counters: admitted by tailnet,
// admitted_fail_open, refused by reason, connections revoked by reason,
// and clients held while the tailnets' answers settle (now, in all, and
// not held because MaxHeld were).
func (v *Verifier) ExpVar() expvar.Var {
	v.init()
	m := new(metrics.Set)
	m.Set("counter_admitted", &v.admitted)
	m.Set("counter_admitted_fail_open", &v.failOpen)
	m.Set("counter_refused", &v.refused)
	m.Set("revoked_connections", &v.revoked)
	m.Set("last_refusal", &v.lastRefusal)
	m.Set("gauge_holding", expvar.Func(func() any { return v.holding.Load() }))
	m.Set("counter_held", &v.held)
	m.Set("counter_not_held_max", &v.heldOver)
	return m
}

// TailnetExpVar is the admission counters of one tailnet, for its own
// /debug on a relay that keeps tailnets apart: its admissions (its
// revocations are on its status page). Refusals are not in it: a refused
// key belongs to no tailnet (or to two), so whose they are cannot be told.
func (v *Verifier) TailnetExpVar(name string) expvar.Var {
	v.init()
	m := new(metrics.Set)
	m.Set("counter_admitted", expvar.Func(func() any { return v.AdmittedBy(name) }))
	return m
}

// Refused returns how many clients were refused for reason.
func (v *Verifier) Refused(reason string) int64 {
	v.init()
	return v.refused.Get(reason).Value()
}

// revokedKey labels the revoked-connections counter.
type revokedKey struct {
	Tailnet string `prom:"tailnet"`
	Reason  string `prom:"reason"`
}

// Revoked returns how many connections were closed for reason, in all
// tailnets.
func (v *Verifier) Revoked(reason string) int64 {
	v.init()
	var n int64
	v.revoked.Do(func(kv metrics.KeyValue[revokedKey]) {
		if i, ok := kv.Value.(*expvar.Int); ok && kv.Key.Reason == reason {
			n += i.Value()
		}
	})
	return n
}

// RevokedBy returns the connections closed, by reason, in tailnet.
func (v *Verifier) RevokedBy(tailnet string) map[string]int64 {
	v.init()
	out := map[string]int64{}
	v.revoked.Do(func(kv metrics.KeyValue[revokedKey]) {
		if i, ok := kv.Value.(*expvar.Int); ok && kv.Key.Tailnet == tailnet {
			out[kv.Key.Reason] += i.Value()
		}
	})
	return out
}

// RefusedByReason returns how many clients were refused, by reason.
func (v *Verifier) RefusedByReason() map[string]int64 {
	v.init()
	out := map[string]int64{}
	v.refused.Do(func(kv expvar.KeyValue) {
		if i, ok := kv.Value.(*expvar.Int); ok {
			out[kv.Key] = i.Value()
		}
	})
	return out
}

// AdmittedBy returns how many clients tailnet admitted.
func (v *Verifier) AdmittedBy(tailnet string) int64 {
	v.init()
	return v.admitted.Get(tailnet).Value()
}

// Held returns how many clients were held while the tailnets' answers
// settled, in all (see NotReadyWait).
func (v *Verifier) Held() int64 {
	v.init()
	return v.held.Value()
}

// Admitted returns how many clients were admitted, in all.
func (v *Verifier) Admitted() int64 {
	v.init()
	var n int64
	v.admitted.Do(func(kv expvar.KeyValue) {
		if i, ok := kv.Value.(*expvar.Int); ok {
			n += i.Value()
		}
	})
	return n
}
