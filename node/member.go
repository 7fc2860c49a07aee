package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"tailscale.com/ipn"
	"tailscale.com/ipn/store/mem"
	"tailscale.com/tsnet"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/logs"
)

// Join says how JoinEphemeral joins a tailnet.
type Join struct {
	// ControlURL is the coordination server; empty means Tailscale's.
	ControlURL string

	// AuthKey is an auth key of the tailnet (reusable or ephemeral; an
	// OAuth client secret is not supported). Never logged.
	AuthKey string

	// Hostname is the node's name on the tailnet; DefaultMemberHostname
	// if empty.
	Hostname string

	// Logger receives tsnet's own logs at debug, the auth key redacted.
	// Nil discards.
	Logger *slog.Logger
}

// DefaultMemberHostname is the tailnet name of a Member whose Join gave
// none: what an operator sees, briefly, in the tailnet's device list.
const DefaultMemberHostname = "tailderp-check"

// ErrAuthKeyRejected is wrapped by JoinEphemeral's error when the control
// server refused the auth key.
var ErrAuthKeyRejected = errors.New("the control server rejected the auth key")

// Member is a throwaway node of a tailnet, for proving that a relay admits
// the tailnet's members: it holds a real node key that the tailnet's
// nodes (the relay's among them) learn from their network maps.
type Member struct {
	ts      *tsnet.Server
	dir     string
	key     key.NodePrivate
	authKey string
	joined  bool // reached Running: Close logs out

	closeOnce sync.Once
	closeErr  error
}

// memberLogsDirOnce sets TS_LOGS_DIR once for the process, see
// JoinEphemeral.
var memberLogsDirOnce sync.Once

// JoinEphemeral logs in to a tailnet as an ephemeral node, bounded by
// ctx, and returns once the node is on the tailnet. Its state is kept in
// memory only; tsnet's own files (log configuration and buffers) go to a
// private temporary directory that Close removes with everything in it,
// so nothing is left behind. Close logs the node out: the control server
// then removes it at once (an ephemeral node that is not logged out is
// removed after it has been offline for a while).
//
// tsnet's local backend finds a directory for its socket statistics
// through the process environment only (TS_LOGS_DIR; without it, on
// Linux, it creates /var/lib/tailscale). When TS_LOGS_DIR is unset,
// JoinEphemeral sets it, once for the process, to the system's temporary
// directory, where nothing is written in builds with the standard Go
// toolchain (socket statistics need Tailscale's own).
//
// An auth key the control server refuses returns an error wrapping
// ErrAuthKeyRejected; ctx ending first returns an error saying how far
// the login got. Neither contains the auth key.
func JoinEphemeral(ctx context.Context, j Join) (*Member, error) {
	if j.AuthKey == "" {
		return nil, errors.New("node: join: no auth key")
	}
	if j.Hostname == "" {
		j.Hostname = DefaultMemberHostname
	}
	if j.Logger == nil {
		j.Logger = logs.Discard()
	}
	control := j.ControlURL
	if control == "" {
		control = ipn.DefaultControlURL
	}
	memberLogsDirOnce.Do(func() {
		if os.Getenv("TS_LOGS_DIR") == "" {
			os.Setenv("TS_LOGS_DIR", os.TempDir())
		}
	})
	dir, err := os.MkdirTemp("", "tailderp-member-")
	if err != nil {
		return nil, fmt.Errorf("node: join: %w", err)
	}
	logf := logs.Logf(j.Logger.With("component", "tsnet"), slog.LevelDebug, j.AuthKey)
	m := &Member{dir: dir, authKey: j.AuthKey}
	store := new(mem.Store)
	m.ts = &tsnet.Server{
		Dir:        dir,
		Store:      store, // the node key never touches the disk
		Hostname:   j.Hostname,
		ControlURL: j.ControlURL,
		AuthKey:    j.AuthKey,
		Ephemeral:  true,
		Logf:       logf,
		UserLogf:   logf,
	}
	if err := m.ts.Start(); err != nil {
		// No Close: tsnet cleans up after a failed Start, and its Close
		// panics on a server whose Start failed early (v1.102.5).
		os.RemoveAll(dir)
		return nil, fmt.Errorf("node: join %s: %s", control, m.redact(err.Error()))
	}
	pub, err := m.waitRunning(ctx, control)
	if err == nil {
		m.joined = true
		m.key, err = nodeKeyFromStore(store, pub)
	}
	if err != nil {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		m.Close(cctx)
		return nil, err
	}
	return m, nil
}

// waitRunning follows the node's IPN bus until it is Running, the control
// server refuses the login, or ctx ends; it returns the node's public key
// from its status.
func (m *Member) waitRunning(ctx context.Context, control string) (key.NodePublic, error) {
	lc, err := m.ts.LocalClient()
	if err != nil {
		return key.NodePublic{}, fmt.Errorf("node: join: %w", err)
	}
	w, err := lc.WatchIPNBus(ctx, ipn.NotifyInitialState)
	if err != nil {
		return key.NodePublic{}, m.joinErr(ctx, control, ipn.NoState, err)
	}
	defer w.Close()
	state := ipn.NoState
	for {
		n, err := w.Next()
		if err != nil {
			return key.NodePublic{}, m.joinErr(ctx, control, state, err)
		}
		if n.ErrMessage != nil {
			return key.NodePublic{}, fmt.Errorf("node: join %s: %w: %s", control, ErrAuthKeyRejected, m.redact(*n.ErrMessage))
		}
		if n.State == nil {
			continue
		}
		state = *n.State
		if state != ipn.Running {
			continue
		}
		st, err := lc.StatusWithoutPeers(ctx)
		if err != nil {
			return key.NodePublic{}, m.joinErr(ctx, control, state, err)
		}
		if st.Self == nil || st.Self.PublicKey.IsZero() {
			return key.NodePublic{}, fmt.Errorf("node: join %s: running, but the node has no key in its status", control)
		}
		return st.Self.PublicKey, nil
	}
}

// joinErr says how far a login got when it stopped with err.
func (m *Member) joinErr(ctx context.Context, control string, state ipn.State, err error) error {
	if ctx.Err() == nil {
		return fmt.Errorf("node: join %s: %s", control, m.redact(err.Error()))
	}
	var why string
	switch state {
	case ipn.NeedsMachineAuth:
		why = "the tailnet requires device approval, and nobody approved this node"
	case ipn.Starting:
		why = "logged in, but the node reached no DERP relay of the tailnet"
	default:
		why = "no answer from the control server (is the URL right, and is it reachable from here?)"
	}
	return fmt.Errorf("node: join %s: not on the tailnet in time (state %s): %s: %w", control, state, why, ctx.Err())
}

// nodeKeyFromStore finds the private node key of the node whose public key
// is pub in a tsnet state store: tailscaled keeps it in the prefs of the
// node's login profile (ipn.Prefs.Persist.PrivateNodeKey, JSON field
// "Config"), under the StateKey each known profile names. Which profile
// holds it is decided by the key itself, so a mismatch cannot go unseen.
func nodeKeyFromStore(st ipn.StateStore, pub key.NodePublic) (key.NodePrivate, error) {
	b, err := st.ReadState(ipn.KnownProfilesStateKey)
	if err != nil {
		return key.NodePrivate{}, fmt.Errorf("node: join: read the login profiles: %w", err)
	}
	var profiles map[string]struct{ Key ipn.StateKey }
	if err := json.Unmarshal(b, &profiles); err != nil {
		return key.NodePrivate{}, fmt.Errorf("node: join: read the login profiles: %w", err)
	}
	for _, p := range profiles {
		b, err := st.ReadState(p.Key)
		if err != nil {
			continue
		}
		var prefs struct {
			Config *struct{ PrivateNodeKey key.NodePrivate }
		}
		if json.Unmarshal(b, &prefs) != nil || prefs.Config == nil || prefs.Config.PrivateNodeKey.IsZero() {
			continue
		}
		if k := prefs.Config.PrivateNodeKey; k.Public() == pub {
			return k, nil
		}
	}
	return key.NodePrivate{}, fmt.Errorf("node: join: the node's key %s is in none of its %d login profiles", pub.ShortString(), len(profiles))
}

// NodeKey returns the member's private node key: a DERP client holding it
// is, to a relay, this member of the tailnet.
func (m *Member) NodeKey() key.NodePrivate { return m.key }

// Close logs the member out (bounded by ctx), stops it and removes its
// directory. It returns the logout's error, if any: the node is then left
// for the control server to remove once it has been offline a while, as
// it does with every ephemeral node. Calling it again returns the same.
func (m *Member) Close(ctx context.Context) error {
	m.closeOnce.Do(func() {
		var errs []error
		if m.joined {
			if lc, err := m.ts.LocalClient(); err != nil {
				errs = append(errs, err)
			} else if err := lc.Logout(ctx); err != nil {
				errs = append(errs, fmt.Errorf("log out: %s", m.redact(err.Error())))
			}
		}
		m.ts.Close()
		if err := os.RemoveAll(m.dir); err != nil {
			errs = append(errs, err)
		}
		if err := errors.Join(errs...); err != nil {
			m.closeErr = fmt.Errorf("node: close member: %w", err)
		}
	})
	return m.closeErr
}

func (m *Member) redact(s string) string {
	return strings.ReplaceAll(s, m.authKey, "[redacted]")
}
