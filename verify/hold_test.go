package verify

import (
	"context"
	"sync"
	"testing"
	"time"

	"tailscale.com/types/key"
)

// settlingTailnet is a tailnet whose answers arrive when the test says:
// until then it cannot answer (or answers from an old set, if it was made
// ready), and Settling returns a channel that arrive closes.
type settlingTailnet struct {
	mu      sync.Mutex
	ready   bool
	keys    map[key.NodePublic]bool
	arrived chan struct{} // nil once the answers arrived
}

func newSettling(ready bool, keys ...key.NodePublic) *settlingTailnet {
	s := &settlingTailnet{ready: ready, keys: map[key.NodePublic]bool{}, arrived: make(chan struct{})}
	for _, k := range keys {
		s.keys[k] = true
	}
	return s
}

func (s *settlingTailnet) KnowsNodeKey(k key.NodePublic) (known, ready bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ready && s.keys[k], s.ready
}

func (s *settlingTailnet) Settling() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.arrived == nil {
		return nil
	}
	return s.arrived
}

// arrive makes the live answers arrive, with keys in the tailnet.
func (s *settlingTailnet) arrive(keys ...key.NodePublic) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ready = true
	for _, k := range keys {
		s.keys[k] = true
	}
	close(s.arrived)
	s.arrived = nil
}

// admitAsync runs Admit in its own goroutine; the result arrives on the
// channel.
func admitAsync(ctx context.Context, v *Verifier, k key.NodePublic) <-chan bool {
	out := make(chan bool, 1)
	go func() { out <- v.Admit(ctx, k, src) }()
	return out
}

// waitHeld waits until v holds n clients, failing the test if an Admit
// returns meanwhile (it was not held) or the test's deadline nears.
func waitHeld(t *testing.T, v *Verifier, n int64, results ...<-chan bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for v.holding.Load() != n {
		for _, r := range results {
			select {
			case ok := <-r:
				t.Fatalf("Admit returned %v at once, want it held", ok)
			default:
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d clients held, want %d", v.holding.Load(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestHoldAdmitsWhenAnswersArrive: a client the tailnet cannot answer for
// yet is held, not refused, and admitted on the same call once the answers
// arrive with its key; a stranger held beside it is refused then.
func TestHoldAdmitsWhenAnswersArrive(t *testing.T) {
	member, stranger := key.NewNode().Public(), key.NewNode().Public()
	tn := newSettling(false)
	v := &Verifier{Tailnets: one(tn), NotReadyWait: time.Hour}
	ctx := context.Background()
	m, s := admitAsync(ctx, v, member), admitAsync(ctx, v, stranger)
	waitHeld(t, v, 2, m, s)
	tn.arrive(member)
	if !<-m {
		t.Error("the member was refused after its tailnet's answers arrived")
	}
	if <-s {
		t.Error("the stranger was admitted")
	}
	if got := v.Refused(ReasonNotInTailnet); got != 1 {
		t.Errorf("%d refused as not in the tailnet, want 1 (the stranger)", got)
	}
	if got := v.Refused(ReasonTailnetNotReady); got != 0 {
		t.Errorf("%d refused as not ready, want 0", got)
	}
	if v.Held() != 2 || v.holding.Load() != 0 {
		t.Errorf("held %d in all, %d now; want 2, 0", v.Held(), v.holding.Load())
	}
}

// TestHoldWhileAnsweringFromCache: a tailnet that answers from an old
// set (a cache) but is settling holds a key it does not know until the
// live answers arrive.
func TestHoldWhileAnsweringFromCache(t *testing.T) {
	old, joined := key.NewNode().Public(), key.NewNode().Public()
	tn := newSettling(true, old)
	v := &Verifier{Tailnets: one(tn), NotReadyWait: time.Hour}
	if !v.Admit(context.Background(), old, src) {
		t.Fatal("a key of the old set was refused")
	}
	if v.Held() != 0 {
		t.Fatal("a key the tailnet knows was held")
	}
	r := admitAsync(context.Background(), v, joined)
	waitHeld(t, v, 1, r)
	tn.arrive(joined)
	if !<-r {
		t.Error("a node that joined since the old set was refused after the live answers arrived")
	}
}

// TestHoldFailsClosed: a held client is refused, with the reason of the
// moment, when the wait ends without an answer: by its context, or after
// NotReadyWait.
func TestHoldFailsClosed(t *testing.T) {
	k := key.NewNode().Public()
	t.Run("context", func(t *testing.T) {
		v := &Verifier{Tailnets: one(newSettling(false)), NotReadyWait: time.Hour}
		ctx, cancel := context.WithCancel(context.Background())
		r := admitAsync(ctx, v, k)
		waitHeld(t, v, 1, r)
		cancel()
		if <-r {
			t.Error("admitted when the wait ended without an answer")
		}
		if v.Refused(ReasonTailnetNotReady) != 1 {
			t.Errorf("refusals: not ready %d, want 1", v.Refused(ReasonTailnetNotReady))
		}
	})
	t.Run("NotReadyWait", func(t *testing.T) {
		v := &Verifier{Tailnets: one(newSettling(false)), NotReadyWait: time.Millisecond}
		if v.Admit(context.Background(), k, src) {
			t.Error("admitted when the wait ended without an answer")
		}
		if v.Held() != 1 || v.Refused(ReasonTailnetNotReady) != 1 {
			t.Errorf("held %d, refused as not ready %d; want 1, 1", v.Held(), v.Refused(ReasonTailnetNotReady))
		}
	})
}

// TestHoldBounded: no more than MaxHeld clients are held; the next is
// decided at once.
func TestHoldBounded(t *testing.T) {
	tn := newSettling(false)
	v := &Verifier{Tailnets: one(tn), NotReadyWait: time.Hour, MaxHeld: 1}
	first := admitAsync(context.Background(), v, key.NewNode().Public())
	waitHeld(t, v, 1, first)
	// With MaxHeld not enforced this would wait for an hour.
	if v.Admit(context.Background(), key.NewNode().Public(), src) {
		t.Error("the client over MaxHeld was admitted")
	}
	if v.heldOver.Value() != 1 || v.Refused(ReasonTailnetNotReady) != 1 {
		t.Errorf("not held: %d, refused as not ready: %d; want 1, 1", v.heldOver.Value(), v.Refused(ReasonTailnetNotReady))
	}
	tn.arrive()
	<-first
}

// TestNoHold: nothing is held when there is nothing to wait for, when
// holding is off, or when fail-open admits anyway.
func TestNoHold(t *testing.T) {
	k := key.NewNode().Public()
	tests := []struct {
		name string
		v    *Verifier
		want bool
	}{
		{"not settling", &Verifier{Tailnets: one(&members{notReady: true}), NotReadyWait: time.Hour}, false},
		{"holding off", &Verifier{Tailnets: one(newSettling(false)), NotReadyWait: -1}, false},
		{"fail-open", &Verifier{Tailnets: one(newSettling(false)), NotReadyWait: time.Hour, FailOpen: true}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Held, any of these would wait for an hour.
			if got := tt.v.Admit(context.Background(), k, src); got != tt.want {
				t.Errorf("Admit = %v, want %v", got, tt.want)
			}
			if tt.v.Held() != 0 {
				t.Errorf("held %d", tt.v.Held())
			}
		})
	}
}

// TestHoldSeveralTailnets: a client is held while any tailnet settles and
// admitted when the one that has its key answers, whichever it is.
func TestHoldSeveralTailnets(t *testing.T) {
	k := key.NewNode().Public()
	a, b := newSettling(false), newSettling(false)
	ready := &members{keys: map[key.NodePublic]bool{}}
	v := &Verifier{Tailnets: []Tailnet{{Name: "a", Keys: a}, {Name: "ready", Keys: ready}, {Name: "b", Keys: b}}, NotReadyWait: time.Hour}
	r := admitAsync(context.Background(), v, k)
	waitHeld(t, v, 1, r)
	a.arrive() // without k: b still settles, so k stays held
	// The held client wakes and asks every tailnet again (ready among
	// them: its second question) before b's answers arrive.
	for ready.calls.Load() < 2 {
		select {
		case ok := <-r:
			t.Fatalf("Admit returned %v when a answered, want it held for b", ok)
		case <-time.After(time.Millisecond):
		}
	}
	b.arrive(k)
	if !<-r {
		t.Error("refused after the tailnet that has the key answered")
	}
	if got := v.admitted.Get("b").Value(); got != 1 {
		t.Errorf("admitted through b: %d, want 1", got)
	}
}
