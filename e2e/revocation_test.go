package e2e

import (
	"context"
	bin "encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/tailderp/tailderp/internal/testtailnet"
	"github.com/tailderp/tailderp/node"
)

// derpPeer is a plain DERP client of the relay (as a Tailscale client's
// magicsock holds one), reading in the background.
type derpPeer struct {
	key    key.NodePrivate
	c      *derphttp.Client
	from   atomic.Int64              // packets received
	msgs   chan derp.ReceivedMessage // packets (their sources) and PeerGone answers, while there is room
	closed chan struct{}             // closed when the connection ends
	err    error                     // why, once closed
}

// dialDERP connects a client with k to p and waits until the relay
// admitted it (ServerInfo) or refused it (the connection ends): admitted
// reports which. A refused client is closed.
func dialDERP(ctx context.Context, t *testing.T, p *relayProc, k key.NodePrivate) (dp *derpPeer, admitted bool) {
	t.Helper()
	region := testtailnet.DERPRegion(p.HTTPSPort, p.STUNPort, p.CertName).Regions[testtailnet.RegionID]
	c := derphttp.NewRegionClient(k, logger.Discard, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	dp = &derpPeer{key: k, c: c, closed: make(chan struct{}), msgs: make(chan derp.ReceivedMessage, 64)}
	t.Cleanup(func() { c.Close() })
	// derphttp's Connect ends before the relay decides (a refusal shows
	// in Recv): an error here is the dial or TLS failing, not a refusal.
	// Try again, bounded by ctx.
	for {
		err := c.Connect(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("connect %v: %v", k.Public().ShortString(), err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	info := make(chan struct{})
	go func() {
		defer close(dp.closed)
		sawInfo := false
		for {
			// Recv after an error would dial again: read until the first.
			m, err := c.Recv()
			if err != nil {
				dp.err = err
				return
			}
			switch m.(type) {
			case derp.ServerInfoMessage:
				if !sawInfo {
					sawInfo = true
					close(info)
				}
			case derp.ReceivedPacket:
				dp.from.Add(1)
				m := m.(derp.ReceivedPacket)
				m.Data = nil // aliases the client's buffer
				select {
				case dp.msgs <- m:
				default:
				}
			case derp.PeerGoneMessage:
				select {
				case dp.msgs <- m:
				default:
				}
			}
		}
	}()
	select {
	case <-info:
		return dp, true
	case <-dp.closed:
		return dp, false
	case <-ctx.Done():
		t.Fatalf("client %v: neither admitted nor refused: %v", k.Public().ShortString(), ctx.Err())
	}
	return dp, false
}

// mustAdmit dials with k and fails the test unless the relay admits it,
// retrying (bounded by ctx) while it refuses: the relay's node may not
// have the client's node in its map yet.
func mustAdmit(ctx context.Context, t *testing.T, p *relayProc, k key.NodePrivate) *derpPeer {
	t.Helper()
	for {
		dp, ok := dialDERP(ctx, t, p, k)
		if ok {
			return dp
		}
		dp.c.Close()
		select {
		case <-ctx.Done():
			t.Fatalf("client %v never admitted", k.Public().ShortString())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// mustRefuse dials with k and fails the test if the relay admits it.
func mustRefuse(ctx context.Context, t *testing.T, p *relayProc, k key.NodePrivate, why string) {
	t.Helper()
	if dp, ok := dialDERP(ctx, t, p, k); ok {
		dp.c.Close()
		t.Fatalf("%s: client %v admitted, want refused", why, k.Public().ShortString())
	}
}

// talk makes from send a numbered packet to to every 20 ms until the
// returned stop is called; stop reports how many to received, and fails
// the test if either connection ended meanwhile.
func talk(t *testing.T, from, to *derpPeer) (received func() int64, stop func()) {
	done := make(chan struct{})
	stopped := make(chan error, 1)
	go func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		var seq uint64
		for {
			select {
			case <-done:
				stopped <- nil
				return
			case <-tick.C:
			}
			seq++
			if err := from.c.Send(to.key.Public(), bin.BigEndian.AppendUint64(nil, seq)); err != nil {
				stopped <- err
				return
			}
		}
	}()
	return to.from.Load, func() {
		close(done)
		if err := <-stopped; err != nil {
			t.Errorf("sending between the tailnet's other clients failed: %v", err)
		}
		for _, dp := range []*derpPeer{from, to} {
			select {
			case <-dp.closed:
				t.Errorf("client %v lost its connection: %v", dp.key.Public().ShortString(), dp.err)
			default:
			}
		}
	}
}

// relayNodeKey is the node key of tailderp's own node in ctl.
func relayNodeKey(ctx context.Context, t *testing.T, ctl *testtailnet.Control) key.NodePublic {
	t.Helper()
	for ctx.Err() == nil {
		for _, n := range ctl.Server.AllNodes() {
			if n.Hostinfo.Valid() && n.Hostinfo.Hostname() == "127-0-0-1" {
				return n.Key
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("tailderp's node is not in the control server")
	return key.NodePublic{}
}

// pushMap sends mr to tailderp's node as control's next map response,
// retrying until its map poll takes it.
func pushMap(ctx context.Context, t *testing.T, ctl *testtailnet.Control, relay key.NodePublic, mr *tailcfg.MapResponse) {
	t.Helper()
	for !ctl.Server.AddRawMapResponse(relay, mr) {
		if ctx.Err() != nil {
			t.Fatal("tailderp's node has no map poll to push to")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRevocation: a connected client of the tailnet is disconnected when
// its node is removed, its key rotates (the old key) or its key expires,
// and its reconnect is refused; meanwhile two other clients of the tailnet
// keep exchanging packets through the relay without interruption.
func TestRevocation(t *testing.T) {
	tests := []struct {
		name   string
		reason node.DropReason
		// revoke takes a's admission away; it returns when the relay
		// should stop admitting a, and the key a might use instead.
		revoke func(ctx context.Context, t *testing.T, ctl *testtailnet.Control, relay key.NodePublic, a *tailcfg.Node) (from time.Time, next *key.NodePrivate)
	}{
		{name: "node removed", reason: node.DropRemoved,
			revoke: func(ctx context.Context, t *testing.T, ctl *testtailnet.Control, relay key.NodePublic, a *tailcfg.Node) (time.Time, *key.NodePrivate) {
				pushMap(ctx, t, ctl, relay, &tailcfg.MapResponse{PeersRemoved: []tailcfg.NodeID{a.ID}})
				return time.Now(), nil
			}},
		{name: "key rotated", reason: node.DropKeyRotated,
			revoke: func(ctx context.Context, t *testing.T, ctl *testtailnet.Control, relay key.NodePublic, a *tailcfg.Node) (time.Time, *key.NodePrivate) {
				next := key.NewNode()
				rotated := a.Clone()
				rotated.Key = next.Public()
				pushMap(ctx, t, ctl, relay, &tailcfg.MapResponse{PeersChanged: []*tailcfg.Node{rotated}})
				return time.Now(), &next
			}},
		{name: "key expired", reason: node.DropKeyExpired,
			revoke: func(ctx context.Context, t *testing.T, ctl *testtailnet.Control, relay key.NodePublic, a *tailcfg.Node) (time.Time, *key.NodePrivate) {
				// The key expires two seconds from now, with no further
				// word from control: the relay must notice the time.
				expiry := time.Now().Add(2 * time.Second)
				expiring := a.Clone()
				expiring.KeyExpiry = expiry
				ctl.Server.UpdateNode(expiring)
				return expiry, nil
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			p, ctl := tailnetWithRelay(t, relayOpts{})
			relay := relayNodeKey(ctx, t, ctl)
			ka, kb, kc := key.NewNode(), key.NewNode(), key.NewNode()
			an := ctl.AddNode(t, ka.Public(), "victim.tailnet.example.")
			ctl.AddNode(t, kb.Public(), "b.tailnet.example.")
			ctl.AddNode(t, kc.Public(), "c.tailnet.example.")
			a := mustAdmit(ctx, t, p, ka)
			b := mustAdmit(ctx, t, p, kb)
			c := mustAdmit(ctx, t, p, kc)
			received, stop := talk(t, b, c)

			// Traffic flows before.
			for received() < 5 && ctx.Err() == nil {
				time.Sleep(10 * time.Millisecond)
			}
			from, next := tt.revoke(ctx, t, ctl, relay, an)
			before := received()

			select {
			case <-a.closed:
			case <-time.After(time.Until(from) + 5*time.Second):
				t.Fatalf("client still connected 5 s after its admission was taken away")
			}
			t.Logf("disconnected %v after its admission ended", time.Since(from).Round(time.Millisecond))
			p.waitLog("reason="+string(tt.reason), 5*time.Second)
			p.waitLog("name=victim.tailnet.example.", 5*time.Second)
			mustRefuse(ctx, t, p, ka, "reconnect with the old key")
			if next != nil {
				mustAdmit(ctx, t, p, *next) // the node's new key is fine
			}

			// The others kept talking through all of it.
			for received() < before+10 && ctx.Err() == nil {
				time.Sleep(10 * time.Millisecond)
			}
			stop()
			t.Logf("b→c packets: %d before the revocation, %d in all", before, received())
			if received() < before+10 {
				t.Errorf("b→c traffic stopped after the revocation: %d before, %d after", before, received())
			}
		})
	}
}

// TestKnownPeersAcrossRestart: restarted while the control server is down,
// the relay admits the nodes it knew from its persisted set and refuses
// strangers; a set older than the maximum age (or the cache off) admits
// nobody; when control is back the fresh network map takes over without a
// restart, with a node added meanwhile.
func TestKnownPeersAcrossRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	p, ctl := tailnetWithRelay(t, relayOpts{})
	known := key.NewNode()
	ctl.AddNode(t, known.Public(), "known.tailnet.example.")
	mustAdmit(ctx, t, p, known).c.Close()
	if err := p.stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	cache := filepath.Join(p.StateDir, "tailscale", node.KnownPeersFile)
	fi, err := os.Stat(cache)
	if err != nil {
		t.Fatalf("no persisted key set after a clean stop: %v", err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("%s has mode %v, want 0600", cache, fi.Mode().Perm())
	}
	if b, _ := os.ReadFile(cache); !strings.Contains(string(b), known.Public().String()) || !strings.Contains(string(b), "known.tailnet.example.") {
		t.Errorf("persisted set does not hold the known node:\n%s", b)
	}

	// Control goes away; a node joins meanwhile (control knows it, the
	// relay cannot hear of it).
	ctl.Stop()
	added := key.NewNode()
	ctl.AddNode(t, added.Public(), "added.tailnet.example.")
	restart := func(args ...string) *relayProc {
		t.Helper()
		p2 := newRelay(t, relayOpts{stateDir: p.StateDir, args: args})
		p2.HTTPSPort, p2.STUNPort = p.HTTPSPort, p.STUNPort
		p2.cmd.Args = replaceFlag(replaceFlag(p2.cmd.Args, "-a", fmt.Sprintf("127.0.0.1:%d", p.HTTPSPort)), "-stun-port", fmt.Sprint(p.STUNPort))
		p2.cmd.Env = append(p2.cmd.Env, "TAILSCALE_CONTROL_URL="+ctl.URL) // no key: the login is in the state
		p2.start()
		return p2
	}

	t.Run("cache off", func(t *testing.T) {
		p2 := restart("-verify-clients-cache-max-age", "0")
		mustRefuse(ctx, t, p2, known, "cache off, control down")
		p2.waitLog("reason=tailnet_not_ready", 5*time.Second)
		p2.stop()
	})
	t.Run("cache older than the maximum age", func(t *testing.T) {
		p2 := restart("-verify-clients-cache-max-age", "1ms")
		p2.waitLog("older than its maximum age", 5*time.Second)
		mustRefuse(ctx, t, p2, known, "cache too old, control down")
		p2.stop()
	})

	p2 := restart()
	p2.waitLog("admitting from the known-peers cache", 5*time.Second)
	k := mustAdmit(ctx, t, p2, known)
	mustRefuse(ctx, t, p2, key.NewNode(), "stranger while answering from the cache")
	mustRefuse(ctx, t, p2, added, "node added while control was down, before control is back")

	// Control is back: the fresh map takes over, with the added node. (A
	// known node re-registers without a key at Tailscale's control;
	// testcontrol must be told to allow that.)
	ctl.SetRequireAuthKey("")
	ctl.Resume(t)
	p2.waitLog("network map received", 30*time.Second)
	mustAdmit(ctx, t, p2, added).c.Close()
	mustAdmit(ctx, t, p2, known).c.Close()
	select {
	case <-k.closed:
		t.Errorf("the known node's connection, admitted from the cache, was closed when the fresh map arrived: %v", k.err)
	default:
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		t.Fatal("timed out")
	}
}
