package relay

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"

	"github.com/tailderp/tailderp/internal/logs"
)

// fuzzWait bounds each fuzz input's outcome.
const fuzzWait = 10 * time.Second

// FuzzProxyHeader: any bytes as the start of a connection from a listed
// source, over real loopback TCP through the gate. The gate never panics
// and decides within a bounded time; it hands a connection on exactly
// when the library's parser, reading the same bytes from memory, finds a
// header (PROXY for TCP, LOCAL or UNKNOWN), with the header's client
// address (the proxy's own for LOCAL/UNKNOWN) as RemoteAddr and every
// byte after the header intact; it closes every other.
func FuzzProxyHeader(f *testing.F) {
	src := net.TCPAddrFromAddrPort(netip.MustParseAddrPort("198.51.100.7:40001"))
	src6 := net.TCPAddrFromAddrPort(netip.MustParseAddrPort("[2001:db8::7]:40001"))
	dst := net.TCPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:443"))
	dst6 := net.TCPAddrFromAddrPort(netip.MustParseAddrPort("[::1]:443"))
	tlsStart := []byte("\x16\x03\x01\x00\x05hello")
	for _, h := range []*proxyproto.Header{
		{Version: 1, Command: proxyproto.PROXY, TransportProtocol: proxyproto.TCPv4, SourceAddr: src, DestinationAddr: dst},
		{Version: 1, Command: proxyproto.PROXY, TransportProtocol: proxyproto.TCPv6, SourceAddr: src6, DestinationAddr: dst6},
		{Version: 1, Command: proxyproto.PROXY, TransportProtocol: proxyproto.UNSPEC},
		{Version: 2, Command: proxyproto.PROXY, TransportProtocol: proxyproto.TCPv4, SourceAddr: src, DestinationAddr: dst},
		{Version: 2, Command: proxyproto.PROXY, TransportProtocol: proxyproto.TCPv6, SourceAddr: src6, DestinationAddr: dst6},
		{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC},
		{Version: 2, Command: proxyproto.PROXY, TransportProtocol: proxyproto.UDPv4,
			SourceAddr: &net.UDPAddr{IP: src.IP, Port: src.Port}, DestinationAddr: &net.UDPAddr{IP: dst.IP, Port: dst.Port}},
	} {
		b, err := h.Format()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(append(b, tlsStart...))
		f.Add(b)
		f.Add(b[:len(b)/2])
	}
	f.Add(tlsStart)
	f.Add([]byte("PROXY TCP4 198.51.100.7 127.0.0.1 40001 443\n"))
	f.Add([]byte("PROXY TCP4 198.51.100.700 127.0.0.1 40001 443\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add([]byte{})

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	g := &connGate{
		Listener:      ln,
		from:          []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")},
		headerTimeout: fuzzWait / 2,
		peekTimeout:   fuzzWait / 2,
		log:           logs.NewLimited(logs.Discard(), "fuzz", 1, time.Minute, maxLogLine),
		ready:         make(chan acceptResult),
		done:          make(chan struct{}),
		pending:       make(map[net.Conn]struct{}),
	}
	defer g.Close()
	accepted := make(chan net.Conn)
	go func() {
		for {
			c, err := g.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()

	f.Fuzz(func(t *testing.T, in []byte) {
		// What the parser makes of the same bytes.
		r := bytes.NewReader(in)
		br := bufio.NewReaderSize(r, headerBufSize)
		h, perr := proxyproto.Read(br)
		rest := in[len(in)-r.Len()-br.Buffered():]
		wantClient := netip.MustParseAddr("127.0.0.1") // LOCAL, UNKNOWN
		wantServed := perr == nil
		if perr == nil && h.Command.IsProxy() {
			if tcp, _, ok := h.TCPAddrs(); ok {
				wantClient = tcp.AddrPort().Addr().Unmap()
			} else {
				wantServed = false
			}
		}

		c, err := net.DialTimeout("tcp", ln.Addr().String(), fuzzWait)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(fuzzWait))
		// One write, as a proxy sends a header; then the end of the
		// stream, so no input waits for the header timeout.
		if _, err := c.Write(in); err != nil {
			t.Fatal(err)
		}
		c.(*net.TCPConn).CloseWrite()
		closed := make(chan error, 1)
		go func() {
			_, err := c.Read(make([]byte, 1))
			closed <- err
		}()

		select {
		case sc := <-accepted:
			defer sc.Close()
			if !wantServed {
				t.Fatalf("served %q (parser: %v), want closed", in, perr)
			}
			got := sc.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
			if got != wantClient {
				t.Errorf("RemoteAddr %v, want %v", got, wantClient)
			}
			sc.SetDeadline(time.Now().Add(fuzzWait))
			after, err := io.ReadAll(sc)
			if err != nil {
				t.Fatalf("reading what followed the header: %v", err)
			}
			if !bytes.Equal(after, rest) {
				t.Errorf("after the header got %q, want %q", after, rest)
			}
		case err := <-closed:
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("no decision on %q within %v", in, fuzzWait)
			}
			if wantServed {
				t.Fatalf("closed %q (%v), but the parser found a header %+v", in, err, h)
			}
		}
	})
}
