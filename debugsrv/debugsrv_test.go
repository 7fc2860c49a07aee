package debugsrv

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/relay"
)

// TestMeshPage: /debug/mesh lists a relay's mesh peers as relay reports
// them: two real relays, one meshed with the other (pinned by its
// self-signed certificate) and with a port where nothing listens.
func TestMeshPage(t *testing.T) {
	mk, err := key.ParseDERPMesh("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
	if err != nil {
		t.Fatal(err)
	}
	start := func(peers ...relay.MeshPeer) *relay.Server {
		certs, err := relay.NewSelfSigned("127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		s := &relay.Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: certs, PrivateKey: key.NewNode(), MeshKey: mk, MeshWith: peers}
		if err := s.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close(context.Background()) })
		return s
	}
	peer := start()
	info, _ := peer.Certs.Current()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedPort := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	s := start(
		relay.MeshPeer{Host: "127.0.0.1", Port: peer.LocalAddr().(*net.TCPAddr).Port, CertName: info.CertName},
		relay.MeshPeer{Host: "127.0.0.1", Port: closedPort},
	)
	deadline := time.Now().Add(10 * time.Second)
	for st := s.MeshPeers(); st[0].State != relay.MeshConnected || st[1].LastError == ""; st = s.MeshPeers() {
		if time.Now().After(deadline) {
			t.Fatalf("mesh not settled after 10s: %+v", st)
		}
		time.Sleep(20 * time.Millisecond)
	}

	srv := httptest.NewServer(Handler(Config{MeshPeers: s.MeshPeers}))
	defer srv.Close()
	res, err := http.Get(srv.URL + "/debug/mesh")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	page := string(body)
	rows := strings.Split(page, "<tr>")
	if len(rows) != 4 { // before the table, the header, two peers
		t.Fatalf("want a header and 2 rows:\n%s", page)
	}
	up, down := rows[2], rows[3]
	for _, want := range []string{peer.LocalAddr().String(), "connected", peer.PrivateKey.Public().ShortString()} {
		if !strings.Contains(up, want) {
			t.Errorf("the connected peer's row lacks %q:\n%s", want, up)
		}
	}
	for _, want := range []string{"dialing", "connection refused"} {
		if !strings.Contains(down, want) {
			t.Errorf("the unreachable peer's row lacks %q:\n%s", want, down)
		}
	}
	// Listed on /debug/ with the other pages.
	res, err = http.Get(srv.URL + "/debug/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(res.Body)
	res.Body.Close()
	if !strings.Contains(string(body), "/debug/mesh") {
		t.Errorf("/debug/ does not link /debug/mesh:\n%s", body)
	}
}
