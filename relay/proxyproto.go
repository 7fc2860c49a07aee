package relay

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"expvar"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/pires/go-proxyproto"
	"tailscale.com/metrics"

	"github.com/tailderp/tailderp/internal/logs"
)

// The PROXY protocol, for a relay sharing port 443 behind a TCP proxy that
// routes by SNI without terminating TLS (HAProxy mode tcp, nginx stream
// with ssl_preread, Traefik TCP routers). Such a proxy hides the client's
// address; with the PROXY protocol it says it in a header before the TLS
// bytes. Connections from Server.ProxyProtocolFrom must start with a v1
// or v2 header, and its source address is the client's from then on: the
// net.Conn's RemoteAddr, so net/http's r.RemoteAddr, derpserver's client
// address, admission's src, the logs and the caps all see it.
//
// Everything here happens before net/http sees the connection, in the
// connection gate (connGate): a listener between the rate-limited
// listener (limits.go) and TLS. Each connection's start is read by a
// goroutine of its own, bounded by a deadline, so a source that sends
// nothing holds only that goroutine, and only until the deadline, never
// Accept; connections reach TLS as they pass. A connection that does not
// pass is closed at once: net/http never sees it, so no TLS handshake is
// attempted nor logged. What closes it:
//
//   - from a listed source: no header (TLS bytes at once), a malformed
//     one, one for a transport other than TCP, or nothing before
//     ProxyHeaderTimeout;
//   - from any other source: a PROXY header (a proxy not listed, or
//     someone forging a client address).
//
// The header is parsed by github.com/pires/go-proxyproto's Read: the
// library's Listener reads the header lazily, on the first Read or
// RemoteAddr, which is inside net/http's connection goroutine and its
// TLS handshake, too late to refuse before TLS or to apply a cap to the
// header's address.
//
// A PROXY v2 LOCAL header (a proxy's health check) and a v1 UNKNOWN one
// stand for the proxy itself: the connection keeps the proxy's address.
// A source that connects and closes without a byte (a TCP health check)
// is closed quietly. STUN, on UDP, is not concerned.
//
// The cost, with ProxyProtocolFrom set: a goroutine, a 256-byte buffer
// and a deadline per connection until its first bytes arrive; and
// derpserver's TCP round-trip statistics skip gated connections (it looks
// for a *net.TCPConn under TLS and finds the gate's wrapper). Without
// ProxyProtocolFrom and MaxConnsPerIP there is no gate at all.

// DefaultProxyHeaderTimeout bounds how long a PROXY protocol source has to
// send its header. A proxy sends it at once, with the connection.
const DefaultProxyHeaderTimeout = 5 * time.Second

// headerBufSize is the buffer a connection's start is read into: a v1
// header is at most 107 bytes and must arrive in one read (the library's
// slow-loris defense), a v2 header without TLVs is 28 to 232 bytes.
const headerBufSize = 256

// Why a connection was closed before TLS.
var (
	errNoHeader         = errors.New("no PROXY header")
	errHeaderNotTrusted = errors.New("a PROXY header from a source not trusted for the PROXY protocol")
	errNotTCP           = errors.New("PROXY header for a transport other than TCP")
)

// connGate is the HTTPS listener's pre-TLS gate: the PROXY protocol and
// the caps per address. It is nil when neither is configured.
type connGate struct {
	net.Listener // the guarded listener

	from          []netip.Prefix // sources that must send a PROXY header
	headerTimeout time.Duration  // for a listed source's header
	peekTimeout   time.Duration  // for another source's first bytes
	caps          *connCaps      // nil: no caps

	log *logs.Limited // connections closed before TLS

	startOnce sync.Once
	ready     chan acceptResult // unbuffered: an accept loop error waits for the next Accept
	done      chan struct{}
	closeOnce sync.Once
	closeErr  error
	bgCancel  context.CancelFunc // ends the mesh peers' resolution

	mu      sync.Mutex
	pending map[net.Conn]struct{} // being read; closed by Close
	closed  bool

	headers, badHeaders, untrusted expvar.Int

	resolve func(context.Context) // resolves the exempt mesh peers; nil: nothing to resolve
}

type acceptResult struct {
	c   net.Conn
	err error
}

// newConnGate returns the gate the Server's fields ask for, nil for none.
// It checks the settings; the gate starts working at its first Accept.
func (s *Server) newConnGate() (*connGate, error) {
	caps, err := s.newConnCaps()
	if err != nil {
		return nil, err
	}
	if s.ProxyHeaderTimeout < 0 {
		return nil, fmt.Errorf("relay: PROXY header timeout %v: want a positive duration, or 0 for %v", s.ProxyHeaderTimeout, DefaultProxyHeaderTimeout)
	}
	from := make([]netip.Prefix, 0, len(s.ProxyProtocolFrom))
	for _, p := range s.ProxyProtocolFrom {
		if !p.IsValid() {
			return nil, fmt.Errorf("relay: PROXY protocol source %v: not a valid prefix", p)
		}
		if p.Addr().Is4In6() {
			p = netip.PrefixFrom(p.Addr().Unmap(), max(p.Bits()-96, 0))
		}
		from = append(from, p.Masked())
	}
	if caps == nil && len(from) == 0 {
		return nil, nil
	}
	g := &connGate{
		from:          from,
		headerTimeout: orDefault(s.ProxyHeaderTimeout, DefaultProxyHeaderTimeout),
		peekTimeout:   orDefault(s.HeaderTimeout, DefaultHeaderTimeout),
		caps:          caps,
		log:           logs.NewLimited(s.Logger, "connections closed before TLS", 5, time.Minute, maxLogLine),
		ready:         make(chan acceptResult),
		done:          make(chan struct{}),
		pending:       make(map[net.Conn]struct{}),
	}
	if names := meshNames(s.MeshWith); caps != nil && len(names) > 0 {
		g.resolve = func(ctx context.Context) { caps.resolveExempt(ctx, s.Resolver, names) }
	}
	return g, nil
}

// listed reports whether a must send a PROXY header.
func (g *connGate) listed(a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range g.from {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// start begins the background work at the first Accept, so a gate whose
// listener never serves (Start failing later) leaves nothing running.
func (g *connGate) start() {
	g.startOnce.Do(func() {
		ctx, cancel := context.WithCancel(context.Background())
		g.mu.Lock()
		closed := g.closed
		g.bgCancel = cancel
		g.mu.Unlock()
		if closed {
			cancel()
			return
		}
		if g.resolve != nil {
			go g.resolve(ctx)
		}
		if len(g.from) > 0 {
			go g.acceptLoop()
		}
	})
}

// Accept returns the next connection that passed the gate.
func (g *connGate) Accept() (net.Conn, error) {
	g.start()
	if len(g.from) == 0 {
		// Caps only: decided here, from the socket's address.
		for {
			c, err := g.Listener.Accept()
			if err != nil {
				return nil, err
			}
			if gc := g.admit(c, remoteAddr(c)); gc != nil {
				return gc, nil
			}
		}
	}
	select {
	case r := <-g.ready:
		return r.c, r.err
	case <-g.done:
		return nil, net.ErrClosed
	}
}

// acceptLoop accepts from the guarded listener and reads each
// connection's start in a goroutine of its own.
func (g *connGate) acceptLoop() {
	for {
		c, err := g.Listener.Accept()
		if err != nil {
			// Handed to net/http's Serve, which backs off from a
			// temporary error (running out of file descriptors) before
			// its next Accept, and ends on any other.
			select {
			case g.ready <- acceptResult{err: err}:
			case <-g.done:
				return
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		src := remoteAddr(c)
		listed := g.listed(src.Addr())
		var release func()
		if !listed && g.caps != nil {
			// Known now: refused before reading a byte.
			var ok bool
			if release, ok = g.caps.acquire(src.Addr()); !ok {
				resetClose(c)
				continue
			}
		}
		if !g.track(c) {
			if release != nil {
				release()
			}
			c.Close()
			return
		}
		go g.readStart(c, src, listed, release)
	}
}

// readStart reads the start of c: a listed source's PROXY header, or
// another source's first bytes (which must not be one). It hands c on to
// Accept if it passes, and closes it otherwise.
func (g *connGate) readStart(c net.Conn, src netip.AddrPort, listed bool, release func()) {
	gc := g.check(c, src, listed, release)
	g.untrack(c)
	if gc == nil {
		return
	}
	select {
	case g.ready <- acceptResult{c: gc}:
	case <-g.done:
		gc.Close()
	}
}

// check is readStart's decision: the connection to hand on, or nil (c is
// closed, release called).
func (g *connGate) check(c net.Conn, src netip.AddrPort, listed bool, release func()) net.Conn {
	timeout := g.peekTimeout
	if listed {
		timeout = g.headerTimeout
	}
	br := bufio.NewReaderSize(c, headerBufSize)
	c.SetReadDeadline(time.Now().Add(timeout))
	h, err := proxyproto.Read(br)
	c.SetReadDeadline(time.Time{})

	refuse := func(level slog.Level, why error, args ...any) net.Conn {
		if release != nil {
			release()
		}
		resetClose(c)
		if g.log.Enabled(level) {
			g.log.Log(level, "relay: closed a connection before TLS", append([]any{"src", src.String(), "why", why.Error()}, args...)...)
		}
		return nil
	}
	silent := errors.Is(err, proxyproto.ErrNoProxyProtocol) && br.Buffered() == 0 // closed without a byte
	timedOut := errors.Is(err, os.ErrDeadlineExceeded)
	if !listed {
		switch {
		case silent || timedOut || (err != nil && !errors.Is(err, proxyproto.ErrNoProxyProtocol)):
			// A scanner, a half-open connection: what net/http's
			// handshake timeout would have closed, said at debug level
			// as net/http says it.
			return refuse(slog.LevelDebug, cmpErr(err, io.EOF))
		case err == nil:
			g.untrusted.Add(1)
			return refuse(slog.LevelWarn, errHeaderNotTrusted, "header_src", headerSource(h))
		}
		// TLS bytes, most likely: on to net/http.
		return &gatedConn{Conn: c, r: br, release: release}
	}

	switch {
	case silent:
		// A TCP health check that connects and closes.
		return refuse(slog.LevelDebug, fmt.Errorf("%w: closed before sending anything", errNoHeader))
	case timedOut:
		g.badHeaders.Add(1)
		return refuse(slog.LevelWarn, fmt.Errorf("%w within %v", errNoHeader, timeout))
	case errors.Is(err, proxyproto.ErrNoProxyProtocol):
		g.badHeaders.Add(1)
		first, _ := br.Peek(min(br.Buffered(), 16))
		why := errNoHeader
		if first[0] == 0x16 { // a TLS record of type handshake
			why = fmt.Errorf("%w: the connection starts with a TLS handshake", errNoHeader)
		}
		return refuse(slog.LevelWarn, why, "start_hex", hex.EncodeToString(first))
	case err != nil:
		g.badHeaders.Add(1)
		return refuse(slog.LevelWarn, fmt.Errorf("malformed PROXY header: %w", err))
	}
	client := src // LOCAL, or v1 UNKNOWN: the proxy itself
	if h.Command.IsProxy() {
		tcp, _, ok := h.TCPAddrs()
		if !ok {
			g.badHeaders.Add(1)
			return refuse(slog.LevelWarn, errNotTCP, "transport", fmt.Sprint(h.TransportProtocol))
		}
		client = tcp.AddrPort()
		client = netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
	}
	g.headers.Add(1)
	if g.caps != nil {
		var ok bool
		if release, ok = g.caps.acquire(client.Addr()); !ok {
			resetClose(c)
			return nil
		}
	}
	return &gatedConn{Conn: c, r: br, remote: net.TCPAddrFromAddrPort(client), release: release}
}

// headerSource is what a header claims, for a log line.
func headerSource(h *proxyproto.Header) string {
	if tcp, _, ok := h.TCPAddrs(); ok && h.Command.IsProxy() {
		return tcp.String()
	}
	return "none (LOCAL or UNKNOWN)"
}

func cmpErr(err, def error) error {
	if err == nil || errors.Is(err, proxyproto.ErrNoProxyProtocol) {
		return def
	}
	return err
}

// track adds c to the connections being read, unless the gate is closed.
func (g *connGate) track(c net.Conn) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.pending[c] = struct{}{}
	return true
}

func (g *connGate) untrack(c net.Conn) {
	g.mu.Lock()
	delete(g.pending, c)
	g.mu.Unlock()
}

// Close closes the listener and the connections still being read.
func (g *connGate) Close() error {
	g.closeOnce.Do(func() {
		g.mu.Lock()
		g.closed = true
		pending := g.pending
		g.pending = nil
		cancel := g.bgCancel
		g.mu.Unlock()
		close(g.done)
		if cancel != nil {
			cancel()
		}
		g.closeErr = g.Listener.Close()
		for c := range pending {
			c.Close()
		}
		g.log.Flush()
	})
	return g.closeErr
}

// admit applies the cap to a connection whose address is known at Accept
// and wraps it; nil if refused (c is closed).
func (g *connGate) admit(c net.Conn, src netip.AddrPort) net.Conn {
	var release func()
	if g.caps != nil {
		var ok bool
		if release, ok = g.caps.acquire(src.Addr()); !ok {
			resetClose(c)
			return nil
		}
	}
	return &gatedConn{Conn: c, release: release}
}

// publish adds the gate's counters to the listener's metrics; a nil gate
// publishes zeros, so the names are there whatever the settings.
func (g *connGate) publish(m *metrics.Set) {
	var headers, badHeaders, untrusted, capRefused *expvar.Int
	var caps *connCaps
	if g != nil {
		headers, badHeaders, untrusted, caps = &g.headers, &g.badHeaders, &g.untrusted, g.caps
	}
	if caps != nil {
		capRefused = &caps.refusedTotal
	}
	for name, v := range map[string]*expvar.Int{
		"counter_proxy_protocol_headers":           headers,
		"counter_proxy_protocol_rejected":          badHeaders,
		"counter_proxy_protocol_untrusted_headers": untrusted,
		"counter_rejected_connections_per_ip":      capRefused,
	} {
		if v == nil {
			v = new(expvar.Int)
		}
		m.Set(name, v)
	}
	m.Set("gauge_conns_per_ip_sources", expvar.Func(func() any {
		if caps == nil {
			return 0
		}
		n, _ := caps.gauges()
		return n
	}))
	m.Set("gauge_conns_per_ip_max", expvar.Func(func() any {
		if caps == nil {
			return 0
		}
		_, most := caps.gauges()
		return most
	}))
}

// gatedConn is a connection that passed the gate.
type gatedConn struct {
	net.Conn
	// r holds what was read past the PROXY header (the start of the TLS
	// handshake) until it is drained; nil then. Only TLS reads, one read
	// at a time.
	r *bufio.Reader
	// remote is the client's address from the PROXY header; nil: the
	// socket's.
	remote net.Addr
	// release gives back the connection's place under the cap; nil if
	// not counted.
	release   func()
	closeOnce sync.Once
}

func (c *gatedConn) Read(b []byte) (int, error) {
	if c.r != nil {
		if c.r.Buffered() > 0 {
			return c.r.Read(b)
		}
		c.r = nil
	}
	return c.Conn.Read(b)
}

// RemoteAddr is the client's address: the PROXY header's when there was
// one.
func (c *gatedConn) RemoteAddr() net.Addr {
	if c.remote != nil {
		return c.remote
	}
	return c.Conn.RemoteAddr()
}

func (c *gatedConn) Close() error {
	c.closeOnce.Do(func() {
		if c.release != nil {
			c.release()
		}
	})
	return c.Conn.Close()
}

// remoteAddr is c's peer address, the zero AddrPort if it is not TCP.
func remoteAddr(c net.Conn) netip.AddrPort {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// resetClose closes c with a reset, keeping no TIME_WAIT for a refused
// connection.
func resetClose(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}
