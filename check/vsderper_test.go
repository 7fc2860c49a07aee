//go:build derpbench

// TestVsDerper measures tailderp against upstream derper on this machine:
// all on loopback with the same self-signed certificate, the same load
// (check.Load) against each. Every round starts every server as a fresh
// process, then runs each part of the load (idle clients, the reconnect
// storm, connects, throughput with 1, 8 and 64 pairs, STUN) against every
// server back to back, the order rotated by round and by part. It reports
// medians, the ratios against the first server and whether the targets are
// met.
//
// Four servers:
//
//   - derper: tailscale.com/cmd/derper at the go.mod version, no client
//     verification (its default).
//   - tailderp: -verify-clients=false, the plain comparison.
//   - tailderp+admission: admission on, the way tailderp runs in
//     production: its embedded node is logged in to a real tailnet (Tailscale's
//     test control server, in this process), and every load client's key
//     is a node of that tailnet, so every connect passes the real
//     admission path (derpserver's admission hook → verify → the node's
//     key set). No mesh key is involved.
//   - derper+tailscaled: what users run today to admit only their tailnet:
//     derper --verify-clients --socket=S beside a real tailscaled
//     (tailscale.com/cmd/tailscaled at the go.mod version, userspace
//     networking) serving its LocalAPI on S and logged in to a tailnet
//     with the same members (its own test control server; see
//     vsPairTailnet), so every connect costs derper a LocalAPI WhoIsNodeKey
//     call to tailscaled.
//
// And two that compare tailderp with itself (docs/PERFORMANCE.md, "Tenant
// isolation: single-tailnet unchanged"), each with a tailnet, ports and
// state of its own:
//
//   - tailderp+admission@base: tailderp+admission running the binary of
//     TAILDERP_BASE_BIN (the script's BASE_REV), an earlier tailderp.
//   - tailderp+2tailnets: tailderp+admission with a second tailnet in a
//     -tailnets file (its own test control server, no clients): the relay
//     runs one DERP server per tailnet and routes every connect by node key.
//
// The storm part: N admitted clients connect and stay idle; the relay
// process is restarted (tailderp, or derper alone: tailscaled stays up);
// every client reconnects the way a Tailscale client's magicsock does
// (derphttp's Recv loop with util/backoff: n²×10 ms, ±50%, at most 5 s) and,
// once connected, sends one packet to itself through the relay; the storm
// ends when every one of them has received its packet, or at the time
// bound. With the storm's N clients connected (before the restart) it also
// reads the VmRSS of the whole setup: the relay process, plus tailscaled
// for derper+tailscaled.
//
// It is not a test of correctness and asserts nothing about time. Run it
// with scripts/bench-vs-derper.sh, which builds the binaries:
//
//	TAILDERP_BIN=... DERPER_BIN=... TAILSCALED_BIN=... [TAILDERP_BASE_BIN=...] go test -tags derpbench -run '^TestVsDerper$' -v -timeout 60m ./check/ -args -rounds 3
package check_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"math"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"tailscale.com/client/local"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/ipn"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
	"tailscale.com/types/preftype"
	"tailscale.com/util/backoff"

	"github.com/tailderp/tailderp/check"
	"github.com/tailderp/tailderp/internal/testtailnet"
	"github.com/tailderp/tailderp/internal/testutil"
	"github.com/tailderp/tailderp/relay"
)

var (
	vsRounds   = flag.Int("rounds", 3, "rounds; each round runs the load once against every server")
	vsOut      = flag.String("out", "", "also write the report (markdown) to this file")
	vsServers  = flag.String("servers", "derper,tailderp,tailderp+admission,derper+tailscaled", "servers to compare; ratios are against the first")
	vsIdle     = flag.Int("idle", 1000, "idle clients per run")
	vsDuration = flag.Duration("load-duration", 2*time.Second, "time bound of each measurement")
	vsInFlight = flag.Int("in-flight", 32, "packets in flight per pair")
	vsParts    = flag.String("parts", "idle,storm,connect,throughput,stun", "parts of the load to run")
	vsStormN   = flag.Int("storm", 500, "storm: admitted clients connected and idle when the relay restarts; the setup's total RSS is read with them connected")
	vsStormMax = flag.Duration("storm-timeout", 60*time.Second, "storm: time bound, from the restart, for every client to relay a packet again")
	vsLogs     = flag.String("logs", "", "keep the servers' logs in this directory (default: a temporary one, removed)")
	vsCPUs     = flag.String("server-cpus", "", "if set, run every server process (relays, tailscaled) on these CPUs only (taskset -c LIST); the script's LOAD_CPUS puts the load elsewhere")
)

// vsServer is one kind of server under test.
type vsServer struct {
	name  string
	start func(t *testing.T) *vsProc
}

// vsProc is a running server process: the relay, and for
// derper+tailscaled its companion tailscaled, which outlives restarts of
// the relay.
type vsProc struct {
	cmd       *exec.Cmd
	derpPort  int
	stunPort  int
	done      chan struct{}
	logPath   string
	startedAt time.Time
	companion *vsProc // tailscaled beside derper; nil for the others

	// How it was started, for restart.
	logDir, name, bin string
	env, args         []string
}

// stop stops the relay and its companion.
func (p *vsProc) stop(t *testing.T) {
	p.stopOne(t)
	if p.companion != nil {
		p.companion.stopOne(t)
	}
}

// stopOne stops this process only: SIGTERM, then SIGKILL after 10s.
func (p *vsProc) stopOne(t *testing.T) {
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
		t.Logf("%s: killed after 10s", p.cmd.Path)
	}
}

// restart starts the relay again as it was started (same binary, flags,
// ports and state), keeping the companion. The old process must have
// exited.
func (p *vsProc) restart(t *testing.T) *vsProc {
	np := vsStart(t, p.logDir, p.name, p.bin, p.env, p.derpPort, p.stunPort, p.args...)
	np.companion = p.companion
	return np
}

// pids returns the relay's process ID and the companion's (0 if none).
func (p *vsProc) pids() (relay, node int) {
	relay = p.cmd.Process.Pid
	if p.companion != nil {
		node = p.companion.cmd.Process.Pid
	}
	return relay, node
}

func vsStart(t *testing.T, logDir, name, bin string, env []string, derpPort, stunPort int, args ...string) *vsProc {
	t.Helper()
	p := &vsProc{derpPort: derpPort, stunPort: stunPort, done: make(chan struct{}), startedAt: time.Now(),
		logDir: logDir, name: name, bin: bin, env: env, args: args}
	p.logPath = filepath.Join(logDir, fmt.Sprintf("%s-%d.log", strings.ReplaceAll(name, "+", "-"), time.Now().UnixNano()))
	logf, err := os.Create(p.logPath)
	if err != nil {
		t.Fatal(err)
	}
	if *vsCPUs != "" {
		// taskset execs bin: the process ID stays the one measured.
		p.cmd = exec.Command("taskset", append([]string{"-c", *vsCPUs, bin}, args...)...)
	} else {
		p.cmd = exec.Command(bin, args...)
	}
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	return p
}

// keyPool hands out the load clients' keys in order, each once: every
// part of the load gets a pool of its own over the same keys, for every
// server and every round, so every server sees the same keys, and the
// tailnet needs only as many nodes as the largest part has clients (the
// clients of one part are gone before the next part starts).
type keyPool struct {
	mu   sync.Mutex
	keys []key.NodePrivate
	next int
}

func (p *keyPool) get() key.NodePrivate {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.next >= len(p.keys) {
		panic(fmt.Sprintf("key pool of %d exhausted", len(p.keys)))
	}
	k := p.keys[p.next]
	p.next++
	return k
}

// admitInTailnet makes every key a node of the test control server's
// tailnet, so the relay's embedded node sees it as a peer.
func admitInTailnet(ctl *testtailnet.Control, keys []key.NodePrivate) {
	ctl.Server.AddFakeNode() // initialises the node table; one more peer
	for i, k := range keys {
		id := 1_000_000 + i
		addr := netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 96, byte(i >> 8), byte(i)}), 32)
		ctl.Server.UpdateNode(&tailcfg.Node{
			ID:                tailcfg.NodeID(id),
			StableID:          tailcfg.StableNodeID(fmt.Sprintf("LOAD%06d", i)),
			Name:              fmt.Sprintf("load-%d.fake-control.example.net.", i),
			User:              tailcfg.UserID(id),
			Key:               k.Public(),
			Machine:           key.NewMachine().Public(),
			DiscoKey:          key.NewDisco().Public(),
			MachineAuthorized: true,
			Addresses:         []netip.Prefix{addr},
			AllowedIPs:        []netip.Prefix{addr},
		})
	}
}

func TestVsDerper(t *testing.T) {
	tailderpBin, derperBin, tailscaledBin := os.Getenv("TAILDERP_BIN"), os.Getenv("DERPER_BIN"), os.Getenv("TAILSCALED_BIN")
	tailderpBaseBin := os.Getenv("TAILDERP_BASE_BIN")
	if tailderpBin == "" {
		t.Skip("set TAILDERP_BIN, DERPER_BIN for derper, TAILSCALED_BIN for derper+tailscaled, TAILDERP_BASE_BIN for tailderp+admission@base (scripts/bench-vs-derper.sh builds them)")
	}
	testtailnet.SetTestEnv(t) // inherited by tailderp+admission's embedded node and by tailscaled
	work := t.TempDir()
	logDir := filepath.Join(work, "logs")
	if *vsLogs != "" {
		logDir = *vsLogs
	}
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		t.Fatal(err)
	}
	certDir := filepath.Join(work, "certs")
	if _, err := relay.EnsureSelfSignedIPCert(certDir, "127.0.0.1"); err != nil {
		t.Fatal(err)
	}
	mc, err := relay.LoadManualCerts(certDir, "127.0.0.1", nil)
	if err != nil {
		t.Fatal(err)
	}
	info, _ := mc.Current()
	pin := info.CertName

	lc := check.LoadConfig{
		InFlight: *vsInFlight,
		Duration: *vsDuration,
		Idle:     *vsIdle,
	}
	pairs := []int{1, 8, 64}
	// Keys: every part starts at the first key (see keyPool), so the pool
	// is as large as the largest part: Load's probe plus its clients.
	poolSize := max(1+max(lc.Idle, 0), 1+200+640, 1+2*slices.Max(pairs), *vsStormN)
	pool := &keyPool{}
	for range poolSize {
		pool.keys = append(pool.keys, key.NewNode())
	}

	// The tailnet for derper+tailscaled, the same way (see vsPairTailnet).
	pairDERP, pairSTUN := testutil.FreePort(t, "tcp"), testutil.FreePort(t, "udp")
	pairDir := filepath.Join(work, "tailscaled")
	// tailscaled's --port: a port free on 127.0.0.1, the same all run.
	// With TS_DEBUG_ALWAYS_USE_DERP (SetTestEnv) magicsock opens no UDP
	// socket at all, so nothing binds it; vsAuditSockets checks.
	pairWGPort := testutil.FreePort(t, "udp")
	var pairCtl *testtailnet.Control

	common := func(derpPort, stunPort int) []string {
		return []string{"-certmode", "manual", "-certdir", certDir, "-hostname", "127.0.0.1",
			"-a", fmt.Sprintf("127.0.0.1:%d", derpPort), "-stun-port", fmt.Sprint(stunPort), "-http-port", "-1"}
	}
	// admission is a tailderp server with admission on, the way tailderp
	// runs in production: its embedded node is logged in to a tailnet of
	// its own (a test control server in this process whose DERP map names
	// only this relay, and whose members are the load's keys), on ports
	// and a state directory of its own, kept across rounds. more, if not
	// nil, is called at every start with the relay's ports and returns
	// extra flags, and then waits for what those flags start.
	admission := func(name, bin string, more func(t *testing.T, derpPort, stunPort int, log func() string) (args []string, wait func())) vsServer {
		derpPort, stunPort := testutil.FreePort(t, "tcp"), testutil.FreePort(t, "udp")
		state := filepath.Join(work, strings.NewReplacer("+", "-", "@", "-").Replace(name)+"-state")
		var ctl *testtailnet.Control
		return vsServer{name, func(t *testing.T) *vsProc {
			if bin == "" {
				t.Fatalf("%s: no binary (TAILDERP_BASE_BIN: scripts/bench-vs-derper.sh builds it when BASE_REV is set)", name)
			}
			if ctl == nil {
				ctl = testtailnet.NewControl(t, testtailnet.DERPRegion(derpPort, stunPort, pin))
				admitInTailnet(ctl, pool.keys)
				t.Logf("%s's tailnet: %d nodes before the relay's own", name, len(ctl.Server.AllNodes()))
			}
			env := []string{"TAILSCALE_AUTH_KEY=" + ctl.AuthKey, "TAILSCALE_CONTROL_URL=" + ctl.URL}
			args := append(common(derpPort, stunPort), "-state-dir", state)
			var p *vsProc
			var wait func()
			if more != nil {
				var extra []string
				extra, wait = more(t, derpPort, stunPort, func() string {
					b, _ := os.ReadFile(p.logPath)
					return string(b)
				})
				args = append(args, extra...)
			}
			p = vsStart(t, logDir, name, bin, env, derpPort, stunPort, args...)
			if wait != nil {
				wait()
			}
			return p
		}}
	}
	// secondTailnet gives a relay a second tailnet, B: a -tailnets file
	// naming a test control server of its own (the same DERP region: this
	// relay), with no clients; the load's keys are all in the default
	// tailnet. The relay then runs one DERP server per tailnet and routes
	// every connect by its node key (relay/tenants.go). The start waits
	// until B's node is running, so B's node is part of what is measured.
	var ctlB *testtailnet.Control
	secondTailnet := func(t *testing.T, derpPort, stunPort int, log func() string) ([]string, func()) {
		file := filepath.Join(work, "tailnets.json")
		if ctlB == nil {
			ctlB = testtailnet.NewControl(t, testtailnet.DERPRegion(derpPort, stunPort, pin))
			keyFile := filepath.Join(work, "tailnet-b.key")
			if err := os.WriteFile(keyFile, []byte(ctlB.AuthKey+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(file, fmt.Appendf(nil, `{"tailnets": [{"name": "b", "control_url": %q, "auth_key_file": %q}]}`, ctlB.URL, keyFile), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		return []string{"-tailnets", file}, func() {
			const running = `serving on the tailnet only" tailnet=b`
			deadline := time.Now().Add(90 * time.Second)
			for !strings.Contains(log(), running) {
				if time.Now().After(deadline) {
					t.Fatalf("tailderp+2tailnets: tailnet b's node not running after 90s (no %q in the log):\n%s", running, tail([]byte(log()), 4000))
				}
				time.Sleep(50 * time.Millisecond)
			}
		}
	}
	servers := map[string]vsServer{
		"derper": {"derper", func(t *testing.T) *vsProc {
			if derperBin == "" {
				t.Fatal("derper needs DERPER_BIN (scripts/bench-vs-derper.sh builds it)")
			}
			d, s := testutil.FreePort(t, "tcp"), testutil.FreePort(t, "udp")
			return vsStart(t, logDir, "derper", derperBin, nil, d, s, append(common(d, s), "-c", filepath.Join(work, "derper.key"))...)
		}},
		"tailderp": {"tailderp", func(t *testing.T) *vsProc {
			d, s := testutil.FreePort(t, "tcp"), testutil.FreePort(t, "udp")
			return vsStart(t, logDir, "tailderp", tailderpBin, nil, d, s,
				append(common(d, s), "-state-dir", filepath.Join(work, "tailderp-state"), "-verify-clients=false")...)
		}},
		"tailderp+admission":      admission("tailderp+admission", tailderpBin, nil),
		"tailderp+admission@base": admission("tailderp+admission@base", tailderpBaseBin, nil),
		"tailderp+2tailnets":      admission("tailderp+2tailnets", tailderpBin, secondTailnet),
		"derper+tailscaled": {"derper+tailscaled", func(t *testing.T) *vsProc {
			if tailscaledBin == "" || derperBin == "" {
				t.Fatal("derper+tailscaled needs DERPER_BIN and TAILSCALED_BIN (scripts/bench-vs-derper.sh builds them)")
			}
			if pairCtl == nil {
				pairCtl = vsPairTailnet(t, pairDERP, pairSTUN, pin, pool.keys)
				t.Logf("derper+tailscaled's tailnet: %d nodes before tailscaled's own", len(pairCtl.Server.AllNodes()))
			}
			tsd, sock := vsTailscaled(t, tailscaledBin, logDir, pairDir, pairWGPort, pairCtl, pool.keys[0].Public())
			p := vsStart(t, logDir, "derper+tailscaled", derperBin, nil, pairDERP, pairSTUN,
				append(common(pairDERP, pairSTUN), "-c", filepath.Join(work, "derper-pair.key"),
					"--verify-clients", "--socket", sock)...)
			p.companion = tsd
			return p
		}},
	}
	var order []vsServer
	for n := range strings.SplitSeq(*vsServers, ",") {
		s, ok := servers[n]
		if !ok {
			t.Fatalf("-servers: unknown %q", n)
		}
		order = append(order, s)
	}

	// Every round starts all servers fresh (an idle relay uses no CPU),
	// then runs each part of the load against every server back to back,
	// in an order rotated by round and by part: a burst of noise from
	// elsewhere on the machine then hits all servers' numbers for that
	// part alike, instead of one server's whole run.
	type part struct {
		name  string
		apply func(*check.LoadConfig)
	}
	parts := []part{
		// Idle first, on fresh processes: RSS growth is then measured
		// before anything else has grown the heap.
		{"idle", func(c *check.LoadConfig) { c.Skip = []string{"connect", "throughput", "stun"} }},
		// The storm second: the setup's RSS with its clients is read on
		// processes that have served only the idle clients; the relay
		// restarts in it, so the parts after it run on the new process.
		{"storm", nil},
		{"connect", func(c *check.LoadConfig) { c.Skip = []string{"idle", "throughput", "stun"} }},
	}
	for _, p := range pairs {
		parts = append(parts, part{fmt.Sprintf("throughput %d pairs", p), func(c *check.LoadConfig) {
			c.Skip, c.Pairs = []string{"idle", "connect", "stun"}, []int{p}
		}})
	}
	parts = append(parts, part{"stun", func(c *check.LoadConfig) { c.Skip = []string{"idle", "connect", "throughput"} }})

	want := map[string]bool{}
	for p := range strings.SplitSeq(*vsParts, ",") {
		want[p] = true
	}
	parts = slices.DeleteFunc(parts, func(p part) bool { return !want[strings.Fields(p.name)[0]] })

	rotate := func(s []vsServer, n int) []vsServer {
		n %= len(s)
		return append(slices.Clone(s[n:]), s[:n]...)
	}
	results := map[string][]*vsResult{}
	for round := range *vsRounds {
		type running struct {
			p      *vsProc
			region *tailcfg.DERPRegion
			res    *vsResult
		}
		run := map[string]*running{}
		stopAll := func() {
			for _, rs := range run {
				rs.p.stop(t)
			}
		}
		for _, srv := range rotate(order, round) {
			p := srv.start(t)
			node := &tailcfg.DERPNode{Name: "900b", RegionID: 900, HostName: "127.0.0.1", IPv4: "127.0.0.1", IPv6: "none",
				DERPPort: p.derpPort, STUNPort: p.stunPort, CertName: pin}
			rs := &running{p: p, region: &tailcfg.DERPRegion{RegionID: 900, RegionCode: "bench", Nodes: []*tailcfg.DERPNode{node}},
				res: &vsResult{LoadResult: &check.LoadResult{}}}
			run[srv.name] = rs
			ready := vsWaitReady(t, p, rs.region, pool.keys[0])
			t.Logf("round %d: %s ready %v after start", round+1, srv.name, ready.Round(time.Millisecond))
		}
		if round == 0 {
			for _, srv := range order {
				vsAuditSockets(t, srv.name, run[srv.name].p, true)
			}
		}
		for pi, pt := range parts {
			for _, srv := range rotate(order, round+pi) {
				rs := run[srv.name]
				// This part's keys, each used once.
				keys := &keyPool{keys: pool.keys}
				if pt.apply == nil { // the storm
					st, np := vsRunStorm(t, srv.name, rs.p, rs.region, keys, *vsStormN, *vsStormMax)
					rs.p, rs.res.Storm = np, st
					t.Logf("round %d %s: %s", round+1, srv.name, st)
					// The parts after it need a relay that serves.
					vsWaitReady(t, rs.p, rs.region, pool.keys[0])
					continue
				}
				cfg := lc
				cfg.Region = rs.region
				cfg.NewKey = keys.get
				cfg.PID = rs.p.cmd.Process.Pid
				pt.apply(&cfg)
				cpu0 := rs.p.setupCPU()
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
				res, err := check.Load(ctx, cfg)
				cancel()
				if pt.name == "connect" && err == nil {
					// Load's probe, then the sequential and concurrent connects.
					if n := 1 + res.ConnectSeq.N + res.ConnectPar.N; n > 0 {
						rs.res.ConnectCPU = (rs.p.setupCPU() - cpu0) / time.Duration(n)
					}
				}
				if err != nil {
					stopAll()
					log, _ := os.ReadFile(rs.p.logPath)
					t.Fatalf("round %d %s %s: %v\n%s log:\n%s", round+1, srv.name, pt.name, err, srv.name, tail(log, 4000))
				}
				mergeLoad(rs.res.LoadResult, res)
			}
		}
		for _, srv := range order {
			rs := run[srv.name]
			// Every process, after all the load: no socket beyond
			// loopback (details logged in the first round).
			vsAuditSockets(t, srv.name, rs.p, round == 0)
			rs.p.stop(t)
			var sb strings.Builder
			rs.res.WriteText(&sb)
			if c := rs.res.ConnectCPU; c > 0 {
				fmt.Fprintf(&sb, "connect     setup CPU (relay + tailscaled) %v per connect\n", c.Round(time.Microsecond))
			}
			if st := rs.res.Storm; st != nil {
				fmt.Fprintf(&sb, "storm       %s\n", st)
			}
			t.Logf("round %d %s:\n%s", round+1, srv.name, sb.String())
			results[srv.name] = append(results[srv.name], rs.res)
		}
	}

	var names []string
	for _, s := range order {
		names = append(names, s.name)
	}
	report := vsReport(names, results, *vsRounds)
	fmt.Println(report)
	if *vsOut != "" {
		if err := os.WriteFile(*vsOut, []byte(report), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// vsResult is one server's results of one round.
type vsResult struct {
	*check.LoadResult
	Storm *vsStorm
	// ConnectCPU is the CPU time (user + system) the setup (relay, and
	// tailscaled) spent in the connect part, per successful connect.
	ConnectCPU time.Duration
}

// vsCPU returns the CPU time (user + system) process pid has used, from
// /proc/PID/stat (clock ticks of 10 ms: USER_HZ is 100 on Linux).
func vsCPU(pid int) time.Duration {
	if pid == 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:])) // f[0] is field 3 (state)
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64) // field 14
	stime, _ := strconv.ParseInt(f[12], 10, 64) // field 15
	return time.Duration(utime+stime) * 10 * time.Millisecond
}

// setupCPU is the CPU time of p and its companion.
func (p *vsProc) setupCPU() time.Duration {
	relay, node := p.pids()
	return vsCPU(relay) + vsCPU(node)
}

// mergeLoad adds the parts src measured to dst.
func mergeLoad(dst, src *check.LoadResult) {
	if src.Idle != nil {
		dst.Idle = src.Idle
	}
	if src.ConnectSeq != nil {
		dst.ConnectSeq, dst.ConnectPar = src.ConnectSeq, src.ConnectPar
	}
	dst.Throughput = append(dst.Throughput, src.Throughput...)
	if src.STUN != nil {
		dst.STUN = src.STUN
	}
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// vsWaitReady waits until a client holding k is admitted: the relay
// serves, and (with admission) its node has logged in and seen the
// tailnet.
func vsWaitReady(t *testing.T, p *vsProc, region *tailcfg.DERPRegion, k key.NodePrivate) time.Duration {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-p.done:
			log, _ := os.ReadFile(p.logPath)
			t.Fatalf("%s exited before serving:\n%s", p.cmd.Path, tail(log, 4000))
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		dc := check.NewDERPClient(region, k, nil, key.DERPMesh{}, nil)
		last = check.ConnectDERP(ctx, dc)
		dc.Close()
		cancel()
		if last == nil {
			// Let the relay see the probe's disconnect before measuring.
			time.Sleep(300 * time.Millisecond)
			return time.Since(p.startedAt)
		}
		time.Sleep(100 * time.Millisecond)
	}
	log, _ := os.ReadFile(p.logPath)
	t.Fatalf("%s not ready after 90s (%v):\n%s", p.cmd.Path, last, tail(log, 4000))
	return 0
}

// vsPairTailnet starts the tailnet derper+tailscaled's tailscaled logs in
// to: a test control server like tailderp+admission's, with every load
// client's key a node (admitInTailnet), whose DERP map names only the
// pair's derper on loopback.
//
// It is a second control server with the same members rather than the one
// tailderp+admission uses, so that each tailnet's DERP map names only the
// relay under test: with both relays in one map, each server's node could
// make the other relay its home, and restarting one relay in the storm
// would disturb the other server's node.
func vsPairTailnet(t *testing.T, derpPort, stunPort int, pin string, keys []key.NodePrivate) *testtailnet.Control {
	t.Helper()
	ctl := testtailnet.NewControl(t, testtailnet.DERPRegion(derpPort, stunPort, pin))
	admitInTailnet(ctl, keys)
	return ctl
}

// vsTailscaled starts tailscaled as a derper --verify-clients host runs it
// beside derper, with userspace networking, its own state directory and
// LocalAPI socket under dir (kept across rounds, like tailderp's
// -state-dir), and logs it in to ctl through its LocalAPI, the way
// "tailscale up --auth-key" does. It returns once the node is Running and
// its netmap shows probe (a load client's key). It returns the process and
// the socket path.
//
// Nothing leaves loopback: the control URL and the DERP map (the pair's
// derper) are on 127.0.0.1; its environment has every knob of
// testtailnet.SetTestEnv (no log uploads, no port mapping, all traffic over
// DERP so magicsock opens no UDP socket, IN_TS_TEST so netcheck skips
// everything but localhost, a panic rather than a dial of Tailscale's
// control server), --no-logs-no-support as well, and TS_LOGS_DIR in dir so
// logpolicy writes its config there instead of /var/lib/tailscale. The
// script builds it with ts_omit_captiveportal: captive-portal detection
// would probe controlplane.tailscale.com and login.tailscale.com on every
// non-loopback interface.
func vsTailscaled(t *testing.T, bin, logDir, dir string, port int, ctl *testtailnet.Control, probe key.NodePublic) (*vsProc, string) {
	t.Helper()
	sock := filepath.Join(dir, "tailscaled.sock")
	logs := filepath.Join(dir, "logs")
	if err := os.MkdirAll(logs, 0o700); err != nil {
		t.Fatal(err)
	}
	env := []string{
		"TS_NO_LOGS_NO_SUPPORT=true",
		"TS_DISABLE_PORTMAPPER=true",
		"TS_DEBUG_ALWAYS_USE_DERP=true",
		"IN_TS_TEST=1",
		"TS_PANIC_IF_HIT_MAIN_CONTROL=1",
		"TS_LOGS_DIR=" + logs,
	}
	p := vsStart(t, logDir, "tailscaled", bin, env, 0, 0,
		"--tun=userspace-networking",
		"--statedir="+filepath.Join(dir, "state"),
		"--socket="+sock,
		fmt.Sprintf("--port=%d", port),
		"--no-logs-no-support")
	fail := func(format string, args ...any) {
		p.stopOne(t)
		log, _ := os.ReadFile(p.logPath)
		t.Fatalf("tailscaled: "+format+"\ntailscaled log:\n%s", append(args, tail(log, 4000))...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	lc := &local.Client{Socket: sock, UseSocketOnly: true}
	var haveNodeKey bool
	for {
		st, err := lc.StatusWithoutPeers(ctx)
		if err == nil {
			haveNodeKey = st.HaveNodeKey
			break
		}
		if ctx.Err() != nil {
			fail("LocalAPI not answering: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	prefs := ipn.NewPrefs()
	prefs.ControlURL = ctl.URL
	prefs.WantRunning = true
	prefs.Hostname = "derper-host"
	prefs.CorpDNS = false // a relay host: no tailnet DNS
	prefs.RouteAll = false
	prefs.NetfilterMode = preftype.NetfilterOff
	if err := lc.Start(ctx, ipn.Options{AuthKey: ctl.AuthKey, UpdatePrefs: prefs}); err != nil {
		fail("LocalAPI Start: %v", err)
	}
	if !haveNodeKey { // as the CLI does: a first login
		if err := lc.StartLoginInteractive(ctx); err != nil {
			fail("LocalAPI StartLoginInteractive: %v", err)
		}
	}
	for {
		st, err := lc.StatusWithoutPeers(ctx)
		if err == nil && st.BackendState == ipn.Running.String() {
			if _, err := lc.WhoIsNodeKey(ctx, probe); err == nil {
				return p, sock
			}
		}
		if ctx.Err() != nil {
			state := ""
			if st != nil {
				state = st.BackendState
			}
			fail("not Running with the load clients in its netmap after 90s (state %q, %v)", state, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// vsStorm is one reconnect storm.
type vsStorm struct {
	N     int           // clients connected and idle before the restart
	Back  int           // of them, relayed a packet again within Bound
	Bound time.Duration // from the restart
	Stop  time.Duration // the restart (SIGTERM) → the old relay process gone
	Half  time.Duration // the restart → half of the N clients back
	Last  time.Duration // the restart → the last of them back (Bound if not all)

	// CPU is the CPU time the setup spent from the restart until the end
	// (all back or the bound): the new relay process's, and tailscaled's
	// (the old process's shutdown is not in it).
	CPU time.Duration

	RSSBefore vsRSS // the setup before the storm's clients connect
	RSSIdle   vsRSS // with the N clients connected and idle, before the restart
	RSSAfter  vsRSS // once they are back (the relay is the restarted process)
}

// vsRSS is the VmRSS of a setup: the relay process and, for
// derper+tailscaled, tailscaled (Node; 0 for tailderp, whose node is in the
// relay's process).
type vsRSS struct{ Relay, Node int64 }

func (r vsRSS) Total() int64 { return r.Relay + r.Node }

func (r vsRSS) String() string {
	if r.Node == 0 {
		return fmt.Sprintf("%.1f MiB", float64(r.Relay)/(1<<20))
	}
	return fmt.Sprintf("%.1f MiB (relay %.1f + tailscaled %.1f)", float64(r.Total())/(1<<20), float64(r.Relay)/(1<<20), float64(r.Node)/(1<<20))
}

func (s *vsStorm) String() string {
	all := fmt.Sprintf("all back %v after the restart", s.Last.Round(time.Millisecond))
	if s.Back < s.N {
		all = fmt.Sprintf("NOT all back: %d of %d within %v", s.Back, s.N, s.Bound)
	}
	return fmt.Sprintf("%d clients: %s (half %v; old process gone %v after SIGTERM; setup CPU %v meanwhile); setup RSS %s before the clients, %s with them idle, %s after the storm",
		s.N, all, s.Half.Round(time.Millisecond), s.Stop.Round(time.Millisecond), s.CPU, s.RSSBefore, s.RSSIdle, s.RSSAfter)
}

// vsSetupRSS reads the VmRSS of p and its companion.
func vsSetupRSS(t *testing.T, p *vsProc) vsRSS {
	relayPID, nodePID := p.pids()
	var r vsRSS
	var err error
	if r.Relay, err = check.ReadRSS(relayPID); err != nil {
		t.Logf("RSS of the relay: %v", err)
	}
	if nodePID != 0 {
		if r.Node, err = check.ReadRSS(nodePID); err != nil {
			t.Logf("RSS of tailscaled: %v", err)
		}
	}
	return r
}

// Storm packets carry a phase in their first 4 bytes: 1 before the
// restart (a check that every client relays), 2 after.
const (
	stormBefore = 1
	stormAfter  = 2
)

// stormClient is one of the storm's clients, run like the DERP reader of a
// Tailscale client (magicsock's runDerpReader).
type stormClient struct {
	dc     *derphttp.Client
	pub    key.NodePublic
	before chan struct{} // closed when its phase-1 packet came back
	after  chan struct{} // closed when its phase-2 packet came back
	backAt atomic.Int64  // ns since the restart, when after closed
}

// run reads until dc is closed. A read error (the relay went away, or
// refused the client) is followed by util/backoff's wait, as in magicsock,
// and the next read reconnects. On every new connection after the restart
// (its first frame is ServerInfo) the client sends one packet to itself,
// until one came back.
func (c *stormClient) run(ctx context.Context, phase *atomic.Int32, t0 *atomic.Int64) {
	bo := backoff.NewBackoff("storm", logger.Discard, 5*time.Second)
	var gotBefore, gotAfter bool
	for {
		m, _, err := c.dc.RecvDetail()
		if err != nil {
			if errors.Is(err, derphttp.ErrClientClosed) || ctx.Err() != nil {
				return
			}
			bo.BackOff(ctx, err)
			continue
		}
		bo.BackOff(ctx, nil)
		switch m := m.(type) {
		case derp.ServerInfoMessage:
			if phase.Load() == stormAfter && !gotAfter {
				c.dc.Send(c.pub, stormPacket(stormAfter))
			}
		case derp.ReceivedPacket:
			if m.Source != c.pub || len(m.Data) < 4 {
				continue
			}
			switch binary.BigEndian.Uint32(m.Data) {
			case stormBefore:
				if !gotBefore {
					gotBefore = true
					close(c.before)
				}
			case stormAfter:
				if !gotAfter {
					gotAfter = true
					c.backAt.Store(time.Now().UnixNano() - t0.Load())
					close(c.after)
				}
			}
		}
	}
}

func stormPacket(phase uint32) []byte {
	b := make([]byte, 64)
	binary.BigEndian.PutUint32(b, phase)
	return b
}

// vsRunStorm connects n admitted clients to the relay p (32 at a time,
// bounded), checks that each relays a packet, reads the setup's RSS with
// them idle, restarts the relay process (SIGTERM, wait for its exit, start
// it again with the same flags and state; a companion tailscaled stays up)
// and measures, from the SIGTERM, until every client has relayed a packet
// through the new process, at most bound. It returns the result and the
// new process.
func vsRunStorm(t *testing.T, name string, p *vsProc, region *tailcfg.DERPRegion, keys *keyPool, n int, bound time.Duration) (*vsStorm, *vsProc) {
	t.Helper()
	res := &vsStorm{Bound: bound}
	res.RSSBefore = vsSetupRSS(t, p)

	// Connect.
	var (
		mu      sync.Mutex
		clients []*stormClient
		errs    int
		first   error
		next    atomic.Int64
		wg      sync.WaitGroup
	)
	cctx, ccancel := context.WithTimeout(context.Background(), 2*time.Minute)
	for range 32 {
		wg.Go(func() {
			for next.Add(1) <= int64(n) && cctx.Err() == nil {
				mu.Lock()
				k := keys.get()
				mu.Unlock()
				dc := check.NewDERPClient(region, k, nil, key.DERPMesh{}, nil)
				ctx, cancel := context.WithTimeout(cctx, 10*time.Second)
				err := check.ConnectDERP(ctx, dc)
				cancel()
				mu.Lock()
				if err != nil {
					dc.Close()
					errs++
					if first == nil {
						first = err
					}
				} else {
					clients = append(clients, &stormClient{dc: dc, pub: k.Public(), before: make(chan struct{}), after: make(chan struct{})})
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	ccancel()
	res.N = len(clients)
	if errs > 0 {
		t.Logf("storm %s: %d of %d clients did not connect (first: %v)", name, errs, n, first)
	}

	ctx, cancel := context.WithCancel(context.Background())
	var phase atomic.Int32
	var t0 atomic.Int64
	phase.Store(stormBefore)
	var readers sync.WaitGroup
	for _, c := range clients {
		readers.Go(func() { c.run(ctx, &phase, &t0) })
	}
	defer func() {
		cancel()
		closeStorm(clients)
		readers.Wait()
		time.Sleep(200 * time.Millisecond) // let the relay unregister them
	}()

	// Every client relays before the restart.
	for _, c := range clients {
		c.dc.Send(c.pub, stormPacket(stormBefore))
	}
	deadline := time.After(30 * time.Second)
	missing := 0
	for _, c := range clients {
		select {
		case <-c.before:
		case <-deadline:
			missing++
		}
	}
	if missing > 0 {
		t.Logf("storm %s: %d clients did not relay a packet before the restart", name, missing)
	}
	// Let the relay (and tailscaled) settle, then read the setup's RSS.
	time.Sleep(time.Second)
	res.RSSIdle = vsSetupRSS(t, p)

	// Restart.
	var nodeCPU0 time.Duration
	if p.companion != nil {
		nodeCPU0 = vsCPU(p.companion.cmd.Process.Pid)
	}
	start := time.Now()
	t0.Store(start.UnixNano())
	p.stopOne(t)
	res.Stop = time.Since(start)
	// From here any ServerInfo comes from the new process: the old one
	// has exited.
	phase.Store(stormAfter)
	np := p.restart(t)

	// Wait until every client is back, at most bound.
	end := start.Add(bound)
	for {
		back := 0
		for _, c := range clients {
			select {
			case <-c.after:
				back++
			default:
			}
		}
		res.Back = back
		if back == len(clients) || time.Now().After(end) {
			break
		}
		select {
		case <-np.done:
			log, _ := os.ReadFile(np.logPath)
			t.Fatalf("storm %s: the restarted relay exited:\n%s", name, tail(log, 4000))
		case <-time.After(20 * time.Millisecond):
		}
	}
	var times []time.Duration
	for _, c := range clients {
		select {
		case <-c.after:
			times = append(times, time.Duration(c.backAt.Load()))
		default:
		}
	}
	res.CPU = np.setupCPU() - nodeCPU0
	slices.Sort(times)
	res.Last = bound
	if len(times) > 0 && len(times) == len(clients) {
		res.Last = times[len(times)-1]
	}
	if len(times) > len(clients)/2 {
		res.Half = times[len(clients)/2]
	} else {
		res.Half = bound
	}
	time.Sleep(time.Second)
	res.RSSAfter = vsSetupRSS(t, np)
	return res, np
}

func closeStorm(cs []*stormClient) {
	var wg sync.WaitGroup
	for _, c := range cs {
		wg.Go(func() { c.dc.Close() })
	}
	wg.Wait()
}

// vsAuditSockets lists the internet sockets of p and its companion (from
// /proc/PID/fd and /proc/PID/net/{tcp,tcp6,udp,udp6}) and fails the test
// if any is bound to, or connected to, an address beyond loopback. A
// wildcard listener (0.0.0.0 or [::]) sends nothing by itself; it is
// logged. With verbose, every socket is summarised in the log.
func vsAuditSockets(t *testing.T, name string, p *vsProc, verbose bool) {
	t.Helper()
	procs := []*vsProc{p}
	if p.companion != nil {
		procs = append(procs, p.companion)
	}
	for _, q := range procs {
		pid := q.cmd.Process.Pid
		inodes := map[string]bool{}
		fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		if err != nil {
			t.Logf("socket audit %s (pid %d): %v", name, pid, err)
			continue
		}
		for _, fd := range fds {
			l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
			if err == nil && strings.HasPrefix(l, "socket:[") {
				inodes[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
			}
		}
		counts := map[string]int{}
		for _, proto := range []string{"tcp", "tcp6", "udp", "udp6"} {
			f, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", pid, proto))
			if err != nil {
				continue
			}
			sc := bufio.NewScanner(f)
			sc.Scan() // header
			for sc.Scan() {
				fs := strings.Fields(sc.Text())
				if len(fs) < 10 || !inodes[fs[9]] {
					continue
				}
				local, remote := procNetAddr(fs[1]), procNetAddr(fs[2])
				// A TCP listener (state 0A), or a UDP socket not connected.
				listen := (proto[:3] == "tcp" && fs[3] == "0A") || (proto[:3] == "udp" && remote.Addr().IsUnspecified())
				switch {
				case !local.Addr().IsLoopback() && !local.Addr().IsUnspecified():
					t.Errorf("socket audit %s: %s (pid %d) has a %s socket on %v (remote %v): beyond loopback", name, filepath.Base(q.bin), pid, proto, local, remote)
				case !remote.Addr().IsUnspecified() && !remote.Addr().IsLoopback():
					t.Errorf("socket audit %s: %s (pid %d) has a %s socket connected to %v: beyond loopback", name, filepath.Base(q.bin), pid, proto, remote)
				case local.Addr().IsUnspecified() && listen:
					t.Logf("socket audit %s: %s (pid %d) listens on %s %v (wildcard address; sends nothing by itself)", name, filepath.Base(q.bin), pid, proto, local)
				}
				kind := "connected"
				if listen {
					kind = "listening on " + local.String()
				}
				counts[proto+" "+kind]++
			}
			f.Close()
		}
		if verbose {
			var parts []string
			for k, v := range counts {
				parts = append(parts, fmt.Sprintf("%s ×%d", k, v))
			}
			slices.Sort(parts)
			t.Logf("socket audit %s: %s (pid %d): %d sockets: %s", name, filepath.Base(q.bin), pid, len(inodes), strings.Join(parts, "; "))
		}
	}
}

// procNetAddr decodes an address of /proc/net/{tcp,udp}[6]: hex, each
// 32-bit word in host (little-endian) order, then ":" and the hex port.
func procNetAddr(s string) netip.AddrPort {
	h, portHex, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}
	}
	b, err := hex.DecodeString(h)
	if err != nil || (len(b) != 4 && len(b) != 16) {
		return netip.AddrPort{}
	}
	for i := 0; i < len(b); i += 4 {
		b[i], b[i+1], b[i+2], b[i+3] = b[i+3], b[i+2], b[i+1], b[i]
	}
	port, _ := strconv.ParseUint(portHex, 16, 16)
	a, _ := netip.AddrFromSlice(b)
	return netip.AddrPortFrom(a.Unmap(), uint16(port))
}

// vsMetric is one number taken from a round's results.
type vsMetric struct {
	name   string
	unit   string
	higher bool // higher is better
	get    func(*vsResult) float64
}

func throughputMetric(pairs, size int) vsMetric {
	m := vsMetric{higher: true}
	if size >= 1000 {
		m.name, m.unit = fmt.Sprintf("throughput %d pair(s) × %d B", pairs, size), "Mbit/s"
	} else {
		m.name, m.unit = fmt.Sprintf("throughput %d pair(s) × %d B", pairs, size), "kpackets/s"
	}
	m.get = func(r *vsResult) float64 {
		for _, t := range r.Throughput {
			if t.Pairs == pairs && t.Size == size {
				if size >= 1000 {
					return t.Mbps()
				}
				return t.PPS() / 1000
			}
		}
		return math.NaN()
	}
	return m
}

func vsMetrics() []vsMetric {
	out := []vsMetric{}
	for _, size := range []int{1200, 64} {
		for _, p := range []int{1, 8, 64} {
			out = append(out, throughputMetric(p, size))
		}
	}
	out = append(out,
		vsMetric{"connect sequential p50", "ms", false, connects(false, func(c *check.Connects) float64 { return ms(c.P50) })},
		vsMetric{"connect sequential p99", "ms", false, connects(false, func(c *check.Connects) float64 { return ms(c.P99) })},
		vsMetric{"connect sequential rate", "/s", true, connects(false, (*check.Connects).Rate)},
		vsMetric{"connect 32 at once p50", "ms", false, connects(true, func(c *check.Connects) float64 { return ms(c.P50) })},
		vsMetric{"connect 32 at once p99", "ms", false, connects(true, func(c *check.Connects) float64 { return ms(c.P99) })},
		vsMetric{"connect 32 at once rate", "/s", true, connects(true, (*check.Connects).Rate)},
		vsMetric{"RSS per idle connection", "KiB", false, func(r *vsResult) float64 {
			if r.Idle == nil {
				return math.NaN()
			}
			return r.Idle.Marginal() / 1024
		}},
		vsMetric{"RSS per idle connection, all (incl. reused heap)", "KiB", false, func(r *vsResult) float64 {
			if r.Idle == nil {
				return math.NaN()
			}
			return r.Idle.PerConn() / 1024
		}},
		vsMetric{"RSS before the idle clients", "MiB", false, func(r *vsResult) float64 {
			if r.Idle == nil {
				return math.NaN()
			}
			return float64(r.Idle.RSSBefore) / (1 << 20)
		}},
		vsMetric{"STUN answers", "k/s", true, func(r *vsResult) float64 {
			if r.STUN == nil {
				return math.NaN()
			}
			return r.STUN.Rate() / 1000
		}},
		vsMetric{"setup CPU per connect (relay + tailscaled)", "ms", false, func(r *vsResult) float64 {
			if r.ConnectCPU == 0 {
				return math.NaN()
			}
			return ms(r.ConnectCPU)
		}},
		vsMetric{metricStorm, "s", false, storm(func(s *vsStorm) float64 { return s.Last.Seconds() })},
		vsMetric{"storm: half back after the restart", "s", false, storm(func(s *vsStorm) float64 { return s.Half.Seconds() })},
		vsMetric{"storm: clients back (of those connected)", "%", true, storm(func(s *vsStorm) float64 { return 100 * float64(s.Back) / float64(max(s.N, 1)) })},
		vsMetric{"storm: old process gone after SIGTERM", "s", false, storm(func(s *vsStorm) float64 { return s.Stop.Seconds() })},
		vsMetric{"storm: setup CPU, restart → end (new relay + tailscaled)", "s", false, storm(func(s *vsStorm) float64 { return s.CPU.Seconds() })},
		vsMetric{metricSetupRSS, "MiB", false, storm(func(s *vsStorm) float64 { return mibF(s.RSSIdle.Total()) })},
		vsMetric{"setup RSS, idle clients: relay process", "MiB", false, storm(func(s *vsStorm) float64 { return mibF(s.RSSIdle.Relay) })},
		vsMetric{"setup RSS, idle clients: tailscaled", "MiB", false, storm(func(s *vsStorm) float64 {
			if s.RSSIdle.Node == 0 {
				return math.NaN() // no tailscaled
			}
			return mibF(s.RSSIdle.Node)
		})},
		vsMetric{"setup RSS before the storm's clients", "MiB", false, storm(func(s *vsStorm) float64 { return mibF(s.RSSBefore.Total()) })},
		vsMetric{"setup RSS after the storm (relay restarted)", "MiB", false, storm(func(s *vsStorm) float64 { return mibF(s.RSSAfter.Total()) })},
	)
	return out
}

const (
	metricStorm    = "storm: all back after the restart"
	metricSetupRSS = "setup RSS, storm's clients idle"
)

// storm reads a storm measurement, NaN when the part did not run.
func storm(f func(*vsStorm) float64) func(*vsResult) float64 {
	return func(r *vsResult) float64 {
		if r.Storm == nil || r.Storm.N == 0 {
			return math.NaN()
		}
		return f(r.Storm)
	}
}

func mibF(b int64) float64 { return float64(b) / (1 << 20) }

// connects reads a connect measurement, NaN when the part did not run.
func connects(concurrent bool, f func(*check.Connects) float64) func(*vsResult) float64 {
	return func(r *vsResult) float64 {
		c := r.ConnectSeq
		if concurrent {
			c = r.ConnectPar
		}
		if c == nil {
			return math.NaN()
		}
		return f(c)
	}
}

func metricNamed(name string) vsMetric {
	for _, m := range vsMetrics() {
		if m.name == name {
			return m
		}
	}
	panic("no metric " + name)
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func median(xs []float64) float64 {
	s := slices.DeleteFunc(slices.Clone(xs), math.IsNaN)
	if len(s) == 0 {
		return math.NaN()
	}
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func fmtNum(x float64) string {
	switch {
	case math.IsNaN(x):
		return "–"
	case math.Abs(x) >= 100:
		return fmt.Sprintf("%.0f", x)
	case math.Abs(x) >= 10:
		return fmt.Sprintf("%.1f", x)
	default:
		return fmt.Sprintf("%.2f", x)
	}
}

// vsReport writes the medians, the ratios and the raw numbers as
// markdown. Two ratios per metric: the ratio of the medians, and the
// median of the per-round ratios. The second pairs each round's numbers,
// which were taken seconds apart, so noise that hit both servers in a
// round cancels; its range (min–max over the rounds) shows how much noise
// is left, and it is what the targets are judged by.
func vsReport(names []string, results map[string][]*vsResult, rounds int) string {
	var b strings.Builder
	base := names[0]
	values := func(name string, m vsMetric) []float64 {
		var vs []float64
		for _, r := range results[name] {
			vs = append(vs, m.get(r))
		}
		return vs
	}
	paired := func(name string, m vsMetric) []float64 {
		bv, v := values(base, m), values(name, m)
		var rs []float64
		for i := range min(len(bv), len(v)) {
			rs = append(rs, v[i]/bv[i])
		}
		return rs
	}
	fmt.Fprintf(&b, "\n## Medians of %d rounds, and each server/%s\n\n", rounds, base)
	fmt.Fprintf(&b, "Ratio: of the medians; per round: median of the per-round ratios [min–max].\n\n")
	fmt.Fprintf(&b, "| metric | unit | %s |", base)
	for _, n := range names[1:] {
		fmt.Fprintf(&b, " %s | ratio | per round |", n)
	}
	fmt.Fprintf(&b, "\n|---|---|---:|")
	for range names[1:] {
		fmt.Fprintf(&b, "---:|---:|---:|")
	}
	b.WriteString("\n")
	for _, m := range vsMetrics() {
		bm := median(values(base, m))
		fmt.Fprintf(&b, "| %s | %s | %s |", m.name, m.unit, fmtNum(bm))
		for _, n := range names[1:] {
			v := median(values(n, m))
			pr := paired(n, m)
			fmt.Fprintf(&b, " %s | %s× | %s× [%s–%s] |", fmtNum(v), fmtNum2(v/bm), fmtNum2(median(pr)), fmtNum2(minF(pr)), fmtNum2(maxF(pr)))
		}
		b.WriteString("\n")
	}

	fmt.Fprintf(&b, "\n## Raw numbers, round 1 / round 2 / …\n\n| metric | unit |")
	for _, n := range names {
		fmt.Fprintf(&b, " %s |", n)
	}
	fmt.Fprintf(&b, "\n|---|---|")
	for range names {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	for _, m := range vsMetrics() {
		fmt.Fprintf(&b, "| %s | %s |", m.name, m.unit)
		for _, n := range names {
			var parts []string
			for _, v := range values(n, m) {
				parts = append(parts, fmtNum(v))
			}
			fmt.Fprintf(&b, " %s |", strings.Join(parts, " / "))
		}
		b.WriteString("\n")
	}

	if base == "derper" {
		b.WriteString(vsDerperTargets(names, paired, values))
	}
	if slices.Contains(names, "tailderp+admission") && slices.Contains(names, "derper+tailscaled") {
		b.WriteString(vsPairReport(results, rounds))
	}
	return b.String()
}

// vsDerperTargets judges the targets docs/PERFORMANCE.md states for
// tailderp against plain derper (base): throughput ≥ 1.0×, connect p50
// with admission ≤ derper's without verification + 0.5 ms, RSS per idle
// connection ≤ derper's.
func vsDerperTargets(names []string, paired, values func(string, vsMetric) []float64) string {
	var b strings.Builder
	base := names[0]
	var tailderps []string
	for _, n := range names[1:] {
		if strings.HasPrefix(n, "tailderp") {
			tailderps = append(tailderps, n)
		}
	}
	fmt.Fprintf(&b, "\n## Targets (tailderp vs derper)\n\n")
	for _, n := range tailderps {
		for _, m := range vsMetrics() {
			if !strings.HasPrefix(m.name, "throughput") {
				continue
			}
			pr := paired(n, m)
			fmt.Fprintf(&b, "- %s, %s: %s× %s per round: %s\n", n, m.name, fmtNum2(median(pr)), base, judge(pr, true))
		}
	}
	connP50 := metricNamed("connect sequential p50")
	for _, n := range tailderps {
		bv, v := values(base, connP50), values(n, connP50)
		var diffs []float64
		for i := range min(len(bv), len(v)) {
			diffs = append(diffs, v[i]-bv[i])
		}
		d := median(diffs)
		verdict := "met"
		if math.IsNaN(d) {
			verdict = "not measured"
		} else if d > 0.5 {
			verdict = fmt.Sprintf("MISSED by %.2f ms", d-0.5)
		}
		fmt.Fprintf(&b, "- %s, connect p50 (sequential, every connect admitted by %s) minus %s's: median %+.2f ms per round [%+.2f to %+.2f], target ≤ +0.5 ms: %s\n",
			n, admittedBy(n), base, d, minF(diffs), maxF(diffs), verdict)
	}
	rss := metricNamed("RSS per idle connection")
	for _, n := range tailderps {
		pr := paired(n, rss)
		fmt.Fprintf(&b, "- %s, RSS per idle connection (growth over the second half of the idle clients): %s KiB vs %s %s KiB, %s× per round: %s\n",
			n, fmtNum(median(values(n, rss))), base, fmtNum(median(values(base, rss))), fmtNum2(median(pr)), judge(pr, false))
	}
	return b.String()
}

// vsPairReport compares tailderp+admission with what users run today to
// admit only their tailnet, derper --verify-clients beside tailscaled,
// and judges its targets (docs/PERFORMANCE.md, "Against derper
// --verify-clients + tailscaled") on the medians of the per-round ratios
// tailderp+admission ÷ derper+tailscaled: connect rate with 32 at once ≥
// 1.2×, storm time ≤ 0.8×, the setup's total RSS with the storm's clients
// idle ≤ 1.0×.
func vsPairReport(results map[string][]*vsResult, rounds int) string {
	const us, them = "tailderp+admission", "derper+tailscaled"
	values := func(name string, m vsMetric) []float64 {
		var vs []float64
		for _, r := range results[name] {
			vs = append(vs, m.get(r))
		}
		return vs
	}
	ratios := func(m vsMetric) []float64 {
		a, b := values(us, m), values(them, m)
		var rs []float64
		for i := range min(len(a), len(b)) {
			rs = append(rs, a[i]/b[i])
		}
		return rs
	}
	rng := func(xs []float64) string {
		return fmt.Sprintf("%s [%s–%s]", fmtNum(median(xs)), fmtNum(minF(xs)), fmtNum(maxF(xs)))
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\n## Against derper --verify-clients + tailscaled\n\n")
	fmt.Fprintf(&b, "Medians of %d rounds [min–max over the rounds]; ratio: median of the per-round ratios %s ÷ %s [min–max].\n\n", rounds, us, them)
	fmt.Fprintf(&b, "| metric | unit | %s | %s | ratio |\n|---|---|---:|---:|---:|\n", them, us)
	rows := []string{
		"connect sequential p50", "connect sequential p99", "connect sequential rate",
		"connect 32 at once p50", "connect 32 at once p99", "connect 32 at once rate", "setup CPU per connect (relay + tailscaled)",
		metricStorm, "storm: half back after the restart", "storm: clients back (of those connected)", "storm: old process gone after SIGTERM",
		"storm: setup CPU, restart → end (new relay + tailscaled)",
		metricSetupRSS, "setup RSS, idle clients: relay process", "setup RSS, idle clients: tailscaled",
		"setup RSS before the storm's clients", "setup RSS after the storm (relay restarted)",
		"RSS per idle connection",
	}
	for _, name := range rows {
		m := metricNamed(name)
		r := ratios(m)
		ratio := fmt.Sprintf("%s× [%s–%s]", fmtNum2(median(r)), fmtNum2(minF(r)), fmtNum2(maxF(r)))
		if math.IsNaN(median(r)) || math.IsInf(median(r), 0) {
			ratio = "–"
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", m.name, m.unit, rng(values(them, m)), rng(values(us, m)), ratio)
	}

	fmt.Fprintf(&b, "\n### Targets (%s ÷ %s, median of the per-round ratios)\n\n", us, them)
	target := func(what string, m vsMetric, want float64, higher bool, note string) {
		r := ratios(m)
		med := median(r)
		verdict := "met"
		switch {
		case math.IsNaN(med):
			verdict = "not measured"
		case higher && med < want:
			verdict = fmt.Sprintf("MISSED (%.1f%% short of %.1f×)", (want-med)/want*100, want)
		case !higher && med > want:
			verdict = fmt.Sprintf("MISSED (%.1f%% over %.1f×)", (med-want)/want*100, want)
		}
		op := "≤"
		if higher {
			op = "≥"
		}
		fmt.Fprintf(&b, "- %s: %s× per round [%s–%s], target %s %.1f×: %s%s\n", what, fmtNum2(med), fmtNum2(minF(r)), fmtNum2(maxF(r)), op, want, verdict, note)
	}
	target("connect rate, 32 at once", metricNamed("connect 32 at once rate"), 1.2, true, "")
	note := ""
	back := metricNamed("storm: clients back (of those connected)")
	for _, n := range []string{us, them} {
		for i, v := range values(n, back) {
			if v < 100 {
				note += fmt.Sprintf(" (%s round %d: only %.0f%% back within the bound, counted as the bound)", n, i+1, v)
			}
		}
	}
	target("reconnect storm, restart → every client relayed again", metricNamed(metricStorm), 0.8, false, note)
	target("RSS of the whole setup with the storm's clients idle", metricNamed(metricSetupRSS), 1.0, false, "")
	return b.String()
}

// judge tells whether per-round ratios pr meet a target of 1.0× (higher
// or lower is better): met when their median is at or better than it; met
// within noise when it is within 10% (the spread measured between
// identical servers here) and at least one round was at or better.
func judge(pr []float64, higher bool) string {
	m := median(pr)
	if math.IsNaN(m) {
		return "not measured"
	}
	if !higher {
		m, pr = 1/m, invert(pr)
	}
	switch {
	case m >= 1:
		return "met"
	case m >= 0.9 && maxF(pr) >= 1:
		return fmt.Sprintf("met within noise (%.0f%% below, rounds %s–%s)", (1-m)*100, fmtNum2(minF(pr)), fmtNum2(maxF(pr)))
	}
	return fmt.Sprintf("MISSED by %.0f%%", (1-m)*100)
}

func admittedBy(server string) string {
	if strings.Contains(server, "admission") {
		return "the relay's tailnet"
	}
	return "nobody: an open relay"
}

func invert(xs []float64) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = 1 / x
	}
	return out
}

func minF(xs []float64) float64 {
	s := slices.DeleteFunc(slices.Clone(xs), math.IsNaN)
	if len(s) == 0 {
		return math.NaN()
	}
	return slices.Min(s)
}

func maxF(xs []float64) float64 {
	s := slices.DeleteFunc(slices.Clone(xs), math.IsNaN)
	if len(s) == 0 {
		return math.NaN()
	}
	return slices.Max(s)
}

func fmtNum2(x float64) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return "–"
	}
	return fmt.Sprintf("%.2f", x)
}
