package stun

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	tsstun "tailscale.com/net/stun"

	"github.com/tailderp/tailderp/internal/testutil"
)

// startServer starts a STUN server on addr and stops it when the test ends.
func startServer(t *testing.T, addr string) *Server {
	t.Helper()
	s := &Server{Addr: addr}
	if err := s.Start(); err != nil {
		t.Fatalf("Start(%q): %v", addr, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// bindingRequest sends one Tailscale binding request from a socket bound to
// clientAddr to the server at dst and returns the mapped address of the
// response and the client socket's own address.
func bindingRequest(t *testing.T, network, clientAddr string, dst net.Addr) (mapped, local netip.AddrPort) {
	t.Helper()
	mapped, local, err := testutil.STUNBinding(network, clientAddr, dst.String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return mapped, local
}

// serverAddrFor returns where a client on loopback of the given family
// reaches s.
func serverAddrFor(s *Server, loopback string) *net.UDPAddr {
	return &net.UDPAddr{IP: net.ParseIP(loopback), Port: s.LocalAddr().(*net.UDPAddr).Port}
}

func TestBindingResponseIsClientAddress(t *testing.T) {
	tests := []struct {
		name       string
		listen     string // server address
		network    string // client socket network
		clientAddr string
		loopback   string // address the client sends to
		needIPv6   bool
	}{
		{"ipv4 listener", "127.0.0.1:0", "udp4", "127.0.0.1:0", "127.0.0.1", false},
		{"ipv6 listener", "[::1]:0", "udp6", "[::1]:0", "::1", true},
		// ":3478" is how tailderp listens by default: one socket for both
		// families. An IPv4 client must still be told an IPv4 address, or
		// it would believe it has IPv6.
		{"all addresses, ipv4 client", ":0", "udp4", "127.0.0.1:0", "127.0.0.1", false},
		{"all addresses, ipv6 client", ":0", "udp6", "[::1]:0", "::1", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.needIPv6 {
				skipWithoutIPv6Loopback(t)
			}
			s := startServer(t, tt.listen)
			mapped, local := bindingRequest(t, tt.network, tt.clientAddr, serverAddrFor(s, tt.loopback))
			if mapped != local {
				t.Errorf("mapped address = %v, want the client's own address %v", mapped, local)
			}
		})
	}
}

// skipWithoutIPv6Loopback skips the test when this machine cannot bind ::1.
func skipWithoutIPv6Loopback(t *testing.T) {
	t.Helper()
	pc, err := net.ListenPacket("udp6", "[::1]:0")
	if err != nil {
		t.Skipf("skipping: this machine cannot bind UDP on [::1] (no IPv6 loopback): %v", err)
	}
	pc.Close()
}

func TestRequestWithoutFingerprintIsIgnored(t *testing.T) {
	// Like derper, only Tailscale's binding requests (SOFTWARE +
	// FINGERPRINT) are answered; this is documented behaviour, so pin it.
	s := startServer(t, "127.0.0.1:0")
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	// A bare RFC 5389 binding request: header only, no attributes.
	tx := tsstun.NewTxID()
	req := append([]byte{0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42}, tx[:]...)
	dst := serverAddrFor(s, "127.0.0.1")
	if _, err := pc.WriteTo(req, dst); err != nil {
		t.Fatal(err)
	}
	// Then a proper one: its answer proves the bare one was read first and
	// dropped (UDP on loopback keeps order).
	tx2 := tsstun.NewTxID()
	if _, err := pc.WriteTo(tsstun.Request(tx2), dst); err != nil {
		t.Fatal(err)
	}
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1500)
	n, _, err := pc.ReadFrom(buf)
	if err != nil {
		t.Fatalf("no response to the Tailscale request: %v", err)
	}
	got, _, err := tsstun.ParseResponse(buf[:n])
	if err != nil {
		t.Fatal(err)
	}
	if got != tx2 {
		t.Errorf("first response is for transaction %x, want only the Tailscale request's %x", got, tx2)
	}
}

func TestPortInUse(t *testing.T) {
	taken, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	s := &Server{Addr: taken.LocalAddr().String()}
	err = s.Start()
	if err == nil {
		s.Close()
		t.Fatalf("Start on a port in use succeeded")
	}
	for _, want := range []string{"stun", taken.LocalAddr().String(), "address already in use"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestCloseStopsServing(t *testing.T) {
	s := &Server{Addr: "127.0.0.1:0"}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	addr := s.LocalAddr().String()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	// The port is free again.
	pc, err := net.ListenPacket("udp4", addr)
	if err != nil {
		t.Fatalf("port still bound after Close: %v", err)
	}
	pc.Close()
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}
