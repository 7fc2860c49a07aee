// Package stun serves STUN on UDP for Tailscale clients, with
// tailscale.com/net/stunserver, so they can learn their public address and
// measure latency to the relay.
//
// Like derper, it answers only the binding requests Tailscale sends, which
// carry SOFTWARE and FINGERPRINT attributes; generic STUN testers that omit
// them get no answer and may call the server dead. Use `tailscale netcheck`
// or `tailderp check` instead. STUN is not authenticated: anyone can measure
// latency to it, which is not the same as being allowed to relay.
package stun

import (
	"context"
	"fmt"
	"net"

	"tailscale.com/net/stunserver"
)

// Server is a STUN listener. Its counters are stunserver's, published under
// "stun" in the process's metrics.
type Server struct {
	// Addr is the UDP listen address, e.g. ":3478" (all addresses, IPv4
	// and IPv6) or "192.0.2.1:3478".
	Addr string

	srv    *stunserver.STUNServer
	cancel context.CancelFunc
	done   chan struct{}
}

// Start binds the UDP socket and serves in the background until Close.
func (s *Server) Start() error {
	ctx, cancel := context.WithCancel(context.Background())
	srv := stunserver.New(ctx)
	if err := srv.Listen(s.Addr); err != nil {
		cancel()
		return fmt.Errorf("stun: %w", err)
	}
	s.srv, s.cancel, s.done = srv, cancel, make(chan struct{})
	go func() {
		defer close(s.done)
		srv.Serve()
	}()
	return nil
}

// LocalAddr returns the bound address.
func (s *Server) LocalAddr() net.Addr { return s.srv.LocalAddr() }

// Close stops serving and waits for the listener to finish.
func (s *Server) Close() error {
	if s.cancel == nil {
		return nil
	}
	s.cancel()
	<-s.done
	return nil
}
