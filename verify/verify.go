// Package verify decides which clients may use the relay: a client is
// admitted when its node key belongs to our tailnet (asked of the embedded
// node, see package node) and, if an admission URL is configured, that URL
// admits it too. When a check cannot answer (the node has not logged in
// yet, the URL is down) the client is refused, unless FailOpen is set.
//
// The tailnet check is an interface, KeyChecker, so this package is tested
// without a tailnet and can ask several tailnets. See the Verifier example.
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
	"slices"
	"sync"
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

// Reasons a client is refused, as counted in metrics and logged.
const (
	ReasonNotInTailnet    = "not_in_tailnet"
	ReasonTailnetNotReady = "tailnet_not_ready"
	ReasonURLDenied       = "url_denied"
	ReasonURLUnreachable  = "url_unreachable"
)

// URLTimeout bounds one call to the admission URL, as derper does.
const URLTimeout = 5 * time.Second

// Verifier is the admission decision. Its exported fields may be changed
// until the first call to Admit.
type Verifier struct {
	// Tailnet, if non-nil, must know the client's node key.
	Tailnet KeyChecker

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

	// Logger receives one line per refusal (rate-limited); nil discards.
	Logger *slog.Logger

	once        sync.Once
	client      *http.Client
	logLimit    *logs.Limiter
	hintLimit   *logs.Limiter
	recentMu    sync.Mutex
	recent      map[key.NodePublic]Admission
	admitted    expvar.Int
	failOpen    expvar.Int
	refused     metrics.LabelMap
	lastRefusal expvar.String
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
	v.refused = metrics.LabelMap{Label: "reason"}
}

// Admit reports whether the client holding clientKey, connecting from
// src, may use the relay.
func (v *Verifier) Admit(ctx context.Context, clientKey key.NodePublic, src netip.Addr) bool {
	v.init()
	if v.Tailnet != nil {
		ok, ready := v.Tailnet.KnowsNodeKey(clientKey)
		switch {
		case !ready && v.FailOpen:
			v.admitFailOpen(clientKey, src, "tailnet membership not known yet", nil)
		case !ready:
			v.refuse(clientKey, src, ReasonTailnetNotReady, nil)
			return false
		case !ok:
			v.refuse(clientKey, src, ReasonNotInTailnet, nil)
			return false
		}
	}
	if v.URL != "" {
		allow, err := v.askURL(ctx, clientKey, src)
		switch {
		case err != nil && v.FailOpen:
			v.admitFailOpen(clientKey, src, "admission URL unreachable", err)
		case err != nil:
			v.refuse(clientKey, src, ReasonURLUnreachable, err)
			return false
		case !allow:
			v.refuse(clientKey, src, ReasonURLDenied, nil)
			return false
		}
	}
	v.admitted.Add(1)
	v.noteAdmitted(clientKey, src)
	return true
}

// Admission records a client admitted to the relay.
type Admission struct {
	Key  key.NodePublic
	From netip.Addr
	At   time.Time
}

// maxRecent bounds the memory kept for the debug client list.
const maxRecent = 1024

func (v *Verifier) noteAdmitted(k key.NodePublic, src netip.Addr) {
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
	v.recent[k] = Admission{Key: k, From: src, At: time.Now()}
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

func (v *Verifier) refuse(k key.NodePublic, src netip.Addr, reason string, err error) {
	v.refused.Add(reason, 1)
	v.lastRefusal.Set(time.Now().UTC().Format(time.RFC3339) + " " + reason)
	if !v.allowLog() {
		return
	}
	attrs := []any{"key", k.ShortString(), "src", src.String(), "reason", reason}
	if err != nil {
		attrs = append(attrs, "err", err.Error())
	}
	v.Logger.Info("verify: client refused", attrs...)
	if reason == ReasonNotInTailnet {
		if pc, isPC := v.Tailnet.(PeerCounter); isPC && pc.PeerCount() <= 1 {
			if ok, _ := v.hintLimit.Allow(time.Now()); ok {
				v.Logger.Warn("verify: the relay's tailnet node sees almost no peers; if your tailnet policy hides clients from it, they are refused as strangers (see docs: the relay node must be able to see every client)",
					"peers_seen", pc.PeerCount())
			}
		}
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

// ExpVar returns the admission counters: admitted, admitted_fail_open,
// and refused by reason.
func (v *Verifier) ExpVar() expvar.Var {
	v.init()
	m := new(metrics.Set)
	m.Set("counter_admitted", &v.admitted)
	m.Set("counter_admitted_fail_open", &v.failOpen)
	m.Set("counter_refused", &v.refused)
	m.Set("last_refusal", &v.lastRefusal)
	return m
}

// Refused returns how many clients were refused for reason.
func (v *Verifier) Refused(reason string) int64 {
	v.init()
	return v.refused.Get(reason).Value()
}

// Admitted returns how many clients were admitted.
func (v *Verifier) Admitted() int64 { return v.admitted.Value() }
