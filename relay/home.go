package relay

import (
	"fmt"
	"io"
	"net/http"
	"strings"

	"tailscale.com/tsweb"
)

// defaultHomePage says nothing about what this server is. The stock
// derper text ("This is a Tailscale DERP server.") is what internet
// scanners search for to find open relays.
const defaultHomePage = "<!doctype html>\n<html><head><title>OK</title></head><body></body></html>\n"

// HomeHandler returns the handler for "/" as Server.Home describes it: ""
// for the default neutral page, "blank" for an empty page, or an http(s)
// URL to redirect to. Every other path is 404. Any other value is an
// error, so a program can check the setting before it starts a Server.
func HomeHandler(home string) (http.Handler, error) {
	var h http.Handler
	switch {
	case home == "":
		h = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			io.WriteString(w, defaultHomePage)
		})
	case home == "blank":
		h = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
		})
	case strings.HasPrefix(home, "https://") || strings.HasPrefix(home, "http://"):
		h = http.RedirectHandler(home, http.StatusFound)
	default:
		return nil, fmt.Errorf("relay: home page %q: want empty (a neutral page), \"blank\", or an http:// or https:// URL to redirect to", home)
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		tsweb.AddBrowserHeaders(w)
		h.ServeHTTP(w, r)
	}), nil
}

// robotsTxt keeps crawlers away.
func robotsTxt(w http.ResponseWriter, r *http.Request) {
	tsweb.AddBrowserHeaders(w)
	io.WriteString(w, "User-agent: *\nDisallow: /\n")
}
