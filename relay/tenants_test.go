package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http/httptest"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/derp/derpserver"
	"tailscale.com/disco"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// tenantClient is a real derphttp client whose received messages are
// collected on msgs.
type tenantClient struct {
	k    key.NodePrivate
	c    *derphttp.Client
	msgs chan derp.ReceivedMessage
}

// next returns the next message, failing after a bounded wait.
func (tc *tenantClient) next(t *testing.T) derp.ReceivedMessage {
	t.Helper()
	select {
	case m, ok := <-tc.msgs:
		if !ok {
			t.Fatalf("client %v: connection closed", tc.k.Public().ShortString())
		}
		return m
	case <-time.After(10 * time.Second):
		t.Fatalf("client %v: no message within 10s", tc.k.Public().ShortString())
		return nil
	}
}

// discoLike is a payload derpserver treats as disco, the only kind it
// answers with PeerGone (derpserver.go:970-977).
func discoLike(tag byte) []byte {
	p := make([]byte, len(disco.Magic)+32+disco.NonceLen+8)
	copy(p, disco.Magic)
	p[len(p)-1] = tag
	return p
}

// TestTenantIsolation: two tailnets behind one listener, one derpserver
// each with the same key, routed by the client's node key. A client of A
// reaches A's keys; a connected key of B is, to it, exactly an absent key.
func TestTenantIsolation(t *testing.T) {
	priv := key.NewNode()
	sA := derpserver.New(priv, t.Logf)
	defer sA.Close()
	sB := derpserver.New(priv, t.Logf)
	defer sB.Close()

	owner := map[key.NodePublic]*derpserver.Server{}
	ready := make(chan struct{})
	ts := httptest.NewUnstartedServer(TenantHandler(priv.Public(), func(name string, k key.NodePublic) *derpserver.Server {
		<-ready
		return owner[k]
	}))
	ts.StartTLS()
	defer ts.Close()
	pool := x509.NewCertPool()
	pool.AddCert(ts.Certificate())
	url := ts.URL + "/derp"

	// Keys are enrolled before they dial (as a tailnet's netmap would
	// know them); the selector waits for the map to be complete.
	kA1, kA2, kB1, kB2, kAbsent := key.NewNode(), key.NewNode(), key.NewNode(), key.NewNode(), key.NewNode()
	owner[kA1.Public()], owner[kA2.Public()] = sA, sA
	owner[kB1.Public()], owner[kB2.Public()] = sB, sB
	close(ready)
	dial := func(k key.NodePrivate) *tenantClient { return dialTenantKey(t, url, pool, k) }
	a1, a2, b1, b2 := dial(kA1), dial(kA2), dial(kB1), dial(kB2)

	// A→A is delivered.
	if err := a1.c.Send(kA2.Public(), []byte("a1 to a2")); err != nil {
		t.Fatal(err)
	}
	if m, ok := a2.next(t).(derp.ReceivedPacket); !ok || m.Source != kA1.Public() || string(m.Data) != "a1 to a2" {
		t.Fatalf("a2 got %#v, want a1's packet", m)
	}

	// A→B (connected) and A→absent: both answered PeerGone, same reason.
	if err := a1.c.Send(kB1.Public(), discoLike(1)); err != nil {
		t.Fatal(err)
	}
	if err := a1.c.Send(kAbsent.Public(), discoLike(2)); err != nil {
		t.Fatal(err)
	}
	gone := map[key.NodePublic]derp.PeerGoneReasonType{}
	for len(gone) < 2 {
		m, ok := a1.next(t).(derp.PeerGoneMessage)
		if !ok {
			t.Fatalf("a1 got %#v, want PeerGone", m)
		}
		gone[m.Peer] = m.Reason
	}
	rB, okB := gone[kB1.Public()]
	rX, okX := gone[kAbsent.Public()]
	if !okB || !okX || rB != rX || rB != derp.PeerGoneReasonNotHere {
		t.Fatalf("PeerGone answers %v, want NotHere for both B's connected key and the absent key", gone)
	}

	// A's server has dropped a1's packet to b1 (the PeerGone above proves
	// it handled it): the first thing b1 receives is b2's marker.
	if err := b2.c.Send(kB1.Public(), []byte("b2 to b1")); err != nil {
		t.Fatal(err)
	}
	if m, ok := b1.next(t).(derp.ReceivedPacket); !ok || m.Source != kB2.Public() || !bytes.Equal(m.Data, []byte("b2 to b1")) {
		t.Fatalf("b1 got %#v, want only b2's packet", m)
	}
}

func dialTenantKey(t *testing.T, url string, pool *x509.CertPool, k key.NodePrivate) *tenantClient {
	t.Helper()
	c, err := derphttp.NewClient(k, url, logger.Discard, netmon.NewStatic())
	if err != nil {
		t.Fatal(err)
	}
	c.TLSConfig = &tls.Config{RootCAs: pool}
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Connect(ctx); err != nil {
		t.Fatalf("connect: %v", err)
	}
	tc := &tenantClient{k: k, c: c, msgs: make(chan derp.ReceivedMessage, 16)}
	go func() {
		defer close(tc.msgs)
		for {
			m, _, err := c.RecvDetail()
			if err != nil {
				return
			}
			tc.msgs <- m
		}
	}()
	if _, ok := tc.next(t).(derp.ServerInfoMessage); !ok {
		t.Fatal("first message is not ServerInfo")
	}
	return tc
}

// TestTenantFastStart: a client that knows the server key (Derp-Fast-Start,
// no 101) sends ClientInfo at once and is served by its tenant; a key no
// tenant knows is closed before derpserver sees it.
func TestTenantFastStart(t *testing.T) {
	priv := key.NewNode()
	sA := derpserver.New(priv, t.Logf)
	defer sA.Close()
	known := key.NewNode()
	ts := httptest.NewUnstartedServer(TenantHandler(priv.Public(), func(_ string, k key.NodePublic) *derpserver.Server {
		if k == known.Public() {
			return sA
		}
		return nil
	}))
	ts.StartTLS()
	defer ts.Close()
	pool := x509.NewCertPool()
	pool.AddCert(ts.Certificate())

	dial := func(k key.NodePrivate) (derp.ReceivedMessage, error) {
		conn, err := tls.Dial("tcp", ts.Listener.Addr().String(), &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		brw := bufio.NewReadWriter(bufio.NewReader(conn), bufio.NewWriter(conn))
		fmt.Fprintf(brw, "GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n%s: 1\r\n\r\n", derp.FastStartHeader)
		c, err := derp.NewClient(k, conn, brw, logger.Discard, derp.ServerPublicKey(priv.Public()))
		if err != nil {
			t.Fatal(err)
		}
		return c.Recv()
	}
	if m, err := dial(known); err != nil {
		t.Fatalf("known key: %v", err)
	} else if _, ok := m.(derp.ServerInfoMessage); !ok {
		t.Fatalf("known key got %#v, want ServerInfo", m)
	}
	if m, err := dial(key.NewNode()); err == nil {
		t.Fatalf("unknown key got %#v, want the connection closed", m)
	}
}
