package relay_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/relay"
	"github.com/tailderp/tailderp/verify"
)

// startingTailnet stands in for a tailnet node that has just started: it
// cannot answer until arrive, and says so through verify.Settling.
type startingTailnet struct {
	mu      sync.Mutex
	keys    map[key.NodePublic]bool // nil until arrive
	arrived chan struct{}
}

func (s *startingTailnet) KnowsNodeKey(k key.NodePublic) (known, ready bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.keys[k], s.keys != nil
}

func (s *startingTailnet) Settling() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.keys != nil {
		return nil
	}
	return s.arrived
}

func (s *startingTailnet) arrive(keys ...key.NodePublic) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.keys = map[key.NodePublic]bool{}
	for _, k := range keys {
		s.keys[k] = true
	}
	close(s.arrived)
}

// TestAdmissionHeldUntilReady: a client of the tailnet that connects
// before the relay's tailnet can answer is held, not refused, and
// admitted on that same connection once the answers arrive: it never
// reconnects, so it never backs off.
func TestAdmissionHeldUntilReady(t *testing.T) {
	certs, pool := selfSigned(t)
	member := key.NewNode()
	tn := &startingTailnet{arrived: make(chan struct{})}
	// An hour: only derpserver's own bound (5 s) would end the hold.
	v := &verify.Verifier{Tailnets: []verify.Tailnet{{Name: "default", Keys: tn}}, NotReadyWait: time.Hour}
	s := startRelay(t, certs, func(s *relay.Server) { s.Admitter = v })
	c := newClientWithKey(t, s, pool, member)

	type recv struct {
		m       derp.ReceivedMessage
		connGen int
		err     error
	}
	first := make(chan recv, 1)
	go func() {
		m, connGen, err := c.RecvDetail()
		first <- recv{m, connGen, err}
	}()
	waitUntil(t, "the client is held", func() bool { return v.Held() == 1 }, first)
	if s.Connected(member.Public()) || len(s.Clients()) != 0 {
		t.Error("a client still being decided is listed as connected")
	}
	tn.arrive(member.Public())
	r := <-first
	if r.err != nil {
		t.Fatalf("the held client's first read: %v, want its ServerInfo", r.err)
	}
	if _, ok := r.m.(derp.ServerInfoMessage); !ok {
		t.Fatalf("first message %T, want ServerInfo", r.m)
	}
	if r.connGen != 1 {
		t.Errorf("admitted on connection %d, want the first", r.connGen)
	}
	if !s.Connected(member.Public()) {
		t.Error("the admitted client is not listed")
	}
	if n := v.Refused(verify.ReasonTailnetNotReady); n != 0 {
		t.Errorf("%d clients refused as not ready", n)
	}
}

// waitUntil polls cond until it holds, failing the test if something
// arrives on early first (the client was decided without being held) or
// the wait takes very long.
func waitUntil[T any](t *testing.T, what string, cond func() bool, early <-chan T) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		select {
		case v := <-early:
			t.Fatalf("waiting until %s: got %+v first", what, v)
		case <-time.After(time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("not true within %v: %s", waitFor, what)
		}
	}
}

// blockingAdmitter holds every client until its context ends, and
// reports why it ended.
type blockingAdmitter struct {
	entered chan key.NodePublic
	ended   chan error
}

func (a *blockingAdmitter) Admit(ctx context.Context, k key.NodePublic, _ netip.Addr) bool {
	a.entered <- k
	<-ctx.Done()
	a.ended <- ctx.Err()
	return false
}

// TestCloseEndsHeldAdmission: Close ends an admission that is still
// deciding, by its context, instead of waiting for derpserver's own 5 s
// bound on it (which would end it with DeadlineExceeded).
func TestCloseEndsHeldAdmission(t *testing.T) {
	certs, pool := selfSigned(t)
	a := &blockingAdmitter{entered: make(chan key.NodePublic, 1), ended: make(chan error, 1)}
	s := &relay.Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: certs, PrivateKey: key.NewNode(), Admitter: a}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	c := newClient(t, s, pool)
	go c.Recv()
	<-a.entered
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := <-a.ended; !errors.Is(err, context.Canceled) {
		t.Errorf("the held admission ended with %v, want context.Canceled (by Close)", err)
	}
}

// TestRevokeReachesHeldAdmission: a connection still being decided is
// not listed among the clients, but Revoke finds and closes it.
func TestRevokeReachesHeldAdmission(t *testing.T) {
	certs, pool := selfSigned(t)
	a := &blockingAdmitter{entered: make(chan key.NodePublic, 1), ended: make(chan error, 1)}
	s := startRelay(t, certs, func(s *relay.Server) { s.Admitter = a })
	c := newClient(t, s, pool)
	in := watch(c)
	k := <-a.entered
	if s.Connected(k) || len(s.Clients()) != 0 || len(s.ConnectedKeys()) != 0 {
		t.Errorf("a connection still being decided is listed: connected=%v, %d clients, %d keys", s.Connected(k), len(s.Clients()), len(s.ConnectedKeys()))
	}
	if n := s.Revoke(k); n != 1 {
		t.Fatalf("Revoke closed %d connections, want the held one", n)
	}
	if err := <-a.ended; !errors.Is(err, context.Canceled) {
		t.Errorf("the held admission ended with %v, want context.Canceled (by Revoke)", err)
	}
	if ok, err := in.admitted(context.Background()); ok || err != nil {
		t.Errorf("revoked while held: admitted=%v err=%v, want its connection closed", ok, err)
	}
}

// TestStopAccepting: the listener closes, connected clients keep relaying
// (the process's exit will close them), and Close afterwards closes them.
func TestStopAccepting(t *testing.T) {
	certs, pool := selfSigned(t)
	s := &relay.Server{Addr: "127.0.0.1:0", HTTPPort: 0, Certs: certs, PrivateKey: key.NewNode()}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	ka, kb := key.NewNode(), key.NewNode()
	a, b := newClientWithKey(t, s, pool, ka), newClientWithKey(t, s, pool, kb)
	aIn, bIn := watch(a), watch(b)
	aIn.mustBeAdmitted(t)
	bIn.mustBeAdmitted(t)

	s.StopAccepting()
	for _, addr := range []string{s.LocalAddr().String(), s.HTTPAddr()} {
		if c, err := net.DialTimeout("tcp", addr, waitFor); err == nil {
			c.Close()
			t.Errorf("%s still accepts connections after StopAccepting", addr)
		}
	}
	exchange(t, a, ka.Public(), aIn, b, kb.Public(), bIn)
	s.StopAccepting() // again: nothing

	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for name, in := range map[string]*inbox{"a": aIn, "b": bIn} {
		select {
		case <-in.err:
		case <-ctx.Done():
			t.Errorf("client %s still connected after Close", name)
		}
	}
	select {
	case err := <-s.Err():
		t.Errorf("a listener reported %v after StopAccepting", err)
	default:
	}
}
