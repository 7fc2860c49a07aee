package node

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tailscale.com/ipn"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/testutil"
)

// liveSet is a key set with a live map of peers.
func liveSet(peers ...*tailcfg.Node) *keySet {
	s := newKeySet(time.Hour)
	s.apply(&ipn.Notify{SelfChange: &tailcfg.Node{Key: key.NewNode().Public(), Name: "relay.ts.net."}, PeersChanged: peers})
	return s
}

func TestCacheRoundTrip(t *testing.T) {
	p1, p2, expired := peer(1), peer(2), peer(3)
	expired.Expired = true
	path := filepath.Join(t.TempDir(), KnownPeersFile)
	w := &cacheWriter{path: path, keys: liveSet(p1, p2, expired), rename: os.Rename}
	if err := w.writeIfChanged(false); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
	mod := fi.ModTime()
	// Unchanged: no second write.
	if err := w.writeIfChanged(false); err != nil {
		t.Fatal(err)
	}
	if fi2, _ := os.Stat(path); !fi2.ModTime().Equal(mod) {
		t.Error("unchanged set written again")
	}

	c, _, err := readCache(path)
	if err != nil {
		t.Fatal(err)
	}
	s := newKeySet(time.Hour)
	s.loadCache(c)
	mustContain(t, s, p1.Key, true)
	mustContain(t, s, p2.Key, true)
	mustContain(t, s, expired.Key, false)
	if s.name(p1.Key) != p1.Name || s.size() != 2 {
		t.Errorf("from the file: name %q, size %d; want %q, 2", s.name(p1.Key), s.size(), p1.Name)
	}
}

// TestCacheCorruptFiles: anything but a whole file of this layout is an
// error, never a partial set.
func TestCacheCorruptFiles(t *testing.T) {
	k1, k2 := key.NewNode().Public(), key.NewNode().Public()
	good, err := os.ReadFile(writeTestCache(t, peer(1)))
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{
		"truncated":     good[:len(good)/2],
		"empty":         nil,
		"not JSON":      []byte("hello"),
		"other version": bytes.Replace(good, []byte(`"version": 1`), []byte(`"version": 9`), 1),
		"no time":       []byte(`{"version":1,"nodes":[]}`),
		"key twice":     nodesFile(k1, 1, k1, 2),
		"ID twice":      nodesFile(k1, 1, k2, 1),
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), KnownPeersFile)
			os.WriteFile(path, b, 0o600)
			if c, _, err := readCache(path); err == nil {
				t.Errorf("readCache accepted it: %+v", c)
			}
		})
	}
}

// nodesFile is a cache file listing keys with node IDs (key, id, key, id…).
func nodesFile(kv ...any) []byte {
	var nodes []string
	for i := 0; i < len(kv); i += 2 {
		k, _ := kv[i].(key.NodePublic).MarshalText()
		nodes = append(nodes, fmt.Sprintf(`{"key":%q,"id":%d}`, k, kv[i+1]))
	}
	return fmt.Appendf(nil, `{"version":1,"netmap_received":%q,"nodes":[%s]}`, time.Now().UTC().Format(time.RFC3339), strings.Join(nodes, ","))
}

// TestCacheFromTheFuture: a file that says it was written in the future
// (the clock went back, or the file is not ours) is not used: its age
// cannot be told, and it would answer past the maximum age.
func TestCacheFromTheFuture(t *testing.T) {
	dir := t.TempDir()
	p1 := peer(1)
	k, _ := p1.Key.MarshalText()
	future := fmt.Sprintf(`{"version":1,"netmap_received":%q,"nodes":[{"key":%q,"id":1}]}`, time.Now().Add(24*time.Hour).UTC().Format(time.RFC3339), k)
	if err := os.WriteFile(filepath.Join(dir, KnownPeersFile), []byte(future), 0o600); err != nil {
		t.Fatal(err)
	}
	var logBuf testutil.Buffer
	n := &Node{Dir: dir, CacheMaxAge: time.Hour, Logger: slog.New(slog.NewTextHandler(&logBuf, nil))}
	if err := n.Load(); err != nil {
		t.Fatal(err)
	}
	if known, ready := n.KnowsNodeKey(p1.Key); known || ready {
		t.Errorf("answered from a cache written in the future: known=%v ready=%v", known, ready)
	}
	if !strings.Contains(logBuf.String(), "level=WARN") || !strings.Contains(logBuf.String(), "future") {
		t.Errorf("no warning about the time:\n%s", logBuf.String())
	}
}

func writeTestCache(t testing.TB, peers ...*tailcfg.Node) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), KnownPeersFile)
	w := &cacheWriter{path: path, keys: liveSet(peers...), rename: os.Rename}
	if err := w.writeIfChanged(false); err != nil {
		t.Fatal(err)
	}
	return path
}

// crashEnv makes the test binary, re-run as a child, write a cache file
// and die between writing the temporary file and renaming it.
const crashEnv = "TAILDERP_TEST_CACHE_CRASH"

// TestCacheCrashBeforeRename: a process killed between writing the new
// cache and renaming it over the old one leaves the old file whole; the
// next start reads the old one and clears the leftover.
func TestCacheCrashBeforeRename(t *testing.T) {
	if path := os.Getenv(crashEnv); path != "" {
		// The child: write another set, and die where a crash would.
		w := &cacheWriter{path: path, keys: liveSet(peer(7), peer(8)), rename: func(string, string) error {
			os.Exit(7) // no deferred cleanup runs, as in a crash
			return nil
		}}
		w.writeIfChanged(false)
		os.Exit(1) // not reached
	}

	old := peer(1)
	path := writeTestCache(t, old)
	before, _ := os.ReadFile(path)
	cmd := exec.Command(os.Args[0], "-test.run=^TestCacheCrashBeforeRename$")
	cmd.Env = append(os.Environ(), crashEnv+"="+path)
	err := cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 7 {
		t.Fatalf("child: %v, want exit status 7 (died before the rename)", err)
	}
	after, _ := os.ReadFile(path)
	if !bytes.Equal(before, after) {
		t.Fatal("the cache file changed although the writer died before renaming")
	}
	temps, _ := filepath.Glob(path + ".tmp*")
	if len(temps) != 1 {
		t.Fatalf("leftover temporary files %q, want the one the crash left", temps)
	}

	// A node starting now reads the old set and removes the leftover.
	var logBuf bytes.Buffer
	n := &Node{Dir: filepath.Dir(path), CacheMaxAge: time.Hour, Logger: slog.New(slog.NewTextHandler(&logBuf, nil))}
	n.Logger.Info("start")
	if err := n.Load(); err != nil {
		t.Fatal(err)
	}
	mustContain(t, n.keys, old.Key, true)
	if temps, _ := filepath.Glob(path + ".tmp*"); len(temps) != 0 {
		t.Errorf("leftover %q not removed", temps)
	}
	if strings.Contains(logBuf.String(), "level=WARN") {
		t.Errorf("warned about a good cache:\n%s", logBuf.String())
	}
}

// TestNodeStartsFailClosedOnCorruptCache: a corrupt cache gives one
// warning, the node starts (never fatal), and it admits nobody until it
// has a network map. The control server is a closed loopback port.
func TestNodeStartsFailClosedOnCorruptCache(t *testing.T) {
	dir := t.TempDir()
	path := writeTestCache(t, peer(1))
	good, _ := os.ReadFile(path)
	if err := os.WriteFile(filepath.Join(dir, KnownPeersFile), good[:len(good)-20], 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TS_NO_LOGS_NO_SUPPORT", "true")
	var logBuf testutil.Buffer
	n := &Node{Dir: dir, Hostname: "corrupt-cache-test", ControlURL: "http://127.0.0.1:1", CacheMaxAge: time.Hour,
		Logger: slog.New(slog.NewTextHandler(&logBuf, nil))}
	if err := n.Start(); err != nil {
		t.Fatalf("Start with a corrupt cache: %v", err)
	}
	defer n.Close()
	if _, ready := n.KnowsNodeKey(peer(1).Key); ready {
		t.Error("a node with a corrupt cache and no network map answers")
	}
	if st := n.Status(); st.Source != SourceNone {
		t.Errorf("source %s, want none", st.Source)
	}
	if got := strings.Count(logBuf.String(), "ignoring the known-peers cache"); got != 1 {
		t.Errorf("%d warnings about the cache, want 1:\n%s", got, logBuf.String())
	}
	select {
	case err := <-n.Fatal():
		t.Errorf("node stopped: %v", err)
	default:
	}
}

// TestLoadAnswersBeforeStart: Load reads the cache, so the node answers
// (and admission may hold strangers for it) before it logs in, and it
// writes nothing: a server that then fails to bind a port leaves no login
// state behind. Start after Load keeps the loaded answers.
func TestLoadAnswersBeforeStart(t *testing.T) {
	dir := t.TempDir()
	p1, stranger := peer(1), peer(2)
	good, err := os.ReadFile(writeTestCache(t, p1))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, KnownPeersFile), good, 0o600); err != nil {
		t.Fatal(err)
	}
	n := &Node{Dir: filepath.Join(dir, "node"), Hostname: "load-test", ControlURL: "http://127.0.0.1:1", CacheMaxAge: time.Hour}
	if known, ready := n.KnowsNodeKey(p1.Key); known || ready {
		t.Fatalf("before Load: known=%v ready=%v, want no answer", known, ready)
	}
	n.Dir = dir
	if err := n.Load(); err != nil {
		t.Fatalf("Load: %v", err)
	}
	if known, ready := n.KnowsNodeKey(p1.Key); !known || !ready {
		t.Errorf("cached peer after Load: known=%v ready=%v", known, ready)
	}
	if known, ready := n.KnowsNodeKey(stranger.Key); known || !ready {
		t.Errorf("stranger after Load: known=%v ready=%v", known, ready)
	}
	if n.Settling() == nil {
		t.Error("a loaded node is not settling: admission would refuse instead of holding")
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != KnownPeersFile {
		t.Errorf("Load changed the state directory: %v", entries)
	}

	t.Setenv("TS_NO_LOGS_NO_SUPPORT", "true")
	if err := n.Start(); err != nil {
		t.Fatalf("Start after Load: %v", err)
	}
	defer n.Close()
	if known, ready := n.KnowsNodeKey(p1.Key); !known || !ready {
		t.Errorf("cached peer after Start: known=%v ready=%v", known, ready)
	}
}
