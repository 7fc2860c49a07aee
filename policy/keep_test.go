package policy

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/internal/testpolicy"
)

// logBuffer collects log lines from several goroutines.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuffer) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// waitFor polls cond until it holds, failing the test after 20 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// runKeeper runs k until the test ends, and checks that Run returns when
// its context is cancelled.
func runKeeper(t *testing.T, k *Keeper, regions <-chan *tailcfg.DERPRegion) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		k.Run(ctx, regions)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("Keeper.Run did not return after its context was cancelled")
		}
	})
}

func regionWith(hosts ...string) *tailcfg.DERPRegion {
	r := &tailcfg.DERPRegion{RegionID: 900, RegionCode: "tailderp", RegionName: "tailderp"}
	for i, h := range hosts {
		r.Nodes = append(r.Nodes, &tailcfg.DERPNode{Name: "900" + string(rune('a'+i)), RegionID: 900, HostName: h})
	}
	return r
}

func TestKeeperWritesAtStartAndAfterAChangeOnly(t *testing.T) {
	api := newStandIn(t, policyFile)
	var logs logBuffer
	regions := make(chan *tailcfg.DERPRegion)
	runKeeper(t, &Keeper{Client: clientOf(api, apiKey), Logger: logs.logger(), Settle: time.Millisecond, Resync: -1}, regions)

	regions <- regionWith("a.example")
	waitFor(t, "the first write", func() bool { return api.Calls("written") == 1 })
	if got := regionsOf(t, []byte(api.File()))["900"]; got == nil || len(got.Nodes) != 1 || got.Nodes[0].HostName != "a.example" {
		t.Errorf("region 900 as written: %+v", got)
	}
	// The same region again is no change: not even read. Then a change.
	regions <- regionWith("a.example")
	regions <- regionWith("a.example", "b.example")
	// The log line comes after the API's answer: wait for it.
	waitFor(t, "the write of the change", func() bool { return strings.Count(logs.String(), "level=INFO") == 2 })
	if got := regionsOf(t, []byte(api.File()))["900"]; got == nil || len(got.Nodes) != 2 {
		t.Errorf("region 900 after the change: %+v", got)
	}
	if n := api.Calls("GET /acl"); n != 2 {
		t.Errorf("the file was read %d times, want 2 (the repeated region is no change)", n)
	}
	// The rest of the file is kept.
	if f := api.File(); !strings.Contains(f, "// The office relay, managed by hand.") || !strings.Contains(f, `"action": "accept"`) {
		t.Errorf("the write lost the rest of the file:\n%s", f)
	}
	out := logs.String()
	for _, want := range []string{"policy file: region 900 written, 1 node", "policy file: region 900 written, 2 nodes"} {
		if !strings.Contains(out, want) {
			t.Errorf("no log line %q in:\n%s", want, out)
		}
	}
	if n := strings.Count(out, "level=INFO"); n != 2 {
		t.Errorf("%d INFO lines, want one per write (2):\n%s", n, out)
	}
	secretsFree(t, "the log", out)
}

func TestKeeperCoalescesABurst(t *testing.T) {
	api := newStandIn(t, policyFile)
	// Three regions queued before Run reads any: one settle, one write.
	regions := make(chan *tailcfg.DERPRegion, 3)
	regions <- regionWith("a.example")
	regions <- regionWith("a.example", "b.example")
	regions <- regionWith("a.example", "b.example", "c.example")
	var logs logBuffer
	runKeeper(t, &Keeper{Client: clientOf(api, apiKey), Logger: logs.logger(), Settle: time.Second, Resync: -1}, regions)

	waitFor(t, "the write", func() bool { return api.Calls("written") == 1 })
	if got := regionsOf(t, []byte(api.File()))["900"]; got == nil || len(got.Nodes) != 3 {
		t.Errorf("region 900 as written: %+v, want the last of the burst (3 nodes)", got)
	}
	if n := api.Calls("GET /acl"); n != 1 {
		t.Errorf("the file was read %d times, want 1 for the burst", n)
	}
}

func TestKeeperResyncPutsBackARegionEditedOut(t *testing.T) {
	api := newStandIn(t, policyFile)
	var logs logBuffer
	regions := make(chan *tailcfg.DERPRegion, 1)
	regions <- regionWith("a.example")
	runKeeper(t, &Keeper{Client: clientOf(api, apiKey), Logger: logs.logger(), Settle: time.Millisecond, Resync: 20 * time.Millisecond}, regions)

	waitFor(t, "the first write", func() bool { return api.Calls("written") == 1 })
	api.SetFile(policyFile) // someone takes region 900 out by hand
	waitFor(t, "the region written again", func() bool { return api.Calls("written") == 2 })
	if regionsOf(t, []byte(api.File()))["900"] == nil {
		t.Errorf("region 900 is not back:\n%s", api.File())
	}
}

func TestKeeperBacksOffOnAPIErrorsAndRecovers(t *testing.T) {
	api := newStandIn(t, policyFile)
	api.Fail["GET /acl"] = 500
	api.FailBody = `{"message":"internal error"}`
	var logs logBuffer
	regions := make(chan *tailcfg.DERPRegion, 1)
	regions <- regionWith("a.example")
	k := &Keeper{
		Client: clientOf(api, apiKey), Logger: logs.logger(),
		Settle: time.Millisecond, Backoff: 20 * time.Millisecond, MaxBackoff: 80 * time.Millisecond, Resync: -1,
		Advice: func(err error) string {
			if _, ok := errors.AsType[*APIError](err); ok {
				return "check TAILSCALE_API_KEY"
			}
			return ""
		},
	}
	runKeeper(t, k, regions)

	waitFor(t, "five failed attempts", func() bool { return strings.Count(logs.String(), "level=WARN") >= 5 })
	api.Update(func(s *testpolicy.StandIn) { delete(s.Fail, "GET /acl") })
	waitFor(t, "the write once the API is back", func() bool { return strings.Contains(logs.String(), "level=INFO") })

	out := logs.String()
	var waits []time.Duration
	for _, line := range strings.Split(out, "\n") {
		if !strings.Contains(line, "level=WARN") {
			continue
		}
		for _, want := range []string{`msg="policy file: region 900 not written; trying again later"`, "500 Internal Server Error", "internal error", `fix="check TAILSCALE_API_KEY"`} {
			if !strings.Contains(line, want) {
				t.Errorf("warning without %s: %s", want, line)
			}
		}
		_, v, _ := strings.Cut(line, "retry_in=")
		v, _, _ = strings.Cut(v, " ")
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("warning without a retry_in duration: %s", line)
		}
		waits = append(waits, d)
	}
	// 20 ms doubling to 80 ms, each ±20%.
	if len(waits) < 5 || waits[0] < 16*time.Millisecond || waits[0] > 24*time.Millisecond ||
		waits[1] <= waits[0] || waits[2] <= waits[1] {
		t.Errorf("waits between attempts %v: want 20ms, 40ms, 80ms… (±20%%)", waits)
	}
	for _, w := range waits {
		if w > 96*time.Millisecond {
			t.Errorf("a wait of %v is over MaxBackoff (80ms) +20%%: %v", w, waits)
		}
	}
	if !strings.Contains(out, "policy file: region 900 written, 1 node") {
		t.Errorf("no INFO line for the write after recovering:\n%s", out)
	}
	secretsFree(t, "the log", out)
}

func TestKeeperLogsNoCredential(t *testing.T) {
	api := newStandIn(t, policyFile)
	// A hostile API that echoes the Authorization header, refusing the
	// OAuth client's tokens: the warning must not carry them.
	api.EchoAuth = true
	api.RevokeAll = true
	var logs logBuffer
	regions := make(chan *tailcfg.DERPRegion, 1)
	regions <- regionWith("a.example")
	c := clientOf(api, Credentials{OAuthClientID: testClientID, OAuthClientSecret: testClientSecret})
	runKeeper(t, &Keeper{Client: c, Logger: logs.logger(), Settle: time.Millisecond, Backoff: time.Millisecond, MaxBackoff: time.Millisecond}, regions)

	waitFor(t, "two failed attempts", func() bool { return strings.Count(logs.String(), "level=WARN") >= 2 })
	out := logs.String()
	if !strings.Contains(out, "401 Unauthorized") {
		t.Errorf("the warning does not say 401:\n%s", out)
	}
	secretsFree(t, "the log", out)
	if api.Calls("written") != 0 {
		t.Error("written with revoked tokens")
	}
}
