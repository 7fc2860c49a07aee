package e2e

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/relay"
)

// inNetns runs ops on one thread inside the network namespace of process
// pid, with its loopback brought up first; it returns once ops ran.
// Sockets made in ops belong to that namespace (the socket's namespace
// is its creating thread's), whichever threads use them afterwards.
func inNetns(t *testing.T, pid int, ops func()) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the thread leaves this process's namespace, and
		// when the goroutine returns the runtime ends the thread instead of
		// reusing it.
		runtime.LockOSThread()
		f, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", pid))
		if err != nil {
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		if err := testutil.LoopbackUp(); err != nil {
			errc <- err
			return
		}
		ops()
		errc <- nil
	}()
	if err := <-errc; err != nil {
		t.Fatalf("in the relay's network namespace: %v", err)
	}
}

// TestAllAddressesBothFamilies: `-a :PORT` (every address, as an
// operator writes it) answers TLS (the DERP listener, with a certificate
// for both loopback addresses) and STUN on 127.0.0.1 and on ::1. Binding
// every address is allowed here only because the relay runs in a network
// namespace of its own (CLONE_NEWNET, as root), whose only interface is
// loopback: nothing it binds is reachable from outside, and the test
// talks to it from a thread that entered that namespace.
func TestAllAddressesBothFamilies(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the relay binds every address, which is allowed only in a network namespace of its own (CI runs as root)")
	}
	const httpsPort, stunPort = 8443, 3478 // free: the namespace is new
	ca := newLoopbackCA(t)
	state := t.TempDir()
	crt, keyPath := relay.CertPaths(filepath.Join(state, "certs"), "127.0.0.1")
	testutil.NewCert(t, testutil.CertOptions{Names: []string{"127.0.0.1", "::1"}, CA: ca.ca}).WriteFiles(t, crt, keyPath)
	cmd := exec.Command(binary,
		"-hostname", "127.0.0.1", "-certmode", "manual",
		"-a", fmt.Sprintf(":%d", httpsPort), "-http-port", "-1", "-stun-port", fmt.Sprint(stunPort),
		"-state-dir", state, "-verify-clients=false", "-log-level", "debug")
	cmd.Env = append(os.Environ(), "TS_NO_LOGS_NO_SUPPORT=true")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET}
	proc := testutil.StartProcess(t, cmd, testutil.ProcessOptions{Name: "tailderp", StopGrace: stopGrace})
	// Its own namespace, not this host's: what it bound is reachable
	// from nowhere else.
	var mine, its unix.Stat_t
	if err := errors.Join(unix.Stat("/proc/self/ns/net", &mine), unix.Stat(fmt.Sprintf("/proc/%d/ns/net", proc.Cmd.Process.Pid), &its)); err != nil || mine.Ino == its.Ino {
		proc.Stop(0)
		t.Fatalf("the relay is not in a network namespace of its own (%v)", err)
	}
	proc.WaitOutput(t, "relay: serving DERP over HTTPS", 10*time.Second)
	proc.WaitOutput(t, "stun: serving", 10*time.Second)

	type result struct {
		what string
		err  error
	}
	var results []result
	inNetns(t, proc.Cmd.Process.Pid, func() {
		for _, ip := range []string{"127.0.0.1", "::1"} {
			addr := net.JoinHostPort(ip, fmt.Sprint(httpsPort))
			// The loopback just came up: ::1 may still be tentative
			// (duplicate address detection) for a moment.
			var err error
			pollFor(5*time.Second, func() bool {
				var c *tls.Conn
				c, err = tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", addr, ca.tlsConfig())
				if err == nil {
					c.Close()
				}
				return err == nil
			})
			results = append(results, result{"TLS " + addr, err})

			network, local := "udp4", "127.0.0.1:0"
			if ip == "::1" {
				network, local = "udp6", "[::1]:0"
			}
			var mapped, self netip.AddrPort
			pollFor(5*time.Second, func() bool {
				mapped, self, err = testutil.STUNBinding(network, local, net.JoinHostPort(ip, fmt.Sprint(stunPort)), time.Second)
				return err == nil
			})
			if err == nil && mapped != self {
				err = fmt.Errorf("STUN answered %v, want the request's source %v", mapped, self)
			}
			results = append(results, result{"STUN " + ip, err})
		}
	})
	for _, r := range results {
		if r.err != nil {
			t.Errorf("%s: %v", r.what, r.err)
		}
	}
	if len(results) != 4 {
		t.Fatalf("%d checks ran, want 4", len(results))
	}
}
