package node

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// FuzzReadCache: a known-peers file holding anything (a torn write of an
// older version, a disk error, a hand edit) is refused with an error that
// names the file, or it is whole: loaded into a key set, it admits exactly
// the nodes it lists whose keys have not expired (and the relay's own
// node), strangers are refused, and the set written back reads back the
// same.
func FuzzReadCache(f *testing.F) {
	good, err := os.ReadFile(writeTestCache(f, peer(1), peer(2)))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"version":1,"netmap_received":"2026-11-29T00:00:00Z","nodes":[{"key":"nodekey:0000000000000000000000000000000000000000000000000000000000000000","id":1}]}`))
	f.Add([]byte(`{"version":1,"netmap_received":"2026-11-29T00:00:00Z","nodes":null,"self":{"key":"nodekey:0000000000000000000000000000000000000000000000000000000000000001"}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		path := filepath.Join(t.TempDir(), KnownPeersFile)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		c, _, err := readCache(path)
		if err != nil {
			if c != nil {
				t.Fatalf("readCache returned a cache and an error: %v", err)
			}
			if !strings.Contains(err.Error(), path) {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		// A set that answers from the file whatever its time says.
		s, clock := newTestKeySet(time.Hour)
		clock.t = c.Received
		s.loadCache(c)
		now := s.now()
		for _, n := range c.Nodes {
			want := n.KeyExpiry.IsZero() || now.Before(n.KeyExpiry)
			if known, ready := s.contains(n.Key); known != want || !ready {
				t.Fatalf("listed node %v (expiry %v, now %v): known=%v ready=%v, want known=%v", n.Key, n.KeyExpiry, now, known, ready, want)
			}
		}
		if !c.Self.Key.IsZero() {
			if known, _ := s.contains(c.Self.Key); !known {
				t.Fatalf("the relay's own node %v is not known", c.Self.Key)
			}
		}
		if known, ready := s.contains(peer(3).Key); known || !ready {
			t.Fatalf("stranger: known=%v ready=%v", known, ready)
		}

		// Written back (as a live set is), it reads back the same nodes.
		s.mu.Lock()
		s.setSourceLocked(SourceLive)
		s.mu.Unlock()
		w := &cacheWriter{path: path, keys: s, rename: os.Rename}
		w.written = s.changeCount() + 1 // force a write
		if err := w.writeIfChanged(false); err != nil {
			t.Fatalf("writing it back: %v", err)
		}
		again, _, err := readCache(path)
		if err != nil {
			t.Fatalf("the file written back does not read: %v", err)
		}
		admitted := 0
		for _, n := range c.Nodes {
			if n.KeyExpiry.IsZero() || now.Before(n.KeyExpiry) {
				admitted++
			}
		}
		if len(again.Nodes) != admitted || !again.Received.Equal(c.Received) || again.Self.Key != c.Self.Key {
			t.Fatalf("written back: %d nodes (want %d), received %v (want %v), self %v (want %v)",
				len(again.Nodes), admitted, again.Received, c.Received, again.Self.Key, c.Self.Key)
		}
	})
}
