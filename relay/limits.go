package relay

import (
	"errors"
	"expvar"
	"fmt"
	"math"
	"net"
	"net/http"
	"syscall"
	"time"

	"golang.org/x/time/rate"
	"tailscale.com/metrics"
)

// Limits against a hostile internet. The relay's ports face everyone, and
// until a /derp request is upgraded a connection costs a goroutine, a file
// descriptor and buffers; these bound how long and how large that can be:
//
//   - HeaderTimeout closes a connection whose TLS handshake, or then the
//     header of a request, is not done in time: half-open handshakes and
//     slowloris clients that send a header a byte at a time.
//   - RequestTimeout bounds reading a whole request and writing its
//     response (slow bodies, clients that do not read).
//   - MaxHeaderBytes bounds a request's header; net/http answers a larger
//     one 431 before any handler sees it.
//   - AcceptConnectionLimit/Burst (off by default, like derper) close new
//     connections over a rate at once, so a flood of handshakes cannot
//     take all the CPU.
//
// None of them cuts a relaying client: net/http clears a connection's
// deadlines when derpserver hijacks it for DERP (and derpserver clears the
// 10 s deadline of its own handshake), so a DERP connection lives as long
// as the client keeps it.
const (
	// DefaultHeaderTimeout gives a client on a slow, lossy link several
	// round trips for the TLS handshake, and again for the request header.
	DefaultHeaderTimeout = 10 * time.Second
	// DefaultRequestTimeout is derper's bound on a request (its
	// ReadTimeout and WriteTimeout).
	DefaultRequestTimeout = 30 * time.Second
	// DefaultMaxHeaderBytes is ample for every client: Tailscale's DERP
	// upgrade is about 200 bytes, a browser's WebSocket upgrade far less
	// than this. net/http's default is 1 MiB.
	DefaultMaxHeaderBytes = 16 << 10
)

// limitHTTP applies the Server's timeouts and header bound to h.
func (s *Server) limitHTTP(h *http.Server) {
	// net/http bounds the TLS handshake by the shortest of its timeouts,
	// which is ReadHeaderTimeout; then each request's header by it again.
	h.ReadHeaderTimeout = orDefault(s.HeaderTimeout, DefaultHeaderTimeout)
	h.ReadTimeout = max(orDefault(s.RequestTimeout, DefaultRequestTimeout), h.ReadHeaderTimeout)
	h.WriteTimeout = h.ReadTimeout
	h.MaxHeaderBytes = s.MaxHeaderBytes
	if h.MaxHeaderBytes == 0 {
		h.MaxHeaderBytes = DefaultMaxHeaderBytes
	}
}

// acceptLimiter is the rate limiter of new HTTPS connections, nil for no
// limit.
func (s *Server) acceptLimiter() (*rate.Limiter, error) {
	limit, burst := s.AcceptConnectionLimit, s.AcceptConnectionBurst
	switch {
	case limit == 0 || math.IsInf(limit, +1):
		return nil, nil
	case limit < 0 || math.IsNaN(limit):
		return nil, fmt.Errorf("relay: accept connection limit %v: want a positive number of connections per second, or 0 for none", limit)
	case burst < 1:
		return nil, fmt.Errorf("relay: accept connection burst %d: want at least 1 with a limit of %v per second", burst, limit)
	}
	return rate.NewLimiter(rate.Limit(limit), burst), nil
}

// guardedListener is a public port's listener. Connections over its rate
// limit are closed as soon as they are accepted, as derper does: the
// client learns at once, and they do not pile up in the kernel's queue.
// Unlike derper's, it goes on accepting: a non-temporary error from Accept
// would end http.Server.Serve. Running out of file descriptors is said at
// warning level, once a minute while it lasts: it stops new clients from
// connecting.
type guardedListener struct {
	net.Listener
	lim *rate.Limiter // nil: no limit
	// limitArgs say lim in the refusal warning; lim never changes, and a
	// flood of refusals should not box them anew for each.
	limitArgs []any

	accepted, refused, fdErrors expvar.Int

	refusedWarn *warnEvery
	fdWarn      *warnEvery

	// gate, if set, is what serves on top of this listener: the PROXY
	// protocol and the caps per address (proxyproto.go, caps.go).
	gate *connGate
}

// serving is the listener to serve TLS on: the gate if there is one.
func (ln *guardedListener) serving() net.Listener {
	if ln.gate == nil {
		return ln
	}
	ln.gate.Listener = ln
	return ln.gate
}

func (ln *guardedListener) Accept() (net.Conn, error) {
	for {
		c, err := ln.Listener.Accept()
		if err != nil {
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				ln.fdErrors.Add(1)
				ln.warnFDs(err)
			}
			// net/http retries temporary errors, EMFILE among them,
			// backing off up to a second.
			return nil, err
		}
		if ln.lim != nil && !ln.lim.Allow() {
			ln.refused.Add(1)
			if tc, ok := c.(*net.TCPConn); ok {
				tc.SetLinger(0) // a reset: no TIME_WAIT kept for it
			}
			c.Close()
			ln.refusedWarn.add("relay: refusing new connections over the accept rate limit; if they are your clients, raise the limit",
				ln.limitArgs...)
			continue
		}
		ln.accepted.Add(1)
		return c, nil
	}
}

func (ln *guardedListener) warnFDs(err error) {
	if errors.Is(err, syscall.ENFILE) {
		ln.fdWarn.add("relay: the system is out of file descriptors: new clients cannot connect until some close; raise the system-wide limit (sysctl fs.file-max)",
			"err", err.Error())
		return
	}
	ln.fdWarn.add("relay: out of file descriptors: new clients cannot connect until some close; raise the limit on open files (systemd: LimitNOFILE=, the unit in deploy/ sets 1048576; docker: --ulimit nofile=1048576; shell: ulimit -n)",
		"err", err.Error(), "open_files_limit", openFilesLimit())
}

// expVar is the listener's counters, named as derper's.
func (ln *guardedListener) expVar() expvar.Var {
	m := new(metrics.Set)
	m.Set("counter_accepted_connections", &ln.accepted)
	m.Set("counter_rejected_connections", &ln.refused)
	m.Set("counter_accept_fd_exhausted", &ln.fdErrors)
	ln.gate.publish(m)
	return m
}

// guard wraps a public port's listener; lim nil means no rate limit.
func (s *Server) guard(ln net.Listener, lim *rate.Limiter) *guardedListener {
	g := &guardedListener{
		Listener:    ln,
		lim:         lim,
		refusedWarn: newWarnEvery(s.Logger, time.Minute),
		fdWarn:      newWarnEvery(s.Logger, time.Minute),
	}
	if lim != nil {
		g.limitArgs = []any{"limit_per_second", float64(lim.Limit()), "burst", lim.Burst()}
	}
	return g
}
