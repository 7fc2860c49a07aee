package debugsrv

import (
	"context"
	"expvar"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/relay"
	"github.com/tailderp/tailderp/verify"
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

	srv := httptest.NewServer(Handler(Config{ProcessWide: true, MeshPeers: s.MeshPeers}))
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

// TestListenLoopback: the debug handler served on a loopback listener
// answers there (IPv4 and IPv6); every address that is not a loopback IP
// address is refused with an error naming it.
func TestListenLoopback(t *testing.T) {
	h := Handler(Config{ProcessWide: true, Status: func() Status { return Status{} }})
	for _, addr := range []string{"127.0.0.1:0", "[::1]:0"} {
		ln, err := ListenLoopback(addr)
		if err != nil {
			t.Fatalf("ListenLoopback(%q): %v", addr, err)
		}
		go Serve(ln, h)
		t.Cleanup(func() { ln.Close() })
		if ip := ln.Addr().(*net.TCPAddr).IP; !ip.IsLoopback() {
			t.Errorf("ListenLoopback(%q) bound %v", addr, ln.Addr())
		}
		c := &http.Client{Timeout: 10 * time.Second}
		res, err := c.Get("http://" + ln.Addr().String() + "/metrics")
		if err != nil {
			t.Fatalf("GET /metrics on %v: %v", ln.Addr(), err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusOK || !strings.Contains(string(body), "memstats") {
			t.Errorf("GET /metrics on %v: status %d, body %.200q", ln.Addr(), res.StatusCode, body)
		}
	}
	for _, addr := range []string{":9090", "0.0.0.0:9090", "[::]:9090", "192.0.2.1:9090", "[2001:db8::1]:9090", "localhost:9090", "example.com:9090", "127.0.0.1", "", "[fe80::1%lo]:9090"} {
		ln, err := ListenLoopback(addr)
		if err == nil {
			ln.Close()
			t.Errorf("ListenLoopback(%q) succeeded, bound %v", addr, ln.Addr())
			continue
		}
		if !strings.Contains(err.Error(), "loopback") || !strings.Contains(err.Error(), `"`+addr+`"`) {
			t.Errorf("ListenLoopback(%q): error %q should name the address and say it must be loopback", addr, err)
		}
	}
}

// TestProcessWidePages: pprof and the process's own expvars (Go runtime,
// the command line) are served only with ProcessWide; without it, the
// status page, the metrics given in Vars and the named pages still are.
func TestProcessWidePages(t *testing.T) {
	for _, processWide := range []bool{true, false} {
		h := Handler(Config{
			ProcessWide: processWide,
			Status:      func() Status { return Status{Tailnet: "b"} },
			Vars:        map[string]expvar.Var{"tailderp_tenant_probe": expvar.Func(func() any { return 42 })},
			Recent:      func() []verify.Admission { return nil },
		})
		srv := httptest.NewServer(h)
		get := func(path string) (int, string) {
			res, err := http.Get(srv.URL + path)
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			b, _ := io.ReadAll(res.Body)
			return res.StatusCode, string(b)
		}
		code, _ := get("/debug/pprof/")
		if (code == http.StatusOK) != processWide {
			t.Errorf("ProcessWide=%v: /debug/pprof/ status %d", processWide, code)
		}
		for _, path := range []string{"/debug/vars", "/metrics"} {
			_, body := get(path)
			if !strings.Contains(body, "tailderp_tenant_probe") {
				t.Errorf("ProcessWide=%v: %s lacks the given metrics", processWide, path)
			}
			if got := strings.Contains(body, "memstats") || strings.Contains(body, "cmdline"); got != processWide {
				t.Errorf("ProcessWide=%v: %s shows the process's expvars: %v", processWide, path, got)
			}
		}
		if code, body := get("/debug/"); code != http.StatusOK || strings.Contains(body, "pprof") != processWide {
			t.Errorf("ProcessWide=%v: /debug/ status %d, links pprof: %v", processWide, code, strings.Contains(body, "pprof"))
		}
		if code, _ := get("/debug/clients"); code != http.StatusOK {
			t.Errorf("ProcessWide=%v: /debug/clients status %d", processWide, code)
		}
		srv.Close()
	}
}
