package testutil

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"tailscale.com/net/stun"
)

// childEnv makes the test binary a child process for the Process tests
// (see TestMain), doing what its value says.
const childEnv = "TESTUTIL_CHILD"

func TestMain(m *testing.M) {
	switch os.Getenv(childEnv) {
	case "":
		os.Exit(m.Run())
	case "serve": // says it is ready, exits 0 on SIGTERM
		term := make(chan os.Signal, 1)
		signal.Notify(term, syscall.SIGTERM)
		fmt.Println("ready")
		fmt.Fprintln(os.Stderr, "level=INFO on stderr")
		<-term
		os.Exit(0)
	case "stubborn": // ignores SIGTERM
		signal.Ignore(syscall.SIGTERM)
		fmt.Println("ready")
		time.Sleep(time.Minute)
		os.Exit(0)
	case "fail": // exits 3 at once
		fmt.Println("giving up")
		os.Exit(3)
	}
	os.Exit(125)
}

func child(t *testing.T, mode string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+mode)
	return cmd
}

func TestNewCertCASigned(t *testing.T) {
	ca := NewCert(t, CertOptions{CommonName: "testutil CA", IsCA: true})
	leaf := NewCert(t, CertOptions{Names: []string{"relay.test", "127.0.0.1"}, CA: ca, ValidFor: 90 * 24 * time.Hour})
	for _, name := range []string{"relay.test", "127.0.0.1"} {
		if _, err := leaf.Cert.Verify(x509.VerifyOptions{DNSName: name, Roots: ca.Pool()}); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := leaf.Cert.Verify(x509.VerifyOptions{DNSName: "other.test", Roots: ca.Pool()}); err == nil {
		t.Error("valid for a name it does not have")
	}
	if got := leaf.Cert.Issuer.CommonName; got != "testutil CA" {
		t.Errorf("issuer %q", got)
	}
	if got := leaf.Cert.Subject.CommonName; got != "relay.test" {
		t.Errorf("common name %q, want the first name", got)
	}
	if d := time.Until(leaf.Cert.NotAfter); d < 89*24*time.Hour || d > 90*24*time.Hour {
		t.Errorf("valid for another %v, want 90 days", d)
	}
	// Not signed by an unrelated CA, nor trusted by a self-signed leaf's pool.
	other := NewCert(t, CertOptions{Names: []string{"relay.test"}})
	if _, err := leaf.Cert.Verify(x509.VerifyOptions{DNSName: "relay.test", Roots: other.Pool()}); err == nil {
		t.Error("verified against another certificate")
	}
	if _, err := other.Cert.Verify(x509.VerifyOptions{DNSName: "relay.test", Roots: other.Pool()}); err != nil {
		t.Errorf("self-signed certificate against its own pool: %v", err)
	}
}

func TestNewCertKeyFormats(t *testing.T) {
	for _, tt := range []struct {
		format KeyFormat
		block  string
	}{{PKCS8, "-----BEGIN PRIVATE KEY-----"}, {EC, "-----BEGIN EC PRIVATE KEY-----"}} {
		c := NewCert(t, CertOptions{Names: []string{"derp.test"}, KeyFormat: tt.format})
		if !strings.HasPrefix(string(c.KeyPEM), tt.block) {
			t.Errorf("format %d: key PEM starts %.30q, want %s", tt.format, c.KeyPEM, tt.block)
		}
		pair, err := tls.X509KeyPair(c.CertPEM, c.KeyPEM)
		if err != nil {
			t.Fatalf("format %d: %v", tt.format, err)
		}
		if !pair.Leaf.Equal(c.Cert) || !c.TLS.Leaf.Equal(c.Cert) {
			t.Errorf("format %d: PEM, TLS and parsed certificates differ", tt.format)
		}
	}
	a, b := NewCert(t, CertOptions{}), NewCert(t, CertOptions{})
	if _, err := tls.X509KeyPair(a.CertPEM, b.KeyPEM); err == nil {
		t.Error("the key of another certificate matches")
	}
}

func TestWriteFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs")
	crt, key := filepath.Join(dir, "h.crt"), filepath.Join(dir, "h.key")
	c := NewCert(t, CertOptions{Names: []string{"h"}})
	c.WriteFiles(t, crt, key)
	for path, mode := range map[string]os.FileMode{crt: 0o644, key: 0o600, dir: 0o700 | os.ModeDir} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode()&^0o022 != mode&^0o022 { // whatever the umask takes away
			t.Errorf("%s: mode %v, want %v", path, fi.Mode(), mode)
		}
	}
	if _, err := tls.LoadX509KeyPair(crt, key); err != nil {
		t.Error(err)
	}
}

func TestBufferTake(t *testing.T) {
	var b Buffer
	fmt.Fprint(&b, "one")
	if got := b.Take(); got != "one" {
		t.Errorf("Take = %q, want %q", got, "one")
	}
	fmt.Fprint(&b, "two")
	if got, all := b.Take(), b.String(); got != "two" || all != "" {
		t.Errorf("Take = %q then String = %q, want %q then empty", got, all, "two")
	}
}

func TestBufferWait(t *testing.T) {
	var b Buffer
	go func() {
		time.Sleep(50 * time.Millisecond)
		fmt.Fprintf(&b, "serving on port %d\n", 8443)
	}()
	if !b.WaitFor("serving", 10*time.Second) {
		t.Fatalf("WaitFor missed the line: %q", b.String())
	}
	if m := b.WaitMatch(regexp.MustCompile(`port (\d+)`), time.Second, nil); len(m) != 2 || m[1] != "8443" {
		t.Errorf("WaitMatch = %q", m)
	}
	start := time.Now()
	if b.WaitFor("never written", 100*time.Millisecond) {
		t.Error("WaitFor found what was never written")
	}
	if time.Since(start) < 100*time.Millisecond {
		t.Error("WaitFor gave up before its timeout")
	}
	stop := make(chan struct{})
	close(stop)
	start = time.Now()
	if m := b.WaitMatch(regexp.MustCompile("never written"), 20*time.Second, stop); m != nil {
		t.Errorf("WaitMatch = %q after stop", m)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("WaitMatch waited %v with stop closed", d)
	}
}

func TestProcessStopsOnSIGTERM(t *testing.T) {
	p := StartProcess(t, child(t, "serve"), ProcessOptions{Name: "serve", StopGrace: 10 * time.Second})
	p.WaitOutput(t, "ready", 10*time.Second)
	p.WaitOutput(t, "on stderr", 10*time.Second) // both streams are collected
	if m := p.WaitMatch(t, regexp.MustCompile(`level=(\w+)`), time.Second); m[1] != "INFO" {
		t.Errorf("WaitMatch = %q", m)
	}
	if p.Exited() || p.Err() != nil {
		t.Fatalf("exited (%v) before Stop", p.Err())
	}
	if err := p.Stop(10 * time.Second); err != nil {
		t.Errorf("Stop: %v, want exit status 0", err)
	}
	if !p.Exited() {
		t.Error("not exited after Stop")
	}
	if err := p.Stop(10 * time.Second); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}

func TestProcessKilledAfterGrace(t *testing.T) {
	p := StartProcess(t, child(t, "stubborn"), ProcessOptions{Name: "stubborn"})
	p.WaitOutput(t, "ready", 10*time.Second)
	err := p.Stop(100 * time.Millisecond)
	if !errors.Is(err, ErrKilled) {
		t.Fatalf("Stop = %v, want ErrKilled", err)
	}
	t.Log(err)
}

func TestProcessExitEndsWait(t *testing.T) {
	p := StartProcess(t, child(t, "fail"), ProcessOptions{Name: "fail"})
	ft := &fatalTB{TB: t}
	start := time.Now()
	ft.run(func() { p.WaitOutput(ft, "ready", time.Minute) })
	if time.Since(start) > 30*time.Second {
		t.Errorf("WaitOutput waited %v after the exit", time.Since(start))
	}
	if !strings.Contains(ft.msg, "fail exited (exit status 3) before writing \"ready\"") || !strings.Contains(ft.msg, "giving up") {
		t.Errorf("failure %q, want the exit status and the output", ft.msg)
	}
	var exit *exec.ExitError
	if err := p.Stop(0); !errors.As(err, &exit) || exit.ExitCode() != 3 {
		t.Errorf("Stop after the exit = %v, want exit status 3", err)
	}
	// What was written just before the exit is found.
	p = StartProcess(t, child(t, "fail"), ProcessOptions{Name: "fail"})
	p.WaitOutput(t, "giving up", time.Minute)
}

// fatalTB records a Fatalf instead of failing the test.
type fatalTB struct {
	testing.TB
	msg string
}

func (f *fatalTB) Helper() {}
func (f *fatalTB) Fatalf(format string, args ...any) {
	f.msg = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// run runs fn as a test body would, where Fatalf ends it.
func (f *fatalTB) run(fn func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	<-done
}

func TestFreePort(t *testing.T) {
	for _, network := range []string{"tcp", "udp"} {
		port := FreePort(t, network)
		addr := net.JoinHostPort("127.0.0.1", fmt.Sprint(port))
		var err error
		if network == "udp" {
			var pc net.PacketConn
			if pc, err = net.ListenPacket("udp", addr); err == nil {
				pc.Close()
			}
		} else {
			var ln net.Listener
			if ln, err = net.Listen("tcp", addr); err == nil {
				ln.Close()
			}
		}
		if port == 0 || err != nil {
			t.Errorf("%s port %d: %v, want one that can be listened on", network, port, err)
		}
	}
}

func TestDERPMapRegion(t *testing.T) {
	const js = `{"derpMap": {"Regions": {"900": {"RegionID": 900, "Nodes": [{"Name": "900a", "HostName": "127.0.0.1", "DERPPort": 8443}]}}}}`
	for name, out := range map[string]string{
		"server log": "time=… level=INFO msg=serving\n--- derpMap for your tailnet policy file (merge into its \"derpMap\") ---\n" + js + "\n---\ntime=… level=INFO msg=more\n",
		"derpmap":    js + "\n",
	} {
		r := DERPMapRegion(t, out)
		if r.RegionID != 900 || r.Nodes[0].HostName != "127.0.0.1" || r.Nodes[0].DERPPort != 8443 {
			t.Errorf("%s: region %+v, node %+v", name, r, r.Nodes[0])
		}
	}
	for name, out := range map[string]string{
		"not terminated": "--- derpMap ---\n" + js + "\n",
		"two nodes":      `{"derpMap": {"Regions": {"900": {"RegionID": 900, "Nodes": [{"Name": "a"}, {"Name": "b"}]}}}}`,
		"other RegionID": `{"derpMap": {"Regions": {"900": {"RegionID": 901, "Nodes": [{"Name": "a"}]}}}}`,
		"no region":      `{"derpMap": {"Regions": {}}}`,
		"not JSON":       "hello",
	} {
		ft := &fatalTB{TB: t}
		ft.run(func() { DERPMapRegion(ft, out) })
		if ft.msg == "" {
			t.Errorf("%s: accepted", name)
		}
	}
}

// stunResponder answers each binding request on 127.0.0.1 as answer says,
// until the test ends, and returns its address.
func stunResponder(t *testing.T, answer func(tx stun.TxID, from netip.AddrPort) [][]byte) string {
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			tx, err := stun.ParseBindingRequest(buf[:n])
			if err != nil {
				continue
			}
			for _, b := range answer(tx, from.(*net.UDPAddr).AddrPort()) {
				pc.WriteTo(b, from)
			}
		}
	}()
	return pc.LocalAddr().String()
}

func TestSTUNBinding(t *testing.T) {
	honest := stunResponder(t, func(tx stun.TxID, from netip.AddrPort) [][]byte {
		return [][]byte{stun.Response(tx, from)}
	})
	mapped, self, err := STUNBinding("udp4", "127.0.0.1:0", honest, 10*time.Second)
	if err != nil || mapped != self || !self.Addr().Is4() {
		t.Errorf("STUNBinding = %v, %v, %v; want the client's own IPv4 address twice", mapped, self, err)
	}
	other := stunResponder(t, func(tx stun.TxID, from netip.AddrPort) [][]byte {
		return [][]byte{stun.Response(stun.NewTxID(), from)}
	})
	if _, _, err := STUNBinding("udp4", "127.0.0.1:0", other, 10*time.Second); err == nil || !strings.Contains(err.Error(), "transaction") {
		t.Errorf("answer to another transaction: err = %v", err)
	}
	junk := stunResponder(t, func(tx stun.TxID, from netip.AddrPort) [][]byte {
		return [][]byte{[]byte("not STUN"), stun.Response(tx, from)}
	})
	if _, _, err := STUNBinding("udp4", "127.0.0.1:0", junk, 10*time.Second); err == nil {
		t.Error("a packet that is not STUN before the answer: no error")
	}
	silent := stunResponder(t, func(stun.TxID, netip.AddrPort) [][]byte { return nil })
	if _, _, err := STUNBinding("udp4", "127.0.0.1:0", silent, 100*time.Millisecond); err == nil || !strings.Contains(err.Error(), "no STUN answer") {
		t.Errorf("no answer: err = %v", err)
	}
}

func TestLogRecorder(t *testing.T) {
	r := &LogRecorder{}
	l := slog.New(r).With("dropped", 1)
	l.Info("relay: serving", "addr", "127.0.0.1:443")
	l.Warn("the certificate expires soon")
	l.Error("the certificate expired")
	if got := r.Count(slog.LevelWarn, "certificate"); got != 1 {
		t.Errorf("Count(WARN, certificate) = %d, want 1 (the ERROR line is another level)", got)
	}
	if got := r.Count(slog.LevelInfo, "addr"); got != 0 {
		t.Errorf("Count(INFO, addr) = %d, want 0 (attributes do not count)", got)
	}
	want := []string{"INFO relay: serving addr=127.0.0.1:443", "WARN the certificate expires soon", "ERROR the certificate expired"}
	if got := r.Take(); !slices.Equal(got, want) {
		t.Errorf("Take = %q, want %q", got, want)
	}
	if got, n := r.Take(), r.Count(slog.LevelError, ""); got != nil || n != 0 {
		t.Errorf("after Take: Take = %q, Count = %d; want nothing", got, n)
	}
}

func TestLines(t *testing.T) {
	out := "level=INFO msg=one\nlevel=WARN msg=two\nlevel=WARN msg=three"
	if got, want := Lines(out, "level=WARN", "msg=t"), []string{"level=WARN msg=two", "level=WARN msg=three"}; !slices.Equal(got, want) {
		t.Errorf("Lines = %q, want %q", got, want)
	}
	if got := Lines(out + "\n"); len(got) != 3 {
		t.Errorf("Lines with no substrings = %q, want the 3 lines", got)
	}
	if got := Lines(out, "msg=four"); got != nil {
		t.Errorf("Lines = %q, want none", got)
	}
}

func TestPoll(t *testing.T) {
	n := 0
	if !Poll(10*time.Second, time.Millisecond, nil, func() bool { n++; return n == 3 }) || n != 3 {
		t.Errorf("Poll stopped after %d calls, want true after 3", n)
	}
	start := time.Now()
	if Poll(50*time.Millisecond, time.Millisecond, nil, func() bool { return false }) {
		t.Error("Poll = true for a condition never true")
	}
	if time.Since(start) < 50*time.Millisecond {
		t.Error("Poll gave up before its timeout")
	}
	stop := make(chan struct{})
	close(stop)
	n = 0
	if !Poll(time.Minute, time.Minute, stop, func() bool { n++; return n == 2 }) || n != 2 {
		t.Errorf("with stop closed: %d calls, want true at the last call (the 2nd)", n)
	}
}

func TestDNS(t *testing.T) {
	ctx := context.Background()
	d := StartDNS(t, map[string][]netip.Addr{"a.test.example": {netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")}})
	r := d.Resolver()
	if got, err := r.LookupNetIP(ctx, "ip", "A.test.example."); err != nil || len(got) != 2 {
		t.Errorf("a.test.example = %v, %v; want both addresses", got, err)
	}
	var dnsErr *net.DNSError
	if _, err := r.LookupNetIP(ctx, "ip", "b.test.example"); !errors.As(err, &dnsErr) || !dnsErr.IsNotFound {
		t.Errorf("a name not in the table: %v, want not found", err)
	}
	d.SetDefault(netip.MustParseAddr("192.0.2.53"))
	if got, err := r.LookupNetIP(ctx, "ip4", "b.test.example"); err != nil || len(got) != 1 || got[0] != netip.MustParseAddr("192.0.2.53") {
		t.Errorf("with a default: %v, %v", got, err)
	}
	d.Set("a.test.example", nil, true)
	if _, err := r.LookupNetIP(ctx, "ip4", "a.test.example"); err == nil {
		t.Error("no error while the server fails")
	}
	if d.Queries() < 4 {
		t.Errorf("Queries = %d, want at least one per lookup", d.Queries())
	}
}

func TestNewMeshKey(t *testing.T) {
	h, k := NewMeshKey(t)
	h2, _ := NewMeshKey(t)
	if len(h) != 64 || k.String() != h || h == h2 {
		t.Errorf("NewMeshKey = %q (%v), then %q; want two different keys of 64 hex digits", h, k, h2)
	}
}
