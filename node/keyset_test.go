package node

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"tailscale.com/ipn"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/netmap"
)

func peer(id tailcfg.NodeID) *tailcfg.Node {
	return &tailcfg.Node{ID: id, Key: key.NewNode().Public(), Name: "n" + string(rune('a'+id)) + ".ts.net."}
}

// clock is a settable time for a keySet.
type clock struct{ t time.Time }

func (c *clock) now() time.Time          { return c.t }
func (c *clock) advance(d time.Duration) { c.t = c.t.Add(d) }

func newTestKeySet(maxAge time.Duration) (*keySet, *clock) {
	c := &clock{t: time.Date(2026, 11, 1, 12, 0, 0, 0, time.UTC)}
	s := newKeySet(maxAge)
	s.now, s.notLiveSince = c.now, c.t
	return s, c
}

// wantDrops checks that got is exactly want (any order), by key and reason.
func wantDrops(t *testing.T, step string, got []Drop, want ...Drop) {
	t.Helper()
	str := func(ds []Drop) []string {
		var out []string
		for _, d := range ds {
			out = append(out, d.Key.ShortString()+"/"+string(d.Reason))
		}
		slices.Sort(out)
		return out
	}
	if g, w := str(got), str(want); !slices.Equal(g, w) {
		t.Errorf("%s: dropped %v, want %v", step, g, w)
	}
}

func drop(p *tailcfg.Node, r DropReason) Drop { return Drop{Key: p.Key, Reason: r} }

func TestKeySet(t *testing.T) {
	s, _ := newTestKeySet(0)
	self := key.NewNode().Public()
	p1, p2, p3 := peer(1), peer(2), peer(3)

	if _, ready := s.contains(p1.Key); ready {
		t.Fatal("empty set claims to be ready")
	}
	// A delta before any netmap is ignored: we cannot know the rest.
	s.apply(&ipn.Notify{PeersChanged: []*tailcfg.Node{p1}})
	if _, ready := s.contains(p1.Key); ready {
		t.Fatal("delta before netmap made the set ready")
	}

	nm := &netmap.NetworkMap{NodeKey: self, Peers: []tailcfg.NodeView{p1.View(), p2.View()}}
	wantDrops(t, "first netmap", s.apply(&ipn.Notify{NetMap: nm}))
	mustContain(t, s, self, true)
	mustContain(t, s, p1.Key, true)
	mustContain(t, s, p2.Key, true)
	mustContain(t, s, p3.Key, false)
	if s.size() != 2 {
		t.Fatalf("size = %d, want 2", s.size())
	}

	// Delta: p3 joins, p1 is removed.
	got := s.apply(&ipn.Notify{PeersChanged: []*tailcfg.Node{p3}, PeersRemoved: []tailcfg.NodeID{p1.ID}})
	wantDrops(t, "PeersRemoved", got, drop(p1, DropRemoved))
	mustContain(t, s, p1.Key, false)
	mustContain(t, s, p3.Key, true)

	// p2 rotates its node key: the old one is no longer admitted.
	p2b := p2.Clone()
	p2b.Key = key.NewNode().Public()
	wantDrops(t, "rotation", s.apply(&ipn.Notify{PeersChanged: []*tailcfg.Node{p2b}}), drop(p2, DropKeyRotated))
	mustContain(t, s, p2.Key, false)
	mustContain(t, s, p2b.Key, true)
	if s.name(p2b.Key) != p2.Name {
		t.Errorf("name = %q, want %q", s.name(p2b.Key), p2.Name)
	}

	// p3's key expires: known but not admitted. Hearing it again drops
	// nothing more.
	p3e := p3.Clone()
	p3e.Expired = true
	wantDrops(t, "Expired", s.apply(&ipn.Notify{PeersChanged: []*tailcfg.Node{p3e}}), drop(p3, DropKeyExpired))
	mustContain(t, s, p3.Key, false)
	wantDrops(t, "Expired again", s.apply(&ipn.Notify{PeersChanged: []*tailcfg.Node{p3e}}))

	// A new full netmap (SelfChange + all peers) replaces everything,
	// dropping peers it no longer lists even without PeersRemoved, and
	// the node's own old key.
	self2 := key.NewNode().Public()
	got = s.apply(&ipn.Notify{SelfChange: &tailcfg.Node{Key: self2}, PeersChanged: []*tailcfg.Node{p1}})
	wantDrops(t, "full netmap", got, drop(p2b, DropNotInNetmap), Drop{Key: self, Reason: DropKeyRotated})
	mustContain(t, s, p1.Key, true)
	mustContain(t, s, p2b.Key, false)
	mustContain(t, s, self, false)
	mustContain(t, s, self2, true)

	// Logged out with the cache off: no answers, every key dropped.
	wantDrops(t, "logged out", s.loggedOut(), drop(p1, DropNoAnswer), Drop{Key: self2, Reason: DropNoAnswer})
	if _, ready := s.contains(p1.Key); ready {
		t.Fatal("logged-out set still ready")
	}
}

// TestKeySetFullMapDrops: a full map drops, with the right reason, a peer
// that is gone, one whose key rotated, and one whose key expired.
func TestKeySetFullMapDrops(t *testing.T) {
	s, _ := newTestKeySet(0)
	p1, p2, p3, p4 := peer(1), peer(2), peer(3), peer(4)
	s.apply(&ipn.Notify{SelfChange: &tailcfg.Node{Key: key.NewNode().Public()}, PeersChanged: []*tailcfg.Node{p1, p2, p3, p4}})
	p2b, p3e := p2.Clone(), p3.Clone()
	p2b.Key = key.NewNode().Public()
	p3e.Expired = true
	got := s.apply(&ipn.Notify{SelfChange: &tailcfg.Node{Key: s.self.key}, PeersChanged: []*tailcfg.Node{p2b, p3e, p4}})
	wantDrops(t, "full map", got, drop(p1, DropNotInNetmap), drop(p2, DropKeyRotated), drop(p3, DropKeyExpired))
	mustContain(t, s, p4.Key, true)
}

// TestKeySetExpiryTime: a key whose KeyExpiry passes stops being admitted
// then, with no map update, and expireDue reports it once.
func TestKeySetExpiryTime(t *testing.T) {
	s, c := newTestKeySet(0)
	p := peer(1)
	p.KeyExpiry = c.t.Add(time.Minute)
	s.apply(&ipn.Notify{SelfChange: &tailcfg.Node{Key: key.NewNode().Public()}, PeersChanged: []*tailcfg.Node{p}})
	wantDrops(t, "before expiry", s.expireDue())
	mustContain(t, s, p.Key, true)
	c.advance(time.Minute)
	mustContain(t, s, p.Key, false)
	wantDrops(t, "at expiry", s.expireDue(), drop(p, DropKeyExpired))
	wantDrops(t, "after", s.expireDue())
}

// TestKeySetCache: the set answers from a loaded cache while it is younger
// than the maximum age, a fresh map replaces it (dropping what it no
// longer has), and after a logout the last map goes on answering as the
// cache until it ages out, when everything is dropped.
func TestKeySetCache(t *testing.T) {
	const maxAge = time.Hour
	s, c := newTestKeySet(maxAge)
	self, p1, p2 := key.NewNode().Public(), peer(1), peer(2)
	s.loadCache(&cacheFile{Version: cacheVersion, Received: c.t.Add(-50 * time.Minute), Self: cacheNode{Key: self},
		Nodes: []cacheNode{{Key: p1.Key, ID: p1.ID, Name: p1.Name}, {Key: p2.Key, ID: p2.ID}}})
	if src, _ := s.status(); src != SourceCache {
		t.Fatalf("source %s, want cache", src)
	}
	mustContain(t, s, p1.Key, true)
	mustContain(t, s, self, true)
	mustContain(t, s, key.NewNode().Public(), false)
	if s.name(p1.Key) != p1.Name {
		t.Errorf("name from the cache = %q, want %q", s.name(p1.Key), p1.Name)
	}
	if _, _, ok := s.snapshot(); ok {
		t.Error("a cache-answered set offers a snapshot to write back")
	}

	// Ten minutes later the cache is an hour old: no answers.
	c.advance(10 * time.Minute)
	if _, ready := s.contains(p1.Key); ready {
		t.Fatal("cache older than the maximum age still answers")
	}
	wantDrops(t, "cache aged out", s.expireDue(), drop(p1, DropNoAnswer), drop(p2, DropNoAnswer), Drop{Key: self, Reason: DropNoAnswer})

	// A cache again, then a fresh map without p2: it replaces the cache.
	s.loadCache(&cacheFile{Version: cacheVersion, Received: c.t, Nodes: []cacheNode{{Key: p1.Key, ID: p1.ID}, {Key: p2.Key, ID: p2.ID}}})
	p3 := peer(3)
	got := s.apply(&ipn.Notify{NetMap: &netmap.NetworkMap{NodeKey: self, Peers: []tailcfg.NodeView{p1.View(), p3.View()}}})
	wantDrops(t, "fresh map over the cache", got, drop(p2, DropNotInNetmap))
	if src, _ := s.status(); src != SourceLive {
		t.Fatalf("source %s, want live", src)
	}
	mustContain(t, s, p3.Key, true)
	snap, _, ok := s.snapshot()
	if !ok || len(snap.Nodes) != 2 || !snap.Received.Equal(c.t) {
		t.Fatalf("snapshot %+v ok=%v, want 2 nodes received now", snap, ok)
	}
	// A cache loaded later does not replace the live map.
	s.loadCache(&cacheFile{Version: cacheVersion, Received: c.t, Nodes: []cacheNode{{Key: p2.Key, ID: p2.ID}}})
	mustContain(t, s, p2.Key, false)

	// Logged out: no drops, the last map answers as the cache, then ages
	// out.
	wantDrops(t, "logout with cache", s.loggedOut())
	if src, _ := s.status(); src != SourceCache {
		t.Fatalf("after logout: source %s, want cache", src)
	}
	mustContain(t, s, p3.Key, true)
	c.advance(maxAge)
	got = s.expireDue()
	if len(got) != 3 || !strings.Contains(string(got[0].Reason), "no_answer") {
		t.Errorf("cache aged out after logout: dropped %v, want self, p1, p3 (no_answer)", got)
	}
}

func mustContain(t *testing.T, s *keySet, k key.NodePublic, want bool) {
	t.Helper()
	got, ready := s.contains(k)
	if !ready {
		t.Fatalf("contains(%s): set not ready", k.ShortString())
	}
	if got != want {
		t.Fatalf("contains(%s) = %v, want %v", k.ShortString(), got, want)
	}
}

func BenchmarkKeySetContains(b *testing.B) {
	s := newKeySet(0)
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

// TestKeySetPending: until the set is live, pending offers a channel that
// closes when it becomes live; losing the live map (a logout) offers a new
// one, from that moment.
func TestKeySetPending(t *testing.T) {
	s, c := newTestKeySet(time.Hour)
	start := c.t
	live, since := s.pending()
	if live == nil || !since.Equal(start) {
		t.Fatalf("new set: pending %v since %v, want a channel since %v", live, since, start)
	}
	s.loadCache(&cacheFile{Version: cacheVersion, Received: c.t, Nodes: []cacheNode{{Key: peer(1).Key, ID: 1}}})
	if l, _ := s.pending(); l != live {
		t.Error("answering from the cache: not the same pending channel")
	}
	mustBeOpen(t, "before the live map", live)
	c.advance(time.Minute)
	s.apply(&ipn.Notify{NetMap: &netmap.NetworkMap{NodeKey: key.NewNode().Public()}})
	mustBeClosed(t, "once live", live)
	if l, _ := s.pending(); l != nil {
		t.Error("a live set is pending")
	}

	c.advance(time.Minute)
	s.loggedOut() // the last map answers as the cache
	again, since := s.pending()
	if again == nil || !since.Equal(c.t) {
		t.Fatalf("after a logout: pending %v since %v, want a new channel since %v", again, since, c.t)
	}
	mustBeOpen(t, "after a logout", again)
	s.apply(&ipn.Notify{NetMap: &netmap.NetworkMap{NodeKey: key.NewNode().Public()}})
	mustBeClosed(t, "live again", again)

	// Without a cache a logout clears the set: pending again.
	s, _ = newTestKeySet(0)
	s.apply(&ipn.Notify{NetMap: &netmap.NetworkMap{NodeKey: key.NewNode().Public()}})
	s.loggedOut()
	if l, _ := s.pending(); l == nil {
		t.Error("cleared set is not pending")
	}
}

func mustBeOpen(t *testing.T, when string, ch <-chan struct{}) {
	t.Helper()
	select {
	case <-ch:
		t.Errorf("%s: channel closed", when)
	default:
	}
}

func mustBeClosed(t *testing.T, when string, ch <-chan struct{}) {
	t.Helper()
	select {
	case <-ch:
	default:
		t.Errorf("%s: channel still open", when)
	}
}

// TestNodeSettling: the node offers admission a wait while it has no live
// map and expects one soon (starting, running, logging in with a key),
// for at most ControlWarnAfter; not once stopped, nor when a person must
// log it in.
func TestNodeSettling(t *testing.T) {
	tests := []struct {
		state   State
		authKey string
		want    bool
	}{
		{StateStarting, "", true},
		{StateRunning, "", true},
		{StateNeedsLogin, "tskey-auth-x", true},
		{StateNeedsLogin, "", false},
		{StateStopped, "tskey-auth-x", false},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s key=%v", tt.state, tt.authKey != ""), func(t *testing.T) {
			n := &Node{AuthKey: tt.authKey, ControlWarnAfter: time.Minute}
			var c *clock
			n.keys, c = newTestKeySet(time.Hour)
			n.state.Store(tt.state)
			if got := n.Settling() != nil; got != tt.want {
				t.Fatalf("settling = %v, want %v", got, tt.want)
			}
			c.advance(time.Minute)
			if n.Settling() != nil {
				t.Error("still settling after ControlWarnAfter without a live map")
			}
		})
	}
	n := &Node{ControlWarnAfter: time.Minute}
	n.keys, _ = newTestKeySet(time.Hour)
	n.state.Store(StateRunning)
	n.keys.apply(&ipn.Notify{NetMap: &netmap.NetworkMap{NodeKey: key.NewNode().Public()}})
	if n.Settling() != nil {
		t.Error("settling with a live map")
	}
	if (&Node{}).Settling() != nil {
		t.Error("a node never started is settling")
	}
}

// TestKeySetChangesOnlyWhenAnEntryDoes: a delta that changes only what the
// set does not keep (a peer's endpoints, home relay, online state) is no
// change, so the cache file is not rewritten for it; a changed name, key
// or expiry, or a removal, is.
func TestKeySetChangesOnlyWhenAnEntryDoes(t *testing.T) {
	p := peer(1)
	s := liveSet(p)
	before := s.changeCount()
	same := *p
	same.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:41641")}
	same.HomeDERP = 900
	s.apply(&ipn.Notify{PeersChanged: []*tailcfg.Node{&same}})
	if got := s.changeCount(); got != before {
		t.Errorf("endpoints and home relay changed: change count %d → %d, want no change", before, got)
	}
	renamed := same
	renamed.Name = "renamed.ts.net."
	s.apply(&ipn.Notify{PeersChanged: []*tailcfg.Node{&renamed}})
	if s.changeCount() == before {
		t.Error("a renamed node is no change")
	}
	before = s.changeCount()
	s.apply(&ipn.Notify{PeersRemoved: []tailcfg.NodeID{42}})
	if s.changeCount() != before {
		t.Error("removing a node the set does not hold is a change")
	}
	s.apply(&ipn.Notify{PeersRemoved: []tailcfg.NodeID{p.ID}})
	if s.changeCount() == before {
		t.Error("a removal is no change")
	}
}
