package node

import (
	"sync"
	"time"
)

// maxWarnEvery caps the backoff between repeated warnings about the same
// problem.
const maxWarnEvery = 30 * time.Minute

// controlWatch follows whether the control server answers, and when to
// warn that it does not: first after warnAfter, then each time twice as
// late (capped at maxWarnEvery) while it lasts; once more when it ends.
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

// inMapPoll reports whether the node holds its long poll with the control
// server open now: the control server answers.
func (n *Node) inMapPoll() bool {
	n.mu.Lock()
	ts := n.ts
	n.mu.Unlock()
	if ts == nil {
		return false
	}
	ht := ts.Sys().HealthTracker.Get()
	return ht != nil && ht.GetInPollNetMap()
}

// checkControl notes whether the control server answers and logs the
// transitions that matter to an operator: the first contact at info; an
// outage at warning with its effect and the fix, repeated with backoff;
// the recovery at info. A node that needs a login is warned about the
// same way.
func (n *Node) checkControl() {
	inPoll := n.inMapPoll()
	now := time.Now()
	state := n.State()
	c := &n.control
	c.mu.Lock()
	defer c.mu.Unlock()

	// A first login with an auth key shows as needs-login until the
	// control server answers: that is control's silence, not a login
	// problem.
	loggingIn := state == StateNeedsLogin && n.AuthKey != "" && !c.everOK
	if state == StateNeedsLogin && !loggingIn {
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
		return
	}
	// Only a node that should be talking to control can find it silent:
	// not one waiting for a login or stopped.
	if inPoll || (state != StateStarting && state != StateRunning && !loggingIn) {
		return
	}
	if d := now.Sub(c.since); d >= c.nextWarn {
		n.Logger.Warn("node: cannot reach the control server", "url", n.controlURL(), "for", d.Round(time.Second),
			"effect", n.effectWithoutLiveMap(), "fix", n.advice(ProblemControlUnreachable))
		c.warned = true
		c.nextWarn = min(2*c.nextWarn, maxWarnEvery)
	}
}
