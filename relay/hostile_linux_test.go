//go:build linux

// The hostile tests that need Linux: /proc for memory and descriptors, and
// the process's limit on open files.

package relay_test

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"

	"github.com/tailderp/tailderp/relay"
)

// raiseFDLimit makes room for n more open files, raising the soft limit
// up to the hard one if needed, and returns how many there is room for.
func raiseFDLimit(t *testing.T, n int) int {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	open := len(openFDs(t))
	if need := uint64(open + n + 256); rl.Cur < need {
		prev := rl
		rl.Cur = min(need, rl.Max)
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &prev) })
	}
	return min(n, int(rl.Cur)-open-256)
}

// openFDs lists the process's open file descriptors.
func openFDs(t *testing.T) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var fds []int
	for _, e := range ents {
		if fd, err := strconv.Atoi(e.Name()); err == nil {
			fds = append(fds, fd)
		}
	}
	return fds
}

// rssKiB is the process's resident memory (VmRSS) in KiB, 0 if unknown.
func rssKiB() int {
	b, _ := os.ReadFile("/proc/self/status")
	for l := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return n
		}
	}
	return 0
}

// floodConn is one attacking connection, open until the server closes it.
type floodConn struct {
	opened, closed time.Time
}

// TestFloodOfHalfOpenConnections: 2,000 TLS handshakes that never finish
// (half send nothing, half a partial ClientHello) and 500 slowloris
// connections (a request header a few bytes at a time) are all closed by
// the relay's header timeout, while a DERP client pair connected before
// the flood relays packets throughout and is never cut, though it lives
// longer than that timeout. RSS is reported, not asserted.
func TestFloodOfHalfOpenConnections(t *testing.T) {
	nHalfOpen, nSlow := 2000, 500
	if room := raiseFDLimit(t, 2*(nHalfOpen+nSlow)); room < 2*(nHalfOpen+nSlow) {
		nHalfOpen, nSlow = room/2*4/5, room/2/5
		t.Logf("open files limit: only %d half-open and %d slowloris connections", nHalfOpen, nSlow)
	}
	// The request timeout stays at its default (30 s): what closes the
	// flood is the header timeout, well within the clients' patience
	// (waitFor).
	const headerTimeout = 2 * time.Second
	certs, pool := selfSigned(t)
	sink := &logSink{}
	s := startRelay(t, certs, func(s *relay.Server) {
		s.Logger = sink.logger()
		s.HeaderTimeout = headerTimeout
	})

	// The pair relays from before the flood to after it.
	a, b := newClient(t, s, pool), newClient(t, s, pool)
	aIn, bIn := watch(a), watch(b)
	aIn.mustBeAdmitted(t)
	bIn.mustBeAdmitted(t)
	pairSince := time.Now()
	exchange(t, a, a.SelfPublicKey(), aIn, b, b.SelfPublicKey(), bIn)

	runtime.GC()
	baseline, baseGoroutines := rssKiB(), runtime.NumGoroutine()
	if baseline == 0 {
		t.Fatal("no VmRSS in /proc/self/status")
	}

	var floodOpen atomic.Int64 // flood connections open now
	var relayed, relayedDuringFlood atomic.Int64
	relayErr := make(chan error, 1)
	stopRelaying := make(chan struct{})
	relayDone := make(chan struct{})
	go func() {
		defer close(relayDone)
		relayErr <- relayUntil(a, b, bIn, stopRelaying, func() {
			relayed.Add(1)
			if floodOpen.Load() > 0 {
				relayedDuringFlood.Add(1)
			}
		})
	}()

	var peak, peakGoroutines atomic.Int64
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			peak.Store(max(peak.Load(), int64(rssKiB())))
			peakGoroutines.Store(max(peakGoroutines.Load(), int64(runtime.NumGoroutine())))
			select {
			case <-stopSampling:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()

	// Each flood connection is watched by a goroutine reading until the
	// server closes it; the test never closes one itself before the end.
	conns := make([]floodConn, nHalfOpen+nSlow)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var floodErrs []error
	fail := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		floodErrs = append(floodErrs, err)
	}
	waitClosed := func(i int, c net.Conn) {
		c.SetReadDeadline(time.Now().Add(waitFor))
		var err error
		for buf := make([]byte, 16); err == nil; {
			_, err = c.Read(buf)
		}
		conns[i].closed = time.Now()
		floodOpen.Add(-1)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			fail(fmt.Errorf("flood connection %d still open after %v", i, waitFor))
		}
	}
	partialHello := []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03} // a 512-byte record, 11 bytes of it
	addr := s.LocalAddr().String()
	floodStart := time.Now()
	for i := range nHalfOpen {
		c, err := net.DialTimeout("tcp", addr, waitFor)
		if err != nil {
			t.Fatalf("half-open connection %d: %v", i, err)
		}
		defer c.Close()
		conns[i].opened = time.Now()
		floodOpen.Add(1)
		if i%2 == 1 {
			if _, err := c.Write(partialHello); err != nil {
				t.Fatalf("half-open connection %d: %v", i, err)
			}
		}
		wg.Go(func() { waitClosed(i, c) })
	}
	// Slowloris: handshakes a few at a time (the attacker's CPU is the
	// relay's here), then a request header a line every 100 ms.
	handshakes := make(chan struct{}, 8)
	var slowInHeader atomic.Int64 // closed while still sending the header
	for j := range nSlow {
		i := nHalfOpen + j
		floodOpen.Add(1)
		wg.Go(func() {
			handshakes <- struct{}{}
			c, err := tls.DialWithDialer(&net.Dialer{Timeout: waitFor}, "tcp", addr, &tls.Config{RootCAs: pool})
			<-handshakes
			conns[i].opened = time.Now()
			closedEarly := func() {
				// The server closed it already: its handshake
				// timeout can expire on a loaded machine.
				conns[i].closed = time.Now()
				floodOpen.Add(-1)
			}
			if err != nil {
				closedEarly()
				return
			}
			defer c.Close()
			if _, err := io.WriteString(c, "GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\n"); err != nil {
				closedEarly()
				return
			}
			stop, stopped := make(chan struct{}), make(chan struct{})
			var sent atomic.Int64
			go func() {
				defer close(stopped)
				for k := 0; ; k++ {
					select {
					case <-stop:
						return
					case <-time.After(100 * time.Millisecond):
					}
					if _, err := fmt.Fprintf(c, "X-%d: %d\r\n", k, k); err != nil {
						return
					}
					sent.Add(1)
				}
			}()
			waitClosed(i, c)
			close(stop)
			<-stopped
			if sent.Load() > 0 {
				slowInHeader.Add(1)
			}
		})
	}
	opened := time.Since(floodStart)
	wg.Wait()
	flood := time.Since(floodStart)
	close(stopSampling)
	<-sampled

	// Let the pair outlive the header timeout twice over (the request
	// timeout: TestDERPConnectionsOutliveTimeouts), then check it was
	// never cut.
	if d := 2*headerTimeout - time.Since(pairSince); d > 0 {
		time.Sleep(d)
	}
	close(stopRelaying)
	<-relayDone
	if err := <-relayErr; err != nil {
		t.Fatalf("relaying during the flood: %v", err)
	}
	exchange(t, a, a.SelfPublicKey(), aIn, b, b.SelfPublicKey(), bIn)
	for name, in := range map[string]*inbox{"a": aIn, "b": bIn} {
		select {
		case err := <-in.err:
			t.Errorf("client %s's DERP connection was cut: %v", name, err)
		default:
		}
	}

	runtime.GC()
	afterGC, afterGoroutines := rssKiB(), runtime.NumGoroutine()
	debug.FreeOSMemory()
	afterFree := rssKiB()

	for _, err := range floodErrs {
		t.Error(err)
	}
	t.Logf("flood: %d half-open TLS + %d slowloris connections opened in %v, all closed by the server after %v (header timeout %v)",
		nHalfOpen, nSlow, opened.Round(time.Millisecond), flood.Round(time.Millisecond), headerTimeout)
	for _, kind := range []struct {
		name     string
		from, to int
	}{{"silent", 0, nHalfOpen}, {"partial ClientHello", 0, nHalfOpen}, {"slowloris", nHalfOpen, len(conns)}} {
		var lifetimes, openedAt []time.Duration
		for i := kind.from; i < kind.to; i++ {
			if kind.to == nHalfOpen && (i%2 == 1) != (kind.name != "silent") {
				continue
			}
			lifetimes = append(lifetimes, conns[i].closed.Sub(conns[i].opened))
			openedAt = append(openedAt, conns[i].opened.Sub(floodStart))
		}
		slices.Sort(lifetimes)
		slices.Sort(openedAt)
		q := func(d []time.Duration, f float64) time.Duration {
			return d[int(f*float64(len(d)-1))].Round(time.Millisecond)
		}
		t.Logf("  %s: lifetime median %v, p90 %v, max %v; opened from %v to %v after the flood began",
			kind.name, q(lifetimes, .5), q(lifetimes, .9), q(lifetimes, 1), q(openedAt, 0), q(openedAt, 1))
	}
	t.Logf("DERP pair: %d packets relayed, %d of them while flood connections were open; connected %v, never cut",
		relayed.Load(), relayedDuringFlood.Load(), time.Since(pairSince).Round(time.Millisecond))
	t.Logf("  slowloris connections closed while still sending their header: %d of %d", slowInHeader.Load(), nSlow)
	t.Logf("RSS (whole test process, attacker side included): baseline %d KiB, peak %d KiB (+%d), after %d KiB (after FreeOSMemory %d KiB); goroutines %d, peak %d, after %d",
		baseline, peak.Load(), peak.Load()-int64(baseline), afterGC, afterFree, baseGoroutines, peakGoroutines.Load(), afterGoroutines)
	t.Logf("log: %d bytes, %d lines", sink.size(), len(sink.lines("")))
	if slowInHeader.Load() == 0 {
		t.Error("no slowloris connection got as far as sending its header")
	}
	if relayedDuringFlood.Load() == 0 {
		t.Error("no packet was relayed while flood connections were open")
	}
	if w := sink.lines("level=WARN"); len(w) != 0 {
		t.Errorf("warnings during the flood: %q", w)
	}
}

// relayUntil sends packets from a to b one at a time, each waited for,
// calling each for every packet that arrives, until stop is closed.
func relayUntil(a *derphttp.Client, b *derphttp.Client, bIn *inbox, stop <-chan struct{}, each func()) error {
	bKey := b.SelfPublicKey()
	for i := 0; ; i++ {
		select {
		case <-stop:
			return nil
		default:
		}
		payload := []byte("packet " + strconv.Itoa(i))
		if err := a.Send(bKey, payload); err != nil {
			return fmt.Errorf("send %d: %w", i, err)
		}
		timeout := time.After(waitFor)
	recv:
		for {
			select {
			case m := <-bIn.msgs:
				if p, ok := m.(derp.ReceivedPacket); ok && bytes.Equal(p.Data, payload) {
					break recv
				}
			case err := <-bIn.err:
				return fmt.Errorf("b's connection ended: %w", err)
			case <-timeout:
				return fmt.Errorf("packet %d not relayed within %v", i, waitFor)
			}
		}
		each()
	}
}

// TestFDExhaustionWarns: when accept fails for lack of file descriptors,
// the relay says so at warning level with the fix, once however often
// accept fails, and serves again once descriptors are free.
func TestFDExhaustionWarns(t *testing.T) {
	certs, pool := selfSigned(t)
	sink := &logSink{}
	s := startRelay(t, certs, func(s *relay.Server) { s.Logger = sink.logger() })
	addr := s.LocalAddr().(*net.TCPAddr)

	// A client socket made while descriptors are free, connected once
	// none is: the relay's accept then has none for it.
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	client := os.NewFile(uintptr(fd), "client")
	defer client.Close()

	var prev syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &prev); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			syscall.Setrlimit(syscall.RLIMIT_NOFILE, &prev)
		}
	}
	defer restore()
	// Descriptors must be below the soft limit: set it just above the
	// highest in use and fill the holes below it.
	lim := prev
	lim.Cur = uint64(slices.Max(openFDs(t)) + 1)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	var fillers []int
	defer func() {
		for _, f := range fillers {
			syscall.Close(f)
		}
	}()
	for {
		f, err := syscall.Open("/dev/null", syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			if !errors.Is(err, syscall.EMFILE) {
				t.Fatal(err)
			}
			break
		}
		fillers = append(fillers, f)
	}
	if err := syscall.Connect(fd, &syscall.SockaddrInet4{Port: addr.Port, Addr: [4]byte(addr.IP.To4())}); err != nil {
		restore()
		t.Fatal(err)
	}
	// accept fails, and net/http retries with a growing delay.
	deadline := time.Now().Add(waitFor)
	for listenerCounters(t, s)["counter_accept_fd_exhausted"] < 4 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	exhausted := listenerCounters(t, s)["counter_accept_fd_exhausted"]
	restore()
	for _, f := range fillers {
		syscall.Close(f)
	}
	fillers = nil

	warnings := sink.lines("level=WARN", "out of file descriptors")
	t.Logf("%d failed accepts, %d warnings: %q", exhausted, len(warnings), warnings)
	if exhausted < 4 {
		t.Fatalf("%d failed accepts, want at least 4", exhausted)
	}
	if len(warnings) != 1 {
		t.Fatalf("%d warnings for %d failed accepts, want 1", len(warnings), exhausted)
	}
	for _, want := range []string{"too many open files", "LimitNOFILE", "ulimit -n", "open_files_limit=" + strconv.FormatUint(lim.Cur, 10)} {
		if !strings.Contains(warnings[0], want) {
			t.Errorf("the warning does not say %q: %s", want, warnings[0])
		}
	}

	// The waiting client is served once descriptors are free.
	nc, err := net.FileConn(client)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	tc := tls.Client(nc, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
	tc.SetDeadline(time.Now().Add(waitFor))
	if err := tc.Handshake(); err != nil {
		t.Fatalf("the client that waited is not served: %v", err)
	}
}
