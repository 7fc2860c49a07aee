package commands

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"tailscale.com/envknob"
	"tailscale.com/ipn"
	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/check"
	"github.com/tailderp/tailderp/internal/config"
	"github.com/tailderp/tailderp/internal/logs"
	"github.com/tailderp/tailderp/internal/relayrules"
	"github.com/tailderp/tailderp/internal/serving"
	"github.com/tailderp/tailderp/node"
)

// checkOpts are the flags of `tailderp check` itself; the server's
// settings are parsed beside them (they describe this server).
type checkOpts struct {
	local       bool
	liveness    bool
	json        bool
	timeout     time.Duration
	certName    string
	caFile      string
	expectOpen  bool
	meshKeyFile string
	pings       int

	load         bool
	yes          bool
	pid          int
	loadDuration time.Duration
	pairs        string
	sizes        string
	inFlight     int
	maxPackets   int
	connects     int
	parConnects  int
	concurrency  int
	idle         int
	loadSkip     string
	loadProgress bool
	stunWorkers  int
	timeoutGiven bool // -timeout was on the command line
}

func defineCheckFlags(fs *flag.FlagSet) *checkOpts {
	o := &checkOpts{}
	fs.BoolVar(&o.local, "local", false, "check the relay on this machine (the one of -state-dir when given, else the one running here): HTTPS /generate_204 and STUN answer, and it is ready: every tailnet admits its members (a known-peers cache passes with a warning), the admission URL answers, clients accept the certificate, it is not stopping. The Docker HEALTHCHECK and the readiness probe")
	fs.BoolVar(&o.liveness, "liveness", false, "with -local: only whether the relay serves (HTTPS and STUN answer), what a restart could fix; not its tailnets, which a restart does not fix. The liveness probe")
	fs.BoolVar(&o.json, "json", false, "print the report as JSON")
	fs.DurationVar(&o.timeout, "timeout", 30*time.Second, "give up after this long (default for -load: 10m; each of its parts is bounded by -load-duration)")
	fs.StringVar(&o.certName, "cert-name", "", `the derpMap node's CertName: a "sha256-raw:<hex>" pin of a self-signed certificate (IP mode; "tailderp derpmap" prints it), or the DNS name on the certificate when it is not the URL's host`)
	fs.StringVar(&o.caFile, "ca-file", "", "PEM file of extra root CAs to trust (a private CA)")
	fs.BoolVar(&o.expectOpen, "expect-open", false, "the relay is meant to be open: a stranger admitted passes (by default an open relay is a failure). Without a URL this follows the server's -verify-clients")
	fs.StringVar(&o.meshKeyFile, "mesh-key-file", "", "file holding the relay's mesh key: the relay test then uses two mesh clients, proving relaying works even when strangers are refused; -load uses it for every client (default: the server's -mesh-psk-file when no URL is given)")
	fs.IntVar(&o.pings, "pings", 20, "round trips for the latency figures")

	fs.BoolVar(&o.load, "load", false, "put bounded load on the relay and measure it: throughput, connects, idle memory, STUN. Only for relays you own: refuses anything but loopback unless -yes-i-own-this-server")
	fs.BoolVar(&o.yes, "yes-i-own-this-server", false, "-load: allow a target that is not on this machine's loopback")
	fs.IntVar(&o.pid, "pid", 0, "-load: the relay's process ID on this machine, to read its RSS per idle connection from /proc/PID/status")
	fs.DurationVar(&o.loadDuration, "load-duration", 2*time.Second, "-load: time bound of each measurement")
	fs.StringVar(&o.pairs, "pairs", "1,8,64", "-load: numbers of sender→receiver pairs for throughput")
	fs.StringVar(&o.sizes, "sizes", "1200,64", "-load: packet sizes in bytes for throughput")
	fs.IntVar(&o.inFlight, "in-flight", 32, "-load: packets in flight per pair")
	fs.IntVar(&o.maxPackets, "max-packets", 2_000_000, "-load: count bound of each measurement (packets per pair, STUN answers)")
	fs.IntVar(&o.connects, "connects", 200, "-load: sequential connects")
	fs.IntVar(&o.parConnects, "concurrent-connects", 640, "-load: connects made -concurrency at a time")
	fs.IntVar(&o.concurrency, "concurrency", 32, "-load: clients connecting at once")
	fs.IntVar(&o.idle, "idle", 1000, "-load: idle clients to hold open (RSS per connection with -pid); -1 skips")
	fs.IntVar(&o.stunWorkers, "stun-workers", 4, "-load: STUN sockets sending at once")
	fs.StringVar(&o.loadSkip, "load-skip", "", "-load: comma-separated parts to leave out: idle, connect, throughput, stun")
	fs.BoolVar(&o.loadProgress, "v", false, "-load: say what runs, on stderr")
	return o
}

// newCheckFlags returns the check's flag set with its own flags; the
// server's settings are added by config.Load.
func newCheckFlags() (*flag.FlagSet, *checkOpts) {
	fs := flag.NewFlagSet("tailderp check", flag.ContinueOnError)
	o := defineCheckFlags(fs)
	return fs, o
}

// parseCheckArgs parses the command line into the check's options and the
// server's settings (flags, then the environment); the URL may come
// before, between or after the flags. cfg.src tells which settings the
// command line gave: with a URL, only those describe the target (the
// environment describes this server).
func parseCheckArgs(args []string, env []string, stderr io.Writer) (o *checkOpts, cfg *config.Config, target string, err error) {
	// Find the URL with a scratch parse, then parse the flags without it.
	scratch, _ := newCheckFlags()
	if _, err := config.Load(config.Inspect, scratch, nil, nil); err != nil {
		return nil, nil, "", err
	}
	var flags []string
	for rest := args; ; {
		if err := scratch.Parse(rest); err != nil {
			// The real parse below reports it: give it every argument
			// from here, not only those before the URL, or a bad flag
			// after the URL (and the flags beside it) would be dropped
			// without a word.
			flags = append(flags, rest...)
			break
		}
		flags = append(flags, rest[:len(rest)-scratch.NArg()]...)
		if scratch.NArg() == 0 {
			break
		}
		if target != "" {
			return nil, nil, "", fmt.Errorf("more than one URL: %q and %q", target, scratch.Arg(0))
		}
		target, rest = scratch.Arg(0), scratch.Args()[1:]
	}
	if target == "" {
		flags = args
	}
	fs, o := newCheckFlags()
	cfg, err = config.Load(config.Check, fs, flags, env)
	if errors.Is(err, flag.ErrHelp) {
		printCheckUsage(stderr, fs)
	}
	if err != nil {
		return nil, nil, "", err
	}
	fs.Visit(func(f *flag.Flag) { o.timeoutGiven = o.timeoutGiven || f.Name == "timeout" })
	if err := flagSwallowedFlag(fs); err != nil {
		return nil, nil, "", err
	}
	return o, cfg, target, nil
}

// flagSwallowedFlag finds a flag whose value is one of the flags: a flag
// that takes a value takes the next argument whatever it is, so
// `-cert-name -expect-open URL` would check with the CertName
// "-expect-open" and without -expect-open.
func flagSwallowedFlag(fs *flag.FlagSet) error {
	var err error
	fs.Visit(func(f *flag.Flag) {
		v := f.Value.String()
		name, _, _ := strings.Cut(strings.TrimPrefix(strings.TrimPrefix(v, "-"), "-"), "=")
		if err == nil && strings.HasPrefix(v, "-") && name != "" && fs.Lookup(name) != nil {
			err = fmt.Errorf("-%s %q: that is the flag -%s, not a value; -%s needs its value right after it (see tailderp check -h)", f.Name, v, name, f.Name)
		}
	})
	return err
}

// Check is `tailderp check ARGS` with the environment env ("NAME=value"
// entries); it returns the exit code: 0 passed, 1 a check failed, 2 bad
// flags or settings, or an auth key the control server rejects.
func Check(args []string, env []string, stdout, stderr io.Writer) int {
	o, cfg, target, err := parseCheckArgs(args, env, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "tailderp check: %v\n", err)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()

	if o.liveness && !o.local {
		fmt.Fprintln(stderr, "tailderp check: -liveness goes with -local (the relay on this machine)")
		return 2
	}
	if o.local {
		if target != "" {
			fmt.Fprintln(stderr, "tailderp check: -local checks the relay on this machine by its settings; give either -local or a URL")
			return 2
		}
		return runLocalCheck(ctx, o, cfg, stdout, stderr)
	}

	t, err := checkTarget(o, cfg, target, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "tailderp check: %v\n", err)
		return 2
	}
	if o.load {
		return runLoad(o, t, stdout, stderr)
	}
	if target != "" {
		// Ctrl-C or SIGTERM ends the check, not the process, so a member
		// that joined is still logged out.
		var stop context.CancelFunc
		ctx, stop = signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
		defer stop()
		member, code := joinCheckMember(ctx, cfg, stderr)
		if code != 0 {
			return code
		}
		if member != nil {
			defer func() {
				// Also after a timeout or a failed check: the node leaves
				// the tailnet now rather than when control notices.
				cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				if err := member.Close(cctx); err != nil {
					fmt.Fprintf(stderr, "tailderp check: %v (the control server removes the ephemeral node by itself once it is offline)\n", err)
				}
			}()
			t.MemberKey = member.NodeKey()
		}
	}
	report := check.Run(ctx, t)
	if o.json {
		report.WriteJSON(stdout)
	} else {
		fmt.Fprintf(stdout, "checking %s\n", describeTarget(t))
		report.WriteText(stdout)
		switch {
		case report.AllGood():
			fmt.Fprintln(stdout, "all good")
		case report.OK():
			fmt.Fprintf(stdout, "passed, but members of the tailnet were not tested; to test them, check the URL with an auth key of the tailnet: %s or %s, and %s for Headscale\n",
				settingName("TAILSCALE_AUTH_KEY"), settingName("auth-key-file"), settingName("control-url"))
		default:
			fmt.Fprintf(stdout, "%d problem(s): see the lines marked ✗ or ⚠\n", len(report.Failed()))
		}
	}
	if !report.OK() {
		return 1
	}
	return 0
}

// joinCheckMember joins the tailnet as a throwaway member when the check
// has an auth key, read as the server reads it (TAILSCALE_AUTH_KEY, else
// -auth-key-file; -control-url), so the check can prove the relay admits
// the tailnet's members. No key: nil and 0. A failure is said on stderr
// and returns the exit code: 2 for a key that is wrong, 1 otherwise.
func joinCheckMember(ctx context.Context, cfg *config.Config, stderr io.Writer) (*node.Member, int) {
	if err := cfg.ReadAuthKey(); err != nil {
		fmt.Fprintf(stderr, "tailderp check: %v\n", err)
		return nil, 2
	}
	if cfg.AuthKey == "" {
		return nil, 0
	}
	if err := config.CheckAuthKey(cfg.AuthKey); err != nil {
		fmt.Fprintf(stderr, "tailderp check: %v\n", err)
		return nil, 2
	}
	// Process-wide, before the node starts: a node that lives for the
	// check's seconds has no use for Tailscale's log service.
	if os.Getenv("TS_NO_LOGS_NO_SUPPORT") != "true" {
		envknob.SetNoLogsNoSupport()
	}
	m, err := node.JoinEphemeral(ctx, node.Join{ControlURL: cfg.ControlURL, AuthKey: cfg.AuthKey, Logger: logs.Discard()})
	if err != nil {
		fmt.Fprintf(stderr, "tailderp check: joining the tailnet as a member, to test that the relay admits members: %v\n", err)
		if errors.Is(err, node.ErrAuthKeyRejected) {
			fmt.Fprintf(stderr, "tailderp check: give an auth key of the relay's tailnet (%s or %s), reusable or ephemeral, and for Headscale its URL (%s)\n",
				settingName("TAILSCALE_AUTH_KEY"), settingName("auth-key-file"), settingName("control-url"))
			return nil, 2
		}
		fmt.Fprintf(stderr, "tailderp check: is %s the tailnet's control server? (%s)\n", orDefaultControl(cfg.ControlURL), settingName("control-url"))
		return nil, 1
	}
	return m, 0
}

func orDefaultControl(u string) string {
	if u == "" {
		return ipn.DefaultControlURL
	}
	return u
}

// runLocalCheck is -local, the Docker HEALTHCHECK: it checks what the
// relay on this machine serves (see runningServer), whatever settings the
// check itself was given.
func runLocalCheck(ctx context.Context, o *checkOpts, own *config.Config, stdout, stderr io.Writer) int {
	lt, from, err := localTarget(own)
	if err != nil {
		fmt.Fprintf(stderr, "tailderp check: %v\n", err)
		if errors.Is(err, serving.ErrNotServing) {
			return 1 // that relay is down
		}
		return 2
	}
	lt.Liveness = o.liveness
	report := check.Local(ctx, lt)
	if o.json {
		report.WriteJSON(stdout)
	} else {
		fmt.Fprintf(stdout, "checking %s (from %s)\n", lt.HTTPSAddr, from)
		report.WriteText(stdout)
	}
	if !report.OK() {
		return 1
	}
	return 0
}

// localTarget is where the relay on this machine listens: as its
// serving.json says, else as its settings say, else as own says; from
// says which.
func localTarget(own *config.Config) (lt check.LocalTarget, from string, err error) {
	s, cfg, from, err := serving.Running(own)
	if err != nil {
		return lt, "", err
	}
	if s != nil {
		return check.LocalTarget{HTTPSAddr: s.HTTPSAddr, ServerName: s.ServerName, STUNAddr: s.STUNAddr,
				ProxyProtocolFrom: s.ProxyProtocolFrom, Readiness: s.Readiness, ReadinessRequired: true},
			fmt.Sprintf("pid %d, %s", s.PID, from), nil
	}
	if cfg == nil {
		cfg, from = own, "this command's settings: no running server found"
	}
	proxies, _ := cfg.ProxyProtocolSources() // a bad list fails the server's start: then there is nothing to check
	return check.LocalTarget{HTTPSAddr: cfg.Addr, ServerName: cfg.Hostname, STUNAddr: cfg.STUNAddr(), ProxyProtocolFrom: proxies}, from, nil
}

// checkTarget describes what to check: the URL and the check's flags, or,
// without a URL, this server's public address, as `tailderp derpmap`
// prints it.
func checkTarget(o *checkOpts, cfg *config.Config, target string, stderr io.Writer) (check.Target, error) {
	t := check.Target{Pings: o.pings}
	if o.expectOpen {
		t.Expect = check.ExpectOpen
	}
	if o.caFile != "" {
		pool, err := config.LoadCertPool(o.caFile)
		if err != nil {
			return t, fmt.Errorf("-ca-file: %w", err)
		}
		t.RootCAs = pool
	}
	meshFile, meshSetting := o.meshKeyFile, "-mesh-key-file"
	if target == "" && meshFile == "" {
		meshFile, meshSetting = cfg.MeshPSKFile, settingName("mesh-psk-file")
	}
	if meshFile != "" {
		b, err := config.ReadFileLimited(meshFile, 4<<10)
		if err != nil {
			return t, fmt.Errorf("%s: %w", meshSetting, err)
		}
		k, err := relayrules.ParseMeshKey(string(b))
		if err != nil {
			return t, fmt.Errorf("%s %s: %v", meshSetting, meshFile, err)
		}
		t.MeshKey = k
	}

	if target != "" {
		n, err := check.ParseURL(target)
		if err != nil {
			return t, err
		}
		// Only flags describe another server; the environment is this
		// server's. An address given is where the relay is: the other
		// family is not looked up either.
		v4, v6 := cfg.ByFlag("ipv4"), cfg.ByFlag("ipv6")
		if v4 {
			n.IPv4 = cfg.IPv4
		}
		if v6 {
			n.IPv6 = cfg.IPv6
		}
		if v4 && !v6 {
			n.IPv6 = "none"
		}
		if v6 && !v4 {
			n.IPv4 = "none"
		}
		if cfg.ByFlag("stun-port") {
			n.STUNPort = cfg.STUNPort
		}
		if cfg.ByFlag("stun") && !cfg.STUN {
			n.STUNPort = -1
		}
		n.CertName = o.certName
		t.Node = n
		t.TrustOnFirstUse = cfg.ByFlag("dev") && cfg.Dev && o.certName == ""
		return t, nil
	}

	// This server, as its derpMap snippet describes it.
	if cfg.Hostname == "" {
		return t, fmt.Errorf("no URL given and %s is not set: give the relay's URL (https://host[:port]), or run with the server's settings", settingName("hostname"))
	}
	region, note, err := derpMapRegion(cfg)
	if err != nil {
		if !errors.Is(err, config.ErrNoCertYet) {
			return t, err
		}
		fmt.Fprintf(stderr, "tailderp check: cannot learn this server's pin (%v); checking without it\n", err)
		httpsPort, stunPort := cfg.ConfiguredPorts()
		region = cfg.DERPRegion(httpsPort, stunPort, "")
	} else if note != "" {
		fmt.Fprintf(stderr, "tailderp check: %s\n", note)
	}
	t.Node = *region.Nodes[0]
	if o.certName != "" {
		t.Node.CertName = o.certName
	}
	t.TrustOnFirstUse = cfg.Dev && t.Node.CertName == ""
	if !cfg.VerifyClients && cfg.VerifyClientURL == "" {
		t.Expect = check.ExpectOpen // as this server is configured
	}
	return t, nil
}

func describeTarget(t check.Target) string {
	n := t.Node
	port := n.DERPPort
	if port == 0 {
		port = 443
	}
	s := "https://" + net.JoinHostPort(n.HostName, strconv.Itoa(port))
	var extra []string
	if n.IPv4 != "" && n.IPv4 != "none" && n.IPv4 != n.HostName {
		extra = append(extra, "IPv4 "+n.IPv4)
	}
	if n.IPv6 != "" && n.IPv6 != "none" && n.IPv6 != n.HostName {
		extra = append(extra, "IPv6 "+n.IPv6)
	}
	switch {
	case n.STUNPort < 0:
		extra = append(extra, "no STUN")
	case n.STUNPort == 0:
		extra = append(extra, "STUN 3478")
	default:
		extra = append(extra, fmt.Sprintf("STUN %d", n.STUNPort))
	}
	if n.CertName != "" {
		extra = append(extra, "CertName "+n.CertName)
	}
	if t.Expect == check.ExpectOpen {
		extra = append(extra, "expected open")
	} else {
		extra = append(extra, "strangers must be refused")
	}
	if !t.MeshKey.IsZero() {
		extra = append(extra, "with the mesh key")
	}
	if !t.MemberKey.IsZero() {
		extra = append(extra, "member "+t.MemberKey.Public().ShortString())
	}
	return s + " (" + strings.Join(extra, ", ") + ")"
}

// runLoad is -load.
func runLoad(o *checkOpts, t check.Target, stdout, stderr io.Writer) int {
	pairs, err := intList(o.pairs)
	if err != nil {
		fmt.Fprintf(stderr, "tailderp check: -pairs: %v\n", err)
		return 2
	}
	sizes, err := intList(o.sizes)
	if err != nil {
		fmt.Fprintf(stderr, "tailderp check: -sizes: %v\n", err)
		return 2
	}
	for _, s := range sizes {
		if s < 4 || s > 64<<10 {
			fmt.Fprintf(stderr, "tailderp check: -sizes: %d: want 4 to 65536 bytes\n", s)
			return 2
		}
	}
	timeout := o.timeout
	if !o.timeoutGiven {
		timeout = 10 * time.Minute // every part has its own, smaller bound
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if t.TrustOnFirstUse && t.Node.CertName == "" {
		pin, err := check.LearnPin(ctx, t.Node)
		if err != nil {
			fmt.Fprintf(stderr, "tailderp check: %v\n", err)
			return 1
		}
		t.Node.CertName = pin
	}
	node := t.Node
	lc := check.LoadConfig{
		Region:           &tailcfg.DERPRegion{RegionID: 900, RegionCode: "load", Nodes: []*tailcfg.DERPNode{&node}},
		RootCAs:          t.RootCAs,
		AllowNonLoopback: o.yes,
		MeshKey:          t.MeshKey,
		Pairs:            pairs,
		Sizes:            sizes,
		InFlight:         o.inFlight,
		Duration:         o.loadDuration,
		MaxPackets:       o.maxPackets,
		Connects:         o.connects,
		ParallelConnects: o.parConnects,
		Concurrency:      o.concurrency,
		Idle:             o.idle,
		PID:              o.pid,
		STUNWorkers:      o.stunWorkers,
	}
	if o.loadSkip != "" {
		lc.Skip = strings.Split(o.loadSkip, ",")
	}
	if o.loadProgress {
		lc.Progress = func(format string, args ...any) { fmt.Fprintf(stderr, "load: "+format+"\n", args...) }
	}
	if !o.json {
		fmt.Fprintf(stdout, "load on %s\n", describeTarget(t))
	}
	res, err := check.Load(ctx, lc)
	if res != nil {
		if o.json {
			res.WriteJSON(stdout)
		} else {
			res.WriteText(stdout)
		}
	}
	if err != nil {
		fmt.Fprintf(stderr, "tailderp check -load: %v\n", err)
		if errors.Is(err, check.ErrNotLoopback) {
			return 2
		}
		return 1
	}
	return 0
}

func intList(s string) ([]int, error) {
	var out []int
	for f := range strings.SplitSeq(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q: want positive numbers, comma-separated", s)
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%q: empty", s)
	}
	return out, nil
}

func printCheckUsage(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprint(w, `tailderp check: prove a DERP relay works from where you stand.

Usage:
  tailderp check [flags] [https://host[:port]]
  tailderp check -local                 is the relay on this machine ready (Docker HEALTHCHECK, readiness probe)
  tailderp check -local -liveness       does it serve at all (liveness probe)
  tailderp check -load [flags] [URL]    bounded load against a relay you own

Without a URL it checks this server's public address, from the same flags
and environment as the server (-hostname, -a, -stun-port, -certmode,
-certdir, -verify-clients, -mesh-psk-file, -ipv4, ...). With a URL, only
flags describe the target: -stun-port, -stun=false, -ipv4/-ipv6 (dial that
address, resolving nothing), -cert-name.

One line per check, ✓ passed, ✗ failed, ⚠ warning, – skipped: dns, tls,
certificate, generate_204, admission (a stranger refused, or relayed for),
member (a member of the tailnet admitted), relay (two clients exchange
packets), latency, stun.

What it proves. A relay has two jobs: refuse strangers, admit the members
of its tailnet. Without a member key it proves the first only (and that
the relay answers, its certificate is right, STUN works): a relay whose
tailnet node cannot log in refuses everyone, members too, and still passes.
The last line then says members were not tested, never "all good".
With a URL and an auth key of the tailnet, read as the server reads it
(TAILSCALE_AUTH_KEY, else -auth-key-file; -control-url for Headscale), the
check joins the tailnet as an ephemeral node (state in memory, logged out
at the end), connects to the relay with that node's key, and retries a
refusal for 10 s (the relay's node learns of a new node from its next
network map): "all good" means a stranger was refused (or admitted with
-expect-open) and a member was admitted. An open relay admits any key, so
with -expect-open members need no key. -json gives the same as "member"
(admitted, refused, not-tested) and "all_good".

The relay on this machine (-local). The running relay publishes what it
does in <state-dir>/serving.json, rewritten within a second of a change;
-local reads it (the relay of -state-dir / STATE_DIR when given, and
fails if that one is not running; else the one running here), probes
HTTPS /generate_204 and STUN, and judges each part: ✗ when a tailnet would
refuse every member (its node logging in, logged out, deleted, refused by
or unable to reach its control server, with no known peers to admit
from), when the admission URL is down and admission fails closed, when
clients refuse the certificate, or when the relay is stopping; ⚠ (passing)
while a tailnet admits from its known-peers cache. So it fails within a
second or two of a relay starting whose node cannot log in, naming the
tailnet, the cause and the fix. Readiness probes and the Docker
HEALTHCHECK use it: a relay that admits nobody should leave the load
balancer and show unhealthy. Liveness probes use -local -liveness: a
restart does not fix a dead control server, so liveness asks only that
the relay serves.

Exit status 0 when every check passed (members untested included): 1 on
any ✗ or ⚠ (e.g. a member refused, or a certificate expiring within 30
days, or a third of its lifetime, whichever is less: the relay's log warns
from then too), 2 on bad flags or an auth key the control server rejects.

Check flags:
`)
	fs.VisitAll(func(f *flag.Flag) {
		if config.IsSetting(f.Name) {
			return // the server's settings: see tailderp -help
		}
		def := ""
		if f.DefValue != "" && f.DefValue != "false" {
			def = fmt.Sprintf(" (default %s)", f.DefValue)
		}
		fmt.Fprintf(w, "  -%s\n    \t%s%s\n", f.Name, f.Usage, def)
	})
	fmt.Fprintln(w, "\nServer settings: see tailderp -help.")
}
