package relay_test

import (
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/relay"
)

// TestRevokeClosesConnections: Revoke closes every admitted connection of
// a key, plain DERP and WebSocket alike, through the connection the /derp
// handler hijacked and the request context it serves; other clients keep
// relaying. Clients lists who is connected.
func TestRevokeClosesConnections(t *testing.T) {
	certs, pool := selfSigned(t)
	victim, other, peer := key.NewNode(), key.NewNode(), key.NewNode()
	s := startRelay(t, certs, func(s *relay.Server) { s.Admitter = admitOnly(victim.Public(), other.Public(), peer.Public()) })

	plain := newClientWithKey(t, s, pool, victim)
	plainIn := watch(plain)
	plainIn.mustBeAdmitted(t)
	ws, err := dialWebSocket(t, s, pool, victim)
	if err != nil {
		t.Fatal(err)
	}
	wsIn := watch(ws)
	wsIn.mustBeAdmitted(t)
	o, p := newClientWithKey(t, s, pool, other), newClientWithKey(t, s, pool, peer)
	oIn, pIn := watch(o), watch(p)
	oIn.mustBeAdmitted(t)
	pIn.mustBeAdmitted(t)

	if !s.Connected(victim.Public()) || len(s.Clients()) != 4 || len(s.ConnectedKeys()) != 3 {
		t.Fatalf("before: connected=%v, %d clients, %d keys; want true, 4, 3", s.Connected(victim.Public()), len(s.Clients()), len(s.ConnectedKeys()))
	}
	if n := s.Revoke(victim.Public()); n != 2 {
		t.Fatalf("Revoke closed %d connections, want 2 (plain and WebSocket)", n)
	}
	for name, in := range map[string]*inbox{"plain": plainIn, "WebSocket": wsIn} {
		select {
		case <-in.err:
		case <-time.After(5 * time.Second):
			t.Errorf("%s connection still open 5 s after Revoke", name)
		}
	}
	if s.Connected(victim.Public()) {
		t.Error("revoked key still listed as connected")
	}
	exchange(t, o, other.Public(), oIn, p, peer.Public(), pIn)
	if n := s.Revoke(victim.Public()); n != 0 {
		t.Errorf("second Revoke closed %d", n)
	}
}
