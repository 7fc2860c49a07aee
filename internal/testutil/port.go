package testutil

import (
	"net"
	"testing"
)

// FreePort returns a port on 127.0.0.1 that was free a moment ago:
// network "udp" for a UDP port, anything else for TCP. Nothing listens on
// it when FreePort returns. Use it where a port must be known before the
// server that will listen on it starts (a DERP map, a command line), or
// as a port where nothing answers; everywhere else, listen on port 0.
func FreePort(t testing.TB, network string) int {
	t.Helper()
	if network == "udp" {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		return pc.LocalAddr().(*net.UDPAddr).Port
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
