package relay

import (
	"encoding/base64"
	"log/slog"
	"net/http"
	"net/url"
	"strings"

	"github.com/tailderp/tailderp/internal/logs"
)

// checkUpgrade answers the /derp requests that derpserver would refuse
// and log, before derpserver sees them, and passes the rest to next.
//
// derpserver logs a request with an unexpected Upgrade header ("Weird
// upgrade: %q"), and derpserver.AddWebSocketSupport the failure of a
// WebSocket upgrade (whose error quotes the offending header), both whole
// and through the standard logger, once per request: one client sending
// 1 MB headers wrote megabytes of log a second. Here the same requests get
// the same answers, with a short excerpt of the header in a line of the
// request budget instead. What remains for derpserver is an upgrade it
// accepts.
func checkUpgrade(log *logs.Limited, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		up := r.Header.Get("Upgrade")
		switch {
		case strings.EqualFold(up, "derp"):
		case strings.EqualFold(up, "websocket") && strings.Contains(r.Header.Get("Sec-Websocket-Protocol"), "derp"):
			if code, problem, value := websocketProblem(r); code != 0 {
				log.Log(slog.LevelInfo, "relay: refused a WebSocket upgrade of /derp: "+problem,
					"value", logs.Excerpt(value, excerptBytes), "from", r.RemoteAddr)
				http.Error(w, "bad WebSocket upgrade: "+problem, code)
				return
			}
		case strings.EqualFold(up, "websocket"):
			// Very old clients say "Upgrade: WebSocket" and speak DERP's
			// own framing; derpserver serves them.
		default:
			if up != "" {
				log.Log(slog.LevelInfo, "relay: /derp request with an unexpected Upgrade header (a proxy in front must pass \"Upgrade: DERP\" through)",
					"upgrade", logs.Excerpt(up, excerptBytes), "from", r.RemoteAddr)
			}
			// derpserver's answer.
			http.Error(w, "DERP requires connection upgrade", http.StatusUpgradeRequired)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// websocketProblem checks r as github.com/coder/websocket's Accept does
// (derpserver's WebSocket upgrade), and returns Accept's status code, the
// problem and the client's value at fault; code 0 means Accept will take
// it.
func websocketProblem(r *http.Request) (code int, problem, value string) {
	h := r.Header
	switch {
	case !r.ProtoAtLeast(1, 1):
		return http.StatusUpgradeRequired, "HTTP/1.1 or later required", r.Proto
	case !hasToken(h, "Connection", "upgrade"):
		return http.StatusUpgradeRequired, "Connection header does not contain Upgrade", h.Get("Connection")
	case r.Method != http.MethodGet:
		return http.StatusMethodNotAllowed, "method is not GET", r.Method
	case h.Get("Sec-WebSocket-Version") != "13":
		return http.StatusBadRequest, "only WebSocket version 13 is supported", h.Get("Sec-WebSocket-Version")
	case len(h.Values("Sec-WebSocket-Key")) != 1:
		return http.StatusBadRequest, "want exactly one Sec-WebSocket-Key", h.Get("Sec-WebSocket-Key")
	}
	k := strings.TrimSpace(h.Get("Sec-WebSocket-Key"))
	if len(k) != base64.StdEncoding.EncodedLen(16) {
		return http.StatusBadRequest, "Sec-WebSocket-Key is not 16 bytes in base64", k
	}
	if b, err := base64.StdEncoding.DecodeString(k); err != nil || len(b) != 16 {
		return http.StatusBadRequest, "Sec-WebSocket-Key is not 16 bytes in base64", k
	}
	if o := h.Get("Origin"); o != "" {
		// derpserver allows every origin; only one that does not parse
		// fails.
		if _, err := url.Parse(o); err != nil {
			return http.StatusForbidden, "Origin is not a URL", o
		}
	}
	return 0, "", ""
}

// hasToken reports whether a comma-separated header of h lists token,
// ignoring case.
func hasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}
