package relay_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"log"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/relay"
)

// logSink is a relay's log as an operator's disk sees it: slog's text
// format, every level.
type logSink struct {
	testutil.Buffer
}

func (s *logSink) size() int { return len(s.String()) }

// lines returns the lines that contain every one of substrs.
func (s *logSink) lines(substrs ...string) []string {
	return testutil.Lines(s.String(), substrs...)
}

func (s *logSink) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(s, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// captureStdLog sends the standard logger to a sink for the rest of the
// test: the relay must not use it for anything a client sends.
func captureStdLog(t *testing.T) *logSink {
	sink := &logSink{}
	prevOut, prevFlags := log.Writer(), log.Flags()
	log.SetOutput(sink)
	t.Cleanup(func() { log.SetOutput(prevOut); log.SetFlags(prevFlags) })
	return sink
}

// rawRequest sends req as is over a new TLS connection to s and returns
// the response status.
func rawRequest(t *testing.T, s *relay.Server, pool *x509.CertPool, req []byte) int {
	t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: waitFor}, "tcp", s.LocalAddr().String(), &tls.Config{RootCAs: pool})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(waitFor))
	go c.Write(req) // the server may answer before it has read it all
	res, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	res.Body.Close()
	return res.StatusCode
}

// TestHugeHeadersLogBounded: requests to /derp with 1 MB headers, of the
// kinds that derpserver logged whole (an unknown Upgrade, a bad WebSocket
// upgrade), cost a bounded number of short lines in the relay's log and
// nothing in the standard logger. With the default header bound net/http
// refuses them before any handler (431) and nothing is logged at all.
func TestHugeHeadersLogBounded(t *testing.T) {
	stdLog := captureStdLog(t)
	certs, pool := selfSigned(t)
	huge := strings.Repeat("x", 1<<20)
	requests := []struct {
		name   string
		header string
		status int
	}{
		{"unknown Upgrade", "Upgrade: " + huge + "\r\nConnection: Upgrade", http.StatusUpgradeRequired},
		{"WebSocket with a bad key", "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Protocol: derp\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + huge, http.StatusBadRequest},
		{"WebSocket with a bad version", "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Protocol: derp\r\nSec-WebSocket-Version: " + huge, http.StatusBadRequest},
		{"WebSocket with a bad Connection", "Upgrade: websocket\r\nConnection: " + huge + "\r\nSec-WebSocket-Protocol: derp", http.StatusUpgradeRequired},
	}
	const perKind = 5
	request := func(header string) []byte {
		return []byte("GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header + "\r\n\r\n")
	}

	t.Run("headers let through", func(t *testing.T) {
		sink := &logSink{}
		s := startRelay(t, certs, func(s *relay.Server) {
			s.Logger = sink.logger()
			s.MaxHeaderBytes = 2 << 20 // so that they reach the /derp handler
		})
		before := sink.size()
		n := 0
		for range perKind {
			for _, r := range requests {
				if got := rawRequest(t, s, pool, request(r.header)); got != r.status {
					t.Errorf("%s: status %d, want %d", r.name, got, r.status)
				}
				n++
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		defer cancel()
		if err := s.Close(ctx); err != nil { // says what was suppressed
			t.Fatal(err)
		}
		grew := sink.size() - before
		t.Logf("%d requests with a 1 MiB header: the log grew %d bytes (%.0f bytes/request); the lines:\n%s",
			n, grew, float64(grew)/float64(n), strings.Join(sink.lines(""), "\n"))
		for _, l := range sink.lines("") {
			if len(l) > 1024 {
				t.Errorf("a log line of %d bytes: %.200s…", len(l), l)
			}
		}
		// A budget of 5 lines (the relay's budget for malformed requests)
		// plus the suppressed count; a line per request would be 20.
		logged := len(sink.lines("/derp", "from="))
		if logged < 1 || logged > 5 {
			t.Errorf("%d lines about the requests, want 1 to 5", logged)
		}
		if sup := sink.lines("log lines suppressed", "malformed /derp requests"); len(sup) != 1 || !strings.Contains(sup[0], "count="+strconv.Itoa(n-logged)) {
			t.Errorf("want one line counting the %d suppressed lines, got %q", n-logged, sup)
		}
		if grew > 8<<10 {
			t.Errorf("the log grew %d bytes for %d requests, want at most 8 KiB", grew, n)
		}
		// Each kind is logged once before the budget is spent, each with
		// a quoted excerpt of the header and its length.
		if got := len(sink.lines("/derp", "from=", `"xxxxxxxxxxxxxxxx`, "(1048576 bytes)")); got != logged || logged < len(requests) {
			t.Errorf("%d of %d lines about the requests quote an excerpt of the header with its length; want all, and at least %d", got, logged, len(requests))
		}
		if stdLog.size() != 0 {
			t.Errorf("the standard logger got %d bytes: %.300s", stdLog.size(), stdLog.lines("")[0])
		}
	})

	t.Run("default header bound", func(t *testing.T) {
		sink := &logSink{}
		s := startRelay(t, certs, func(s *relay.Server) { s.Logger = sink.logger() })
		for _, r := range requests {
			if got := rawRequest(t, s, pool, request(r.header)); got != http.StatusRequestHeaderFieldsTooLarge {
				t.Errorf("%s: status %d, want 431", r.name, got)
			}
		}
		if got := sink.lines("/derp", "from="); len(got) != 0 {
			t.Errorf("logged %q, want nothing", got)
		}
		// A well-formed upgrade is still served under the bound.
		c := newClient(t, s, pool)
		watch(c).mustBeAdmitted(t)
	})
}

// TestShutdownLogsBounded: at Close, each client's "closing" line from
// derpserver shares the relay's budget for per-connection lines, and what
// the budget dropped is counted in one line.
func TestShutdownLogsBounded(t *testing.T) {
	const clients = 40
	certs, pool := selfSigned(t)
	sink := &logSink{}
	s := startRelay(t, certs, func(s *relay.Server) { s.Logger = sink.logger() })
	for range clients {
		c := newClient(t, s, pool)
		watch(c).mustBeAdmitted(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	closing := sink.lines("closing")
	sup := sink.lines("log lines suppressed", "per-connection")
	t.Logf("%d clients at Close: %d closing lines, then %q", clients, len(closing), sup)
	if len(closing) > 10 {
		t.Errorf("%d closing lines for %d clients, want at most 10 (the per-connection budget)", len(closing), clients)
	}
	// How many clients log "closing" depends on which loop of theirs
	// sees the close first (others end on EOF, at debug level), so the
	// count of suppressed lines is not fixed; at most one line says it
	// (TestLimited checks the count itself).
	if len(sup) > 1 {
		t.Errorf("%d lines saying what was suppressed, want at most 1: %q", len(sup), sup)
	}
}

// listenerCounters reads the HTTPS listener's counters from s's metrics.
func listenerCounters(t *testing.T, s *relay.Server) map[string]int64 {
	t.Helper()
	var m struct {
		TLSListener map[string]int64 `json:"tls_listener"`
	}
	if err := json.Unmarshal([]byte(s.ExpVar().String()), &m); err != nil {
		t.Fatal(err)
	}
	return m.TLSListener
}

// TestAcceptLimit: with -accept-connection-limit and -burst, connections
// beyond the burst are refused at once, said in one warning, and once the
// bucket refills new connections are served again (derper's listener
// would have stopped serving at the first refusal).
func TestAcceptLimit(t *testing.T) {
	const burst = 3
	certs, pool := selfSigned(t)
	sink := &logSink{}
	s := startRelay(t, certs, func(s *relay.Server) {
		s.Logger = sink.logger()
		s.AcceptConnectionLimit = 1 // a connection a second
		s.AcceptConnectionBurst = burst
	})
	dial := func() (*tls.Conn, error) {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: waitFor}, "tcp", s.LocalAddr().String(), &tls.Config{RootCAs: pool})
		if err == nil {
			t.Cleanup(func() { c.Close() })
		}
		return c, err
	}
	for i := range burst {
		if _, err := dial(); err != nil {
			t.Fatalf("connection %d of the burst of %d: %v", i+1, burst, err)
		}
	}
	// The bucket refills a token a second; these come within
	// milliseconds.
	refused := 0
	for range 3 {
		if _, err := dial(); err != nil {
			refused++
			t.Logf("refused: %v", err)
		}
	}
	if refused == 0 {
		t.Fatal("no connection beyond the burst was refused")
	}
	// Recovers: within a few seconds a new connection is served, DERP
	// and all.
	deadline := time.Now().Add(waitFor)
	for {
		c, err := dial()
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no connection accepted %v after the refusals: %v", waitFor, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	select {
	case err := <-s.Err():
		t.Fatalf("the relay stopped serving: %v", err)
	default:
	}
	got := listenerCounters(t, s)
	t.Logf("listener counters: %v", got)
	if got["counter_rejected_connections"] < int64(refused) {
		t.Errorf("counter_rejected_connections %d, want at least %d", got["counter_rejected_connections"], refused)
	}
	if w := sink.lines("level=WARN", "accept rate limit"); len(w) != 1 {
		t.Errorf("want one warning about the refusals, got %q", w)
	}
}

// TestDERPConnectionsOutliveTimeouts: the header and request timeouts end
// what has not become a DERP connection, never a DERP connection: clients
// over DERP's own upgrade and over WebSocket keep relaying, on the same
// connection, well past both.
func TestDERPConnectionsOutliveTimeouts(t *testing.T) {
	const headerTimeout, requestTimeout = 200 * time.Millisecond, 400 * time.Millisecond
	certs, pool := selfSigned(t)
	s := startRelay(t, certs, func(s *relay.Server) {
		s.HeaderTimeout = headerTimeout
		s.RequestTimeout = requestTimeout
	})
	wsKey := key.NewNode()
	ws, err := dialWebSocket(t, s, pool, wsKey)
	if err != nil {
		t.Fatal(err)
	}
	plain := newClient(t, s, pool)
	wsIn, plainIn := watch(ws), watch(plain)
	wsIn.mustBeAdmitted(t)
	plainIn.mustBeAdmitted(t)
	since := time.Now()
	for time.Since(since) < 5*requestTimeout {
		exchange(t, ws, wsKey.Public(), wsIn, plain, plain.SelfPublicKey(), plainIn)
		time.Sleep(requestTimeout / 4)
	}
	for name, in := range map[string]*inbox{"websocket": wsIn, "derp": plainIn} {
		select {
		case err := <-in.err:
			t.Errorf("the %s client's connection was cut: %v", name, err)
		default:
		}
	}
}
