package e2e

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/node"
)

// TestShutdownWritesTheLastMap: on SIGTERM tailderp stops serving at once
// and exits 0, its clients are disconnected (by the exit: it no longer
// closes them one by one), serving.json is removed, and the known-peers
// cache holds the node that joined just before, although the periodic
// write (at most every 5 s) has not run since: the shutdown wrote it.
func TestShutdownWritesTheLastMap(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p, ctl := tailnetWithRelay(t, relayOpts{})
	cache := filepath.Join(p.StateDir, "tailscale", node.KnownPeersFile)
	// The first periodic write, of the first map: the next one cannot come
	// for 5 s.
	waitFile(ctx, t, cache)
	joined := key.NewNode()
	ctl.AddNode(t, joined.Public(), "joined.tailnet.example.")
	c := mustAdmit(ctx, t, p, joined) // the relay's set has it now

	if err := p.stop(); err != nil {
		t.Fatalf("stop: %v (want exit status 0)", err)
	}
	out := p.proc.Output.String()
	if !strings.Contains(out, "stopped serving") {
		t.Errorf("no \"stopped serving\" line:\n%s", out)
	}
	select {
	case <-c.closed:
	case <-ctx.Done():
		t.Fatal("the client is still connected after the relay exited")
	}
	b, err := os.ReadFile(cache)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), joined.Public().String()) {
		t.Errorf("the known-peers cache lacks the node that joined before the shutdown:\n%s", b)
	}
	if _, err := os.Stat(filepath.Join(p.StateDir, "serving.json")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("serving.json after the shutdown: %v", err)
	}
}

// waitFile waits until path exists.
func waitFile(ctx context.Context, t *testing.T, path string) {
	t.Helper()
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s never written", path)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
