package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
	"tailscale.com/util/backoff"

	"github.com/tailderp/tailderp/internal/config"
	"github.com/tailderp/tailderp/internal/serving"
)

// rollClient is a DERP client of the region that behaves as magicsock's
// DERP reader does: it receives in a loop, and after an error backs off
// (util/backoff: n²×10 ms, ±50%, at most 5 s) and receives again, which
// reconnects to the region's first node that accepts a TCP connection.
// It notes when it loses an established connection and when it is
// connected again (derpserver's ServerInfo frame opens every connection).
type rollClient struct {
	id   int
	priv key.NodePrivate
	c    *derphttp.Client
	pkts chan []byte // packets received; a full channel drops them

	mu          sync.Mutex
	connected   bool
	server      key.NodePublic // the relay connected to, while connected
	disconnects int            // established connections lost
	lostAt      time.Time      // when the last one was lost; zero once connected again
	gaps        []time.Duration
}

func (rc *rollClient) run(ctx context.Context) {
	bo := backoff.NewBackoff(fmt.Sprintf("client-%d", rc.id), logger.Discard, 5*time.Second)
	for ctx.Err() == nil {
		m, err := rc.c.Recv()
		now := time.Now()
		if err != nil {
			rc.mu.Lock()
			if rc.connected {
				rc.connected, rc.disconnects, rc.lostAt = false, rc.disconnects+1, now
			}
			rc.mu.Unlock()
			if errors.Is(err, derphttp.ErrClientClosed) {
				return
			}
			bo.BackOff(ctx, err)
			continue
		}
		bo.BackOff(ctx, nil)
		switch m := m.(type) {
		case derp.ServerInfoMessage:
			srv := rc.c.ServerPublicKey()
			rc.mu.Lock()
			rc.connected, rc.server = true, srv
			if !rc.lostAt.IsZero() {
				rc.gaps = append(rc.gaps, now.Sub(rc.lostAt))
				rc.lostAt = time.Time{}
			}
			rc.mu.Unlock()
		case derp.ReceivedPacket:
			select {
			case rc.pkts <- bytes.Clone(m.Data):
			default:
			}
		}
	}
}

// rollState is a client's state at one moment.
type rollState struct {
	connected   bool
	server      key.NodePublic
	disconnects int
	lostAt      time.Time
	gaps        int
}

func (rc *rollClient) state() rollState {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rollState{rc.connected, rc.server, rc.disconnects, rc.lostAt, len(rc.gaps)}
}

// drainOrder is what watchDrain saw of a relay's shutdown.
type drainOrder struct {
	// atRefusal is serving.json's readiness read just after the HTTPS
	// port first refused a connection: "draining", "ready", "gone", or an
	// error.
	atRefusal string
	// drainingWhileAccepting: serving.json said draining, then the port
	// still accepted a connection (seen only if the poll fell in that
	// window; not asserted, it is a race by nature).
	drainingWhileAccepting bool
	refused                bool
}

// watchDrain polls relay p until its HTTPS port refuses a connection,
// and reads serving.json at once after that first refusal.
//
// Why this proves the order without a race: the relay writes "draining"
// to serving.json (an atomic rename) and only then closes its listener.
// A refused connection means the listener was closed before the dial;
// the read comes after the dial; so, if the order holds, the read must
// see "draining", whatever the scheduling. Had the relay closed its
// listener first, a read just after the first refusal could find the
// file still saying ready (the test catches it when the poll falls in
// that window). "gone" (the process already exited and removed the file
// between the refusal and the read) proves nothing, so it fails too.
func watchDrain(p *relayProc, stop <-chan struct{}) <-chan drainOrder {
	out := make(chan drainOrder, 1)
	path := filepath.Join(p.StateDir, config.ServingFile)
	addr := fmt.Sprintf("127.0.0.1:%d", p.HTTPSPort)
	readiness := func() string {
		sv, err := serving.Read(path)
		switch {
		case err != nil:
			if errors.Is(err, syscall.ENOENT) {
				return "gone"
			}
			return err.Error()
		case sv.Readiness == nil:
			return "no readiness"
		case sv.Readiness.Draining:
			return "draining"
		}
		return "ready"
	}
	go func() {
		var o drainOrder
		defer func() { out <- o }()
		deadline := time.Now().Add(stopGrace)
		for time.Now().Before(deadline) {
			before := readiness()
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
				o.drainingWhileAccepting = o.drainingWhileAccepting || before == "draining"
			} else if errors.Is(err, syscall.ECONNREFUSED) {
				o.atRefusal, o.refused = readiness(), true
				return
			}
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()
	return out
}

// TestRollingRestart: three meshed tailderp binaries (CA-signed loopback
// certificates, one mesh key) are one region; 300 DERP clients list the
// region's nodes in the six different orders, so each relay is the home
// of 100, and reconnect as magicsock does. Each relay in turn gets
// SIGTERM, exits, and is started again on the same port and state
// directory. Each time:
//   - serving.json says draining before the HTTPS port refuses
//     connections (watchDrain);
//   - the relay exits 0 within its drain timeout;
//   - every client it had loses its connection and is connected to a
//     relay of the region again within 3 s of losing it;
//   - no client of the other two relays loses its connection;
//   - a packet from a client on each relay reaches a client on each
//     other relay (through the mesh), the restarted one included.
//
// It logs the reconnect gaps (p50/p99/max), the time from SIGTERM to
// exit and the relay's own "stopped serving" time.
func TestRollingRestart(t *testing.T) {
	const (
		nClients     = 300
		backWithin   = 3 * time.Second  // a client's bound to reconnect, from losing its connection
		relayWithin  = 10 * time.Second // bound for relaying across the mesh after a restart
		connectBound = 60 * time.Second // bound for 300 first connections on 2 busy cores
	)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	ca := newLoopbackCA(t)
	meshKey := newMeshKeyFile(t)
	relays := make([]*relayProc, 3)
	relayKeys := make([]key.NodePublic, 3)
	var ports []int
	for i := range relays {
		relays[i], relayKeys[i] = caSignedRelay(t, ca)
		ports = append(ports, relays[i].HTTPSPort)
	}
	relayOf := func(k key.NodePublic) int { return slices.Index(relayKeys, k) }
	for _, p := range relays {
		p.cmd.Args = append(p.cmd.Args, fleetMeshArgs(ca, meshKey, ports...)...)
		p.start()
	}

	clientCtx, stopClients := context.WithCancel(ctx)
	var clientsDone sync.WaitGroup
	newClient := func(id int, region *tailcfg.DERPRegion) *rollClient {
		rc := &rollClient{id: id, priv: key.NewNode(), pkts: make(chan []byte, 16)}
		rc.c = newRegionClient(ca, rc.priv, region)
		clientsDone.Go(func() { rc.run(clientCtx) })
		return rc
	}
	orders := [][]int{{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {1, 2, 0}, {2, 0, 1}, {2, 1, 0}}
	clients := make([]*rollClient, nClients)
	for i := range clients {
		o := orders[i%len(orders)]
		clients[i] = newClient(i, regionOf(relays[o[0]], relays[o[1]], relays[o[2]]))
	}
	// One probe per relay, in a region of that relay alone: the ends of
	// the relaying checks.
	probes := make([]*rollClient, 3)
	for i := range probes {
		probes[i] = newClient(nClients+i, regionOf(relays[i]))
	}
	t.Cleanup(func() {
		stopClients()
		for _, rc := range append(clients, probes...) {
			rc.c.Close()
		}
		clientsDone.Wait()
	})

	allConnected := func(d time.Duration) {
		t.Helper()
		var missing []int
		ok := pollFor(d, func() bool {
			missing = missing[:0]
			for _, rc := range append(clients, probes...) {
				if !rc.state().connected {
					missing = append(missing, rc.id)
				}
			}
			return len(missing) == 0
		})
		if !ok {
			t.Fatalf("%d clients not connected within %v: %v", len(missing), d, missing)
		}
	}
	allConnected(connectBound)
	// Each client is at home: the first node of its order.
	for i, rc := range clients {
		if got, want := relayOf(rc.state().server), orders[i%len(orders)][0]; got != want {
			t.Fatalf("client %d is on relay %d, want its region's first node, relay %d", i, got, want)
		}
	}
	relayingWorks := func(when string) {
		t.Helper()
		for i, from := range probes {
			for j, to := range probes {
				if i == j {
					continue
				}
				msg := fmt.Appendf(nil, "%s: relay %d to relay %d", when, i, j)
				got := pollFor(relayWithin, func() bool {
					from.c.Send(to.priv.Public(), msg) // resent until it arrives: the mesh may be reconnecting
					for {
						select {
						case b := <-to.pkts:
							if bytes.Equal(b, msg) {
								return true
							}
						case <-time.After(50 * time.Millisecond):
							return false
						}
					}
				})
				if !got {
					t.Fatalf("%s: a packet from a client on relay %d never reached a client on relay %d within %v", when, i, j, relayWithin)
				}
			}
		}
	}
	relayingWorks("before the restarts")

	var gaps []time.Duration
	stoppedRe := regexp.MustCompile(`stopped serving.*took=(\S+)`)
	for k, p := range relays {
		allConnected(relayWithin)
		before := make([]rollState, nClients)
		var onK []int
		for i, rc := range clients {
			before[i] = rc.state()
			if relayOf(before[i].server) == k {
				onK = append(onK, i)
			}
		}
		if len(onK) == 0 {
			t.Fatalf("restart %d: no client on relay %d", k, k)
		}

		stopWatch := make(chan struct{})
		order := watchDrain(p, stopWatch)
		time.Sleep(20 * time.Millisecond) // the watch polls the port before the signal
		sent := time.Now()
		if err := p.proc.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case <-p.proc.Done():
		case <-time.After(stopGrace):
			t.Fatalf("relay %d: no exit within %v of SIGTERM", k, stopGrace)
		}
		exitTook := time.Since(sent)
		close(stopWatch)
		if err := p.proc.Err(); err != nil {
			t.Errorf("relay %d exited with %v, want status 0", k, err)
		}
		o := <-order
		// The order itself, from the relay's own log (one process writes
		// it in order): serving.json says draining, then the listeners
		// close. The watch above sees it from outside when its read lands
		// before the relay exits and removes serving.json ("gone": a
		// shutdown of a few ms can be over before the read).
		out := p.proc.Output.String()
		drained, closed := strings.Index(out, `msg="readiness: draining"`), strings.Index(out, `msg="listeners closed`)
		if drained < 0 || closed < 0 || drained > closed {
			t.Errorf("relay %d: \"readiness: draining\" at %d, \"listeners closed\" at %d in its log: want readiness false before the listener closes", k, drained, closed)
		}
		if !o.refused {
			t.Errorf("relay %d: its HTTPS port never refused a connection while it stopped", k)
		} else if o.atRefusal != "draining" && o.atRefusal != "gone" {
			t.Errorf("relay %d: serving.json said %q when the HTTPS port first refused a connection, want draining (readiness false before the listener closes)", k, o.atRefusal)
		}
		took := "?"
		if m := stoppedRe.FindStringSubmatch(p.proc.Output.String()); m != nil {
			took = m[1]
		}
		t.Logf("relay %d: SIGTERM to exit %v (its own \"stopped serving\" took %s); %d clients on it; saw draining while still accepting: %v",
			k, exitTook.Round(time.Millisecond), took, len(onK), o.drainingWhileAccepting)

		// Started again at once, as systemd or a StatefulSet would; its
		// clients are reconnecting meanwhile.
		p.restart()

		// Each client of relay k: lost its connection, and is connected
		// again within backWithin of losing it. The wait per client is
		// bounded by its own loss time.
		pending := slices.Clone(onK)
		var late []string
		pollFor(stopGrace+backWithin, func() bool {
			now := time.Now()
			pending = slices.DeleteFunc(pending, func(i int) bool {
				s := clients[i].state()
				switch {
				case s.gaps > before[i].gaps:
					return true // connected again
				case s.disconnects > before[i].disconnects && now.Sub(s.lostAt) > backWithin:
					late = append(late, fmt.Sprintf("client %d (lost %v ago)", i, now.Sub(s.lostAt).Round(time.Millisecond)))
					return true
				}
				return false
			})
			return len(pending) == 0
		})
		for _, i := range pending {
			t.Errorf("restart %d: client %d of relay %d never lost its connection or never came back: %+v", k, i, k, clients[i].state())
		}
		if len(late) > 0 {
			t.Errorf("restart %d: %d clients not connected again within %v of losing their connection: %v", k, len(late), backWithin, late)
		}
		for _, i := range onK {
			clients[i].mu.Lock()
			gaps = append(gaps, clients[i].gaps[before[i].gaps:]...)
			clients[i].mu.Unlock()
		}

		// The restarted relay serves and relays again, through the mesh
		// both ways (its probe reconnects by itself).
		allConnected(relayWithin)
		relayingWorks(fmt.Sprintf("after restarting relay %d", k))

		// The other relays' clients never noticed.
		lost := 0
		for i, rc := range clients {
			if relayOf(before[i].server) == k {
				continue
			}
			if s := rc.state(); s.disconnects != before[i].disconnects {
				lost++
				t.Errorf("restart %d: client %d on relay %d (not restarting) lost its connection %d times", k, i, relayOf(before[i].server), s.disconnects-before[i].disconnects)
			}
		}
		t.Logf("restart %d: %d clients of relay %d reconnected; %d of %d clients on the other relays lost their connection", k, len(onK), k, lost, nClients-len(onK))
	}

	slices.Sort(gaps)
	if len(gaps) > 0 {
		pct := func(p float64) time.Duration { return gaps[min(len(gaps)-1, int(p*float64(len(gaps))))] }
		t.Logf("reconnect gaps over %d lost connections: p50 %v, p99 %v, max %v",
			len(gaps), pct(0.50).Round(100*time.Microsecond), pct(0.99).Round(100*time.Microsecond), gaps[len(gaps)-1].Round(100*time.Microsecond))
	}
}
