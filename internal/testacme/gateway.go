package testacme

import (
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// httpGateway is where Pebble's VA sends HTTP-01 validation requests. It
// passes each to the target's plain-HTTP server, with the Host header a
// CA sends to port 80: the validated name, no port. (autocert's HTTP-01
// handler checks the Host header against its allowed hostnames verbatim,
// so "derp.test:40123" would be refused where "derp.test" is what any real
// CA sends.)
type httpGateway struct {
	ln       net.Listener
	srv      *http.Server
	tr       *http.Transport
	logger   *log.Logger
	target   atomic.Pointer[string]
	attempts atomic.Int64
}

func startHTTPGateway(logger *log.Logger) (*httpGateway, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	g := &httpGateway{
		ln:     ln,
		logger: logger,
		tr: &http.Transport{
			DialContext:       (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
			DisableKeepAlives: true,
		},
	}
	g.srv = &http.Server{
		Handler:           g,
		ErrorLog:          logger,
		ReadHeaderTimeout: 10 * time.Second,
	}
	go g.srv.Serve(ln)
	return g, nil
}

func (g *httpGateway) port() int { return ln2port(g.ln) }

func (g *httpGateway) setTarget(addr string) { g.target.Store(&addr) }

func (g *httpGateway) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	g.attempts.Add(1)
	target := loadTarget(&g.target)
	if target == "" {
		g.logger.Printf("testacme: HTTP-01 gateway: no target, dropping %s %s (Host %s)", r.Method, r.URL, r.Host)
		panic(http.ErrAbortHandler) // close the connection, as if nothing listened
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(&url.URL{Scheme: "http", Host: target})
			host := pr.In.Host
			if h, _, err := net.SplitHostPort(host); err == nil {
				host = h
			}
			pr.Out.Host = host
		},
		Transport: g.tr,
		ErrorLog:  g.logger,
	}
	g.logger.Printf("testacme: HTTP-01 gateway: %s %s (Host %s) -> %s", r.Method, r.URL, r.Host, target)
	rp.ServeHTTP(w, r)
}

func (g *httpGateway) close() {
	g.srv.Close()
	g.tr.CloseIdleConnections()
}

// tcpGateway is where Pebble's VA makes its TLS-ALPN-01 validation
// connections. It forwards each TCP connection, unchanged, to the target.
type tcpGateway struct {
	ln       net.Listener
	logger   *log.Logger
	conns    connSet
	target   atomic.Pointer[string]
	attempts atomic.Int64
}

func startTCPGateway(logger *log.Logger) (*tcpGateway, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	g := &tcpGateway{ln: ln, logger: logger}
	g.conns.serve(ln, g.handle)
	return g, nil
}

func (g *tcpGateway) port() int { return ln2port(g.ln) }

func (g *tcpGateway) setTarget(addr string) { g.target.Store(&addr) }

func (g *tcpGateway) close() { g.conns.close(g.ln) }

func (g *tcpGateway) handle(c net.Conn) {
	g.attempts.Add(1)
	target := loadTarget(&g.target)
	if target == "" {
		g.logger.Printf("testacme: TLS-ALPN-01 gateway: no target, closing connection from %s", c.RemoteAddr())
		return
	}
	up, err := net.DialTimeout("tcp", target, 10*time.Second)
	if err != nil {
		g.logger.Printf("testacme: TLS-ALPN-01 gateway: %v", err)
		return
	}
	if !g.conns.add(up) {
		up.Close()
		return
	}
	defer g.conns.remove(up)
	g.logger.Printf("testacme: TLS-ALPN-01 gateway: %s -> %s", c.RemoteAddr(), target)
	var wg sync.WaitGroup
	wg.Go(func() { pipe(up, c) })
	wg.Go(func() { pipe(c, up) })
	wg.Wait()
}

// pipe copies src to dst, then passes the end of the stream on.
func pipe(dst, src net.Conn) {
	_, err := io.Copy(dst, src)
	if cw, ok := dst.(interface{ CloseWrite() error }); ok && err == nil {
		cw.CloseWrite()
		return
	}
	dst.Close()
	src.Close()
}

func loadTarget(p *atomic.Pointer[string]) string {
	if t := p.Load(); t != nil {
		return *t
	}
	return ""
}

func ln2port(ln net.Listener) int {
	_, p, _ := net.SplitHostPort(ln.Addr().String())
	n, _ := strconv.Atoi(p)
	return n
}
