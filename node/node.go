// Package node runs tailderp's embedded tailnet node with
// tailscale.com/tsnet: it logs in with an auth key (or OAuth client
// secret), keeps its state on disk so a restart needs no key, tracks which
// node keys the tailnet holds (for admission, see package verify), and
// offers listeners that exist only on the tailnet (for /debug).
//
// The node never blocks the public relay: Start returns at once and the
// node logs in in the background. KnowsNodeKey answers from memory and
// reports not ready until the node has its first network map. See the Node
// example.
package node

import (
	"context"
	"errors"
	"expvar"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
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

// States lists every State, for metrics.
var States = []State{StateStarting, StateNeedsLogin, StateRunning, StateStopped}

// StateFile is the file in Dir holding the node's login; while it exists a
// restart needs no auth key.
const StateFile = "tailscaled.state"

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
	// only for the first login; never logged.
	AuthKey string

	// ControlURL is the coordination server; empty means Tailscale's.
	// A Headscale URL works.
	ControlURL string

	// AdvertiseTags are the ACL tags the node asks for ("tag:derp").
	AdvertiseTags []string

	// Ephemeral registers the node as ephemeral: removed from the
	// tailnet soon after it goes offline. For tests.
	Ephemeral bool

	// Logger receives state changes at info and the node's own verbose
	// logs at debug. Nil discards.
	Logger *slog.Logger

	// Advice, if set, says what the operator should do about a problem,
	// in the program's own words (which setting to change); it is logged
	// with the problem as "fix".
	Advice func(Problem) string

	started chan struct{} // closed once ts.Start succeeded
	fatal   chan error    // receives the error that stopped the node
	ctx     context.Context
	cancel  context.CancelFunc
	done    chan struct{}

	mu         sync.Mutex
	ts         *tsnet.Server // set before started is closed
	state      atomic.Value  // State
	stateGauge metrics.LabelMap
	keys       keySet
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
)

// LoginError is sent on Fatal when the control server rejected the login.
type LoginError struct {
	Msg string // the control server's message, with the auth key redacted
}

func (e *LoginError) Error() string { return "node: the control server rejected the login: " + e.Msg }

// Start starts logging in in the background and returns at once. It fails
// only on settings that can never work.
func (n *Node) Start() error {
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
	n.state.Store(StateStarting)
	n.started = make(chan struct{})
	n.fatal = make(chan error, 1)
	n.done = make(chan struct{})
	n.ctx, n.cancel = context.WithCancel(context.Background())
	go n.run()
	return nil
}

// HasLogin reports whether dir holds a node login from an earlier start,
// so no auth key is needed.
func HasLogin(dir string) bool {
	fi, err := os.Stat(filepath.Join(dir, StateFile))
	return err == nil && fi.Size() > 0
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
		for _, st := range States {
			v := int64(0)
			if st == s {
				v = 1
			}
			n.stateGauge.Get(string(st)).Set(v)
		}
		n.Logger.Info("node: state", "from", string(old), "to", string(s))
	}
}

// ExpVar returns the node's metrics: its state (one gauge per state, 1
// for the current one) and how many peers it sees.
func (n *Node) ExpVar() expvar.Var {
	m := new(metrics.Set)
	n.stateGauge.Label = "state"
	m.Set("gauge_state", &n.stateGauge)
	m.Set("gauge_peers", expvar.Func(func() any { return n.keys.size() }))
	return m
}

func (n *Node) stop(err error) {
	n.setState(StateStopped)
	select {
	case n.fatal <- err:
	default:
	}
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
		Logf:          logs.Logf(n.Logger.With("component", "tsnet"), slog.LevelDebug, secrets...),
		UserLogf:      logs.Logf(n.Logger.With("component", "tsnet"), slog.LevelDebug, secrets...),
	}
}

// run starts tsnet, retrying with backoff while the start fails for
// network reasons (an OAuth secret is exchanged over the network), then
// follows the node's IPN bus until Close. It owns the tsnet.Server and
// closes it on the way out.
func (n *Node) run() {
	defer close(n.done)
	defer func() {
		if n.ts != nil {
			n.ts.Close()
		}
	}()
	backoff := time.Second
	for {
		ts := n.newTsnet()
		err := ts.Start()
		if err == nil {
			n.mu.Lock()
			n.ts = ts
			n.mu.Unlock()
			close(n.started)
			break
		}
		// No Close: tsnet cleans up after a failed Start itself, and its
		// Close panics on a server whose Start failed early (v1.102.5).
		msg := n.redact(err.Error())
		var netErr net.Error
		var urlErr *url.Error
		if !errors.As(err, &netErr) && !errors.As(err, &urlErr) {
			n.stop(fmt.Errorf("node: start: %s", msg))
			return
		}
		n.Logger.Warn("node: cannot reach the control server; retrying", "err", msg, "in", backoff)
		select {
		case <-n.ctx.Done():
			n.setState(StateStopped)
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
	for n.ctx.Err() == nil {
		err := n.watch()
		if n.ctx.Err() != nil {
			break
		}
		if _, ok := errors.AsType[*LoginError](err); ok {
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

// watch follows the IPN bus, keeping state and the key set current.
func (n *Node) watch() error {
	lc, err := n.ts.LocalClient()
	if err != nil {
		return err
	}
	w, err := lc.WatchIPNBus(n.ctx, ipn.NotifyInitialState|ipn.NotifyInitialNetMap|ipn.NotifyPeerChanges)
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
		if note.State != nil {
			switch *note.State {
			case ipn.Running:
				n.setState(StateRunning)
			case ipn.NeedsLogin, ipn.NeedsMachineAuth:
				if n.State() == StateRunning {
					n.Logger.Error("node: logged out by the control server (node key expired, or the device was removed); clients are refused until it logs in again",
						"fix", n.advice(ProblemLoggedOut))
				}
				n.keys.reset()
				n.setState(StateNeedsLogin)
				if *note.State == ipn.NeedsMachineAuth {
					n.Logger.Warn("node: the tailnet requires device approval", "fix", n.advice(ProblemNeedsApproval))
				}
			case ipn.Stopped:
				n.keys.reset()
				n.setState(StateStopped)
			default:
				n.setState(StateStarting)
			}
		}
		n.keys.apply(&note)
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
// can see, or the node itself); ready is false until the node has a
// network map, and then known is false too. Nodes whose key expired are
// not known. It is a read-locked map lookup.
func (n *Node) KnowsNodeKey(k key.NodePublic) (known, ready bool) {
	return n.keys.contains(k)
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
	ln, err := n.ts.Listen(network, addr)
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

// Close logs the node off this process (its state stays on disk) and
// waits for the background work to end.
func (n *Node) Close() error {
	if n.cancel == nil {
		return nil
	}
	n.cancel()
	<-n.done
	n.setState(StateStopped)
	return nil
}
