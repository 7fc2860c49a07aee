package verify

import (
	"context"
	"testing"
	"time"

	"tailscale.com/types/key"
)

// tenantConns is a connSet that also says which tailnet each key's
// connection was given to, as relay.Server with Tenants does.
type tenantConns struct {
	*connSet
	tenant map[key.NodePublic]string
}

func (c *tenantConns) ConnectedTenant(k key.NodePublic) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conns[k] == 0 {
		return ""
	}
	return c.tenant[k]
}

// TestIsolatedTenantOf: TenantOf names the one tailnet that knows a key;
// a key of two tailnets, or of none, is refused (counted and logged), and
// so is every key while no tailnet can answer, unless fail-open.
func TestIsolatedTenantOf(t *testing.T) {
	a, b, both, stranger := key.NewNode().Public(), key.NewNode().Public(), key.NewNode().Public(), key.NewNode().Public()
	v := &Verifier{Isolated: true, Tailnets: []Tailnet{
		{Name: "a", Keys: &members{keys: map[key.NodePublic]bool{a: true, both: true}}},
		{Name: "b", Keys: &members{keys: map[key.NodePublic]bool{b: true, both: true}}},
	}}
	ctx := context.Background()
	for k, want := range map[key.NodePublic]string{a: "a", b: "b", both: "", stranger: ""} {
		if got := v.TenantOf(ctx, k, src); got != want {
			t.Errorf("TenantOf(%v) = %q, want %q", k.ShortString(), got, want)
		}
	}
	if v.Refused(ReasonTwoTailnets) != 1 || v.Refused(ReasonNotInTailnet) != 1 {
		t.Errorf("refused %v, want one in_two_tailnets and one not_in_tailnet", v.RefusedByReason())
	}
	// Not isolated, the first tailnet that knows a key admits it (a relay
	// of one DERP server: where the key is relayed does not depend on it).
	shared := &Verifier{Tailnets: v.Tailnets}
	if !shared.Admit(ctx, both, src) {
		t.Error("without Isolated, a key of two tailnets was refused")
	}

	down := &Verifier{Isolated: true, Tailnets: []Tailnet{{Name: "x", Keys: &members{notReady: true}}, {Name: "y", Keys: &members{notReady: true}}}}
	if got := down.TenantOf(ctx, a, src); got != "" || down.Refused(ReasonTailnetNotReady) != 1 {
		t.Errorf("no tailnet ready: TenantOf = %q, refused %v; want \"\" and tailnet_not_ready", got, down.RefusedByReason())
	}
	down.FailOpen = true
	if got := down.TenantOf(ctx, a, src); got != "x" {
		t.Errorf("no tailnet ready, fail-open: TenantOf = %q, want the first tailnet", got)
	}
	if !down.ForTailnet("x").Admit(ctx, a, src) || down.admitted.Get("x").Value() != 1 {
		t.Error("fail-open: the first tailnet's Admitter refused, or did not count it under x")
	}
}

// TestIsolatedTenantOfHolds: a key that arrives with a tailnet's first
// network map is routed to it, not refused, while the map settles.
func TestIsolatedTenantOfHolds(t *testing.T) {
	k := key.NewNode().Public()
	settling := newSettling(false)
	v := &Verifier{Isolated: true, NotReadyWait: 5 * time.Second, Tailnets: []Tailnet{
		{Name: "a", Keys: &members{keys: map[key.NodePublic]bool{}}},
		{Name: "b", Keys: settling},
	}}
	got := make(chan string, 1)
	go func() { got <- v.TenantOf(context.Background(), k, src) }()
	waitHeld(t, v, 1)
	settling.arrive(k)
	select {
	case name := <-got:
		if name != "b" {
			t.Fatalf("TenantOf = %q after b's map arrived with the key, want b", name)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("TenantOf still holding 10s after the answers arrived")
	}
}

// TestForTailnet: a tailnet's Admitter admits its own members only: not a
// key of another tailnet (a client routed to the wrong tenant), not a key
// two tailnets know; admissions are counted under it.
func TestForTailnet(t *testing.T) {
	a, b, both := key.NewNode().Public(), key.NewNode().Public(), key.NewNode().Public()
	v := &Verifier{Isolated: true, Tailnets: []Tailnet{
		{Name: "a", Keys: &members{keys: map[key.NodePublic]bool{a: true, both: true}}},
		{Name: "b", Keys: &members{keys: map[key.NodePublic]bool{b: true, both: true}}},
	}}
	ctx := context.Background()
	cases := []struct {
		tailnet string
		k       key.NodePublic
		want    bool
	}{
		{"a", a, true}, {"b", b, true}, {"b", a, false}, {"a", b, false}, {"a", both, false}, {"b", both, false},
	}
	for _, c := range cases {
		if got := v.ForTailnet(c.tailnet).Admit(ctx, c.k, src); got != c.want {
			t.Errorf("ForTailnet(%q).Admit(%v) = %v, want %v", c.tailnet, c.k.ShortString(), got, c.want)
		}
	}
	if v.AdmittedBy("a") != 1 || v.AdmittedBy("b") != 1 {
		t.Errorf("admitted by a %d, by b %d; want 1 each", v.AdmittedBy("a"), v.AdmittedBy("b"))
	}
}

// TestIsolatedRevokeAndSweep: a client given to tailnet b is closed when b
// drops its key even though tailnet a now knows it (it would have to
// reconnect to be a's), and when its key becomes known to both.
func TestIsolatedRevokeAndSweep(t *testing.T) {
	moved, doubled, stays := key.NewNode().Public(), key.NewNode().Public(), key.NewNode().Public()
	tnA := &members{keys: map[key.NodePublic]bool{moved: true, doubled: true}}
	tnB := &members{keys: map[key.NodePublic]bool{doubled: true, stays: true}}
	conns := &tenantConns{connSet: newConnSet(moved, doubled, stays), tenant: map[key.NodePublic]string{moved: "b", doubled: "b", stays: "b"}}
	v := &Verifier{Isolated: true, Conns: conns, Tailnets: []Tailnet{{Name: "a", Keys: tnA}, {Name: "b", Keys: tnB}}}

	if n := v.Revoke(Revocation{Key: moved, Tailnet: "b", Reason: "removed"}); n != 1 {
		t.Errorf("Revoke(moved to a) closed %d, want 1: its connection is b's", n)
	}
	if n := v.Revoke(Revocation{Key: stays, Tailnet: "b", Reason: "removed"}); n != 0 {
		t.Errorf("Revoke(stays, still b's) closed %d, want 0", n)
	}
	// The sweep closes on the second look.
	v.Sweep()
	if n := v.Sweep(); n != 1 || conns.closed[doubled] != 1 {
		t.Errorf("sweep closed %d (%v), want doubled's connection", n, conns.closed)
	}
	if conns.closed[stays] != 0 {
		t.Error("sweep closed a client its own tailnet still has")
	}
}
