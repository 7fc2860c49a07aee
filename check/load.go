package check

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/stun"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// LoadConfig is a bounded load run against a relay you own. Every loop is
// bounded both in count and in time; zero values mean the defaults below.
type LoadConfig struct {
	// Region is the relay, with one node, as a Tailscale client would
	// dial it (HostName, IPv4, DERPPort, STUNPort, CertName).
	Region *tailcfg.DERPRegion
	// RootCAs are extra roots to trust (a private CA). Optional.
	RootCAs *x509.CertPool
	// AllowNonLoopback must be set to load a relay that is not on this
	// machine's loopback: load is for relays you own.
	AllowNonLoopback bool

	// Keys: the load clients must be admitted. MeshKey makes every client
	// a mesh peer, which a relay admits without asking its admission
	// check (so the admission path is not measured). NewKey, if set,
	// returns each client's key, e.g. from a pool of keys the relay's
	// tailnet knows; nil means fresh keys, which only an open relay
	// (-verify-clients=false) admits.
	MeshKey key.DERPMesh
	NewKey  func() key.NodePrivate

	// Throughput: for each number of pairs, and each packet size, every
	// sender keeps InFlight packets in flight to its receiver for
	// Duration or MaxPackets packets per pair, whichever comes first.
	Pairs      []int         // default 1, 8, 64
	Sizes      []int         // bytes per packet; default 1200, 64
	InFlight   int           // default 32 (a relay queues 32 packets per receiver)
	Duration   time.Duration // bound of each measurement; default 2s
	MaxPackets int           // per pair per measurement; default 2,000,000

	// Connects: sequential connects, then ParallelConnects more by
	// Concurrency clients at once, each bounded by Duration.
	Connects         int // default 200
	ParallelConnects int // default 640
	Concurrency      int // default 32

	// Idle clients: connect Idle clients and leave them idle; with PID,
	// read the server's VmRSS before and after (bounded by 30s).
	Idle int // default 1000; -1 skips
	PID  int // the relay's process ID on this machine; 0 skips RSS

	// STUN: STUNWorkers sockets send binding requests for Duration or
	// MaxPackets answers. Skipped when the node has no STUN (STUNPort -1).
	STUNWorkers int // default 4

	// Skip names parts to leave out: "idle", "connect", "throughput", "stun".
	Skip []string

	// Progress, if set, is told what runs.
	Progress logger.Logf
	// Logf receives the DERP clients' logs; nil discards them.
	Logf logger.Logf
}

func (c *LoadConfig) setDefaults() {
	if len(c.Pairs) == 0 {
		c.Pairs = []int{1, 8, 64}
	}
	if len(c.Sizes) == 0 {
		c.Sizes = []int{1200, 64}
	}
	if c.InFlight <= 0 {
		c.InFlight = 32
	}
	if c.Duration <= 0 {
		c.Duration = 2 * time.Second
	}
	if c.MaxPackets <= 0 {
		c.MaxPackets = 2_000_000
	}
	if c.Connects <= 0 {
		c.Connects = 200
	}
	if c.ParallelConnects <= 0 {
		c.ParallelConnects = 640
	}
	if c.Concurrency <= 0 {
		c.Concurrency = 32
	}
	if c.Idle == 0 {
		c.Idle = 1000
	}
	if c.STUNWorkers <= 0 {
		c.STUNWorkers = 4
	}
	if c.Progress == nil {
		c.Progress = logger.Discard
	}
	if c.Logf == nil {
		c.Logf = logger.Discard
	}
}

// Throughput is one throughput measurement.
type Throughput struct {
	Pairs    int           `json:"pairs"`
	Size     int           `json:"size"`
	InFlight int           `json:"in_flight"`
	Packets  int64         `json:"packets"` // received within Elapsed
	Bytes    int64         `json:"bytes"`
	Elapsed  time.Duration `json:"elapsed_ns"`
	// Stalls counts sends that waited 250ms for a window slot: a packet
	// the relay dropped (or one still stuck) frees no slot.
	Stalls int64 `json:"stalls"`
}

// Mbps is the payload throughput in Mbit/s.
func (t Throughput) Mbps() float64 {
	if t.Elapsed <= 0 {
		return 0
	}
	return float64(t.Bytes) * 8 / t.Elapsed.Seconds() / 1e6
}

// PPS is packets per second.
func (t Throughput) PPS() float64 {
	if t.Elapsed <= 0 {
		return 0
	}
	return float64(t.Packets) / t.Elapsed.Seconds()
}

// Connects is one connect measurement: each connect is a new client with
// its own key doing TCP, TLS, the HTTP upgrade, the DERP handshake and
// admission, until the relay's first frame (ServerInfo); then it closes.
type Connects struct {
	Concurrency int           `json:"concurrency"`
	N           int           `json:"n"` // successful connects
	Errors      int           `json:"errors"`
	FirstError  string        `json:"first_error,omitempty"`
	Elapsed     time.Duration `json:"elapsed_ns"`
	P50         time.Duration `json:"p50_ns"`
	P99         time.Duration `json:"p99_ns"`
}

// Rate is connects per second.
func (c Connects) Rate() float64 {
	if c.Elapsed <= 0 {
		return 0
	}
	return float64(c.N) / c.Elapsed.Seconds()
}

// Idle is the idle-client measurement. The relay's RSS is read before
// the first client, after the first half of them, and after all: the
// growth over the second half (Marginal) is the better figure, because the
// first clients may move into memory the process already holds (heap left
// free by earlier work, e.g. the embedded node's netmap) without growing
// its RSS.
type Idle struct {
	N         int   `json:"n"`
	Errors    int   `json:"errors"`
	NHalf     int   `json:"n_half"`                     // clients connected at the middle reading
	RSSBefore int64 `json:"rss_before_bytes,omitempty"` // VmRSS of the relay, 0 if unknown
	RSSHalf   int64 `json:"rss_half_bytes,omitempty"`
	RSSAfter  int64 `json:"rss_after_bytes,omitempty"`
}

// PerConn is the relay's RSS growth per idle connection over all of them,
// in bytes (0 if unknown).
func (i Idle) PerConn() float64 {
	if i.N == 0 || i.RSSBefore <= 0 || i.RSSAfter <= 0 {
		return 0
	}
	return float64(i.RSSAfter-i.RSSBefore) / float64(i.N)
}

// Marginal is the relay's RSS growth per idle connection over the second
// half of them, in bytes (0 if unknown).
func (i Idle) Marginal() float64 {
	if i.N <= i.NHalf || i.RSSHalf <= 0 || i.RSSAfter <= 0 {
		return 0
	}
	return float64(i.RSSAfter-i.RSSHalf) / float64(i.N-i.NHalf)
}

// STUNLoad is the STUN measurement.
type STUNLoad struct {
	Workers int           `json:"workers"`
	Answers int64         `json:"answers"`
	Lost    int64         `json:"lost"`
	Elapsed time.Duration `json:"elapsed_ns"`
	P50     time.Duration `json:"p50_ns"`
	P99     time.Duration `json:"p99_ns"`
}

// Rate is answers per second.
func (s STUNLoad) Rate() float64 {
	if s.Elapsed <= 0 {
		return 0
	}
	return float64(s.Answers) / s.Elapsed.Seconds()
}

// LoadResult is what Load measured. Parts that were skipped are zero.
type LoadResult struct {
	Idle       *Idle        `json:"idle,omitempty"`
	ConnectSeq *Connects    `json:"connect_sequential,omitempty"`
	ConnectPar *Connects    `json:"connect_concurrent,omitempty"`
	Throughput []Throughput `json:"throughput,omitempty"`
	STUN       *STUNLoad    `json:"stun,omitempty"`
}

// ErrNotLoopback is returned by Load for a relay not on loopback when
// AllowNonLoopback is not set.
var ErrNotLoopback = errors.New("load is only for relays you own: the target is not on this machine's loopback (-yes-i-own-this-server to load it anyway)")

// Load runs the bounded load against the relay, in this order: idle
// clients (first, so the RSS growth is measured on a fresh process),
// sequential connects, concurrent connects, throughput, STUN.
func Load(ctx context.Context, cfg LoadConfig) (*LoadResult, error) {
	cfg.setDefaults()
	if cfg.Region == nil || len(cfg.Region.Nodes) != 1 {
		return nil, errors.New("check: Load needs a region with one node")
	}
	node := cfg.Region.Nodes[0]
	addr, err := loopbackCheck(ctx, node, cfg.AllowNonLoopback)
	if err != nil {
		return nil, err
	}
	l := &loader{cfg: cfg}
	skip := map[string]bool{}
	for _, s := range cfg.Skip {
		skip[s] = true
	}
	// One connect first: a refusal is a configuration error, not a result.
	if err := l.probe(ctx); err != nil {
		return nil, err
	}
	res := &LoadResult{}
	if !skip["idle"] && cfg.Idle > 0 {
		cfg.Progress("idle: %d clients", cfg.Idle)
		res.Idle = l.idle(ctx)
	}
	if !skip["connect"] {
		cfg.Progress("connect: %d sequential", cfg.Connects)
		res.ConnectSeq = l.connects(ctx, cfg.Connects, 1)
		cfg.Progress("connect: %d by %d at once", cfg.ParallelConnects, cfg.Concurrency)
		res.ConnectPar = l.connects(ctx, cfg.ParallelConnects, cfg.Concurrency)
	}
	if !skip["throughput"] {
		for _, p := range cfg.Pairs {
			cfg.Progress("throughput: %d pairs", p)
			ts, err := l.throughput(ctx, p)
			res.Throughput = append(res.Throughput, ts...)
			if err != nil {
				return res, err
			}
		}
	}
	if !skip["stun"] && node.STUNPort >= 0 {
		port := node.STUNPort
		if port == 0 {
			port = 3478
		}
		cfg.Progress("stun: %d workers", cfg.STUNWorkers)
		res.STUN = l.stun(ctx, netip.AddrPortFrom(addr, uint16(port)).String())
	}
	return res, ctx.Err()
}

// loopbackCheck resolves the node and refuses anything but loopback
// unless allowed. It returns the address to use for STUN.
func loopbackCheck(ctx context.Context, n *tailcfg.DERPNode, allow bool) (netip.Addr, error) {
	var addrs []netip.Addr
	for _, s := range []string{n.IPv4, n.IPv6} {
		if ip, err := netip.ParseAddr(s); err == nil {
			addrs = append(addrs, ip)
		}
	}
	if ip, err := netip.ParseAddr(n.HostName); err == nil {
		addrs = append(addrs, ip)
	}
	if len(addrs) == 0 {
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		looked, err := net.DefaultResolver.LookupNetIP(lctx, "ip", n.HostName)
		if err != nil {
			return netip.Addr{}, fmt.Errorf("resolve %s: %w", n.HostName, err)
		}
		addrs = looked
	}
	if len(addrs) == 0 {
		return netip.Addr{}, fmt.Errorf("%s has no address", n.HostName)
	}
	if !allow {
		for _, a := range addrs {
			if !a.Unmap().IsLoopback() {
				return netip.Addr{}, fmt.Errorf("%w (%s is %v)", ErrNotLoopback, n.HostName, a)
			}
		}
	}
	return addrs[0].Unmap(), nil
}

type loader struct {
	cfg LoadConfig
}

func (l *loader) newKey() key.NodePrivate {
	if l.cfg.NewKey != nil {
		return l.cfg.NewKey()
	}
	return key.NewNode()
}

func (l *loader) client() *derphttp.Client {
	return NewDERPClient(l.cfg.Region, l.newKey(), l.cfg.RootCAs, l.cfg.MeshKey, l.cfg.Logf)
}

// connect connects a new client and waits for ServerInfo, bounded.
func (l *loader) connect(ctx context.Context) (*derphttp.Client, time.Duration, error) {
	dc := l.client()
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	t0 := time.Now()
	if err := ConnectDERP(cctx, dc); err != nil {
		dc.Close()
		return nil, 0, err
	}
	return dc, time.Since(t0), nil
}

func (l *loader) probe(ctx context.Context) error {
	dc, _, err := l.connect(ctx)
	if errors.Is(err, ErrRefused) {
		return fmt.Errorf("the relay refused the load client's key: it verifies clients; give its mesh key (-mesh-key-file), or load a relay started with -verify-clients=false")
	}
	if err != nil {
		return fmt.Errorf("cannot connect a DERP client: %w", err)
	}
	dc.Close()
	return nil
}

// connects runs n connects, conc at a time, bounded by Duration.
func (l *loader) connects(ctx context.Context, n, conc int) *Connects {
	res := &Connects{Concurrency: conc}
	ctx, cancel := context.WithTimeout(ctx, l.cfg.Duration)
	defer cancel()
	var (
		mu    sync.Mutex
		lat   = make([]time.Duration, 0, n)
		next  atomic.Int64
		wg    sync.WaitGroup
		start = time.Now()
	)
	for range conc {
		wg.Go(func() {
			for next.Add(1) <= int64(n) && ctx.Err() == nil {
				dc, d, err := l.connect(ctx)
				mu.Lock()
				if err != nil {
					if ctx.Err() == nil { // the time bound is not an error
						res.Errors++
						if res.FirstError == "" {
							res.FirstError = err.Error()
						}
					}
				} else {
					lat = append(lat, d)
				}
				mu.Unlock()
				if dc != nil {
					dc.Close()
				}
			}
		})
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	p := Percentiles(lat)
	res.N, res.P50, res.P99 = len(lat), p.P50, p.P99
	return res
}

// idle connects Idle clients (16 at a time, 60s at most) and reads the
// relay's RSS before, half way and after.
func (l *loader) idle(ctx context.Context) *Idle {
	res := &Idle{}
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	var clients []*derphttp.Client
	defer func() {
		closeAll(clients)
		sleepCtx(context.Background(), 200*time.Millisecond) // let the relay unregister them
	}()
	readRSS := func() int64 {
		if l.cfg.PID <= 0 {
			return 0
		}
		// Let the relay finish registering the last clients (their
		// goroutines start after ServerInfo) before reading.
		sleepCtx(ctx, 500*time.Millisecond)
		rss, _ := ReadRSS(l.cfg.PID)
		return rss
	}
	res.RSSBefore = readRSS()
	half := l.cfg.Idle / 2
	for _, n := range []int{half, l.cfg.Idle - half} {
		var (
			mu   sync.Mutex
			next atomic.Int64
			wg   sync.WaitGroup
		)
		for range 16 {
			wg.Go(func() {
				for next.Add(1) <= int64(n) && ctx.Err() == nil {
					dc, _, err := l.connect(ctx)
					mu.Lock()
					if err != nil {
						res.Errors++
					} else {
						clients = append(clients, dc)
					}
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		if res.RSSHalf == 0 && res.NHalf == 0 {
			res.NHalf = len(clients)
			res.RSSHalf = readRSS()
		}
	}
	res.N = len(clients)
	res.RSSAfter = readRSS()
	return res
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

func closeAll(cs []*derphttp.Client) {
	var wg sync.WaitGroup
	for _, c := range cs {
		wg.Go(func() { c.Close() })
	}
	wg.Wait()
}

// ReadRSS returns the resident set size of process pid, from
// /proc/PID/status (Linux).
func ReadRSS(pid int) (int64, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			fields := strings.Fields(v)
			if len(fields) == 2 && fields[1] == "kB" {
				n, err := strconv.ParseInt(fields[0], 10, 64)
				return n * 1024, err
			}
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// pair is one sender and one receiver.
type pair struct {
	from, to *derphttp.Client
	toKey    key.NodePublic
}

// phase is one throughput measurement; packets carry its id in their first
// four bytes, so late packets of an earlier phase are not counted.
type phase struct {
	id     uint32
	slots  []chan struct{} // per pair: InFlight tokens
	pkts   atomic.Int64
	bytes  atomic.Int64
	target int64
	done   chan struct{}
}

// throughput connects n pairs and measures every packet size with them.
func (l *loader) throughput(ctx context.Context, n int) ([]Throughput, error) {
	pairs := make([]pair, n)
	var all []*derphttp.Client
	var (
		mu      sync.Mutex
		connErr error
		next    atomic.Int64
		wg      sync.WaitGroup
	)
	conns := make([]*derphttp.Client, 2*n)
	for range min(16, 2*n) {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(2*n) {
					return
				}
				dc, _, err := l.connect(ctx)
				mu.Lock()
				if err != nil && connErr == nil {
					connErr = err
				}
				if dc != nil {
					conns[i] = dc
					all = append(all, dc)
				}
				mu.Unlock()
				if err != nil {
					return
				}
			}
		})
	}
	wg.Wait()
	if connErr != nil {
		closeAll(all)
		return nil, fmt.Errorf("throughput: connect %d pairs: %w", n, connErr)
	}
	for i := range pairs {
		pairs[i] = pair{from: conns[2*i], to: conns[2*i+1], toKey: conns[2*i+1].SelfPublicKey()}
	}

	var cur atomic.Pointer[phase]
	var readers sync.WaitGroup
	for i, p := range pairs {
		readers.Go(func() { drain(p.from) })
		readers.Go(func() {
			for {
				m, err := p.to.Recv()
				if err != nil {
					if errors.Is(err, derphttp.ErrClientClosed) {
						return
					}
					time.Sleep(10 * time.Millisecond) // derphttp reconnects on the next Recv
					continue
				}
				rp, ok := m.(derp.ReceivedPacket)
				if !ok || len(rp.Data) < 4 {
					continue
				}
				ph := cur.Load()
				if ph == nil || binary.BigEndian.Uint32(rp.Data) != ph.id {
					continue
				}
				ph.bytes.Add(int64(len(rp.Data)))
				if ph.pkts.Add(1) == ph.target {
					close(ph.done)
				}
				select {
				case ph.slots[i] <- struct{}{}:
				default:
				}
			}
		})
	}
	defer func() {
		closeAll(all) // ends the readers
		readers.Wait()
	}()

	var out []Throughput
	for si, size := range l.cfg.Sizes {
		if ctx.Err() != nil {
			break
		}
		t, err := l.measure(ctx, pairs, &cur, uint32(si+1), size)
		if err != nil {
			return out, err
		}
		out = append(out, t)
	}
	return out, nil
}

// waitTimeout waits for wg, at most d; it reports whether wg finished.
func waitTimeout(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}

// drain reads and discards everything c receives until c is closed.
func drain(c *derphttp.Client) {
	for {
		_, err := c.Recv()
		if errors.Is(err, derphttp.ErrClientClosed) {
			return
		}
		if err != nil {
			time.Sleep(10 * time.Millisecond) // derphttp reconnects on the next Recv
		}
	}
}

// measure runs one throughput measurement.
func (l *loader) measure(ctx context.Context, pairs []pair, cur *atomic.Pointer[phase], id uint32, size int) (Throughput, error) {
	size = max(size, 4)
	ph := &phase{id: id, target: int64(len(pairs)) * int64(l.cfg.MaxPackets), done: make(chan struct{})}
	for range pairs {
		ch := make(chan struct{}, l.cfg.InFlight)
		for range l.cfg.InFlight {
			ch <- struct{}{}
		}
		ph.slots = append(ph.slots, ch)
	}
	cur.Store(ph)
	pkt := make([]byte, size)
	binary.BigEndian.PutUint32(pkt, id)

	stop := make(chan struct{})
	var stalls atomic.Int64
	var sendErr atomic.Pointer[error]
	var senders sync.WaitGroup
	start := time.Now()
	for i, p := range pairs {
		senders.Go(func() {
			timer := time.NewTimer(time.Hour)
			defer timer.Stop()
			for range l.cfg.MaxPackets {
				timer.Reset(250 * time.Millisecond)
				select {
				case <-ph.slots[i]:
				case <-timer.C:
					stalls.Add(1) // a packet lost: go on without its slot
				case <-stop:
					return
				}
				if err := p.from.Send(p.toKey, pkt); err != nil {
					sendErr.CompareAndSwap(nil, &err)
					return
				}
			}
		})
	}
	bound := time.NewTimer(l.cfg.Duration)
	defer bound.Stop()
	select {
	case <-ph.done:
	case <-bound.C:
	case <-ctx.Done():
	}
	t := Throughput{
		Pairs:    len(pairs),
		Size:     size,
		InFlight: l.cfg.InFlight,
		Elapsed:  time.Since(start),
		Packets:  ph.pkts.Load(),
		Bytes:    ph.bytes.Load(),
	}
	close(stop)
	if !waitTimeout(&senders, 10*time.Second) {
		// A Send blocked on a relay that stopped reading; closing the
		// clients (the caller does) unblocks it.
		return t, errors.New("throughput: senders still blocked 10s after the measurement: the relay stopped reading")
	}
	t.Stalls = stalls.Load()
	if p := sendErr.Load(); p != nil {
		return t, fmt.Errorf("throughput: send: %w", *p)
	}
	return t, nil
}

// stun sends binding requests from STUNWorkers sockets, one outstanding
// per socket, for Duration or MaxPackets answers.
func (l *loader) stun(ctx context.Context, addr string) *STUNLoad {
	res := &STUNLoad{Workers: l.cfg.STUNWorkers}
	ctx, cancel := context.WithTimeout(ctx, l.cfg.Duration)
	defer cancel()
	var (
		answers, lost atomic.Int64
		mu            sync.Mutex
		lat           []time.Duration
		wg            sync.WaitGroup
	)
	start := time.Now()
	for range l.cfg.STUNWorkers {
		wg.Go(func() {
			c, err := net.Dial("udp", addr)
			if err != nil {
				lost.Add(1)
				return
			}
			defer c.Close()
			buf := make([]byte, 1500)
			var mine []time.Duration
			defer func() {
				mu.Lock()
				lat = append(lat, mine...)
				mu.Unlock()
			}()
			for ctx.Err() == nil && answers.Load() < int64(l.cfg.MaxPackets) {
				tx := stun.NewTxID()
				t0 := time.Now()
				if _, err := c.Write(stun.Request(tx)); err != nil {
					lost.Add(1)
					sleepCtx(ctx, 10*time.Millisecond)
					continue
				}
				c.SetReadDeadline(t0.Add(200 * time.Millisecond))
				for {
					n, err := c.Read(buf)
					if err != nil {
						lost.Add(1)
						break
					}
					if got, _, err := stun.ParseResponse(buf[:n]); err == nil && got == tx {
						answers.Add(1)
						if len(mine) < 100_000 {
							mine = append(mine, time.Since(t0))
						}
						break
					}
				}
			}
		})
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	res.Answers, res.Lost = answers.Load(), lost.Load()
	p := Percentiles(lat)
	res.P50, res.P99 = p.P50, p.P99
	return res
}

// WriteText writes the result as a table for people.
func (r *LoadResult) WriteText(w io.Writer) {
	if r.Idle != nil {
		i := r.Idle
		line := fmt.Sprintf("idle        %d clients connected (%d errors)", i.N, i.Errors)
		if i.RSSBefore > 0 && i.RSSAfter > 0 {
			line += fmt.Sprintf("; relay RSS %.1f → %.1f → %.1f MiB: %.1f KiB per connection (%.1f KiB over the second half)",
				mib(i.RSSBefore), mib(i.RSSHalf), mib(i.RSSAfter), i.PerConn()/1024, i.Marginal()/1024)
		} else {
			line += "; relay RSS not measured (give -pid)"
		}
		fmt.Fprintln(w, line)
	}
	for _, c := range []*Connects{r.ConnectSeq, r.ConnectPar} {
		if c == nil {
			continue
		}
		how := "sequential"
		if c.Concurrency > 1 {
			how = fmt.Sprintf("%d at once", c.Concurrency)
		}
		line := fmt.Sprintf("connect     %-10s %d in %v: %.0f/s, p50 %v, p99 %v, %d errors", how, c.N, roundDur(c.Elapsed), c.Rate(), roundDur(c.P50), roundDur(c.P99), c.Errors)
		if c.FirstError != "" {
			line += " (first: " + c.FirstError + ")"
		}
		fmt.Fprintln(w, line)
	}
	for _, t := range r.Throughput {
		fmt.Fprintf(w, "throughput  %2d pairs × %4d B, %d in flight: %7.1f Mbit/s, %8.0f packets/s (%d stalls)\n",
			t.Pairs, t.Size, t.InFlight, t.Mbps(), t.PPS(), t.Stalls)
	}
	if s := r.STUN; s != nil {
		fmt.Fprintf(w, "stun        %d workers: %.0f answers/s, p50 %v, p99 %v (%d lost)\n", s.Workers, s.Rate(), roundDur(s.P50), roundDur(s.P99), s.Lost)
	}
}

// WriteJSON writes the result as JSON, with the derived rates.
func (r *LoadResult) WriteJSON(w io.Writer) error {
	type tp struct {
		Throughput
		Mbps float64 `json:"mbps"`
		PPS  float64 `json:"pps"`
	}
	out := struct {
		*LoadResult
		Throughput []tp `json:"throughput,omitempty"`
	}{LoadResult: r}
	for _, t := range r.Throughput {
		out.Throughput = append(out.Throughput, tp{t, t.Mbps(), t.PPS()})
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }
