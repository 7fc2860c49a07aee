package testutil

import (
	"fmt"
	"net"
	"net/netip"
	"time"

	"tailscale.com/net/stun"
)

// STUNBinding sends one STUN binding request, as a Tailscale client sends
// it, from a new UDP socket bound to local (network "udp4" or "udp6",
// local "127.0.0.1:0" for example) to dst, and waits up to timeout for the
// answer. It returns the address the answer says the request came from
// (mapped, as Tailscale's STUN parser reads it) and the socket's own
// address (self). The first packet to arrive must be the answer: anything
// else (not STUN, not a success, another transaction) is an error.
func STUNBinding(network, local, dst string, timeout time.Duration) (mapped, self netip.AddrPort, err error) {
	to, err := net.ResolveUDPAddr(network, dst)
	if err != nil {
		return mapped, self, err
	}
	pc, err := net.ListenPacket(network, local)
	if err != nil {
		return mapped, self, err
	}
	defer pc.Close()
	self = pc.LocalAddr().(*net.UDPAddr).AddrPort()
	tx := stun.NewTxID()
	if _, err := pc.WriteTo(stun.Request(tx), to); err != nil {
		return mapped, self, fmt.Errorf("send STUN binding request to %s: %w", dst, err)
	}
	pc.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 1500)
	n, _, err := pc.ReadFrom(buf)
	if err != nil {
		return mapped, self, fmt.Errorf("no STUN answer from %s: %w", dst, err)
	}
	gotTx, addr, err := stun.ParseResponse(buf[:n])
	if err != nil {
		return mapped, self, fmt.Errorf("STUN answer from %s: %w", dst, err)
	}
	if gotTx != tx {
		return mapped, self, fmt.Errorf("STUN answer from %s is for transaction %x, want %x", dst, gotTx, tx)
	}
	return addr, self, nil
}
