package relay_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/net/wsconn"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/tailderp/tailderp/relay"
)

// waitFor bounds every wait on the network in these tests.
const waitFor = 10 * time.Second

// selfSigned returns a self-signed certificate for 127.0.0.1 and the pool
// that trusts it.
func selfSigned(t *testing.T) (*relay.StaticCert, *x509.CertPool) {
	t.Helper()
	certs, err := relay.NewSelfSigned("127.0.0.1", "localhost")
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(certs.Leaf())
	return certs, pool
}

// startRelay starts a relay on 127.0.0.1 with a free HTTPS port and no
// plain-HTTP port, after applying configure, and closes it when the test
// ends.
func startRelay(t *testing.T, certs relay.Certificates, configure ...func(*relay.Server)) *relay.Server {
	t.Helper()
	s := &relay.Server{
		Addr:       "127.0.0.1:0",
		HTTPPort:   -1,
		Certs:      certs,
		PrivateKey: key.NewNode(),
	}
	for _, f := range configure {
		f(s)
	}
	if err := s.Start(); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		defer cancel()
		if err := s.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func derpURL(s *relay.Server) string { return "https://" + s.LocalAddr().String() + "/derp" }

// newClient returns a derphttp client of s with a fresh key, trusting pool.
func newClient(t *testing.T, s *relay.Server, pool *x509.CertPool) *derphttp.Client {
	t.Helper()
	return newClientWithKey(t, s, pool, key.NewNode())
}

// newClientWithKey returns a derphttp client of s with key k, trusting pool.
func newClientWithKey(t *testing.T, s *relay.Server, pool *x509.CertPool, k key.NodePrivate) *derphttp.Client {
	t.Helper()
	c, err := derphttp.NewClient(k, derpURL(s), logger.Discard, netmon.NewStatic())
	if err != nil {
		t.Fatal(err)
	}
	c.TLSConfig = &tls.Config{RootCAs: pool}
	t.Cleanup(func() { c.Close() })
	return c
}

// receiver is what inbox reads from: a derphttp.Client or a derp.Client.
type receiver interface {
	Recv() (derp.ReceivedMessage, error)
}

// inbox collects what a client receives, from its own goroutine, until
// the first error. It does not call Recv again after an error: derphttp
// would reconnect.
type inbox struct {
	msgs chan derp.ReceivedMessage
	err  chan error
}

func watch(c receiver) *inbox {
	in := &inbox{msgs: make(chan derp.ReceivedMessage, 64), err: make(chan error, 1)}
	go func() {
		for {
			m, err := c.Recv()
			if err != nil {
				in.err <- err
				return
			}
			if p, ok := m.(derp.ReceivedPacket); ok {
				// Data aliases the client's buffer.
				p.Data = bytes.Clone(p.Data)
				m = p
			}
			in.msgs <- m
		}
	}()
	return in
}

// admitted waits for the first thing the server says to the client: its
// ServerInfo (true: the relay registered the client) or an error (false:
// the connection was closed, as a refused client's is).
func (in *inbox) admitted(ctx context.Context) (bool, error) {
	for {
		select {
		case m := <-in.msgs:
			if _, ok := m.(derp.ServerInfoMessage); ok {
				return true, nil
			}
		case <-in.err:
			return false, nil
		case <-ctx.Done():
			return false, fmt.Errorf("neither admitted nor closed: %w", ctx.Err())
		}
	}
}

// mustBeAdmitted fails the test unless the server registered the client.
func (in *inbox) mustBeAdmitted(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	ok, err := in.admitted(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !ok {
		t.Fatal("client was closed by the relay, want admitted")
	}
}

// packet waits for a packet and returns it.
func (in *inbox) packet(t *testing.T) derp.ReceivedPacket {
	t.Helper()
	timeout := time.After(waitFor)
	for {
		select {
		case m := <-in.msgs:
			if p, ok := m.(derp.ReceivedPacket); ok {
				return p
			}
		case err := <-in.err:
			t.Fatalf("connection ended before a packet arrived: %v", err)
		case <-timeout:
			t.Fatal("no packet within", waitFor)
		}
	}
}

// sender is a derphttp.Client or a derp.Client.
type sender interface {
	Send(dst key.NodePublic, b []byte) error
}

// exchange sends one packet each way between a and b and checks both
// arrive intact with the right source.
func exchange(t *testing.T, a sender, aKey key.NodePublic, aIn *inbox, b sender, bKey key.NodePublic, bIn *inbox) {
	t.Helper()
	for _, dir := range []struct {
		name     string
		from     sender
		fromKey  key.NodePublic
		to       *inbox
		toKey    key.NodePublic
		payloadN int
	}{
		{"a→b", a, aKey, bIn, bKey, 1200},
		{"b→a", b, bKey, aIn, aKey, 64},
	} {
		payload := bytes.Repeat([]byte(dir.name), dir.payloadN/len(dir.name))
		if err := dir.from.Send(dir.toKey, payload); err != nil {
			t.Fatalf("%s: Send: %v", dir.name, err)
		}
		p := dir.to.packet(t)
		if p.Source != dir.fromKey {
			t.Errorf("%s: packet from %v, want %v", dir.name, p.Source.ShortString(), dir.fromKey.ShortString())
		}
		if !bytes.Equal(p.Data, payload) {
			t.Errorf("%s: got %d bytes %q…, want %d bytes", dir.name, len(p.Data), p.Data[:min(len(p.Data), 16)], len(payload))
		}
	}
}

func TestRelayPacketsBothWays(t *testing.T) {
	certs, pool := selfSigned(t)
	s := startRelay(t, certs)
	a, b := newClient(t, s, pool), newClient(t, s, pool)
	aIn, bIn := watch(a), watch(b)
	aIn.mustBeAdmitted(t)
	bIn.mustBeAdmitted(t)

	if got, want := a.ServerPublicKey(), s.DERP().PublicKey(); got != want {
		t.Errorf("client sees server key %v, want the relay's %v", got.ShortString(), want.ShortString())
	}
	if cs, ok := a.TLSConnectionState(); !ok || cs.Version != tls.VersionTLS13 {
		t.Errorf("TLS state %v (ok=%v), want TLS 1.3", cs, ok)
	}
	exchange(t, a, a.SelfPublicKey(), aIn, b, b.SelfPublicKey(), bIn)
}

// dialWebSocket connects to the relay's /derp over WebSocket, as browsers
// and clients behind proxies that drop "Upgrade: DERP" do, and speaks DERP
// over it.
func dialWebSocket(t *testing.T, s *relay.Server, pool *x509.CertPool, k key.NodePrivate) (*derp.Client, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	u := "wss://" + s.LocalAddr().String() + "/derp"
	wc, _, err := websocket.Dial(ctx, u, &websocket.DialOptions{HTTPClient: hc, Subprotocols: []string{"derp"}})
	if err != nil {
		return nil, fmt.Errorf("websocket.Dial %s: %w", u, err)
	}
	if wc.Subprotocol() != "derp" {
		t.Errorf("subprotocol %q, want derp", wc.Subprotocol())
	}
	nc := wsconn.NetConn(context.Background(), wc, websocket.MessageBinary, u)
	t.Cleanup(func() { nc.Close() })
	brw := bufio.NewReadWriter(bufio.NewReader(nc), bufio.NewWriter(nc))
	return derp.NewClient(k, nc, brw, logger.Discard)
}

func TestRelayWebSocket(t *testing.T) {
	certs, pool := selfSigned(t)
	s := startRelay(t, certs)

	wsKey := key.NewNode()
	ws, err := dialWebSocket(t, s, pool, wsKey)
	if err != nil {
		t.Fatal(err)
	}
	if ws.ServerPublicKey() != s.DERP().PublicKey() {
		t.Errorf("server key over WebSocket %v, want %v", ws.ServerPublicKey().ShortString(), s.DERP().PublicKey().ShortString())
	}
	plain := newClient(t, s, pool)
	wsIn, plainIn := watch(ws), watch(plain)
	wsIn.mustBeAdmitted(t)
	plainIn.mustBeAdmitted(t)
	exchange(t, ws, wsKey.Public(), wsIn, plain, plain.SelfPublicKey(), plainIn)
}

// httpClient trusts pool and does not follow redirects.
func httpClient(pool *x509.CertPool) *http.Client {
	return &http.Client{
		Transport:     &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		Timeout:       waitFor,
	}
}

// do sends one request and returns the response with its body read.
func do(t *testing.T, hc *http.Client, method, url string, header http.Header) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if h := header.Get("Host"); h != "" {
		req.Host = h
	}
	res, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, url, err)
	}
	return res, string(body)
}

// bothPorts starts a relay with a plain-HTTP port and returns the base
// URLs of its two ports by name.
func bothPorts(t *testing.T, configure ...func(*relay.Server)) (s *relay.Server, hc *http.Client, bases map[string]string) {
	t.Helper()
	certs, pool := selfSigned(t)
	s = startRelay(t, certs, append([]func(*relay.Server){func(s *relay.Server) { s.HTTPPort = 0 }}, configure...)...)
	return s, httpClient(pool), map[string]string{
		"https": "https://" + s.LocalAddr().String(),
		"http":  "http://" + s.HTTPAddr(),
	}
}

func TestProbesAndCaptivePortalCheck(t *testing.T) {
	_, hc, bases := bothPorts(t)
	for _, path := range []string{"/derp/probe", "/derp/latency-check"} {
		for _, method := range []string{"GET", "HEAD"} {
			t.Run("https "+method+" "+path, func(t *testing.T) {
				res, _ := do(t, hc, method, bases["https"]+path, nil)
				if res.StatusCode != http.StatusOK {
					t.Errorf("status %d, want 200", res.StatusCode)
				}
				if got := res.Header.Get("Access-Control-Allow-Origin"); got != "*" {
					t.Errorf("Access-Control-Allow-Origin %q, want *", got)
				}
			})
		}
	}
	// Captive-portal detection uses plain HTTP as well as HTTPS.
	for _, scheme := range []string{"https", "http"} {
		t.Run(scheme+" /generate_204", func(t *testing.T) {
			res, body := do(t, hc, "GET", bases[scheme]+"/generate_204", http.Header{"X-Tailscale-Challenge": {"ts_abc-123.4:5"}})
			if res.StatusCode != http.StatusNoContent {
				t.Errorf("status %d, want 204", res.StatusCode)
			}
			if got, want := res.Header.Get("X-Tailscale-Response"), "response ts_abc-123.4:5"; got != want {
				t.Errorf("X-Tailscale-Response %q, want %q", got, want)
			}
			if body != "" {
				t.Errorf("body %q, want none", body)
			}
		})
	}
}

// TestProbesOnPlainHTTPPort: the latency probes answer on port 80 too, not
// only over HTTPS. (Upstream derper redirects them to HTTPS; a redirect
// carries no Access-Control-Allow-Origin, so a browser's cross-origin
// probe of http:// fails.)
func TestProbesOnPlainHTTPPort(t *testing.T) {
	_, hc, bases := bothPorts(t)
	for _, path := range []string{"/derp/probe", "/derp/latency-check"} {
		for _, method := range []string{"GET", "HEAD"} {
			t.Run(method+" "+path, func(t *testing.T) {
				res, _ := do(t, hc, method, bases["http"]+path, nil)
				if res.StatusCode != http.StatusOK {
					t.Errorf("status %d (Location %q), want 200", res.StatusCode, res.Header.Get("Location"))
				}
				if got := res.Header.Get("Access-Control-Allow-Origin"); got != "*" {
					t.Errorf("Access-Control-Allow-Origin %q, want *", got)
				}
			})
		}
	}
}

// TestPlainHTTPRedirectsToHTTPS: port 80 redirects to the HTTPS port at the
// configured hostname, whatever Host the request names (a redirect
// reflecting it would send visitors wherever a crafted link says), or
// without one at the address the request arrived on.
func TestPlainHTTPRedirectsToHTTPS(t *testing.T) {
	hosts := []string{"", "derp.example.com", "derp.example.com:80", "evil.example", "evil.example:8443", "[2001:db8::1]:80", "127.0.0.1"}
	tests := []struct {
		hostname string // the relay's Hostname
		wantHost string // in the Location, before the HTTPS port
	}{
		{"", "127.0.0.1"},
		{"derp.example.com", "derp.example.com"},
		{"203.0.113.7", "203.0.113.7"},
		{"2001:db8::2", "[2001:db8::2]"},
	}
	for _, tt := range tests {
		t.Run("hostname="+tt.hostname, func(t *testing.T) {
			s, hc, bases := bothPorts(t, func(s *relay.Server) { s.Hostname = tt.hostname })
			httpsPort := strconv.Itoa(s.LocalAddr().(*net.TCPAddr).Port)
			for _, host := range hosts {
				for _, path := range []string{"/", "/some/page?x=1&y=2", "/derp"} {
					var h http.Header
					if host != "" {
						h = http.Header{"Host": {host}}
					}
					res, _ := do(t, hc, "GET", bases["http"]+path, h)
					if res.StatusCode != http.StatusFound {
						t.Errorf("Host %q %s: status %d, want 302", host, path, res.StatusCode)
					}
					want := "https://" + tt.wantHost + ":" + httpsPort + path
					if got := res.Header.Get("Location"); got != want {
						t.Errorf("Host %q %s: Location %q, want %q", host, path, got, want)
					}
				}
			}
		})
	}
}

// TestRedirectToPublicPort: behind a proxy or a port mapping, port 80
// redirects to the port clients dial, not the listener's.
func TestRedirectToPublicPort(t *testing.T) {
	for _, tt := range []struct {
		port int
		want string
	}{{443, "https://derp.example.com/x"}, {8443, "https://derp.example.com:8443/x"}} {
		_, hc, bases := bothPorts(t, func(s *relay.Server) { s.Hostname, s.PublicPort = "derp.example.com", tt.port })
		res, _ := do(t, hc, "GET", bases["http"]+"/x", nil)
		if got := res.Header.Get("Location"); res.StatusCode != http.StatusFound || got != tt.want {
			t.Errorf("PublicPort %d: %d %q, want 302 %q", tt.port, res.StatusCode, got, tt.want)
		}
	}
}

func TestBadHostname(t *testing.T) {
	certs, _ := selfSigned(t)
	for _, h := range []string{"https://derp.example.com", "derp.example.com/x", "evil.example:8443", "a b"} {
		s := &relay.Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: certs, PrivateKey: key.NewNode(), Hostname: h}
		err := s.Start()
		if err == nil {
			s.Close(context.Background())
			t.Errorf("Start with Hostname %q succeeded, want an error", h)
			continue
		}
		if !strings.Contains(err.Error(), "hostname") || !strings.Contains(err.Error(), h) {
			t.Errorf("error %q should say it is the hostname and name the value %q", err, h)
		}
	}
}

func TestRobotsTxt(t *testing.T) {
	_, hc, bases := bothPorts(t)
	res, body := do(t, hc, "GET", bases["https"]+"/robots.txt", nil)
	if res.StatusCode != http.StatusOK || !strings.Contains(body, "Disallow: /") {
		t.Errorf("status %d body %q, want 200 disallowing everything", res.StatusCode, body)
	}
}

func TestHomePage(t *testing.T) {
	tests := []struct {
		home         string
		wantStatus   int
		wantLocation string
		checkBody    func(t *testing.T, body string)
	}{
		{"", http.StatusOK, "", func(t *testing.T, body string) {
			if body == "" {
				t.Error("neutral page is empty")
			}
			// Scanners look for these words to find open relays.
			for _, w := range []string{"tailscale", "derp"} {
				if strings.Contains(strings.ToLower(body), w) {
					t.Errorf("neutral page mentions %q: %q", w, body)
				}
			}
		}},
		{"blank", http.StatusOK, "", func(t *testing.T, body string) {
			if body != "" {
				t.Errorf("blank page has body %q", body)
			}
		}},
		{"https://example.com/about", http.StatusFound, "https://example.com/about", nil},
		{"http://example.org/", http.StatusFound, "http://example.org/", nil},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("home=%q", tt.home), func(t *testing.T) {
			_, hc, bases := bothPorts(t, func(s *relay.Server) { s.Home = tt.home })
			res, body := do(t, hc, "GET", bases["https"]+"/", nil)
			if res.StatusCode != tt.wantStatus {
				t.Errorf("status %d, want %d", res.StatusCode, tt.wantStatus)
			}
			if got := res.Header.Get("Location"); got != tt.wantLocation {
				t.Errorf("Location %q, want %q", got, tt.wantLocation)
			}
			if tt.checkBody != nil {
				tt.checkBody(t, body)
			}
			// Only "/" is the home page.
			if res, _ := do(t, hc, "GET", bases["https"]+"/index.html", nil); res.StatusCode != http.StatusNotFound {
				t.Errorf("/index.html: status %d, want 404", res.StatusCode)
			}
		})
	}
}

func TestHomePageBadValue(t *testing.T) {
	for _, home := range []string{"blnk", "example.com", "ftp://example.com/", "javascript:alert(1)"} {
		t.Run(home, func(t *testing.T) {
			certs, _ := selfSigned(t)
			s := &relay.Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: certs, PrivateKey: key.NewNode(), Home: home}
			err := s.Start()
			if err == nil {
				s.Close(context.Background())
				t.Fatalf("Start with Home %q succeeded, want an error", home)
			}
			if !strings.Contains(err.Error(), "home page") || !strings.Contains(err.Error(), home) {
				t.Errorf("error %q should say it is the home page and name the value %q", err, home)
			}
		})
	}
}

func TestNoDebugEndpoints(t *testing.T) {
	_, hc, bases := bothPorts(t)
	paths := []string{"/debug", "/debug/", "/debug/vars", "/debug/pprof/", "/debug/pprof/goroutine?debug=2", "/metrics"}
	headers := map[string]http.Header{
		"no forwarding": nil,
		// A tailnet address, as a proxy would claim: still nothing.
		"X-Forwarded-For tailnet":  {"X-Forwarded-For": {"100.64.0.1"}},
		"X-Forwarded-For loopback": {"X-Forwarded-For": {"127.0.0.1"}},
	}
	for _, scheme := range []string{"https", "http"} {
		for hname, h := range headers {
			for _, path := range paths {
				t.Run(scheme+" "+hname+" "+path, func(t *testing.T) {
					res, body := do(t, hc, "GET", bases[scheme]+path, h)
					if res.StatusCode != http.StatusNotFound {
						t.Errorf("status %d (Location %q), want 404", res.StatusCode, res.Header.Get("Location"))
					}
					for _, leak := range []string{"goroutine", "memstats", "cmdline", "pprof"} {
						if strings.Contains(body, leak) {
							t.Errorf("body mentions %q: %.200q", leak, body)
						}
					}
				})
			}
		}
	}
}

func TestStartErrors(t *testing.T) {
	certs, _ := selfSigned(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	takenPort := taken.Addr().(*net.TCPAddr).Port

	tests := []struct {
		name     string
		s        *relay.Server
		want     []string
		listener string // "https" or "http": a *relay.ListenError for it
	}{
		{"https port in use", &relay.Server{Addr: taken.Addr().String(), HTTPPort: -1, Certs: certs, PrivateKey: key.NewNode()},
			[]string{"https", taken.Addr().String(), "address already in use"}, "https"},
		{"http port in use", &relay.Server{Addr: "127.0.0.1:0", HTTPPort: takenPort, Certs: certs, PrivateKey: key.NewNode()},
			[]string{"http", strconv.Itoa(takenPort), "address already in use"}, "http"},
		{"bad address", &relay.Server{Addr: "443", Certs: certs, PrivateKey: key.NewNode()},
			[]string{"listen address", `"443"`}, ""},
		{"no certificates", &relay.Server{Addr: "127.0.0.1:0", HTTPPort: -1, PrivateKey: key.NewNode()},
			[]string{"certificates"}, ""},
		{"no key", &relay.Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: certs},
			[]string{"key"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.s.Start()
			if err == nil {
				tt.s.Close(context.Background())
				t.Fatal("Start succeeded, want an error")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			le, ok := errors.AsType[*relay.ListenError](err)
			switch {
			case tt.listener == "" && ok:
				t.Errorf("error %q is a ListenError", err)
			case tt.listener != "" && (!ok || le.Listener != tt.listener || !errors.Is(err, syscall.EADDRINUSE)):
				t.Errorf("error %q: want a ListenError for %s wrapping EADDRINUSE", err, tt.listener)
			}
			// Close after a failed Start is harmless.
			if err := tt.s.Close(context.Background()); err != nil {
				t.Errorf("Close after a failed Start: %v", err)
			}
		})
	}
	// The HTTPS listener of the failed "http port in use" start was
	// released: the same kind of server starts fine now.
	startRelay(t, certs)
}

func TestCloseEndsClients(t *testing.T) {
	certs, pool := selfSigned(t)
	s := &relay.Server{Addr: "127.0.0.1:0", HTTPPort: 0, Certs: certs, PrivateKey: key.NewNode()}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	c := newClient(t, s, pool)
	in := watch(c)
	in.mustBeAdmitted(t)

	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case <-in.err:
	case <-ctx.Done():
		t.Fatal("client still connected after Close")
	}
	for _, addr := range []string{s.LocalAddr().String(), s.HTTPAddr()} {
		if c, err := net.DialTimeout("tcp", addr, waitFor); err == nil {
			c.Close()
			t.Errorf("%s still accepts connections after Close", addr)
		}
	}
	if err := s.Close(ctx); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// admitCall is one question an Admitter was asked.
type admitCall struct {
	key key.NodePublic
	src netip.Addr
}

// listAdmitter admits exactly the keys in allow and records every call.
type listAdmitter struct {
	allow map[key.NodePublic]bool // read-only once the relay runs

	mu    sync.Mutex
	calls []admitCall
}

func admitOnly(keys ...key.NodePublic) *listAdmitter {
	a := &listAdmitter{allow: map[key.NodePublic]bool{}}
	for _, k := range keys {
		a.allow[k] = true
	}
	return a
}

func (a *listAdmitter) Admit(ctx context.Context, k key.NodePublic, src netip.Addr) bool {
	a.mu.Lock()
	a.calls = append(a.calls, admitCall{k, src})
	a.mu.Unlock()
	return a.allow[k]
}

// asked returns how many times a was asked about each key, and fails the
// test if any question came from somewhere other than 127.0.0.1.
func (a *listAdmitter) asked(t *testing.T) map[key.NodePublic]int {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	n := map[key.NodePublic]int{}
	for _, c := range a.calls {
		n[c.key]++
		if want := netip.MustParseAddr("127.0.0.1"); c.src != want {
			t.Errorf("Admit(%v) saw source %v, want %v", c.key.ShortString(), c.src, want)
		}
	}
	return n
}

func TestAdmission(t *testing.T) {
	certs, pool := selfSigned(t)
	goodKey, badKey, wsGoodKey, wsBadKey := key.NewNode(), key.NewNode(), key.NewNode(), key.NewNode()
	adm := admitOnly(goodKey.Public(), wsGoodKey.Public())
	s := startRelay(t, certs, func(s *relay.Server) { s.Admitter = adm })

	good, bad := newClientWithKey(t, s, pool, goodKey), newClientWithKey(t, s, pool, badKey)
	goodIn := watch(good)
	goodIn.mustBeAdmitted(t)

	// The refused client is cut off, whether its error shows in Connect
	// or in the first Recv.
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if err := bad.Connect(ctx); err == nil {
		if ok, err := watch(bad).admitted(ctx); err != nil || ok {
			t.Fatalf("refused client: admitted=%v err=%v, want its connection closed", ok, err)
		}
	}
	// A packet to the refused key goes nowhere; the admitted client is
	// still connected (its Send works and its inbox has no error).
	if err := good.Send(badKey.Public(), []byte("to nobody")); err != nil {
		t.Errorf("Send from the admitted client: %v", err)
	}

	// The same decisions over WebSocket.
	wsGood, err := dialWebSocket(t, s, pool, wsGoodKey)
	if err != nil {
		t.Fatal(err)
	}
	wsGoodIn := watch(wsGood)
	wsGoodIn.mustBeAdmitted(t)
	exchange(t, good, goodKey.Public(), goodIn, wsGood, wsGoodKey.Public(), wsGoodIn)
	if wsBad, err := dialWebSocket(t, s, pool, wsBadKey); err == nil {
		if ok, err := watch(wsBad).admitted(ctx); err != nil || ok {
			t.Fatalf("refused WebSocket client: admitted=%v err=%v, want its connection closed", ok, err)
		}
	}

	asked := adm.asked(t)
	for _, k := range []key.NodePrivate{goodKey, badKey, wsGoodKey, wsBadKey} {
		if asked[k.Public()] != 1 {
			t.Errorf("Admitter asked %d times about %v, want once", asked[k.Public()], k.Public().ShortString())
		}
	}
	select {
	case err := <-goodIn.err:
		t.Errorf("admitted client lost its connection: %v", err)
	default:
	}
}

// connectOutcome connects a fresh client and reports whether the relay
// admitted it. It is safe to call from many goroutines.
func connectOutcome(ctx context.Context, s *relay.Server, pool *x509.CertPool, k key.NodePrivate) (bool, error) {
	c, err := derphttp.NewClient(k, derpURL(s), logger.Discard, netmon.NewStatic())
	if err != nil {
		return false, err
	}
	c.TLSConfig = &tls.Config{RootCAs: pool}
	defer c.Close()
	if err := c.Connect(ctx); err != nil {
		if ctx.Err() != nil {
			return false, err
		}
		return false, nil // cut off during the handshake: refused
	}
	return watch(c).admitted(ctx)
}

func TestAdmissionConcurrent(t *testing.T) {
	const n = 32
	certs, pool := selfSigned(t)
	keys := make([]key.NodePrivate, n)
	var allowed []key.NodePublic
	for i := range keys {
		keys[i] = key.NewNode()
		if i%2 == 0 {
			allowed = append(allowed, keys[i].Public())
		}
	}
	adm := admitOnly(allowed...)
	s := startRelay(t, certs, func(s *relay.Server) { s.Admitter = adm })

	ctx, cancel := context.WithTimeout(context.Background(), 2*waitFor)
	defer cancel()
	type result struct {
		ok  bool
		err error
	}
	results := make([]result, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range keys {
		wg.Go(func() {
			<-start
			ok, err := connectOutcome(ctx, s, pool, keys[i])
			results[i] = result{ok, err}
		})
	}
	close(start)
	wg.Wait()
	for i, r := range results {
		if want := i%2 == 0; r.err != nil || r.ok != want {
			t.Errorf("client %d: admitted=%v err=%v, want admitted=%v", i, r.ok, r.err, want)
		}
	}
	asked := adm.asked(t)
	for i, k := range keys {
		if asked[k.Public()] != 1 {
			t.Errorf("client %d: Admitter asked %d times, want once", i, asked[k.Public()])
		}
	}
}

func TestAdmissionPerServer(t *testing.T) {
	// Two relays in one process, each with its own Admitter, admitting
	// opposite keys; clients connect to both at once, several rounds.
	const rounds = 4
	certs, pool := selfSigned(t)
	var ka, kb []key.NodePrivate // admitted by a only, by b only
	for range rounds {
		ka = append(ka, key.NewNode())
		kb = append(kb, key.NewNode())
	}
	pubs := func(ks []key.NodePrivate) (out []key.NodePublic) {
		for _, k := range ks {
			out = append(out, k.Public())
		}
		return out
	}
	admA, admB := admitOnly(pubs(ka)...), admitOnly(pubs(kb)...)
	sa := startRelay(t, certs, func(s *relay.Server) { s.Admitter = admA })
	sb := startRelay(t, certs, func(s *relay.Server) { s.Admitter = admB })

	ctx, cancel := context.WithTimeout(context.Background(), 2*waitFor)
	defer cancel()
	type attempt struct {
		server string
		s      *relay.Server
		k      key.NodePrivate
		want   bool
		got    bool
		err    error
	}
	var attempts []*attempt
	for i := range rounds {
		attempts = append(attempts,
			&attempt{server: "a", s: sa, k: ka[i], want: true},
			&attempt{server: "b", s: sb, k: ka[i], want: false},
			&attempt{server: "a", s: sa, k: kb[i], want: false},
			&attempt{server: "b", s: sb, k: kb[i], want: true},
		)
	}
	var wg sync.WaitGroup
	for _, at := range attempts {
		wg.Go(func() { at.got, at.err = connectOutcome(ctx, at.s, pool, at.k) })
	}
	wg.Wait()
	for _, at := range attempts {
		if at.err != nil || at.got != at.want {
			t.Errorf("relay %s, key %v: admitted=%v err=%v, want admitted=%v", at.server, at.k.Public().ShortString(), at.got, at.err, at.want)
		}
	}
	// Each Admitter was asked only about connections to its own relay:
	// once per key, for all 2*rounds keys.
	for name, adm := range map[string]*listAdmitter{"a": admA, "b": admB} {
		asked := adm.asked(t)
		for _, k := range append(pubs(ka), pubs(kb)...) {
			if asked[k] != 1 {
				t.Errorf("Admitter %s asked %d times about %v, want once", name, asked[k], k.ShortString())
			}
		}
		if len(asked) != 2*rounds {
			t.Errorf("Admitter %s asked about %d keys, want %d", name, len(asked), 2*rounds)
		}
	}
}
