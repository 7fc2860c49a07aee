package node

import (
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"tailscale.com/health"
)

// maxWarnEvery caps the backoff between repeated warnings about the same
// problem.
const maxWarnEvery = 30 * time.Minute

// Liveness. The node's map is live only while the control server answers
// its map poll. It stops being live when
//
//   - the control server refuses the node's map requests: "node not found"
//     (Headscale answers 404 once the node is deleted; testcontrol 400),
//     "node doesn't match machine key", or 401/403: at the first refusal;
//   - the map poll has not been held for ControlWarnAfter (30 s by
//     default): the control server is unreachable.
//
// Admission then follows the known-peers rule (cacheUntil): the keys of
// the last map are admitted until CacheMaxAge after it was last live.
//
// How the refusals are seen: tailscale.com v1.102.5 gives them no public
// signal. The streaming poll's error goes to LocalBackend, which logs it
// ("Received error: PollNetMap: initial fetch failed 404: node not
// found") and passes only vizerrors to the IPN bus; the non-streaming
// updates' errors ("lite map update error after 12ms: initial fetch failed
// 404: node not found") are only logged, and with Headscale the stream of a
// deleted node can stay open, so health's GetInPollNetMap stays true. The
// node therefore reads tsnet's own log lines for the "initial fetch
// failed <status>: <body>" that controlclient's sendMapRequest writes
// (noteTsnetLog) — a last resort, kept to that one format; a later
// tailscale.com that changes it loses the refusal signal (the poll's
// absence is still seen through health), and TestRefusalLogFormat pins it.
// The poll itself is health.Tracker.GetInPollNetMap (public).

// refusalPattern matches controlclient's map request failure (direct.go,
// sendMapRequest: "initial fetch failed %d: %.200s").
var refusalPattern = regexp.MustCompile(`initial fetch failed (\d{3}): (.*)`)

// refusalWindow is how long a refusal counts after it was last seen: the
// map poll and the updates retry with a backoff capped at 30 s, so a
// refusal that lasts repeats well within it.
const refusalWindow = 75 * time.Second

// reloginAfter is how long the control server must go on refusing the
// node (and at least twice) before it logs in again as a new node: a
// control server that restarts may answer "not found" for a moment.
const reloginAfter = 10 * time.Second

// refusal classifies a failed map request: ok is false unless it means
// the control server does not (or no longer) know the node, and p says
// which problem it is.
func refusal(status int, body string) (p Problem, ok bool) {
	b := strings.ToLower(body)
	switch {
	case status == 401 || status == 403:
		return ProblemControlRefused, true
	case (status == 404 || status == 400) && (strings.Contains(b, "not found") || strings.Contains(b, "doesn't match machine key") || strings.Contains(b, "does not match machine key")):
		return ProblemNodeRemoved, true
	}
	return "", false
}

// noteTsnetLog is given every line tsnet logs; it picks out the control
// server's refusals of the node's map requests (see Liveness above).
func (n *Node) noteTsnetLog(line string) {
	if !strings.Contains(line, "initial fetch failed ") {
		return
	}
	m := refusalPattern.FindStringSubmatch(line)
	if m == nil {
		return
	}
	status, _ := strconv.Atoi(m[1])
	p, ok := refusal(status, m[2])
	if !ok {
		return
	}
	n.control.refused(time.Now(), p, m[1]+": "+logsExcerpt(m[2]))
}

func logsExcerpt(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > 120 {
		s = s[:120] + "…"
	}
	return s
}

// controlWatch follows whether the control server answers, and when to
// warn that it does not: first after warnAfter (at the first failure
// while the node has nothing to admit from), then each time twice as late
// (capped at maxWarnEvery) while it lasts; once more when it ends.
type controlWatch struct {
	mu        sync.Mutex
	ok        bool      // in the map poll with control
	since     time.Time // when ok last changed
	everOK    bool
	warnAfter time.Duration
	nextWarn  time.Duration // after since
	warned    bool          // a warning was logged for the current outage

	// The node's login, warned about the same way.
	loginSince time.Time // when the node started needing a login; zero: it does not
	loginNext  time.Duration

	// Refusals of the node's map requests (noteTsnetLog).
	refusedSince time.Time // first of the current run of refusals; zero: none
	refusedLast  time.Time
	refusedCount int
	refusedWhat  Problem
	refusedMsg   string // status and body, for the log
	refusedWarn  time.Time
	refusedNext  time.Duration

	// The current liveness problem (see Liveness), "" when none: what
	// Readiness reports besides the login state.
	problem Problem

	// Re-login after the control server forgot the node.
	relogins int // re-logins started
	// relogging: a re-login was asked for and has not yet forgotten the
	// old node's refusals (resetRefusals); closing the old node takes
	// a second or two, during which its refusals must not ask again.
	relogging    bool
	reloginFail  string    // the last re-login's failure; "" if none
	reloginWarn  time.Time // when reloginFail was last said
	reloginNext  time.Duration
	startFailed  bool // tsnet's start failed at least once (network)
	startProblem bool // said at once (no known peers)
}

func (c *controlWatch) start(now time.Time, warnAfter time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.since, c.warnAfter, c.nextWarn = now, warnAfter, warnAfter
}

func (c *controlWatch) get() (ok bool, since time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ok, c.since
}

// refused notes one refusal of the node's map request.
func (c *controlWatch) refused(now time.Time, p Problem, msg string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.refusedSince.IsZero() || now.Sub(c.refusedLast) > refusalWindow {
		c.refusedSince, c.refusedCount = now, 0
	}
	c.refusedLast, c.refusedWhat, c.refusedMsg = now, p, msg
	c.refusedCount++
}

// refusalLocked returns the current run of refusals, if one is active.
func (c *controlWatch) refusalLocked(now time.Time) (since time.Time, p Problem, active bool) {
	if c.refusedSince.IsZero() || now.Sub(c.refusedLast) > refusalWindow {
		return time.Time{}, "", false
	}
	return c.refusedSince, c.refusedWhat, true
}

// resetRefusals forgets the refusals: the node logged in again as a new
// node.
func (c *controlWatch) resetRefusals() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.refusedSince, c.refusedLast, c.refusedCount, c.refusedWhat, c.refusedMsg = time.Time{}, time.Time{}, 0, "", ""
	c.refusedWarn, c.refusedNext = time.Time{}, 0
	c.reloginFail = ""
	c.relogging = false
}

// refusalActive reports whether the control server refuses the node now,
// and since when.
func (c *controlWatch) refusalActive(now time.Time) (since time.Time, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	since, _, ok = c.refusalLocked(now)
	return since, ok
}

// currentProblem is the liveness problem found by the last checkControl.
func (c *controlWatch) currentProblem() Problem {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.reloginFail != "" {
		return ProblemReloginFailed
	}
	return c.problem
}

// inMapPoll reports whether the node holds its long poll with the control
// server open now: the control server answers.
func (n *Node) inMapPoll() bool {
	ht := n.health()
	return ht != nil && ht.GetInPollNetMap()
}

// loginFailing reports whether tsnet's last attempt to log in (or to
// register its existing login) with the control server failed: health's
// login warnable, public, set by controlclient's auth routine on each
// failure, the first one included.
func (n *Node) loginFailing() bool {
	ht := n.health()
	return ht != nil && ht.IsUnhealthy(health.LoginStateWarnable)
}

func (n *Node) health() *health.Tracker {
	n.mu.Lock()
	ts := n.ts
	n.mu.Unlock()
	if ts == nil {
		return nil
	}
	return ts.Sys().HealthTracker.Get()
}

// checkControl judges the map's liveness (see Liveness) and logs the
// transitions that matter to an operator: the first contact at info; an
// outage or a refusal at warning with its effect and the fix, at once,
// repeated with backoff; the recovery at info. A node that needs a login
// is warned about the same way. It asks for a re-login when the control
// server has forgotten the node.
func (n *Node) checkControl() {
	inPoll := n.inMapPoll()
	loginFailing := n.loginFailing()
	now := time.Now()
	state := n.State()
	src, _ := n.keys.status()
	c := &n.control
	var drops []Drop
	// OnDrop runs after c.mu is released: it may ask the node anything.
	defer func() { n.dropped(drops) }()
	c.mu.Lock()
	defer c.mu.Unlock()

	// A first login with an auth key shows as needs-login until the
	// control server answers: that is control's silence, not a login
	// problem.
	loggingIn := state == StateNeedsLogin && n.AuthKey != "" && !c.everOK
	if state == StateNeedsLogin && !loggingIn && c.reloginFail == "" {
		if c.loginSince.IsZero() {
			c.loginSince, c.loginNext = now, c.warnAfter
		}
		if d := now.Sub(c.loginSince); d >= c.loginNext {
			n.Logger.Warn("node: not logged in to the tailnet", "for", d.Round(time.Second),
				"effect", n.effectWithoutLiveMap(), "fix", n.advice(ProblemLoggedOut))
			c.loginNext = min(2*c.loginNext, maxWarnEvery)
		}
	} else {
		c.loginSince = time.Time{}
	}

	// The control server refuses the node: not live from its first
	// refusal, said at once, then with backoff.
	if since, p, active := c.refusalLocked(now); active {
		c.problem = p
		drops = append(drops, n.keys.notLive(since)...)
		if c.refusedWarn.IsZero() || now.Sub(c.refusedWarn) >= c.refusedNext {
			n.Logger.Warn("node: the control server no longer knows this node (it was removed, or its login revoked)",
				"url", n.controlURL(), "answer", c.refusedMsg, "since", since.UTC().Format(time.RFC3339),
				"effect", n.effectWithoutLiveMap()+n.reloginEffect(), "fix", n.advice(p))
			c.refusedNext = orDefault(min(2*c.refusedNext, maxWarnEvery), c.warnAfter)
			c.refusedWarn = now
		}
		if n.AuthKey != "" && c.reloginFail == "" && !c.relogging && c.refusedCount >= 2 && now.Sub(since) >= reloginAfter {
			c.relogging = true
			n.requestRelogin()
		}
	} else if !c.refusedWarn.IsZero() {
		// The refusals stopped without a re-login (the node was let
		// back in, say): a new map makes it live again.
		c.refusedSince, c.refusedWarn, c.refusedNext, c.refusedCount = time.Time{}, time.Time{}, 0, 0
		if c.problem == ProblemNodeRemoved || c.problem == ProblemControlRefused {
			c.problem = ""
		}
	}
	if c.reloginFail != "" && now.Sub(c.reloginWarn) >= c.reloginNext {
		n.Logger.Warn("node: could not log in again as a new node after the control server forgot this one",
			"url", n.controlURL(), "err", c.reloginFail,
			"effect", n.effectWithoutLiveMap(), "fix", n.advice(ProblemReloginFailed))
		c.reloginWarn = now
		c.reloginNext = orDefault(min(2*c.reloginNext, maxWarnEvery), c.warnAfter)
	}

	if inPoll != c.ok {
		down := now.Sub(c.since)
		c.ok, c.since = inPoll, now
		switch {
		case inPoll && c.warned:
			n.Logger.Info("node: the control server answers again", "url", n.controlURL(), "after", down.Round(time.Second))
		case inPoll && !c.everOK:
			n.Logger.Info("node: connected to the control server", "url", n.controlURL())
		}
		c.everOK = c.everOK || inPoll
		c.warned, c.nextWarn = false, c.warnAfter
		if inPoll && c.problem == ProblemControlUnreachable {
			c.problem = ""
		}
		if inPoll {
			c.startProblem = false
		}
		return
	}
	if inPoll {
		return
	}
	// Only a node that should be talking to control can find it silent:
	// not one waiting for a login or stopped.
	if state != StateStarting && state != StateRunning && !loggingIn {
		return
	}
	d := now.Sub(c.since)
	if d >= c.warnAfter {
		// The poll has not been held for warnAfter: the map stops
		// being live, as of when the poll ended.
		drops = append(drops, n.keys.notLive(c.since)...)
		if c.problem == "" {
			c.problem = ProblemControlUnreachable
		}
	}
	// With nothing to admit from (no known peers, never a map) there is
	// nothing to wait for: say it at the first failure.
	firstFailure := !c.everOK && src == SourceNone && (loginFailing || c.startFailed)
	if firstFailure && c.problem == "" {
		c.problem = ProblemControlUnreachable
	}
	if d >= c.nextWarn || (firstFailure && !c.warned) {
		n.Logger.Warn("node: cannot reach the control server", "url", n.controlURL(), "for", d.Round(time.Second),
			"effect", n.effectWithoutLiveMap(), "fix", n.advice(ProblemControlUnreachable))
		c.warned = true
		if d >= c.nextWarn {
			c.nextWarn = min(2*c.nextWarn, maxWarnEvery)
		} else {
			c.nextWarn = max(c.warnAfter, d)
		}
	}
}

// reloginEffect completes a refusal's effect with what the node does
// about it.
func (n *Node) reloginEffect() string {
	if n.AuthKey == "" {
		return "; without an auth key the node cannot log in again by itself"
	}
	return "; the node logs in again as a new node with its auth key"
}
