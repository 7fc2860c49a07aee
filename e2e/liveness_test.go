package e2e

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/testtailnet"
	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/node"
)

// TestRelayNodeDeleted: the control server forgets the relay's own node
// (as deleting it in Headscale does; testtailnet's ForgetNode). Through
// the binary (node/liveness_test.go proves the node alone):
//   - the relay logs a WARN within 60 s naming the control server and the
//     fix (with the reusable key it has, it logs in again by itself);
//   - `check -local` passes with ⚠ while the relay admits from the last
//     map, and ✓ once it logged in again as a new node;
//   - a client removed from the tailnet after that is refused within 90 s
//     of its removal, while a remaining member is still admitted.
func TestRelayNodeDeleted(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 240*time.Second)
	defer cancel()
	p, ctl := tailnetWithRelay(t, relayOpts{})
	stay, leave := key.NewNode(), key.NewNode()
	ctl.AddNode(t, stay.Public(), "stay.tailnet.example.")
	ctl.AddNode(t, leave.Public(), "leave.tailnet.example.")
	mustAdmit(ctx, t, p, stay).c.Close()
	mustAdmit(ctx, t, p, leave).c.Close()
	if r := waitCheckLocal(t, p, 10*time.Second, "✓ tailnet default: "); r.code != 0 {
		t.Fatalf("check -local before the deletion: exit %d:\n%s", r.code, r.out)
	}

	relay := relayNodeKey(ctx, t, ctl)
	deleted := time.Now()
	ctl.ForgetNode(t, relay)
	const warning = `level=WARN msg="node: the control server no longer knows this node`
	p.waitLog(warning, 60*time.Second)
	t.Logf("measured: WARN %v after the relay's node was forgotten", time.Since(deleted).Round(time.Millisecond))
	line := testutil.Lines(p.proc.Output.String(), warning)[0]
	for _, want := range []string{"url=" + ctl.URL, "fix=", "TAILSCALE_AUTH_KEY", "logs in again"} {
		if !strings.Contains(line, want) {
			t.Errorf("the warning does not say %q:\n%s", want, line)
		}
	}

	// Until the re-login the relay admits from its last map: check -local
	// passes, with a warning that says so.
	r := waitCheckLocal(t, p, 30*time.Second, "⚠ tailnet default: ")
	t.Logf("measured: check -local shows ⚠ %v after the deletion; exit %d:\n%s", time.Since(deleted).Round(time.Millisecond), r.code, r.out)
	if l := lineWith(r.out, "⚠ tailnet default: "); r.code != 0 || !strings.Contains(l, "known-peers cache") ||
		!strings.Contains(l, "no longer knows this node") || !strings.Contains(l, "fix: ") {
		t.Errorf("check -local while admitting from the last map: exit %d, want 0 with a ⚠ line naming the cache, the cause and the fix:\n%s", r.code, r.out)
	}

	// A client removed after the deletion: refused within 90 s.
	removed := time.Now()
	ctl.RemoveNode(t, leave.Public())
	for {
		dp, admitted := dialDERP(ctx, t, p, leave)
		if !admitted {
			break
		}
		dp.c.Close()
		if time.Since(removed) > 90*time.Second {
			t.Fatalf("the client removed after the relay's node was deleted is still admitted 90 s after its removal")
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("measured: the client removed after the deletion is refused %v after its removal (%v after the deletion)",
		time.Since(removed).Round(time.Millisecond), time.Since(deleted).Round(time.Millisecond))
	mustAdmit(ctx, t, p, stay).c.Close()
	if now := relayNodeKeys(ctl); len(now) != 2 {
		t.Errorf("control knows %d nodes of the relay, want 2 (the forgotten one and the new login)", len(now))
	}
	// One re-login: the forgotten node's state kept aside once.
	if olds, _ := filepath.Glob(filepath.Join(p.StateDir, "tailscale", node.StateFile+".old-*")); len(olds) != 1 {
		t.Errorf("old node states kept aside: %q, want one (one re-login)", olds)
	}
	if n := strings.Count(p.proc.Output.String(), "node: logging in again as a new node"); n != 1 {
		t.Errorf("the relay logged in again %d times, want once", n)
	}

	r = waitCheckLocal(t, p, 30*time.Second, "✓ tailnet default: ")
	t.Logf("measured: check -local shows ✓ again %v after the deletion; exit %d:\n%s", time.Since(deleted).Round(time.Millisecond), r.code, r.out)
	if r.code != 0 || strings.Contains(r.out, "⚠ ") {
		t.Errorf("check -local after the re-login: exit %d, want 0 and no warning:\n%s", r.code, r.out)
	}
}

// waitCheckLocal runs `check -local -state-dir` of p until its output has
// a line starting with prefix, for at most d, and returns that run (or
// fails the test with the last one).
func waitCheckLocal(t *testing.T, p *relayProc, d time.Duration, prefix string) checkRun {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		r := runCheck(t, nil, "-local", "-state-dir", p.StateDir, "-timeout", "5s")
		if lineWith(r.out, prefix) != "" {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("check -local shows no %q line within %v; last (exit %d):\n%s", prefix, d, r.code, r.out)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// relayNodeKeys lists the node keys control holds for the relay's node
// (by its hostname), the forgotten ones included.
func relayNodeKeys(ctl *testtailnet.Control) []key.NodePublic {
	var out []key.NodePublic
	for _, n := range ctl.Server.AllNodes() {
		if n.Hostinfo.Valid() && n.Hostinfo.Hostname() == "127-0-0-1" {
			out = append(out, n.Key)
		}
	}
	return out
}
