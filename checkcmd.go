package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/check"
	"github.com/tailderp/tailderp/internal/config"
	"github.com/tailderp/tailderp/internal/serving"
)

// checkOpts are the flags of `tailderp check` itself; the server's
// settings are parsed beside them (they describe this server).
type checkOpts struct {
	local       bool
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
	fs.BoolVar(&o.local, "local", false, "cheap liveness check of the relay on this machine (HTTPS /generate_204 on -a, STUN on -stun-port), configured by the same flags and environment as the server: the Docker HEALTHCHECK")
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
// server's settings are added by parseConfig.
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
	return o, cfg, target, nil
}

// runCheck is `tailderp check`.
func runCheck(args []string, env []string, stdout, stderr io.Writer) int {
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
	report := check.Run(ctx, t)
	if o.json {
		report.WriteJSON(stdout)
	} else {
		fmt.Fprintf(stdout, "checking %s\n", describeTarget(t))
		report.WriteText(stdout)
		if report.OK() {
			fmt.Fprintln(stdout, "all good")
		} else {
			fmt.Fprintf(stdout, "%d problem(s): see the lines marked ✗ or ⚠\n", len(report.Failed()))
		}
	}
	if !report.OK() {
		return 1
	}
	return 0
}

// runLocalCheck is -local, the Docker HEALTHCHECK: it checks what the
// relay on this machine serves (see runningServer), whatever settings the
// check itself was given.
func runLocalCheck(ctx context.Context, o *checkOpts, own *config.Config, stdout, stderr io.Writer) int {
	lt, from, err := localTarget(own)
	if err != nil {
		fmt.Fprintf(stderr, "tailderp check: %v\n", err)
		return 2
	}
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
		return check.LocalTarget{HTTPSAddr: s.HTTPSAddr, ServerName: s.ServerName, STUNAddr: s.STUNAddr},
			fmt.Sprintf("pid %d, %s", s.PID, from), nil
	}
	if cfg == nil {
		cfg, from = own, "this command's settings: no running server found"
	}
	return check.LocalTarget{HTTPSAddr: cfg.Addr, ServerName: cfg.Hostname, STUNAddr: cfg.STUNAddr()}, from, nil
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
	meshFile := o.meshKeyFile
	if target == "" && meshFile == "" {
		meshFile = cfg.MeshPSKFile
	}
	if meshFile != "" {
		b, err := config.ReadFileLimited(meshFile, 4<<10)
		if err != nil {
			return t, fmt.Errorf("-mesh-key-file: %w", err)
		}
		k, err := key.ParseDERPMesh(strings.TrimSpace(string(b)))
		if err != nil {
			return t, fmt.Errorf("-mesh-key-file %s: %v", meshFile, err)
		}
		t.MeshKey = k
	}

	if target != "" {
		n, err := check.ParseURL(target)
		if err != nil {
			return t, err
		}
		// Only flags describe another server; the environment is this
		// server's.
		if cfg.ByFlag("ipv4") {
			n.IPv4 = cfg.IPv4
		}
		if cfg.ByFlag("ipv6") {
			n.IPv6 = cfg.IPv6
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
  tailderp check -local                 liveness of the relay on this machine (Docker HEALTHCHECK)
  tailderp check -load [flags] [URL]    bounded load against a relay you own

Without a URL it checks this server's public address, from the same flags
and environment as the server (-hostname, -a, -stun-port, -certmode,
-certdir, -verify-clients, -mesh-psk-file, -ipv4, ...). With a URL, only
flags describe the target: -stun-port, -stun=false, -ipv4/-ipv6 (dial that
address instead of resolving the host), -cert-name.

One line per check, ✓ passed, ✗ failed, ⚠ warning, – skipped: dns, tls,
certificate, generate_204, admission (a stranger refused, or relayed for),
relay (two clients exchange packets), latency, stun. Exit status 0 only
when everything is as it should be: 1 on any ✗ or ⚠ (e.g. a certificate
expiring within 30 days, or a third of its lifetime, whichever is less: the
relay's log warns from then too), 2 on bad flags.

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
