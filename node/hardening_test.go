package node

import (
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tailscale.com/ipn"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/persist"

	"github.com/tailderp/tailderp/internal/testutil"
)

// cacheFor writes a known-peers cache in dir whose self is self, holding
// p, received at received, with mode perm.
func cacheFor(t *testing.T, dir string, self key.NodePublic, p *tailcfg.Node, received time.Time, perm os.FileMode) {
	t.Helper()
	b, err := json.Marshal(&cacheFile{Version: cacheVersion, Received: received, Self: cacheNode{Key: self},
		Nodes: []cacheNode{{Key: p.Key, ID: p.ID, Name: p.Name}}})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, KnownPeersFile)
	if err := os.WriteFile(path, b, perm); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, perm); err != nil { // past the umask
		t.Fatal(err)
	}
}

// writeLogin writes a tsnet state in dir holding a login with node key k,
// in the layout tsnet's state store uses (current profile → prefs).
func writeLogin(t *testing.T, dir string, k key.NodePrivate) {
	t.Helper()
	prefs, err := json.Marshal(&ipn.Prefs{Persist: &persist.Persist{PrivateNodeKey: k}})
	if err != nil {
		t.Fatal(err)
	}
	state, err := json.Marshal(map[string][]byte{
		string(ipn.CurrentProfileStateKey): []byte("profile-test"),
		"profile-test":                     prefs,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, StateFile), state, 0o600); err != nil {
		t.Fatal(err)
	}
}

func loadWithLog(t *testing.T, dir string) (*Node, string) {
	t.Helper()
	var logBuf testutil.Buffer
	n := &Node{Dir: dir, CacheMaxAge: time.Hour, Logger: slog.New(slog.NewTextHandler(&logBuf, nil))}
	if err := n.Load(); err != nil {
		t.Fatal(err)
	}
	return n, logBuf.String()
}

// TestCacheHardening: the known-peers cache is not followed through a
// symbolic link; a mode open to group or others is warned about; a cache
// written for another node key than the state's login is refused.
func TestCacheHardening(t *testing.T) {
	p := peer(1)
	self := key.NewNode()
	now := time.Now()

	t.Run("symlink", func(t *testing.T) {
		dir, elsewhere := t.TempDir(), t.TempDir()
		cacheFor(t, elsewhere, key.NodePublic{}, p, now, 0o600)
		if err := os.Symlink(filepath.Join(elsewhere, KnownPeersFile), filepath.Join(dir, KnownPeersFile)); err != nil {
			t.Fatal(err)
		}
		n, log := loadWithLog(t, dir)
		if known, ready := n.KnowsNodeKey(p.Key); known || ready {
			t.Errorf("a cache behind a symlink answers: known=%v ready=%v", known, ready)
		}
		if !strings.Contains(log, "level=WARN") || !strings.Contains(log, "symbolic link") {
			t.Errorf("no warning naming the symlink:\n%s", log)
		}
		if r := n.Readiness(); r.Admits != AdmitsNobody {
			t.Errorf("readiness %v, want admits=nobody", r)
		}
	})
	t.Run("mode", func(t *testing.T) {
		dir := t.TempDir()
		cacheFor(t, dir, key.NodePublic{}, p, now, 0o644)
		n, log := loadWithLog(t, dir)
		if known, ready := n.KnowsNodeKey(p.Key); !known || !ready {
			t.Errorf("a 0644 cache: known=%v ready=%v, want used (with a warning)", known, ready)
		}
		if !strings.Contains(log, "level=WARN") || !strings.Contains(log, "mode=0644") {
			t.Errorf("no warning about mode 0644:\n%s", log)
		}
		dir = t.TempDir()
		cacheFor(t, dir, key.NodePublic{}, p, now, 0o600)
		if _, log := loadWithLog(t, dir); strings.Contains(log, "level=WARN") {
			t.Errorf("a 0600 cache warned:\n%s", log)
		}
	})
	t.Run("self", func(t *testing.T) {
		dir := t.TempDir()
		writeLogin(t, dir, self)
		if k, ok := stateNodeKey(dir); !ok || k != self.Public() {
			t.Fatalf("stateNodeKey = %v, %v; want %v", k.ShortString(), ok, self.Public().ShortString())
		}
		cacheFor(t, dir, key.NewNode().Public(), p, now, 0o600)
		n, log := loadWithLog(t, dir)
		if known, ready := n.KnowsNodeKey(p.Key); known || ready {
			t.Errorf("another node's cache answers: known=%v ready=%v", known, ready)
		}
		if !strings.Contains(log, "level=WARN") || !strings.Contains(log, "another node") {
			t.Errorf("no warning about another node's cache:\n%s", log)
		}
		cacheFor(t, dir, self.Public(), p, now, 0o600)
		n, _ = loadWithLog(t, dir)
		if known, ready := n.KnowsNodeKey(p.Key); !known || !ready {
			t.Errorf("this node's cache: known=%v ready=%v", known, ready)
		}
		r := n.Readiness()
		if r.Admits != AdmitsFromCache || r.Problem != ProblemStarting || !r.Netmap.Equal(now.Round(0)) && !r.Netmap.Equal(now) ||
			!r.Until.Equal(r.Netmap.Add(time.Hour)) {
			t.Errorf("readiness after Load from the cache: %v", r)
		}
	})
}

// TestCacheMaxAgeOneRule: whether a cache file is loaded (usableCache)
// and whether the set answers from it (answeringLocked) are one rule: at
// every instant around the maximum age they agree, and the boundary is
// the one documented (admitted strictly before lastLive+maxAge). A rule
// changed in one place only fails here.
func TestCacheMaxAgeOneRule(t *testing.T) {
	const maxAge = time.Hour
	p := peer(1)
	for _, maxAge := range []time.Duration{maxAge, time.Nanosecond, 0} {
		s, clk := newTestKeySet(maxAge)
		received := clk.t
		c := &cacheFile{Version: cacheVersion, Received: received, Nodes: []cacheNode{{Key: p.Key, ID: p.ID}}}
		s.loadCache(c)
		for _, at := range []time.Duration{0, maxAge - time.Nanosecond, maxAge, maxAge + time.Nanosecond, 2 * maxAge} {
			now := received.Add(at)
			clk.t = now
			_, answers := s.contains(p.Key)
			loads := usableCache(c, key.NodePublic{}, maxAge, now) == nil
			want := maxAge > 0 && at < maxAge
			if answers != want || loads != want {
				t.Errorf("maxAge %v, age %v: the set answers %v, the file would load %v; want %v", maxAge, at, answers, loads, want)
			}
			if want && !s.until().Equal(received.Add(maxAge)) {
				t.Errorf("maxAge %v: until %v, want %v", maxAge, s.until(), received.Add(maxAge))
			}
		}
	}
	// A live map that stops being live answers by the same rule, from
	// the moment it stopped.
	s, clk := newTestKeySet(maxAge)
	s.apply(&ipn.Notify{SelfChange: &tailcfg.Node{Key: key.NewNode().Public()}, PeersChanged: []*tailcfg.Node{p}})
	stopped := clk.t.Add(-time.Minute)
	s.notLive(stopped)
	clk.t = stopped.Add(maxAge - time.Nanosecond)
	if k, ready := s.contains(p.Key); !k || !ready {
		t.Errorf("just before stopped+maxAge: known=%v ready=%v", k, ready)
	}
	clk.t = stopped.Add(maxAge)
	if _, ready := s.contains(p.Key); ready {
		t.Error("at stopped+maxAge the set still answers")
	}
	// maxAge 0: nobody at once.
	s0, _ := newTestKeySet(0)
	self0 := key.NewNode().Public()
	s0.apply(&ipn.Notify{SelfChange: &tailcfg.Node{Key: self0}, PeersChanged: []*tailcfg.Node{p}})
	wantDrops(t, "not live, cache off", s0.notLive(time.Now()), Drop{Key: p.Key, Reason: DropNoAnswer}, Drop{Key: self0, Reason: DropNoAnswer})
}

// TestRefusalLogFormat pins the log line the node reads for the control
// server's refusals (see Liveness in control.go): controlclient's
// sendMapRequest error, as LocalBackend and the update routine log it,
// for Headscale's deletion and testcontrol's.
func TestRefusalLogFormat(t *testing.T) {
	for _, tt := range []struct {
		line string
		want Problem
	}{
		{"lite map update error after 12ms: initial fetch failed 404: node not found", ProblemNodeRemoved},
		{"Received error: PollNetMap: initial fetch failed 404: node not found", ProblemNodeRemoved},
		{"[v1] PollNetMap: initial fetch failed 400: node doesn't match machine key", ProblemNodeRemoved},
		{"Received error: PollNetMap: initial fetch failed 401: unauthorized", ProblemControlRefused},
		{"Received error: PollNetMap: initial fetch failed 403: forbidden", ProblemControlRefused},
		{"Received error: PollNetMap: initial fetch failed 500: internal error", ""},
		{"Received error: PollNetMap: initial fetch failed 400: request canceled", ""},
		{"Received error: PollNetMap: Post \"http://127.0.0.1:1/machine/map\": connection refused", ""},
	} {
		n := &Node{}
		n.noteTsnetLog(tt.line)
		_, p, active := n.control.refusalLocked(time.Now())
		if p != tt.want || active != (tt.want != "") {
			t.Errorf("%q: problem %q active %v, want %q", tt.line, p, active, tt.want)
		}
	}
}

// TestMoveStateAside: the old state is renamed, not deleted, and at most
// keepOldStates are kept, the newest.
func TestMoveStateAside(t *testing.T) {
	dir := t.TempDir()
	t0 := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	var moved []string
	for i := range 4 {
		if err := os.WriteFile(filepath.Join(dir, StateFile), []byte{byte('0' + i)}, 0o600); err != nil {
			t.Fatal(err)
		}
		to, err := moveStateAside(dir, t0.Add(time.Duration(i)*time.Hour))
		if err != nil || to == "" {
			t.Fatalf("move %d: %q, %v", i, to, err)
		}
		moved = append(moved, to)
	}
	olds, _ := filepath.Glob(filepath.Join(dir, StateFile+".old-*"))
	if len(olds) != keepOldStates || olds[0] != moved[2] || olds[1] != moved[3] {
		t.Errorf("kept %v, want the newest %d: %v", olds, keepOldStates, moved[2:])
	}
	if b, _ := os.ReadFile(moved[3]); string(b) != "3" {
		t.Errorf("newest kept holds %q", b)
	}
	if to, err := moveStateAside(dir, t0); to != "" || err != nil {
		t.Errorf("no state: %q, %v", to, err)
	}
}
