package tailnets

import (
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/readiness"
	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/relay"
)

// TestRelayReadinessWaitsForTheMesh: a relay meshed with a live peer, a
// dead one (a port nobody listens on) and itself (its own address in its
// peer list). Its readiness leaves itself out; it is not ready while the
// dead peer has never connected, within readiness.MeshReadyWait of its
// start, naming that peer; it is ready with a warning naming it once the
// wait is over (judged at a later time, not waited for); the live peer
// counts as connected. Then the live peer stops: the link was up once, so
// is a warning beside the dead peer's, and the relay stays ready.
func TestRelayReadinessWaitsForTheMesh(t *testing.T) {
	meshKey, err := key.ParseDERPMesh("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
	if err != nil {
		t.Fatal(err)
	}
	selfSigned := func() (relay.Certificates, string) {
		c, err := relay.NewSelfSigned("127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		info, _ := c.Current()
		return c, info.CertName
	}
	peerCerts, peerPin := selfSigned()
	peer := &relay.Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: peerCerts, PrivateKey: key.NewNode(), MeshKey: meshKey}
	if err := peer.Start(); err != nil {
		t.Fatal(err)
	}
	peerStopped := false
	t.Cleanup(func() {
		if !peerStopped {
			peer.Close(context.Background())
		}
	})
	live := relay.MeshPeer{Host: "127.0.0.1", Port: peer.LocalAddr().(*net.TCPAddr).Port, CertName: peerPin}
	dead := relay.MeshPeer{Host: "127.0.0.1", Port: testutil.FreePort(t, "tcp"), CertName: peerPin}
	myCerts, myPin := selfSigned()
	myPort := testutil.FreePort(t, "tcp")
	self := relay.MeshPeer{Host: "127.0.0.1", Port: myPort, CertName: myPin}

	started := time.Now()
	s := &relay.Server{Addr: fmt.Sprintf("127.0.0.1:%d", myPort), HTTPPort: -1, Certs: myCerts, PrivateKey: key.NewNode(), MeshKey: meshKey,
		MeshWith: []relay.MeshPeer{live, dead, self}}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(context.Background()) })
	rel := &Relay{Server: s, Started: started}

	meshOf := func(r readiness.Readiness) map[string]readiness.MeshPeer {
		m := map[string]readiness.MeshPeer{}
		if r.Mesh != nil {
			for _, p := range r.Mesh.Peers {
				m[p.Peer] = p
			}
		}
		return m
	}
	var rd readiness.Readiness
	ok := testutil.Poll(10*time.Second, 20*time.Millisecond, nil, func() bool {
		rd = rel.Readiness()
		peers := meshOf(rd)
		return peers[live.String()].Connected && peers[dead.String()].Err != "" && s.MeshPeers()[2].State == relay.MeshSelf
	})
	if !ok {
		t.Fatalf("after 10 s: mesh %+v; links %+v", rd.Mesh, s.MeshPeers())
	}
	if peers := meshOf(rd); len(peers) != 2 || !peers[live.String()].ConnectedOnce || peers[dead.String()].ConnectedOnce {
		t.Fatalf("mesh part %+v: want the live peer connected, the dead one never, itself left out", rd.Mesh)
	}
	mesh := func(r readiness.Readiness, now time.Time) readiness.Finding {
		t.Helper()
		for _, f := range r.Judge(now) {
			if f.Name == "mesh" {
				return f
			}
		}
		t.Fatalf("no mesh finding in %+v", r.Judge(now))
		return readiness.Finding{}
	}

	// Within the wait (judged at the relay's start plus one second, so a
	// slow machine cannot make this the other case).
	within := started.Add(time.Second)
	if f := mesh(rd, within); f.Severity != readiness.Fail || !strings.Contains(f.Text, "1 of 2 peers connected; waiting for "+dead.String()) || strings.Contains(f.Text, self.String()) {
		t.Errorf("within the wait: %+v, want a failure waiting for %s only", f, dead)
	}
	if rd.Ready(within) {
		t.Error("ready within the wait while a peer never connected")
	}
	after := started.Add(readiness.MeshReadyWait)
	if f := mesh(rd, after); f.Severity != readiness.Warn || !strings.Contains(f.Text, dead.String()+" never connected") {
		t.Errorf("after the wait: %+v, want a warning naming %s", f, dead)
	}
	if !rd.Ready(after) {
		t.Errorf("not ready after the wait: %+v", rd.Judge(after))
	}

	// The live peer goes: it was connected once, so only a warning.
	peerStopped = true
	peer.Close(context.Background())
	ok = testutil.Poll(10*time.Second, 20*time.Millisecond, nil, func() bool {
		rd = rel.Readiness()
		return !meshOf(rd)[live.String()].Connected
	})
	if !ok {
		t.Fatalf("the stopped peer still connected after 10 s: %+v", rd.Mesh)
	}
	if p := meshOf(rd)[live.String()]; !p.ConnectedOnce {
		t.Errorf("the stopped peer: %+v, want connected once", p)
	}
	if f := mesh(rd, after); f.Severity != readiness.Warn || !strings.Contains(f.Text, "not connected now: "+live.String()) || !strings.Contains(f.Text, dead.String()+" never connected") {
		t.Errorf("a peer lost after connecting: %+v, want a warning naming it as not connected now", f)
	}
	if !rd.Ready(after) {
		t.Errorf("not ready after a peer that had connected went: %+v", rd.Judge(after))
	}
}
