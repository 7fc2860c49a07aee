package relay

import (
	"bufio"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"tailscale.com/derp/derpserver"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/tailderp/tailderp/internal/logs"
	"github.com/tailderp/tailderp/internal/testutil"
)

// FuzzCheckUpgrade: the /derp request check in front of derpserver, given
// any request a client can send (its request line and upgrade headers
// fuzzed, parsed as the server parses them), answers what derpserver
// alone answers (checkUpgrade claims the same answers, with bounded log
// lines instead of derpserver's whole-header ones), and leaves derpserver
// only upgrades it accepts: derpserver then logs nothing about the
// request. Every line it logs is short, whatever the size of the headers.
func FuzzCheckUpgrade(f *testing.F) {
	const wsKey = "dGhlIHNhbXBsZSBub25jZQ=="
	for _, s := range []struct {
		method, proto, upgrade, connection, version, wsKey, protocol, origin string
		twoKeys                                                              bool
	}{
		{"GET", "HTTP/1.1", "DERP", "Upgrade", "", "", "", "", false},
		{"POST", "HTTP/1.1", "derp", "upgrade", "", "", "", "", false},
		{"GET", "HTTP/1.1", "websocket", "Upgrade", "13", wsKey, "derp", "https://login.tailscale.com", false},
		{"GET", "HTTP/1.1", "WebSocket", "keep-alive, Upgrade", "13", wsKey, "derp", "", false},
		{"GET", "HTTP/1.1", "WebSocket", "Upgrade", "", "", "", "", false},
		{"GET", "HTTP/1.0", "websocket", "Upgrade", "13", wsKey, "derp", "", false},
		{"GET", "HTTP/1.1", "websocket", "close", "13", wsKey, "derp", "", false},
		{"PUT", "HTTP/1.1", "websocket", "Upgrade", "13", wsKey, "derp", "", false},
		{"GET", "HTTP/1.1", "websocket", "Upgrade", "8", wsKey, "derp", "", false},
		{"GET", "HTTP/1.1", "websocket", "Upgrade", "13", "", "derp", "", false},
		{"GET", "HTTP/1.1", "websocket", "Upgrade", "13", wsKey, "derp", "", true},
		{"GET", "HTTP/1.1", "websocket", "Upgrade", "13", "dGhlIHNhbXBsZSBub25jZQ", "derp", "", false},
		{"GET", "HTTP/1.1", "websocket", "Upgrade", "13", " " + wsKey + " ", "derp", "", false},
		{"GET", "HTTP/1.1", "websocket", "Upgrade", "13", wsKey, "derp", "http://[::1", false},
		{"GET", "HTTP/1.1", "websocket", "Upgrade", "13", wsKey, "chat, derp", "null", false},
		{"GET", "HTTP/1.1", "h2c", "Upgrade", "", "", "", "", false},
		{"GET", "HTTP/1.1", "", "", "", "", "", "", false},
		{"GET", "HTTP/1.1", strings.Repeat("x", 10000), "Upgrade", "", "", "", "", false},
	} {
		f.Add(s.method, s.proto, s.upgrade, s.connection, s.version, s.wsKey, s.protocol, s.origin, s.twoKeys)
	}

	srv := derpserver.New(key.NewNode(), logger.Discard)
	f.Cleanup(func() { srv.Close() })
	derpH := derpserver.AddWebSocketSupport(srv, derpserver.Handler(srv))
	// derpserver logs through the standard logger.
	var stdlog testutil.Buffer
	log.SetOutput(&stdlog)
	f.Cleanup(func() { log.SetOutput(os.Stderr) })

	f.Fuzz(func(t *testing.T, method, proto, upgrade, connection, version, wsKey, protocol, origin string, twoKeys bool) {
		var raw strings.Builder
		raw.WriteString(method + " /derp " + proto + "\r\nHost: derp.example.com\r\n")
		for _, h := range [][2]string{{"Upgrade", upgrade}, {"Connection", connection}, {"Sec-WebSocket-Version", version},
			{"Sec-WebSocket-Key", wsKey}, {"Sec-WebSocket-Protocol", protocol}, {"Origin", origin}} {
			if h[1] != "" {
				raw.WriteString(h[0] + ": " + h[1] + "\r\n")
			}
		}
		if twoKeys {
			raw.WriteString("Sec-WebSocket-Key: " + wsKey + "\r\n")
		}
		raw.WriteString("\r\n")
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw.String())))
		if err != nil {
			return // not a request a client can make
		}
		req.RemoteAddr = "203.0.113.7:4242"

		alone := httptest.NewRecorder()
		derpH.ServeHTTP(alone, req)
		stdlog.Take()

		var relayLog testutil.Buffer
		lim := logs.NewLimited(slog.New(slog.NewTextHandler(&relayLog, nil)), "malformed /derp requests", 5, time.Minute, maxLogLine)
		checked := httptest.NewRecorder()
		checkUpgrade(lim, derpH).ServeHTTP(checked, req)

		if checked.Code != alone.Code {
			t.Fatalf("checkUpgrade answers %d, derpserver alone %d, to %q", checked.Code, alone.Code, raw.String())
		}
		for _, l := range strings.Split(stdlog.Take(), "\n") {
			// A recorder cannot be hijacked: derpserver's complaint about
			// that is the test's, not the request's.
			if l != "" && !strings.Contains(l, "Hijacker") {
				t.Fatalf("derpserver logged about a request checkUpgrade passed: %q", l)
			}
		}
		for _, l := range strings.Split(relayLog.Take(), "\n") {
			if len(l) > 2*maxLogLine {
				t.Fatalf("log line of %d bytes: %.200q…", len(l), l)
			}
		}
	})
}
