package relay_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/tailderp/tailderp/relay"
)

// fakeClient is the client address the test proxies claim: TEST-NET-2,
// never a loopback address, so whatever sees it learned it from the
// header.
var fakeClient = netip.MustParseAddr("198.51.100.7")

// secondLoopback is a second source address on Linux's loopback.
var secondLoopback = netip.MustParseAddr("127.0.0.2")

// sourceRecorder admits everyone and records the src of each question.
type sourceRecorder struct {
	mu   sync.Mutex
	srcs []netip.Addr
}

func (a *sourceRecorder) Admit(_ context.Context, _ key.NodePublic, src netip.Addr) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.srcs = append(a.srcs, src)
	return true
}

func (a *sourceRecorder) sources() []netip.Addr {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]netip.Addr(nil), a.srcs...)
}

// proxyHeader returns a PROXY header of version (1 or 2) claiming src
// as the client of dst.
func proxyHeader(t testing.TB, version byte, src netip.AddrPort, dst net.Addr) []byte {
	t.Helper()
	h := &proxyproto.Header{
		Version:           version,
		Command:           proxyproto.PROXY,
		TransportProtocol: proxyproto.TCPv4,
		SourceAddr:        net.TCPAddrFromAddrPort(src),
		DestinationAddr:   dst,
	}
	if src.Addr().Is6() {
		h.TransportProtocol = proxyproto.TCPv6
	}
	b, err := h.Format()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// testProxy is a loopback TCP proxy in front of a relay, as HAProxy in
// mode tcp with send-proxy: each connection to it is forwarded to the
// relay from the address from, starting with a PROXY header that claims
// client (header nil: no header).
type testProxy struct {
	ln net.Listener
}

func startProxy(t *testing.T, relayAddr string, from netip.Addr, header func(client netip.AddrPort) []byte, client netip.Addr) *testProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &testProxy{ln: ln}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		port := uint16(40000)
		for {
			front, err := ln.Accept()
			if err != nil {
				return
			}
			d := net.Dialer{Timeout: waitFor, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0))}
			back, err := d.Dial("tcp", relayAddr)
			if err != nil {
				front.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, front, back)
			mu.Unlock()
			port++
			if header != nil {
				// One write, as a proxy sends it.
				if _, err := back.Write(header(netip.AddrPortFrom(client, port))); err != nil {
					front.Close()
					back.Close()
					continue
				}
			}
			wg.Go(func() { io.Copy(back, front); back.Close() })
			wg.Go(func() { io.Copy(front, back); front.Close() })
		}
	})
	return p
}

func (p *testProxy) url() string { return "https://" + p.ln.Addr().String() + "/derp" }

// clientAt returns a derphttp client of the relay at url with a fresh key,
// dialing from the source address from (invalid: any).
func clientAt(t *testing.T, url string, pool *x509.CertPool, from netip.Addr) *derphttp.Client {
	t.Helper()
	c, err := derphttp.NewClient(key.NewNode(), url, logger.Discard, netmon.NewStatic())
	if err != nil {
		t.Fatal(err)
	}
	c.TLSConfig = &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}
	if from.IsValid() {
		d := &net.Dialer{Timeout: waitFor, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0))}
		c.SetURLDialer(d.DialContext)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// refused reports whether a client's connection fails or is closed
// before the relay registers it.
func refused(t *testing.T, c *derphttp.Client) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		if ctx.Err() != nil {
			t.Fatalf("neither connected nor refused: %v", err)
		}
		return true
	}
	ok, err := watch(c).admitted(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return !ok
}

// handshakeFrom dials the relay from the address from, writes pre (a
// PROXY header, or nothing), and tries a TLS handshake.
func handshakeFrom(t *testing.T, s *relay.Server, pool *x509.CertPool, from netip.Addr, pre []byte) error {
	t.Helper()
	d := net.Dialer{Timeout: waitFor, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0))}
	c, err := d.Dial("tcp", s.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(waitFor))
	if len(pre) > 0 {
		if _, err := c.Write(pre); err != nil {
			return err
		}
	}
	tc := tls.Client(c, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
	err = tc.Handshake()
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("handshake from %v neither done nor refused in %v", from, waitFor)
	}
	return err
}

// TestProxyProtocol: behind a TCP proxy sending PROXY v1 or v2 headers
// from a listed source, the relay's admission (src), its clients list,
// its caps per address and its logs see the header's address; an
// unlisted source sending a header, and a listed one sending none, are
// closed before TLS, with a line saying why and no handshake logged; a
// direct client from an unlisted source is served as ever.
func TestProxyProtocol(t *testing.T) {
	for _, version := range []byte{1, 2} {
		t.Run(fmt.Sprintf("v%d", version), func(t *testing.T) {
			certs, pool := selfSigned(t)
			sink := &logSink{}
			adm := &sourceRecorder{}
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("the relay's log:\n%s", sink.String())
				}
			})
			s := startRelay(t, certs, func(s *relay.Server) {
				s.Logger = sink.logger()
				s.Admitter = adm
				s.ProxyProtocolFrom = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
				s.MaxConnsPerIP = 2
			})
			header := func(client netip.AddrPort) []byte { return proxyHeader(t, version, client, s.LocalAddr()) }
			proxy := startProxy(t, s.LocalAddr().String(), netip.MustParseAddr("127.0.0.1"), header, fakeClient)

			// The logs: a bad handshake through the proxy is said with
			// the header's address.
			if err := handshakeThroughProxy(t, proxy); err != nil {
				t.Logf("bad handshake through the proxy: %v", err)
			}
			waitUntil[struct{}](t, "the handshake error logged", func() bool {
				return len(sink.lines("TLS handshake error from 198.51.100.7:")) == 1
			}, nil)

			a, b := clientAt(t, proxy.url(), pool, netip.Addr{}), clientAt(t, proxy.url(), pool, netip.Addr{})
			aIn, bIn := watch(a), watch(b)
			aIn.mustBeAdmitted(t)
			bIn.mustBeAdmitted(t)
			exchange(t, a, a.SelfPublicKey(), aIn, b, b.SelfPublicKey(), bIn)
			for _, src := range adm.sources() {
				if src != fakeClient {
					t.Errorf("Admitter saw src %v, want the header's %v", src, fakeClient)
				}
			}
			if n := len(adm.sources()); n != 2 {
				t.Errorf("Admitter asked %d times, want 2", n)
			}
			for _, c := range s.Clients() {
				if c.From != fakeClient {
					t.Errorf("client %v listed from %v, want %v", c.Key.ShortString(), c.From, fakeClient)
				}
			}
			want := []relay.SourceConns{{Source: netip.PrefixFrom(fakeClient, 32), Conns: 2}}
			if got := s.ConnsBySource(5); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("ConnsBySource = %v, want %v", got, want)
			}

			// The cap counts the header's address: a third client
			// through the proxy is refused.
			if !refused(t, clientAt(t, proxy.url(), pool, netip.Addr{})) {
				t.Error("a third client from the header's address was served, want refused by the cap of 2")
			}
			if w := sink.lines("level=WARN", "per-address cap", `top_sources="198.51.100.7=1"`); len(w) != 1 {
				t.Errorf("want one warning naming 198.51.100.7, got %q", w)
			}

			// An unlisted source sending a header: closed before TLS.
			err := handshakeFrom(t, s, pool, secondLoopback, proxyHeader(t, version, netip.MustParseAddrPort("203.0.113.9:1234"), s.LocalAddr()))
			if err == nil {
				t.Fatal("TLS handshake after a PROXY header from an unlisted source succeeded")
			}
			t.Logf("unlisted source with a header: %v", err)
			// A listed source without a header: closed before TLS.
			err = handshakeFrom(t, s, pool, netip.MustParseAddr("127.0.0.1"), nil)
			if err == nil {
				t.Fatal("TLS handshake from a listed source without a header succeeded")
			}
			t.Logf("listed source without a header: %v", err)
			waitUntil[struct{}](t, "both refusals logged", func() bool {
				return len(sink.lines("level=WARN", "closed a connection before TLS")) == 2
			}, nil)
			if l := sink.lines("closed a connection before TLS", "src=127.0.0.2:", "not trusted", "header_src=203.0.113.9:1234"); len(l) != 1 {
				t.Errorf("want one line about the unlisted source's header, got %q", l)
			}
			if l := sink.lines("closed a connection before TLS", "src=127.0.0.1:", `why="no PROXY header: the connection starts with a TLS handshake"`, "start_hex=1603"); len(l) != 1 {
				t.Errorf("want one line about the listed source without a header, got %q\n%s", l, sink.String())
			}
			if l := sink.lines("TLS handshake error"); len(l) != 1 {
				t.Errorf("a handshake was attempted with a refused connection: %q", l)
			}

			// A direct client from an unlisted address is served.
			d := clientAt(t, derpURL(s), pool, secondLoopback)
			watch(d).mustBeAdmitted(t)
			if got := adm.sources(); got[len(got)-1] != secondLoopback {
				t.Errorf("direct client admitted from %v, want %v", got[len(got)-1], secondLoopback)
			}

			got := listenerCounters(t, s)
			t.Logf("listener counters: %v", got)
			// The proxied connections: the bad handshake, a, b, and the
			// third (derphttp may have retried it: at least 4).
			if n := got["counter_proxy_protocol_headers"]; n < 4 {
				t.Errorf("counter_proxy_protocol_headers = %d, want at least 4", n)
			}
			for name, want := range map[string]int64{
				"counter_proxy_protocol_rejected":          1,
				"counter_proxy_protocol_untrusted_headers": 1,
				"gauge_conns_per_ip_sources":               2, // the fake client, 127.0.0.2
				"gauge_conns_per_ip_max":                   2,
			} {
				if got[name] != want {
					t.Errorf("%s = %d, want %d", name, got[name], want)
				}
			}
			if n := got["counter_rejected_connections_per_ip"]; n < 1 {
				t.Errorf("counter_rejected_connections_per_ip = %d, want at least 1", n)
			}
		})
	}
}

// handshakeThroughProxy sends bytes that are not a TLS handshake through
// the proxy, so the relay's net/http says a handshake error.
func handshakeThroughProxy(t *testing.T, p *testProxy) error {
	c, err := net.DialTimeout("tcp", p.ln.Addr().String(), waitFor)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(waitFor))
	if _, err := c.Write([]byte("\x16\x03\x01\x00\x05hello")); err != nil {
		return err
	}
	_, err = io.ReadAll(c)
	return err
}

// TestProxyProtocolLocalAndSilent: a v2 LOCAL header (a proxy's health
// check) keeps the proxy's own address; a listed source that sends
// nothing is closed after ProxyHeaderTimeout, and does not hold up other
// connections meanwhile.
func TestProxyProtocolLocalAndSilent(t *testing.T) {
	const headerTimeout = 4 * time.Second
	certs, pool := selfSigned(t)
	sink := &logSink{}
	adm := &sourceRecorder{}
	s := startRelay(t, certs, func(s *relay.Server) {
		s.Logger = sink.logger()
		s.Admitter = adm
		s.ProxyProtocolFrom = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/30")}
		s.ProxyHeaderTimeout = headerTimeout
	})

	// Silent, from a listed source.
	silent, err := net.DialTimeout("tcp", s.LocalAddr().String(), waitFor)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	silentClosed := make(chan error, 1)
	go func() {
		silent.SetReadDeadline(time.Now().Add(headerTimeout + waitFor))
		_, err := silent.Read(make([]byte, 1))
		silentClosed <- err
	}()

	local := func(netip.AddrPort) []byte {
		b, err := (&proxyproto.Header{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}).Format()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	proxy := startProxy(t, s.LocalAddr().String(), secondLoopback, local, netip.Addr{})
	c := clientAt(t, proxy.url(), pool, netip.Addr{})
	watch(c).mustBeAdmitted(t)
	select {
	case err := <-silentClosed:
		t.Fatalf("the silent connection ended (%v) before another was served: Accept waited for it", err)
	default:
	}
	if got := adm.sources(); len(got) != 1 || got[0] != secondLoopback {
		t.Errorf("Admitter saw %v, want the proxy's own address %v for a LOCAL header", got, secondLoopback)
	}

	select {
	case err := <-silentClosed:
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("the silent connection was not closed by the relay within %v", headerTimeout+waitFor)
		}
		t.Logf("silent connection: %v", err)
	case <-time.After(headerTimeout + waitFor + time.Second):
		t.Fatal("the silent connection's reader did not return")
	}
	waitUntil[struct{}](t, "the timeout logged", func() bool {
		return len(sink.lines("level=WARN", "closed a connection before TLS", "no PROXY header within 4s")) == 1
	}, nil)
}

// TestMaxConnsPerIP: with a cap of 10, the 11th connection from one
// address is refused before TLS while another address connects; closing
// one frees its place.
func TestMaxConnsPerIP(t *testing.T) {
	const limit = 10
	certs, pool := selfSigned(t)
	sink := &logSink{}
	s := startRelay(t, certs, func(s *relay.Server) {
		s.Logger = sink.logger()
		s.MaxConnsPerIP = limit
	})
	first := netip.MustParseAddr("127.0.0.1")
	var clients []*derphttp.Client
	for range limit {
		c := clientAt(t, derpURL(s), pool, first)
		watch(c).mustBeAdmitted(t)
		clients = append(clients, c)
	}
	if !refused(t, clientAt(t, derpURL(s), pool, first)) {
		t.Fatalf("connection %d from %v served, want refused", limit+1, first)
	}
	other := clientAt(t, derpURL(s), pool, secondLoopback)
	watch(other).mustBeAdmitted(t)

	top := s.ConnsBySource(1)
	if len(top) != 1 || top[0] != (relay.SourceConns{Source: netip.PrefixFrom(first, 32), Conns: limit}) {
		t.Errorf("ConnsBySource(1) = %v, want %v with %d", top, first, limit)
	}
	if all := s.ConnsBySource(10); len(all) != 2 || all[1] != (relay.SourceConns{Source: netip.PrefixFrom(secondLoopback, 32), Conns: 1}) {
		t.Errorf("ConnsBySource(10) = %v, want %v with 1 second", all, secondLoopback)
	}
	got := listenerCounters(t, s)
	if got["counter_rejected_connections_per_ip"] < 1 {
		t.Errorf("counter_rejected_connections_per_ip = %d, want at least 1", got["counter_rejected_connections_per_ip"])
	}
	if w := sink.lines("level=WARN", "per-address cap", "max_conns_per_ip=10", `top_sources="127.0.0.1=`); len(w) != 1 {
		t.Errorf("want one warning naming 127.0.0.1, got %q", w)
	}

	// Closing one gives its place back.
	clients[0].Close()
	deadline := time.Now().Add(waitFor)
	for {
		c, err := derphttp.NewClient(key.NewNode(), derpURL(s), logger.Discard, netmon.NewStatic())
		if err != nil {
			t.Fatal(err)
		}
		c.TLSConfig = &tls.Config{RootCAs: pool}
		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		ok, err := func() (bool, error) {
			if err := c.Connect(ctx); err != nil {
				return false, nil
			}
			return watch(c).admitted(ctx)
		}()
		cancel()
		if ok {
			t.Cleanup(func() { c.Close() })
			break
		}
		c.Close()
		if err != nil || time.Now().After(deadline) {
			t.Fatalf("no connection from %v served after one of its %d closed (err %v)", first, limit, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestConnGateSettings: bad settings fail Start with the value and the
// cause.
func TestConnGateSettings(t *testing.T) {
	certs, _ := selfSigned(t)
	for _, tc := range []struct {
		set  func(*relay.Server)
		want string
	}{
		{func(s *relay.Server) { s.MaxConnsPerIP = -1 }, "max connections per IP -1"},
		{func(s *relay.Server) { s.MaxConnsPerIP = 1; s.MaxConnsPerIPv6Prefix = 129 }, "IPv6 prefix length 129"},
		{func(s *relay.Server) { s.ProxyHeaderTimeout = -time.Second }, "PROXY header timeout -1s"},
		{func(s *relay.Server) { s.ProxyProtocolFrom = []netip.Prefix{{}} }, "PROXY protocol source invalid Prefix"},
	} {
		s := &relay.Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: certs, PrivateKey: key.NewNode()}
		tc.set(s)
		err := s.Start()
		if err == nil {
			s.Close(context.Background())
			t.Errorf("%s: Start succeeded", tc.want)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Start: %v, want it to say %q", err, tc.want)
		}
	}
}
