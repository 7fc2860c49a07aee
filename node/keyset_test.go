package node

import (
	"testing"

	"tailscale.com/ipn"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/netmap"
)

func peer(id tailcfg.NodeID) *tailcfg.Node {
	return &tailcfg.Node{ID: id, Key: key.NewNode().Public(), Name: "n" + string(rune('a'+id)) + ".ts.net."}
}

func TestKeySet(t *testing.T) {
	var s keySet
	self := key.NewNode().Public()
	p1, p2, p3 := peer(1), peer(2), peer(3)

	if _, loaded := s.contains(p1.Key); loaded {
		t.Fatal("empty set claims to be loaded")
	}
	// A delta before any netmap is ignored: we cannot know the rest.
	s.apply(&ipn.Notify{PeersChanged: []*tailcfg.Node{p1}})
	if _, loaded := s.contains(p1.Key); loaded {
		t.Fatal("delta before netmap loaded the set")
	}

	nm := &netmap.NetworkMap{NodeKey: self, Peers: []tailcfg.NodeView{p1.View(), p2.View()}}
	s.apply(&ipn.Notify{NetMap: nm})
	mustContain(t, &s, self, true)
	mustContain(t, &s, p1.Key, true)
	mustContain(t, &s, p2.Key, true)
	mustContain(t, &s, p3.Key, false)
	if s.size() != 2 {
		t.Fatalf("size = %d, want 2", s.size())
	}

	// Delta: p3 joins, p1 is removed.
	s.apply(&ipn.Notify{PeersChanged: []*tailcfg.Node{p3}, PeersRemoved: []tailcfg.NodeID{p1.ID}})
	mustContain(t, &s, p1.Key, false)
	mustContain(t, &s, p3.Key, true)

	// p2 rotates its node key: the old one is no longer admitted.
	old := p2.Key
	p2b := p2.Clone()
	p2b.Key = key.NewNode().Public()
	s.apply(&ipn.Notify{PeersChanged: []*tailcfg.Node{p2b}})
	mustContain(t, &s, old, false)
	mustContain(t, &s, p2b.Key, true)
	if s.name(p2b.Key) != p2.Name {
		t.Errorf("name = %q, want %q", s.name(p2b.Key), p2.Name)
	}

	// p3's key expires: known but not admitted.
	p3e := p3.Clone()
	p3e.Expired = true
	s.apply(&ipn.Notify{PeersChanged: []*tailcfg.Node{p3e}})
	mustContain(t, &s, p3.Key, false)

	// A new full netmap (SelfChange + all peers) replaces everything,
	// dropping peers it no longer lists even without PeersRemoved.
	self2 := key.NewNode().Public()
	s.apply(&ipn.Notify{SelfChange: &tailcfg.Node{Key: self2}, PeersChanged: []*tailcfg.Node{p1}})
	mustContain(t, &s, p1.Key, true)
	mustContain(t, &s, p2b.Key, false)
	mustContain(t, &s, self, false)
	mustContain(t, &s, self2, true)

	s.reset()
	if _, loaded := s.contains(p1.Key); loaded {
		t.Fatal("reset set still loaded")
	}
}

func mustContain(t *testing.T, s *keySet, k key.NodePublic, want bool) {
	t.Helper()
	got, loaded := s.contains(k)
	if !loaded {
		t.Fatalf("contains(%s): set not loaded", k.ShortString())
	}
	if got != want {
		t.Fatalf("contains(%s) = %v, want %v", k.ShortString(), got, want)
	}
}

func BenchmarkKeySetContains(b *testing.B) {
	var s keySet
	peers := make([]tailcfg.NodeView, 0, 5000)
	var last key.NodePublic
	for i := range 5000 {
		p := peer(tailcfg.NodeID(i + 1))
		last = p.Key
		peers = append(peers, p.View())
	}
	s.apply(&ipn.Notify{NetMap: &netmap.NetworkMap{NodeKey: key.NewNode().Public(), Peers: peers}})
	b.ReportAllocs()
	for b.Loop() {
		if ok, _ := s.contains(last); !ok {
			b.Fatal("missing")
		}
	}
}
