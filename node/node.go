// Package node runs tailderp's embedded tailnet node with
// tailscale.com/tsnet: it logs in with an auth key (or OAuth client
// secret), keeps its state on disk so a restart needs no key, tracks which
// node keys the tailnet holds (for admission, see package verify) and
// reports every key that stops being admissible (for revocation), and
// offers listeners that exist only on the tailnet (for /debug).
//
// The node never blocks the public relay: Start returns at once and the
// node logs in in the background. KnowsNodeKey answers from memory: from
// the live network map, or, until the node has one, from the keys the last
// map admitted (kept in Dir, see CacheMaxAge). See the Node example.
package node

import (
	"context"
	"encoding/json"
	"errors"
	"expvar"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/client/local"
	"tailscale.com/ipn"
	"tailscale.com/metrics"
	"tailscale.com/tsnet"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/logs"
)

// State is the embedded node's login state.
type State string

// The states a node goes through.
const (
	StateStarting   State = "starting"    // not yet connected to control
	StateNeedsLogin State = "needs-login" // control wants a (new) login
	StateRunning    State = "running"     // on the tailnet
	StateStopped    State = "stopped"     // closed, or stopped by a fatal error
)

// allStates lists every State, for metrics.
func allStates() []State {
	return []State{StateStarting, StateNeedsLogin, StateRunning, StateStopped}
}

// StateFile is the file in Dir holding the node's login; while it holds a
// login profile a restart needs no auth key.
const StateFile = "tailscaled.state"

// Defaults for the Node fields of the same names.
const (
	DefaultControlWarnAfter = 30 * time.Second
	DefaultCacheWriteEvery  = 5 * time.Second
)

// Node is the embedded tailnet node. Its exported fields may be changed
// until Start.
type Node struct {
	// Dir holds the node's state (created 0700). Keep it across restarts:
	// a node that loses it logs in again as a new device.
	Dir string

	// Hostname is the node's name on the tailnet.
	Hostname string

	// AuthKey is a Tailscale auth key ("tskey-auth-…"), or an OAuth
	// client secret ("tskey-client-…", which needs AdvertiseTags). Used
	// for the first login, and to log in again as a new node when the
	// control server no longer knows this one (deleted): keep it set even
	// when Dir holds a login. A single-use key cannot do the second; a
	// reusable one can. Never logged.
	AuthKey string

	// ControlURL is the coordination server; empty means Tailscale's.
	// A Headscale URL works.
	ControlURL string

	// AdvertiseTags are the ACL tags the node asks for ("tag:derp").
	AdvertiseTags []string

	// Port is the UDP port for WireGuard and peer-to-peer traffic; 0
	// picks one at random.
	Port uint16

	// Ephemeral registers the node as ephemeral: removed from the
	// tailnet soon after it goes offline. For tests.
	Ephemeral bool

	// CacheMaxAge is how long the keys of the last network map may go on
	// answering once the map is no longer live, counted from the moment
	// it last was: after a restart while the control server is
	// unreachable (they are kept in Dir, file KnownPeersFile), after the
	// node is logged out, and while the control server refuses the node
	// or has not held its map poll for ControlWarnAfter (see Readiness).
	// Zero turns that off: no file is read or written, and without a live
	// map every key is "not ready".
	CacheMaxAge time.Duration

	// CacheWriteEvery bounds how often the cache file is written: a burst
	// of map changes is one write. DefaultCacheWriteEvery if zero.
	CacheWriteEvery time.Duration

	// ControlWarnAfter is how long the control server may stay
	// unreachable before a warning (repeated, each time twice as late, up
	// to every 30 minutes), and how long the map poll may be lost before
	// the map stops being live. A node with nothing to admit from (no
	// known peers, never a map) warns at the first failure instead; a
	// control server that refuses the node is said at once.
	// DefaultControlWarnAfter if zero.
	ControlWarnAfter time.Duration

	// OnDrop, if set, is called with the keys that stopped being
	// admissible, each time some do (the node removed, absent from a
	// new map, its key rotated or expired, the answers lost). It must not
	// block for long.
	OnDrop func([]Drop)

	// Logger receives progress at info, problems at warning with the fix,
	// and the node's own verbose logs at debug. Nil discards.
	Logger *slog.Logger

	// Advice, if set, says what the operator should do about a problem,
	// in the program's own words (which setting to change); it is logged
	// with the problem as "fix".
	Advice func(Problem) string

	started chan struct{} // closed once ts.Start succeeded
	fatal   chan error    // receives the error that stopped the node
	ctx     context.Context
	cancel  context.CancelFunc
	settled chan struct{}  // closed when run stops applying the bus: the key set no longer changes
	done    chan struct{}  // closed when run has also closed tsnet
	wg      sync.WaitGroup // background loops other than run

	mu          sync.Mutex
	ts          *tsnet.Server // set before started is closed
	state       atomic.Value  // State
	stateGauge  metrics.LabelMap
	keys        *keySet
	cache       *cacheWriter // nil when the cache is off
	cacheMu     sync.Mutex   // one cache write at a time: housekeeping's, then Shutdown's last
	cacheDirty  atomic.Bool  // the set changed since the cache was written
	control     controlWatch
	drops       metrics.LabelMap
	sourceGauge metrics.LabelMap // 1 for the current Source

	loginProblem atomic.Value       // Problem: the login's, "" when none
	reloginCh    chan struct{}      // a re-login is asked for (see requestRelogin)
	watchCancel  context.CancelFunc // ends the current watch; under mu
	readyMu      sync.Mutex
	ready        Readiness // the last one computed, for Since
}

// Problem names a condition that keeps the node from admitting clients,
// for Advice.
type Problem string

// The problems a node reports.
const (
	// ProblemLoginRejected: the control server refused the auth key.
	ProblemLoginRejected Problem = "login-rejected"
	// ProblemLoggedOut: a running node was logged out (its key expired,
	// or the device was removed from the tailnet).
	ProblemLoggedOut Problem = "logged-out"
	// ProblemNeedsApproval: the tailnet requires device approval.
	ProblemNeedsApproval Problem = "needs-approval"
	// ProblemControlUnreachable: the control server does not answer (the
	// map poll has not been held for ControlWarnAfter, or the node never
	// reached it).
	ProblemControlUnreachable Problem = "control-unreachable"
	// ProblemNodeRemoved: the control server answers the node's map
	// requests with "node not found" (or a machine key it does not
	// know): the node was deleted there. With an auth key the node logs
	// in again as a new node; without one, it cannot.
	ProblemNodeRemoved Problem = "node-removed"
	// ProblemControlRefused: the control server answers the node's map
	// requests with 401 or 403. Handled as ProblemNodeRemoved.
	ProblemControlRefused Problem = "control-refused"
	// ProblemReloginFailed: after the control server forgot the node, the
	// auth key did not log it in again (a single-use key already used,
	// say); a reusable auth key lets it recover.
	ProblemReloginFailed Problem = "relogin-failed"
	// ProblemStarting: the node has not had a network map yet and has met
	// no problem so far.
	ProblemStarting Problem = "starting"
	// ProblemStopped: the node was closed.
	ProblemStopped Problem = "stopped"
)

// LoginError is sent on Fatal when the control server rejected the login.
type LoginError struct {
	Msg string // the control server's message, with the auth key redacted
}

func (e *LoginError) Error() string { return "node: the control server rejected the login: " + e.Msg }

// Load gets the node ready to answer KnowsNodeKey before it logs in: it
// checks the settings, creates the state directory and reads the
// known-peers cache. It neither contacts the control server nor writes a
// file, so a server can load its nodes, bind its ports (a port in use then
// fails before any login state is written) and only then Start them, while
// the first clients are already answered from the cache. Start calls Load
// when it has not been called; calling it again does nothing. Load, like
// Start, must not run concurrently with the node's other methods.
func (n *Node) Load() error {
	if n.keys != nil {
		return nil
	}
	if n.Dir == "" {
		return errors.New("node: no state directory")
	}
	if strings.HasPrefix(n.AuthKey, "tskey-client-") && len(n.AdvertiseTags) == 0 {
		return errors.New("node: an OAuth client secret needs AdvertiseTags: nodes made by OAuth clients must be tagged")
	}
	if err := os.MkdirAll(n.Dir, 0o700); err != nil {
		return fmt.Errorf("node: state directory: %w", err)
	}
	if err := os.Chmod(n.Dir, 0o700); err != nil {
		return fmt.Errorf("node: state directory: %w", err)
	}
	if n.Logger == nil {
		n.Logger = logs.Discard()
	}
	n.drops.Label = "reason"
	n.stateGauge.Label = "state"
	n.sourceGauge.Label = "source"
	keys := newKeySet(n.CacheMaxAge)
	if n.CacheMaxAge > 0 {
		n.cache = &cacheWriter{path: n.cachePath(), keys: keys, interval: orDefault(n.CacheWriteEvery, DefaultCacheWriteEvery), rename: os.Rename}
		n.loadCache(keys)
	}
	n.keys = keys
	n.updateSourceGauge()
	n.state.Store(StateStarting)
	n.loginProblem.Store(Problem(""))
	n.reloginCh = make(chan struct{}, 1)
	n.Readiness()
	return nil
}

// Start starts logging in in the background and returns at once. It fails
// only on settings that can never work.
func (n *Node) Start() error {
	if err := n.Load(); err != nil {
		return err
	}
	n.started = make(chan struct{})
	n.fatal = make(chan error, 1)
	n.settled = make(chan struct{})
	n.done = make(chan struct{})
	n.ctx, n.cancel = context.WithCancel(context.Background())
	n.control.start(time.Now(), orDefault(n.ControlWarnAfter, DefaultControlWarnAfter))
	go n.run()
	n.wg.Go(n.housekeeping)
	return nil
}

// maxClockSkew is how far in the future a known-peers cache may say it
// was written and still be used: clock corrections by NTP are smaller.
const maxClockSkew = time.Minute

func (n *Node) cachePath() string { return filepath.Join(n.Dir, KnownPeersFile) }

// loadCache starts the key set from the cache file, if there is a usable
// one (the rule: usableCache). A missing file is normal (first start); an
// unreadable, corrupt or foreign one is one warning and a start without
// it (everyone is refused until the node has a live map), never fatal.
func (n *Node) loadCache(keys *keySet) {
	removeStaleTemps(n.cachePath())
	c, loose, err := readCache(n.cachePath())
	if loose != 0 {
		n.Logger.Warn("node: the known-peers cache may be read or written by others than this program's user; the node writes it 0600, so someone changed it",
			"path", n.cachePath(), "mode", fmt.Sprintf("%#o", loose|0o600))
	}
	switch {
	case errors.Is(err, os.ErrNotExist):
		return
	case err != nil:
		n.Logger.Warn("node: ignoring the known-peers cache: clients are refused until the node has a network map", "err", err)
		return
	}
	self, _ := stateNodeKey(n.Dir)
	switch err := keys.loadUsableCache(c, self); {
	case errors.Is(err, errCacheTooOld):
		n.Logger.Info("node: the known-peers cache is older than its maximum age; not used",
			"netmap_received", c.Received.UTC().Format(time.RFC3339), "max_age", n.CacheMaxAge)
		return
	case err != nil:
		n.Logger.Warn("node: ignoring the known-peers cache: clients are refused until the node has a network map",
			"path", n.cachePath(), "err", err, "netmap_received", c.Received.UTC().Format(time.RFC3339))
		return
	}
	n.Logger.Info("node: admitting from the known-peers cache until the node has a fresh network map",
		"peers", len(c.Nodes), "netmap_received", c.Received.UTC().Format(time.RFC3339),
		"until", keys.until().UTC().Format(time.RFC3339))
}

// stateNodeKey returns the node key of the login kept in dir (tsnet's
// state: the current profile's prefs), if there is one.
func stateNodeKey(dir string) (key.NodePublic, bool) {
	b, err := os.ReadFile(filepath.Join(dir, StateFile))
	if err != nil {
		return key.NodePublic{}, false
	}
	var state map[string][]byte
	if json.Unmarshal(b, &state) != nil {
		return key.NodePublic{}, false
	}
	cur := string(state[string(ipn.CurrentProfileStateKey)])
	if cur == "" {
		return key.NodePublic{}, false
	}
	var prefs ipn.Prefs
	if json.Unmarshal(state[cur], &prefs) != nil || prefs.Persist == nil || prefs.Persist.PrivateNodeKey.IsZero() {
		return key.NodePublic{}, false
	}
	return prefs.Persist.PrivateNodeKey.Public(), true
}

// HasLogin reports whether dir holds a node login from an earlier start,
// so no auth key is needed. A state file from a start that never finished
// logging in (it holds only a machine key) is not a login.
func HasLogin(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, StateFile))
	if err != nil {
		return false
	}
	// tailscaled's state: StateKey → bytes; a login leaves profiles.
	var state map[string][]byte
	if json.Unmarshal(b, &state) != nil {
		return false
	}
	var profiles map[string]json.RawMessage
	if json.Unmarshal(state[string(ipn.KnownProfilesStateKey)], &profiles) != nil {
		return false
	}
	return len(profiles) > 0
}

// Fatal receives the error when the node stops for good: the control
// server rejected the auth key, or the node cannot start at all.
func (n *Node) Fatal() <-chan error { return n.fatal }

// State returns the node's current state.
func (n *Node) State() State {
	s, _ := n.state.Load().(State)
	return s
}

func (n *Node) setState(s State) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if old := n.State(); old != s {
		n.state.Store(s)
		for _, st := range allStates() {
			v := int64(0)
			if st == s {
				v = 1
			}
			n.stateGauge.Get(string(st)).Set(v)
		}
		n.Logger.Info("node: state", "from", string(old), "to", string(s))
	}
}

// Status is what the node can say about itself, for metrics and the
// status page.
type Status struct {
	State   State
	Peers   int       // nodes of the tailnet it sees (not counting itself)
	Source  Source    // where admission answers come from now
	Netmap  time.Time // when the map behind the answers arrived; zero: never
	Control bool      // the control server answers (the node is in its map poll)
	// ControlSince is when Control last changed (or the node started).
	ControlSince time.Time
	ControlURL   string
}

// Status returns the node's status now.
func (n *Node) Status() Status {
	src, received := n.keys.status()
	_, since := n.control.get()
	return Status{
		State: n.State(), Peers: n.keys.size(), Source: src, Netmap: received,
		Control: n.inMapPoll(), ControlSince: since, ControlURL: n.controlURL(),
	}
}

// ExpVar returns the node's metrics: its state (one gauge per state, 1
// for the current one), how many peers it sees, where admission answers
// come from, the age of their network map, whether control answers, and
// the keys dropped by reason.
func (n *Node) ExpVar() expvar.Var {
	m := new(metrics.Set)
	m.Set("gauge_state", &n.stateGauge)
	m.Set("gauge_peers", expvar.Func(func() any { return n.keys.size() }))
	m.Set("gauge_control_reachable", expvar.Func(func() any {
		if n.inMapPoll() {
			return 1
		}
		return 0
	}))
	m.Set("gauge_netmap_age_seconds", expvar.Func(func() any {
		if _, received := n.keys.status(); !received.IsZero() {
			return int64(time.Since(received).Seconds())
		}
		return -1
	}))
	m.Set("gauge_admission_source", &n.sourceGauge)
	m.Set("counter_keys_dropped", &n.drops)
	return m
}

// updateSourceGauge sets the admission-source gauge to the current Source.
func (n *Node) updateSourceGauge() {
	cur, _ := n.keys.status()
	for _, s := range []Source{SourceLive, SourceCache, SourceNone} {
		v := int64(0)
		if s == cur {
			v = 1
		}
		n.sourceGauge.Get(string(s)).Set(v)
	}
}

func (n *Node) stop(err error) {
	n.setState(StateStopped)
	select {
	case n.fatal <- err:
	default:
	}
}

func (n *Node) controlURL() string {
	if n.ControlURL == "" {
		return ipn.DefaultControlURL
	}
	return n.ControlURL
}

func (n *Node) newTsnet() *tsnet.Server {
	secrets := []string{n.AuthKey}
	return &tsnet.Server{
		Dir:           n.Dir,
		Hostname:      n.Hostname,
		AuthKey:       n.AuthKey,
		ControlURL:    n.ControlURL,
		AdvertiseTags: n.AdvertiseTags,
		Ephemeral:     n.Ephemeral,
		Port:          n.Port,
		Logf:          n.tsnetLogf(logs.Logf(n.Logger.With("component", "tsnet"), slog.LevelDebug, secrets...)),
		UserLogf:      n.tsnetLogf(logs.Logf(n.Logger.With("component", "tsnet"), slog.LevelDebug, secrets...)),
	}
}

// tsnetLogf passes tsnet's log lines to logf and to noteTsnetLog.
func (n *Node) tsnetLogf(logf func(string, ...any)) func(string, ...any) {
	return func(format string, args ...any) {
		logf(format, args...)
		// controlclient logs the refusal as an error argument: look at
		// those only, not at every line tsnet writes.
		for _, a := range args {
			if err, ok := a.(error); ok && err != nil {
				n.noteTsnetLog(err.Error())
			}
		}
	}
}

// run starts tsnet and follows it (follow) until Close or a fatal error,
// then closes it. It owns the tsnet.Server. The key set stops changing
// (settled) before tsnet is closed, so Shutdown can write the cache
// without waiting for tsnet's slower teardown.
func (n *Node) run() {
	defer close(n.done)
	n.follow()
	close(n.settled)
	if n.ts != nil {
		n.ts.Close()
	}
}

// follow starts tsnet, retrying with backoff while the start fails for
// network reasons (an OAuth secret is exchanged over the network), then
// follows the node's IPN bus until Close.
func (n *Node) follow() {
	n.Logger.Info("node: reaching the control server", "url", n.controlURL())
	started := n.startTsnet(func(err error, wait time.Duration) bool {
		msg := n.redact(err.Error())
		var netErr net.Error
		var urlErr *url.Error
		if !errors.As(err, &netErr) && !errors.As(err, &urlErr) {
			n.stop(fmt.Errorf("node: start: %s", msg))
			return false
		}
		n.control.mu.Lock()
		n.control.startFailed = true
		n.control.mu.Unlock()
		n.Logger.Debug("node: start failed; retrying", "err", msg, "in", wait)
		return true
	})
	if !started {
		n.setState(StateStopped) // said already if stop was called
		return
	}
	close(n.started)
	for n.ctx.Err() == nil {
		err := n.watch()
		if n.ctx.Err() != nil {
			break
		}
		select {
		case <-n.reloginCh:
			n.relogin()
			continue
		default:
		}
		if le, ok := errors.AsType[*LoginError](err); ok {
			if n.reloggingIn() {
				// Not fatal: the last map goes on answering until its
				// maximum age (checkControl says so, with backoff).
				n.control.mu.Lock()
				n.control.reloginFail = le.Msg
				n.control.mu.Unlock()
				n.checkControl()
				continue
			}
			n.loginProblem.Store(ProblemLoginRejected)
			n.stop(err)
			return
		}
		n.Logger.Warn("node: lost the IPN bus; re-watching", "err", err)
		select {
		case <-n.ctx.Done():
		case <-time.After(time.Second):
		}
	}
	n.setState(StateStopped)
}

// watch follows the IPN bus, keeping state and the key set current,
// until the node closes or a re-login is asked for.
func (n *Node) watch() error {
	ctx, cancel := context.WithCancel(n.ctx)
	defer cancel()
	n.mu.Lock()
	ts := n.ts
	n.watchCancel = cancel
	n.mu.Unlock()
	if len(n.reloginCh) > 0 {
		return errors.New("node: re-login asked for")
	}
	lc, err := ts.LocalClient()
	if err != nil {
		return err
	}
	w, err := lc.WatchIPNBus(ctx, ipn.NotifyInitialState|ipn.NotifyInitialNetMap|ipn.NotifyPeerChanges)
	if err != nil {
		return err
	}
	defer w.Close()
	for {
		note, err := w.Next()
		if err != nil {
			return err
		}
		if note.ErrMessage != nil && n.State() != StateRunning {
			return &LoginError{Msg: n.redact(*note.ErrMessage)}
		}
		if note.LoginFinished != nil {
			n.Logger.Info("node: logged in")
			n.loginProblem.Store(Problem(""))
		}
		if note.State != nil {
			switch *note.State {
			case ipn.Running:
				n.setState(StateRunning)
			case ipn.NeedsLogin, ipn.NeedsMachineAuth:
				wasRunning := n.State() == StateRunning
				n.dropped(n.keys.loggedOut())
				if wasRunning {
					n.loginProblem.Store(ProblemLoggedOut)
					// Said once the set has turned to the cache (or
					// been cleared), so the effect is what happens now.
					n.Logger.Error("node: logged out by the control server (node key expired, or the device was removed)",
						"effect", n.effectWithoutLiveMap(), "fix", n.advice(ProblemLoggedOut))
				}
				n.setState(StateNeedsLogin)
				if *note.State == ipn.NeedsMachineAuth {
					n.loginProblem.Store(ProblemNeedsApproval)
					n.Logger.Warn("node: the tailnet requires device approval", "fix", n.advice(ProblemNeedsApproval))
				}
			case ipn.Stopped:
				n.dropped(n.keys.loggedOut())
				n.setState(StateStopped)
			default:
				n.setState(StateStarting)
			}
		}
		if fullMap := note.NetMap != nil || note.SelfChange != nil; fullMap {
			if src, _ := n.keys.status(); src != SourceLive {
				peers := len(note.PeersChanged)
				if note.NetMap != nil {
					peers = len(note.NetMap.Peers)
				}
				n.Logger.Info("node: network map received; admitting the tailnet's nodes from it", "peers", peers)
			}
		}
		n.dropped(n.keys.apply(&note))
		if since, refused := n.control.refusalActive(time.Now()); refused {
			// A map on a stream the control server still holds open
			// does not make a node it refuses live again.
			n.dropped(n.keys.notLive(since))
		}
		n.updateSourceGauge()
		if n.cache != nil {
			n.cacheDirty.Store(true)
		}
	}
}

// effectWithoutLiveMap says what happens to admission while the node has
// no live network map.
func (n *Node) effectWithoutLiveMap() string {
	src, received := n.keys.status()
	switch {
	case src == SourceLive:
		return "clients are admitted from the last network map; nodes removed meanwhile are not seen"
	case src == SourceCache || (n.CacheMaxAge > 0 && !received.IsZero()):
		return fmt.Sprintf("clients are admitted from the known-peers cache of %s until %s, then refused",
			received.UTC().Format(time.RFC3339), received.Add(n.CacheMaxAge).UTC().Format(time.RFC3339))
	}
	return "clients of this tailnet are refused until the node has a network map"
}

// dropped reports drops to OnDrop and counts them.
func (n *Node) dropped(drops []Drop) {
	if len(drops) == 0 {
		return
	}
	for _, d := range drops {
		n.drops.Add(string(d.Reason), 1)
	}
	if n.OnDrop != nil {
		n.OnDrop(drops)
	}
}

// housekeeping runs every second until Close: it drops keys whose expiry
// passed (and a cache that aged out), writes the cache file when the set
// changed (at most every CacheWriteEvery), and watches whether the
// control server answers.
func (n *Node) housekeeping() {
	tick := time.NewTicker(min(time.Second, orDefault(n.ControlWarnAfter, DefaultControlWarnAfter)/4))
	defer tick.Stop()
	var lastWrite time.Time
	for {
		select {
		case <-n.ctx.Done():
			return // Shutdown writes the cache a last time
		case <-tick.C:
		}
		n.dropped(n.keys.expireDue())
		n.updateSourceGauge()
		if n.cache != nil && n.cacheDirty.Load() && time.Since(lastWrite) >= n.cache.interval {
			n.writeCache()
			lastWrite = time.Now()
		}
		n.checkControl()
		n.Readiness()
	}
}

func (n *Node) writeCache() { n.writeCacheForce(false) }

// writeCacheFinal writes the cache a last time, even unchanged while the
// map is live: the file then says the map was live until now, and its age
// after a restart counts from here.
func (n *Node) writeCacheFinal() { n.writeCacheForce(true) }

func (n *Node) writeCacheForce(force bool) {
	if n.cache == nil {
		return
	}
	n.cacheMu.Lock()
	defer n.cacheMu.Unlock()
	n.cacheDirty.Store(false)
	if err := n.cache.writeIfChanged(force); err != nil {
		n.Logger.Warn("node: cannot write the known-peers cache; a restart while the control server is unreachable would refuse every client", "err", err)
	}
}

func (n *Node) advice(p Problem) string {
	if n.Advice == nil {
		return string(p)
	}
	return n.Advice(p)
}

func (n *Node) redact(s string) string {
	if n.AuthKey == "" {
		return s
	}
	return strings.ReplaceAll(s, n.AuthKey, "[redacted]")
}

// KnowsNodeKey reports whether k is a node of our tailnet (a peer the node
// can see, or the node itself); ready is false while the node has no
// answers (no network map and no usable cache), and then known is false
// too. Nodes whose key expired are not known. It is a read-locked map
// lookup. Before Load (or Start) it cannot answer.
func (n *Node) KnowsNodeKey(k key.NodePublic) (known, ready bool) {
	if n.keys == nil {
		return false, false
	}
	return n.keys.contains(k)
}

// Settling implements verify.Settling: while the node has no live network
// map but expects one soon, it returns a channel that is closed when the
// map arrives; otherwise nil. "Soon": the node is starting, running, or
// logging in with an auth key, and has been without a live map for less
// than ControlWarnAfter (after that it warns that the control server
// cannot be reached, and admission stops holding clients for it).
func (n *Node) Settling() <-chan struct{} {
	if n.keys == nil {
		return nil // not loaded
	}
	live, since := n.keys.pending()
	if live == nil || n.keys.now().Sub(since) >= orDefault(n.ControlWarnAfter, DefaultControlWarnAfter) {
		return nil
	}
	switch n.State() {
	case StateStarting, StateRunning:
		return live
	case StateNeedsLogin:
		if n.AuthKey != "" {
			return live
		}
	}
	return nil
}

// PeerCount implements verify.PeerCounter.
func (n *Node) PeerCount() int { return n.keys.size() }

// NodeName returns the tailnet name of the node holding k, or "".
func (n *Node) NodeName(k key.NodePublic) string { return n.keys.name(k) }

// Listen listens on the node's tailnet addresses only, waiting (bounded
// by ctx) until the node has started.
func (n *Node) Listen(ctx context.Context, network, addr string) (net.Listener, error) {
	select {
	case <-n.started:
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-n.done:
		return nil, errors.New("node: stopped")
	}
	n.mu.Lock()
	ts := n.ts
	n.mu.Unlock()
	ln, err := ts.Listen(network, addr)
	if err != nil {
		return nil, fmt.Errorf("node: listen on tailnet %s: %w", addr, err)
	}
	return ln, nil
}

// LocalClient returns the node's LocalAPI client, once started.
func (n *Node) LocalClient() (*local.Client, error) {
	n.mu.Lock()
	ts := n.ts
	n.mu.Unlock()
	if ts == nil {
		return nil, errors.New("node: not started yet")
	}
	return ts.LocalClient()
}

// Close logs the node off this process (its state stays on disk, the
// cache file is written a last time) and waits for the background work to
// end.
func (n *Node) Close() error {
	if n.cancel == nil {
		return nil
	}
	n.Shutdown(context.Background())
	<-n.done
	n.setState(StateStopped)
	return nil
}

// Shutdown is the part of Close that a process about to exit needs: the
// node stops following the tailnet and writes the known-peers cache a last
// time, waiting for the key set to settle until ctx ends. tsnet goes on
// closing in the background (its netstack, LocalAPI and control client
// take 0.05–0.25 s), which an exit may cut short: its login state is on
// disk already. Close afterwards waits for it.
func (n *Node) Shutdown(ctx context.Context) error {
	if n.cancel == nil {
		return nil
	}
	n.cancel()
	n.wg.Wait() // housekeeping returns at once: from now on only this writes the cache
	select {
	case <-n.settled:
	case <-ctx.Done():
		// Still starting tsnet (an OAuth exchange, say), so the set holds
		// at most the cache read at Start, which is never written back.
		return fmt.Errorf("node: shut down while starting: %w", ctx.Err())
	}
	n.writeCacheFinal()
	return nil
}

func orDefault(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

// requestRelogin asks follow to log in again as a new node, without
// blocking: the current watch ends, and follow sees the request.
func (n *Node) requestRelogin() {
	select {
	case n.reloginCh <- struct{}{}:
	default:
		return
	}
	n.mu.Lock()
	cancel := n.watchCancel
	n.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// reloggingIn reports whether the node has logged in again as a new node
// since it started.
func (n *Node) reloggingIn() bool {
	n.control.mu.Lock()
	defer n.control.mu.Unlock()
	return n.control.relogins > 0
}

// keepOldStates is how many moved-aside states (see relogin) Dir keeps.
const keepOldStates = 2

// relogin replaces the node the control server forgot with a new one: it
// closes tsnet, moves its state aside (kept, not deleted: the old
// identity is still there for an operator who wants it back) and starts
// tsnet again with the auth key. It runs in follow, which owns tsnet.
func (n *Node) relogin() {
	n.mu.Lock()
	old := n.ts
	n.mu.Unlock()
	n.Logger.Warn("node: logging in again as a new node: the control server no longer knows this one",
		"url", n.controlURL(), "effect", n.effectWithoutLiveMap()+" until the new node has a network map")
	old.Close()
	moved, err := moveStateAside(n.Dir, time.Now())
	n.control.mu.Lock()
	n.control.relogins++
	n.control.mu.Unlock()
	n.control.resetRefusals()
	if err != nil {
		n.control.mu.Lock()
		n.control.reloginFail = fmt.Sprintf("cannot move the old state aside: %v", err)
		n.control.mu.Unlock()
	} else if moved != "" {
		n.Logger.Info("node: the old node's state was kept aside", "path", moved)
	}
	// Start fails only before tsnet contacts control (an OAuth exchange,
	// say): retried like follow's first start, whatever the error.
	n.startTsnet(func(err error, _ time.Duration) bool {
		n.control.mu.Lock()
		n.control.reloginFail = n.redact(err.Error())
		n.control.mu.Unlock()
		return true
	})
}

// startTsnet starts a new tsnet server as n.ts. After a failed Start it
// asks retry, with the wait before the next try (1 s, doubling up to
// 30 s), and tries again if retry says so, until n.ctx ends. It reports
// whether a server started.
func (n *Node) startTsnet(retry func(err error, wait time.Duration) bool) bool {
	for wait := time.Second; ; wait = min(2*wait, 30*time.Second) {
		ts := n.newTsnet()
		err := ts.Start()
		if err == nil {
			n.mu.Lock()
			n.ts = ts
			n.mu.Unlock()
			return true
		}
		// No Close: tsnet cleans up after a failed Start itself, and its
		// Close panics on a server whose Start failed early (v1.102.5).
		if !retry(err, wait) {
			return false
		}
		select {
		case <-n.ctx.Done():
			return false
		case <-time.After(wait):
		}
	}
}

// moveStateAside renames dir's StateFile to StateFile.old-<UTC time> and
// removes all but the newest keepOldStates such files. It returns the new
// name ("" when there was no state).
func moveStateAside(dir string, now time.Time) (string, error) {
	from := filepath.Join(dir, StateFile)
	to := from + ".old-" + now.UTC().Format("20060102T150405.000Z")
	if err := os.Rename(from, to); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", nil
		}
		return "", fmt.Errorf("node: move the old state aside: %w", err)
	}
	olds, _ := filepath.Glob(from + ".old-*")
	slices.Sort(olds) // the time sorts as text
	for len(olds) > keepOldStates {
		os.Remove(olds[0])
		olds = olds[1:]
	}
	return to, nil
}

// Admits says whom admission lets in now.
type Admits string

// What a node admits.
const (
	// AdmitsMembers: the tailnet's nodes, from a live network map.
	AdmitsMembers Admits = "members"
	// AdmitsFromCache: the nodes of the last map, which is no longer live
	// (the cache on disk after a restart, or in memory), until Until.
	AdmitsFromCache Admits = "cache"
	// AdmitsNobody: every key of this tailnet is refused.
	AdmitsNobody Admits = "nobody"
)

// Readiness is what the node admits now and why: a plain value for the
// status pages, the health check and the logs.
type Readiness struct {
	Admits  Admits
	Problem Problem   // "" when Admits is AdmitsMembers
	Since   time.Time // when this Admits and Problem began
	// Netmap is when the map behind the answers arrived (live) or was
	// last live (from the cache); zero: never.
	Netmap time.Time
	// Until is, for AdmitsFromCache, when the cache stops admitting.
	Until time.Time
}

// String is the readiness on one line, for logs.
func (r Readiness) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "admits=%s", r.Admits)
	if r.Problem != "" {
		fmt.Fprintf(&b, " problem=%s", r.Problem)
	}
	if !r.Since.IsZero() {
		fmt.Fprintf(&b, " since=%s", r.Since.UTC().Format(time.RFC3339))
	}
	if !r.Netmap.IsZero() {
		fmt.Fprintf(&b, " netmap=%s", r.Netmap.UTC().Format(time.RFC3339))
	}
	if !r.Until.IsZero() {
		fmt.Fprintf(&b, " until=%s", r.Until.UTC().Format(time.RFC3339))
	}
	return b.String()
}

// Readiness returns what the node admits now. It is cheap and safe to
// call concurrently, and usable from Load on (before Start: from the
// cache, or nobody).
func (n *Node) Readiness() Readiness {
	if n.keys == nil {
		return Readiness{Admits: AdmitsNobody, Problem: ProblemStarting}
	}
	src, netmap := n.keys.status()
	r := Readiness{Netmap: netmap}
	switch src {
	case SourceLive:
		r.Admits = AdmitsMembers
	case SourceCache:
		r.Admits, r.Until = AdmitsFromCache, n.keys.until()
	default:
		r.Admits = AdmitsNobody
	}
	if r.Admits != AdmitsMembers {
		r.Problem = n.problem()
	}
	now := time.Now()
	n.readyMu.Lock()
	defer n.readyMu.Unlock()
	if n.ready.Since.IsZero() || n.ready.Admits != r.Admits || n.ready.Problem != r.Problem {
		r.Since = now
		if !n.ready.Since.IsZero() {
			n.Logger.Info("node: readiness", "from", n.ready.String(), "to", r.String())
		}
	} else {
		r.Since = n.ready.Since
	}
	n.ready = r
	return r
}

// problem says why the node does not admit from a live map.
func (n *Node) problem() Problem {
	if p := n.control.currentProblem(); p != "" {
		return p
	}
	if p, _ := n.loginProblem.Load().(Problem); p != "" {
		return p
	}
	if n.State() == StateStopped && n.cancel != nil && n.ctx.Err() != nil {
		return ProblemStopped
	}
	return ProblemStarting
}
