package relay

import (
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/tailderp/tailderp/internal/logs"
	"github.com/tailderp/tailderp/internal/testutil"
)

// TestCapsGroupIPv6ByPrefix: IPv6 clients count by prefix (a /64 by
// default, as one host can use its whole /64), IPv4 by address, a
// v4-mapped address as its IPv4 one; a release gives the place back once
// however often it is called.
func TestCapsGroupIPv6ByPrefix(t *testing.T) {
	for _, tc := range []struct {
		bits       int
		same, diff string
	}{
		{0, "2001:db8:1:1::2", "2001:db8:1:2::1"},
		{48, "2001:db8:1:2::1", "2001:db8:2::1"},
		{128, "2001:db8:1:1::1", "2001:db8:1:1::2"},
	} {
		s := &Server{MaxConnsPerIP: 2, MaxConnsPerIPv6Prefix: tc.bits, Logger: slog.New(slog.DiscardHandler)}
		c, err := s.newConnCaps()
		if err != nil {
			t.Fatal(err)
		}
		first := netip.MustParseAddr("2001:db8:1:1::1")
		r1, ok1 := c.acquire(first)
		_, ok2 := c.acquire(netip.MustParseAddr(tc.same))
		if !ok1 || !ok2 {
			t.Fatalf("/%d: the first two refused", tc.bits)
		}
		if _, ok := c.acquire(netip.MustParseAddr(tc.same)); ok {
			t.Errorf("/%d: a third from %s (same source as %s) accepted, want refused", tc.bits, tc.same, first)
		}
		if _, ok := c.acquire(netip.MustParseAddr(tc.diff)); !ok {
			t.Errorf("/%d: %s refused, want counted apart from %s", tc.bits, tc.diff, first)
		}
		r1()
		r1()
		if got := c.top(1); got[0].Conns != 1 {
			t.Errorf("/%d: after one release (called twice) %v, want 1 left", tc.bits, got)
		}
	}

	s := &Server{MaxConnsPerIP: 1, Logger: slog.New(slog.DiscardHandler)}
	c, _ := s.newConnCaps()
	if _, ok := c.acquire(netip.MustParseAddr("192.0.2.1")); !ok {
		t.Fatal("first IPv4 refused")
	}
	if _, ok := c.acquire(netip.MustParseAddr("::ffff:192.0.2.1")); ok {
		t.Error("the v4-mapped form of a capped IPv4 address accepted, want counted as the same")
	}
	if got := c.top(5); len(got) != 1 || got[0].Source != netip.MustParsePrefix("192.0.2.1/32") {
		t.Errorf("top = %v, want 192.0.2.1/32 only", got)
	}
}

// TestCapsExemptMeshPeers: the addresses MeshWith peers are dialed at
// are never counted nor refused; others are.
func TestCapsExemptMeshPeers(t *testing.T) {
	s := &Server{
		MaxConnsPerIP: 1,
		Logger:        slog.New(slog.DiscardHandler),
		MeshWith: []MeshPeer{
			{Host: "derp2.example.com", DialIP: netip.MustParseAddr("10.0.0.2")},
			{Host: "192.0.2.3"},
			{Host: "derp4.example.com"}, // resolved by resolveExempt
		},
	}
	c, err := s.newConnCaps()
	if err != nil {
		t.Fatal(err)
	}
	for _, peer := range []string{"10.0.0.2", "192.0.2.3", "::ffff:10.0.0.2"} {
		for i := range 3 {
			if _, ok := c.acquire(netip.MustParseAddr(peer)); !ok {
				t.Errorf("mesh peer %s: connection %d refused", peer, i+1)
			}
		}
	}
	if got := c.top(5); len(got) != 0 {
		t.Errorf("mesh peers counted: %v", got)
	}
	if _, ok := c.acquire(netip.MustParseAddr("10.0.0.3")); !ok {
		t.Fatal("first connection of a client refused")
	}
	if _, ok := c.acquire(netip.MustParseAddr("10.0.0.3")); ok {
		t.Error("a client over the cap accepted")
	}
	if got := meshNames(s.MeshWith); fmt.Sprint(got) != "[derp4.example.com]" {
		t.Errorf("meshNames = %v, want the one name without a DialIP", got)
	}
}

// TestCapsWarningBounded: a flood of refusals from many sources is one
// warning per interval, naming at most capWarnTop sources, the most
// refused first, whatever the number of sources.
func TestCapsWarningBounded(t *testing.T) {
	var sink testutil.Buffer
	s := &Server{MaxConnsPerIP: 1, Logger: slog.New(slog.NewTextHandler(&sink, nil))}
	c, _ := s.newConnCaps()
	// Fill the warning's interval with a first refusal, then flood.
	c.acquire(netip.MustParseAddr("192.0.2.1"))
	c.acquire(netip.MustParseAddr("192.0.2.1"))
	for i := range 3000 {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		c.acquire(a)
		for range i % 7 {
			c.acquire(a)
		}
	}
	lines := testutil.Lines(sink.String(), "per-address cap")
	if len(lines) != 1 {
		t.Fatalf("%d warnings, want 1 within the interval: %q", len(lines), lines)
	}
	if !strings.Contains(lines[0], `top_sources="192.0.2.1=1"`) {
		t.Errorf("warning %q, want it to name 192.0.2.1", lines[0])
	}
	// The next warning (forced: a new interval) names the flood's top
	// five, each refused 6 times, and counts the sources past the bound
	// apart.
	c.warnLim = logs.NewLimiter(1, capWarnEvery)
	c.acquire(netip.MustParseAddr("192.0.2.1"))
	lines = testutil.Lines(sink.String(), "per-address cap")
	if len(lines) != 2 {
		t.Fatalf("%d warnings, want 2: %q", len(lines), lines)
	}
	t.Logf("%s", lines[1])
	if n := strings.Count(lines[1], "=6"); n != capWarnTop {
		t.Errorf("second warning names %d sources refused 6 times, want %d: %q", n, capWarnTop, lines[1])
	}
	if !strings.Contains(lines[1], "refused_from_uncounted_sources=") {
		t.Errorf("second warning does not count the sources past the bound: %q", lines[1])
	}
	if len(lines[1]) > 600 {
		t.Errorf("warning of %d bytes, want it bounded", len(lines[1]))
	}
}
