package e2e

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/debugsrv"
)

// The relay's edge, through the binary: the caps per address and the
// PROXY protocol (relay/caps.go, relay/proxyproto.go; their unit tests
// and fuzzing are in relay/), as an operator configures them.

// loopbackDialer dials from the loopback address src (127.0.0.2 is a
// different client to the relay, still on lo).
func loopbackDialer(src string) *net.Dialer {
	return &net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
}

// refusedBeforeTLS reports how c ends when it is expected to be closed
// before any TLS: a TLS handshake on it must fail without the server
// ever answering (no ServerHello, no alert: a reset or EOF), within 5 s.
func refusedBeforeTLS(c net.Conn) error {
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	err := tls.Client(c, &tls.Config{InsecureSkipVerify: true}).Handshake()
	switch {
	case err == nil:
		return errors.New("the TLS handshake succeeded")
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed), strings.Contains(err.Error(), "connection reset"):
		return nil
	}
	return fmt.Errorf("the handshake failed otherwise than by a closed connection: %w", err)
}

// httpsFrom GETs / on the relay over a connection from src, checking
// the relay's certificate with ca.
func httpsFrom(ctx context.Context, ca *loopbackCA, src string, port int) error {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext:     loopbackDialer(src).DialContext,
		TLSClientConfig: ca.tlsConfig(),
	}}
	defer c.CloseIdleConnections()
	req, _ := http.NewRequestWithContext(ctx, "GET", fmt.Sprintf("https://127.0.0.1:%d/", port), nil)
	res, err := c.Do(req)
	if err != nil {
		return err
	}
	res.Body.Close()
	return nil
}

// connectAdmitted connects c and waits (bounded) for the relay's
// ServerInfo frame, which derpserver sends only once it admitted the
// client: derphttp's Connect returns before that.
func connectAdmitted(ctx context.Context, c *derphttp.Client) error {
	if err := c.Connect(ctx); err != nil {
		return err
	}
	got := make(chan error, 1)
	go func() {
		for {
			m, err := c.Recv()
			if err != nil {
				got <- err
				return
			}
			if _, ok := m.(derp.ServerInfoMessage); ok {
				got <- nil
				return
			}
		}
	}()
	select {
	case err := <-got:
		return err
	case <-time.After(10 * time.Second):
		c.Close()
		return errors.New("no ServerInfo frame within 10s")
	}
}

// TestMaxConnsPerIP: with -max-conns-per-ip 10, ten DERP clients from
// 127.0.0.1 connect; the eleventh connection from 127.0.0.1 is refused
// before TLS, while one from 127.0.0.2 still gets HTTPS; once one of the
// ten leaves, 127.0.0.1 connects again. The refusal is counted in the
// metrics (/debug/varz on -debug-listen) and the warning names the
// source.
func TestMaxConnsPerIP(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ca := newLoopbackCA(t)
	p, _ := caSignedRelay(t, ca, "-max-conns-per-ip", "10", "-debug-listen", "127.0.0.1:0")
	p.start()
	debugAddr := p.proc.WaitMatch(t, regexp.MustCompile(`debug: serving on loopback only" addr=(\S+)`), 10*time.Second)[1]

	region := regionOf(p)
	var ten []*derphttp.Client
	for i := range 10 {
		c := newRegionClient(ca, key.NewNode(), region)
		t.Cleanup(func() { c.Close() })
		if err := connectAdmitted(ctx, c); err != nil {
			t.Fatalf("client %d of 10 from 127.0.0.1: %v", i+1, err)
		}
		ten = append(ten, c)
	}
	// The relay resets the 11th connection as it accepts it: the reset
	// may even beat the dial's return.
	eleventh, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", p.HTTPSPort), 5*time.Second)
	if err == nil {
		err = refusedBeforeTLS(eleventh)
	} else if errors.Is(err, syscall.ECONNRESET) {
		err = nil
	}
	if err != nil {
		t.Errorf("the 11th connection from 127.0.0.1: %v; want it refused before TLS", err)
	}
	c11 := newRegionClient(ca, key.NewNode(), region)
	t.Cleanup(func() { c11.Close() })
	if err := connectAdmitted(ctx, c11); err == nil {
		t.Error("an 11th DERP client from 127.0.0.1 connected")
	}
	if err := httpsFrom(ctx, ca, "127.0.0.2", p.HTTPSPort); err != nil {
		t.Errorf("HTTPS from 127.0.0.2 while 127.0.0.1 is at its cap: %v", err)
	}
	p.waitLog("relay: refusing connections over the per-address cap", 10*time.Second)
	warn := p.proc.Output.String()
	if !regexp.MustCompile(`refusing connections over the per-address cap.*max_conns_per_ip=10 .*top_sources="127\.0\.0\.1=\d`).MatchString(warn) {
		t.Errorf("the cap's warning does not name 127.0.0.1:\n%s", lines(warn, "per-address cap"))
	}
	_, varz := get(ctx, t, http.DefaultClient, "http://"+debugAddr+"/debug/varz")
	if got := metric(varz, "tailderp_relay_tls_listener_rejected_connections_per_ip"); got != 2 {
		t.Errorf("tailderp_relay_tls_listener_rejected_connections_per_ip = %v, want 2 (the raw 11th and the DERP client)", got)
	}
	// And on the status page: the cap, the refusals, the top source.
	_, body := get(ctx, t, http.DefaultClient, "http://"+debugAddr+"/debug/status")
	var st debugsrv.Status
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatal(err)
	}
	if c := st.Caps; c.MaxConnsPerIP != 10 || c.RefusedPerIP != 2 || len(c.TopSources) == 0 || c.TopSources[0] != (debugsrv.SourceConns{Source: "127.0.0.1/32", Conns: 10}) {
		t.Errorf("status caps %+v, want 10 per address, 2 refused, 127.0.0.1/32 with 10 open first", c)
	}

	// One of the ten leaves: its slot is free again.
	ten[0].Close()
	c := newRegionClient(ca, key.NewNode(), region)
	t.Cleanup(func() { c.Close() })
	if !pollFor(5*time.Second, func() bool { return connectAdmitted(ctx, c) == nil }) {
		t.Error("127.0.0.1 cannot connect again after one of its ten connections closed")
	}
}

// lines returns out's lines holding s, for a failure message.
func lines(out, s string) string {
	var b strings.Builder
	for l := range strings.Lines(out) {
		if strings.Contains(l, s) {
			b.WriteString(l)
		}
	}
	return b.String()
}

// proxyFront is a TCP proxy on 127.0.0.1 in front of the relay, as
// HAProxy with send-proxy (v1) or send-proxy-v2 does: each connection
// starts with a PROXY header claiming the client is src.
type proxyFront struct {
	ln   net.Listener
	port int
}

func startProxyFront(t *testing.T, relayPort int, version byte, src netip.AddrPort) *proxyFront {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	dst := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(relayPort))
	wg.Go(func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer in.Close()
				out, err := net.DialTimeout("tcp", dst.String(), 5*time.Second)
				if err != nil {
					return
				}
				defer out.Close()
				h := proxyproto.HeaderProxyFromAddrs(version, net.TCPAddrFromAddrPort(src), net.TCPAddrFromAddrPort(dst))
				if _, err := h.WriteTo(out); err != nil {
					return
				}
				done := make(chan struct{}, 2)
				go func() { io.Copy(out, in); out.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
				go func() { io.Copy(in, out); in.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
				<-done
				<-done
			})
		}
	})
	return &proxyFront{ln: ln, port: ln.Addr().(*net.TCPAddr).Port}
}

// TestProxyProtocolFrom: with -proxy-protocol-from 127.0.0.1, DERP
// clients behind a TCP proxy sending PROXY v1 and v2 headers connect, and
// the relay sees the addresses the headers claim (documentation
// addresses, IPv4 in v1, IPv6 in v2) everywhere: admission's src (the
// test's admission URL records it), /debug/clients on -debug-listen, the
// cap per address (-max-conns-per-ip 1: a second client claiming the
// same address is refused, one claiming another connects, although all
// come from the proxy's one address) and the cap's warning in the log. A
// connection from 127.0.0.1 without a header, and one from 127.0.0.2
// (not listed) with a header, are closed before TLS (net/http never
// tries a handshake), each said in one log line naming its source; the
// metrics count each case.
func TestProxyProtocolFrom(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ca := newLoopbackCA(t)
	// An admission URL that admits everyone and notes the source each
	// request names.
	var admitMu sync.Mutex
	admitted := map[key.NodePublic]netip.Addr{}
	admit := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req tailcfg.DERPAdmitClientRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		admitMu.Lock()
		admitted[req.NodePublic] = req.Source
		admitMu.Unlock()
		json.NewEncoder(w).Encode(tailcfg.DERPAdmitClientResponse{Allow: true})
	}))
	t.Cleanup(admit.Close)
	p, _ := caSignedRelay(t, ca, "-proxy-protocol-from", "127.0.0.1", "-max-conns-per-ip", "1", "-debug-listen", "127.0.0.1:0",
		"-verify-client-url", admit.URL+"/admit")
	p.start()
	debugAddr := p.proc.WaitMatch(t, regexp.MustCompile(`debug: serving on loopback only" addr=(\S+)`), 10*time.Second)[1]

	v1src := netip.MustParseAddrPort("203.0.113.7:4242")
	v2src := netip.MustParseAddrPort("[2001:db8::9]:5353")
	v1 := startProxyFront(t, p.HTTPSPort, 1, v1src)
	v2 := startProxyFront(t, p.HTTPSPort, 2, v2src)
	keys := map[*derphttp.Client]key.NodePublic{}
	via := func(f *proxyFront) *derphttp.Client {
		front := *p
		front.HTTPSPort = f.port
		k := key.NewNode()
		c := newRegionClient(ca, k, regionOf(&front))
		keys[c] = k.Public()
		t.Cleanup(func() { c.Close() })
		return c
	}
	a, b := via(v1), via(v2)
	for name, c := range map[string]*derphttp.Client{"v1": a, "v2": b} {
		if err := connectAdmitted(ctx, c); err != nil {
			t.Fatalf("DERP client behind the %s proxy: %v", name, err)
		}
	}
	admitMu.Lock()
	gotA, gotB := admitted[keys[a]], admitted[keys[b]]
	admitMu.Unlock()
	if gotA != v1src.Addr() || gotB != v2src.Addr() {
		t.Errorf("admission asked with sources %v (v1) and %v (v2), want %v and %v", gotA, gotB, v1src.Addr(), v2src.Addr())
	}
	// The operator's page of admitted clients says where they come from.
	_, page := get(ctx, t, http.DefaultClient, "http://"+debugAddr+"/debug/clients")
	for _, src := range []netip.AddrPort{v1src, v2src} {
		if !strings.Contains(page, "<td>"+src.Addr().String()+"</td>") {
			t.Errorf("/debug/clients does not show %v:\n%s", src.Addr(), page)
		}
	}
	a.Close()
	b.Close()
	// The relay frees their slots once it sees the connections close:
	// wait until its status page counts none open.
	if !pollFor(10*time.Second, func() bool {
		_, body := get(ctx, t, http.DefaultClient, "http://"+debugAddr+"/debug/status")
		var st debugsrv.Status
		return json.Unmarshal([]byte(body), &st) == nil && len(st.Caps.TopSources) == 0
	}) {
		t.Fatal("the relay still counts the closed clients' connections after 10s")
	}

	// The cap counts the header's address: a second client claiming
	// 203.0.113.7 is refused while a first holds it.
	held, again := via(v1), via(v1)
	if err := connectAdmitted(ctx, held); err != nil {
		t.Fatalf("DERP client behind the v1 proxy: %v", err)
	}
	if err := connectAdmitted(ctx, again); err == nil {
		t.Error("a second client claiming 203.0.113.7 connected past -max-conns-per-ip 1")
	}
	if b2 := via(v2); connectAdmitted(ctx, b2) != nil {
		t.Error("a client claiming [2001:db8::9] was refused while only 203.0.113.7 is at its cap")
	}
	p.waitLog("relay: refusing connections over the per-address cap", 10*time.Second)
	if w := lines(p.proc.Output.String(), "per-address cap"); !strings.Contains(w, `top_sources="203.0.113.7=`) {
		t.Errorf("the cap's warning does not name the header's address 203.0.113.7:\n%s", w)
	}

	// No header from the listed source.
	bare, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", p.HTTPSPort), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	bareSrc := bare.LocalAddr().String()
	if err := refusedBeforeTLS(bare); err != nil {
		t.Errorf("a connection from 127.0.0.1 without a PROXY header: %v; want it closed before TLS", err)
	}
	// A header from a source not listed.
	forged, err := loopbackDialer("127.0.0.2").Dial("tcp", fmt.Sprintf("127.0.0.1:%d", p.HTTPSPort))
	if err != nil {
		t.Fatal(err)
	}
	forgedSrc := forged.LocalAddr().String()
	h := proxyproto.HeaderProxyFromAddrs(1, net.TCPAddrFromAddrPort(netip.MustParseAddrPort("198.51.100.1:1000")), forged.RemoteAddr())
	if _, err := h.WriteTo(forged); err != nil {
		t.Fatal(err)
	}
	if err := refusedBeforeTLS(forged); err != nil {
		t.Errorf("a connection from 127.0.0.2 with a PROXY header: %v; want it closed before TLS", err)
	}
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`relay: closed a connection before TLS" src=` + regexp.QuoteMeta(bareSrc) + ` why="no PROXY header: the connection starts with a TLS handshake"`),
		regexp.MustCompile(`relay: closed a connection before TLS" src=` + regexp.QuoteMeta(forgedSrc) + ` why="a PROXY header from a source not trusted for the PROXY protocol" header_src=198\.51\.100\.1`),
	} {
		p.proc.WaitMatch(t, want, 10*time.Second)
	}
	out := p.proc.Output.String()
	for _, src := range []string{bareSrc, forgedSrc} {
		if strings.Contains(out, "TLS handshake error from "+src) {
			t.Errorf("net/http tried a TLS handshake with %s, which the gate should have closed before TLS", src)
		}
	}
	_, varz := get(ctx, t, http.DefaultClient, "http://"+debugAddr+"/debug/varz")
	for name, want := range map[string]float64{
		"tailderp_relay_tls_listener_proxy_protocol_headers":           5, // a, b, held, again (then capped), b2
		"tailderp_relay_tls_listener_proxy_protocol_rejected":          1, // no header
		"tailderp_relay_tls_listener_proxy_protocol_untrusted_headers": 1, // from 127.0.0.2
		"tailderp_relay_tls_listener_rejected_connections_per_ip":      1, // again
	} {
		if got := metric(varz, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}
