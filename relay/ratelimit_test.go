package relay_test

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/metrics"

	"github.com/tailderp/tailderp/relay"

	"github.com/tailderp/tailderp/internal/testutil"
)

// minBurst is derpserver's smallest token bucket: one DERP packet and a
// key (derpserver.minRateLimitTokenBucketSize).
const minBurst = derp.MaxPacketSize + derp.KeyLen

// writeRateConfig writes a rate config file with the given limit (bytes
// per second) and the smallest burst.
func writeRateConfig(t *testing.T, path string, bytesPerSec int) {
	t.Helper()
	js := fmt.Sprintf(`{"PerClientRateLimitBytesPerSec": %d, "PerClientRateBurstBytes": %d}`, bytesPerSec, minBurst)
	replaceFile(t, path, js)
}

// replaceFile puts data at path in one step (temporary file + rename), as
// an operator's tools do, so a poll never reads a half-written file.
func replaceFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path+".tmp", []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		t.Fatal(err)
	}
}

// transfer sends n packets of size bytes from a to b and returns how long
// b took to receive the last one, and the DERP frame bytes a sent (what
// the limit counts: the destination key and the payload). The relay may
// drop some of the first burst (the receiver's queue holds 32 packets),
// but the limit paces the rest, so the last packet arrives.
func transfer(t *testing.T, a *derphttp.Client, b *derphttp.Client, bIn *inbox, n, size int) (time.Duration, int) {
	t.Helper()
	payload := bytes.Repeat([]byte{'x'}, size)
	last := bytes.Repeat([]byte{'L'}, size)
	start := time.Now()
	sendErr := make(chan error, 1)
	go func() {
		for i := range n {
			p := payload
			if i == n-1 {
				p = last
			}
			if err := a.Send(b.SelfPublicKey(), p); err != nil {
				sendErr <- err
				return
			}
		}
		sendErr <- nil
	}()
	timeout := time.After(30 * time.Second)
	got := 0
	for done := false; !done; {
		select {
		case m := <-bIn.msgs:
			if p, ok := m.(derp.ReceivedPacket); ok && p.Source == a.SelfPublicKey() {
				got++
				done = p.Data[0] == 'L'
			}
		case err := <-bIn.err:
			t.Fatalf("receiver's connection ended after %d of %d packets: %v", got, n, err)
		case <-timeout:
			t.Fatalf("received %d of %d packets in 30 s, not the last", got, n)
		}
	}
	took := time.Since(start)
	if err := <-sendErr; err != nil {
		t.Fatal(err)
	}
	if got < n {
		t.Logf("the relay dropped %d of %d packets (the first burst)", n-got, n)
	}
	return took, n * (size + derp.KeyLen)
}

// TestRateLimitSlowsAClient: a client sending faster than the rate config
// allows is slowed to it (its packets all arrive, later), and a new file
// applied with Reload (what main does on SIGHUP) changes the limit for the
// same open connection. Times are only checked from below, generously:
// TCP backpressure paces exactly, but the machine is shared.
func TestRateLimitSlowsAClient(t *testing.T) {
	t.Parallel()
	certs, pool := selfSigned(t)
	s := startRelay(t, certs)
	path := filepath.Join(t.TempDir(), "rate.json")
	const rate1, rate2 = 256 << 10, 64 << 10
	writeRateConfig(t, path, rate1)
	var logBuf testutil.Buffer
	// A long poll: this test reloads by hand, as on SIGHUP.
	w, err := relay.WatchRateConfig(s, path, time.Hour, slog.New(slog.NewTextHandler(&logBuf, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close)

	a, b := newClient(t, s, pool), newClient(t, s, pool)
	aIn, bIn := watch(a), watch(b)
	aIn.mustBeAdmitted(t)
	bIn.mustBeAdmitted(t)

	phase := func(name string, rate, n int) {
		t.Helper()
		took, sent := transfer(t, a, b, bIn, n, 1024)
		// A fresh limiter starts with a full bucket: the first burst is
		// free.
		implied := time.Duration(float64(sent-minBurst) / float64(rate) * float64(time.Second))
		measured := float64(sent-minBurst) / took.Seconds()
		t.Logf("%s: %d frame bytes in %v: %.0f bytes/s past the burst, limit %d bytes/s (%.0f%%); the limit implies at least %v",
			name, sent, took.Round(time.Millisecond), measured, rate, 100*measured/float64(rate), implied.Round(time.Millisecond))
		if took < implied/2 {
			t.Errorf("%s: took %v, less than half the %v the limit of %d bytes/s implies", name, took, implied, rate)
		}
	}
	phase("limit 256 KiB/s", rate1, 512)

	writeRateConfig(t, path, rate2)
	changed, err := w.Reload()
	if err != nil || !changed {
		t.Fatalf("Reload = %v, %v; want changed", changed, err)
	}
	if got := w.Applied().PerClientRateLimitBytesPerSec; got != rate2 {
		t.Errorf("Applied = %d bytes/s, want %d", got, rate2)
	}
	phase("after Reload, limit 64 KiB/s", rate2, 192)

	if n := derpCounter(t, s, "accepts"); n != 2 {
		t.Errorf("DERP accepts = %d, want 2: a client reconnected", n)
	}
	if waited := derpCounter(t, s, "rate_limit_per_client_waited"); waited == 0 {
		t.Error("derpserver never waited for the rate limit")
	}
	if !strings.Contains(logBuf.String(), "per_client_bytes_per_sec=65536") {
		t.Errorf("the new limit is not logged:\n%s", logBuf.String())
	}
}

// TestRateConfigBadFileKeepsLimits: a file that stops loading (bad JSON, a
// misspelled field, gone) keeps the limits in force, and each bad version
// is logged once however often the file is polled; a good version is
// picked up by the poll alone.
func TestRateConfigBadFileKeepsLimits(t *testing.T) {
	t.Parallel()
	certs, _ := selfSigned(t)
	s := startRelay(t, certs)
	path := filepath.Join(t.TempDir(), "rate.json")
	writeRateConfig(t, path, 100000)
	var logBuf testutil.Buffer
	const poll = 20 * time.Millisecond
	w, err := relay.WatchRateConfig(s, path, poll, slog.New(slog.NewTextHandler(&logBuf, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close)
	inForce := func() string {
		return s.DERP().ExpVar(true).(*metrics.Set).Get("rate_limit_per_client_bytes_per_second").String()
	}
	if got := inForce(); got != "100000" {
		t.Fatalf("derpserver's limit = %s, want 100000", got)
	}

	const warning = "rate config does not load"
	for i, bad := range []string{
		`{"PerClientRateLimitBytesPerSec": 5000`,        // cut short
		`{"PerClientRateLimitBytesPerSecond": 5000}`,    // misspelled: would be "no limit"
		`{"PerClientRateLimitBytesPerSec": -1}`,         // not a byte count
		`{"PerClientRateLimitBytesPerSec": 5000} {"x"}`, // two objects
	} {
		replaceFile(t, path, bad)
		if !logBuf.WaitCount(warning, i+1, 5*time.Second) {
			t.Fatalf("%q: no warning:\n%s", bad, logBuf.String())
		}
		time.Sleep(10 * poll) // more polls of the same bad version
		if n := strings.Count(logBuf.String(), warning); n != i+1 {
			t.Errorf("%q: %d warnings in all, want %d: each bad version once", bad, n, i+1)
		}
		if got := inForce(); got != "100000" {
			t.Errorf("%q: derpserver's limit = %s, want the old 100000", bad, got)
		}
	}
	if changed, err := w.Reload(); changed || err == nil {
		t.Errorf("Reload of a bad file = %v, %v; want an error", changed, err)
	}

	writeRateConfig(t, path, 200000)
	deadline := time.Now().Add(5 * time.Second)
	for inForce() != "200000" {
		if time.Now().After(deadline) {
			t.Fatalf("a good file was not picked up by polling; limit %s\n%s", inForce(), logBuf.String())
		}
		time.Sleep(poll)
	}
	if _, err := relay.LoadRateConfig(filepath.Join(t.TempDir(), "missing.json")); err == nil {
		t.Error("LoadRateConfig of a missing file: no error")
	}
}
