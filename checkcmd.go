package main

import (
	"context"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/check"
	"github.com/tailderp/tailderp/relay"
)

// checkOpts are the flags of `tailderp check` itself; the server's
// settings are parsed beside them (they describe this server).
type checkOpts struct {
	local         bool
	json          bool
	timeout       time.Duration
	certName      string
	caFile        string
	expectRefused bool
	meshKeyFile   string
	pings         int

	load           bool
	yes            bool
	pid            int
	loadDuration   time.Duration
	pairs          string
	sizes          string
	inFlight       int
	maxPackets     int
	connects       int
	parConnects    int
	concurrency    int
	idle           int
	loadSkip       string
	loadProgress   bool
	stunWorkers    int
	explicitServer map[string]bool // server settings given on the command line
}

func defineCheckFlags(fs *flag.FlagSet) *checkOpts {
	o := &checkOpts{}
	fs.BoolVar(&o.local, "local", false, "cheap liveness check of the relay on this machine (HTTPS /generate_204 on -a, STUN on -stun-port), configured by the same flags and environment as the server: the Docker HEALTHCHECK")
	fs.BoolVar(&o.json, "json", false, "print the report as JSON")
	fs.DurationVar(&o.timeout, "timeout", 30*time.Second, "give up after this long (default for -load: 10m; each of its parts is bounded by -load-duration)")
	fs.StringVar(&o.certName, "cert-name", "", `the derpMap node's CertName: a "sha256-raw:<hex>" pin of a self-signed certificate (IP mode; "tailderp derpmap" prints it), or the DNS name on the certificate when it is not the URL's host`)
	fs.StringVar(&o.caFile, "ca-file", "", "PEM file of extra root CAs to trust (a private CA)")
	fs.BoolVar(&o.expectRefused, "expect-refused", false, "the relay must refuse strangers (it verifies clients): an admitted stranger fails the check. Without a URL this follows the server's -verify-clients")
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

// parseCheckArgs parses the command line into the check's options and the
// server's settings; the URL may come before or after the flags.
func parseCheckArgs(args []string, getenv func(string) string, stderr io.Writer) (*checkOpts, *config, string, error) {
	fs := flag.NewFlagSet("tailderp check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := defineCheckFlags(fs)
	cfg := &config{}
	settings := settingsFor(cfg)
	fs.Usage = func() { printCheckUsage(stderr, fs) }
	if err := parseSettings(fs, settings, args, getenv); err != nil {
		return nil, nil, "", err
	}
	var target string
	for fs.NArg() > 0 {
		if target != "" {
			return nil, nil, "", fmt.Errorf("more than one URL: %q and %q", target, fs.Arg(0))
		}
		target = fs.Arg(0)
		if err := fs.Parse(fs.Args()[1:]); err != nil {
			return nil, nil, "", err
		}
	}
	return o, cfg, target, nil
}

// runCheck is `tailderp check`.
func runCheck(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	// First pass without the environment: which server settings were
	// given on the command line (with a URL, only those describe the
	// target; the environment describes this server).
	noEnv := func(string) string { return "" }
	o, cmdCfg, target, err := parseCheckArgs(args, noEnv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "tailderp check: %v\n", err)
		return 2
	}
	o.explicitServer = explicitFlags(args)
	cfg := cmdCfg
	if target == "" {
		o, cfg, _, err = parseCheckArgs(args, getenv, io.Discard)
		if err != nil {
			fmt.Fprintf(stderr, "tailderp check: %v\n", err)
			return 2
		}
		o.explicitServer = explicitFlags(args)
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()

	if o.local {
		if target != "" {
			fmt.Fprintln(stderr, "tailderp check: -local checks the relay on this machine by its settings; give either -local or a URL")
			return 2
		}
		return runLocalCheck(ctx, o, cfg, getenv, stdout, stderr)
	}

	t, err := checkTarget(o, cfg, target, getenv, stderr)
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

// explicitFlags returns the names of the flags on the command line.
func explicitFlags(args []string) map[string]bool {
	m := map[string]bool{}
	for _, a := range args {
		if a == "--" {
			break
		}
		if !strings.HasPrefix(a, "-") {
			continue
		}
		name := strings.TrimLeft(a, "-")
		name, _, _ = strings.Cut(name, "=")
		m[name] = true
	}
	return m
}

// runLocalCheck is -local, the Docker HEALTHCHECK: unchanged in what it
// reads (the server's flags and environment, -dev's address).
func runLocalCheck(ctx context.Context, o *checkOpts, cfg *config, getenv func(string) string, stdout, stderr io.Writer) int {
	if cfg.Dev && getenv("ADDR") == "" && !o.explicitServer["a"] {
		cfg.Addr = "127.0.0.1:3340"
	}
	host, _, err := net.SplitHostPort(cfg.Addr)
	if err != nil {
		fmt.Fprintf(stderr, "tailderp check: -a (ADDR) %q: %v\n", cfg.Addr, err)
		return 2
	}
	lt := check.LocalTarget{HTTPSAddr: cfg.Addr, ServerName: cfg.Hostname}
	if cfg.Dev && lt.ServerName == "" {
		lt.ServerName = "localhost"
	}
	if cfg.STUN {
		lt.STUNAddr = net.JoinHostPort(host, strconv.Itoa(cfg.STUNPort))
	}
	report := check.Local(ctx, lt)
	if o.json {
		report.WriteJSON(stdout)
	} else {
		report.WriteText(stdout)
	}
	if !report.OK() {
		return 1
	}
	return 0
}

// checkTarget describes what to check: the URL and the check's flags, or,
// without a URL, this server's public address from its settings.
func checkTarget(o *checkOpts, cfg *config, target string, getenv func(string) string, stderr io.Writer) (check.Target, error) {
	t := check.Target{Pings: o.pings}
	if o.expectRefused {
		t.Expect = check.ExpectRefused
	}
	if o.caFile != "" {
		pem, err := os.ReadFile(o.caFile)
		if err != nil {
			return t, fmt.Errorf("-ca-file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return t, fmt.Errorf("-ca-file %s: no PEM certificates in it", o.caFile)
		}
		t.RootCAs = pool
	}
	meshFile := o.meshKeyFile
	if target == "" && meshFile == "" {
		meshFile = cfg.MeshPSK
	}
	if meshFile != "" {
		b, err := os.ReadFile(meshFile)
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
		if o.explicitServer["ipv4"] {
			n.IPv4 = cfg.IPv4
		}
		if o.explicitServer["ipv6"] {
			n.IPv6 = cfg.IPv6
		}
		if cfg.STUNPort != 3478 {
			n.STUNPort = cfg.STUNPort
		}
		if !cfg.STUN {
			n.STUNPort = -1
		}
		n.CertName = o.certName
		t.Node = n
		t.TrustOnFirstUse = cfg.Dev && o.certName == ""
		return t, nil
	}

	// This server, as its derpMap snippet describes it.
	if cfg.Dev {
		if getenv("ADDR") == "" && !o.explicitServer["a"] {
			cfg.Addr = "127.0.0.1:3340"
		}
		if cfg.Hostname == "" {
			cfg.Hostname = "localhost"
		}
		if cfg.AuthKey == "" && cfg.AuthKeyFile == "" {
			cfg.VerifyClients = false
		}
	}
	if cfg.Hostname == "" {
		return t, errors.New("no URL given and -hostname (TAILSCALE_DERP_HOSTNAME) is not set: give the relay's URL (https://host[:port]), or run with the server's settings")
	}
	_, portStr, err := net.SplitHostPort(cfg.Addr)
	if err != nil {
		return t, fmt.Errorf("-a (ADDR) %q: %v", cfg.Addr, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 1 {
		return t, fmt.Errorf("-a (ADDR) %q: the check needs the port clients use", cfg.Addr)
	}
	stunPort := cfg.STUNPort
	if !cfg.STUN {
		stunPort = -1
	}
	certName := o.certName
	if certName == "" && !cfg.Dev && cfg.CertMode == "manual" && net.ParseIP(cfg.Hostname) != nil {
		// IP mode: the pin is the self-signed certificate in the
		// certificate directory, as `tailderp derpmap` prints it.
		certs, err := relay.LoadManualCerts(cfg.certDir(), cfg.Hostname, nil)
		if err != nil {
			fmt.Fprintf(stderr, "tailderp check: cannot read this server's certificate to learn its pin (%v); checking without it\n", err)
		} else {
			info, _ := certs.Current()
			certName = info.CertName
		}
	}
	region := relay.DERPRegion(relay.RegionConfig{RegionID: cfg.RegionID, RegionCode: cfg.RegionCode, RegionName: cfg.RegionName},
		derpNode(cfg, port, stunPort, certName))
	t.Node = *region.Nodes[0]
	t.TrustOnFirstUse = cfg.Dev && certName == ""
	if cfg.VerifyClients {
		t.Expect = check.ExpectRefused
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
	if t.Expect == check.ExpectRefused {
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
	if !o.explicitServer["timeout"] {
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
expiring within 14 days), 2 on bad flags.

Check flags:
`)
	names := map[string]bool{}
	for _, n := range []string{"local", "json", "timeout", "cert-name", "ca-file", "expect-refused", "mesh-key-file", "pings",
		"load", "yes-i-own-this-server", "pid", "load-duration", "pairs", "sizes", "in-flight", "max-packets",
		"connects", "concurrent-connects", "concurrency", "idle", "stun-workers", "load-skip", "v"} {
		names[n] = true
	}
	fs.VisitAll(func(f *flag.Flag) {
		if !names[f.Name] {
			return
		}
		def := ""
		if f.DefValue != "" && f.DefValue != "false" {
			def = fmt.Sprintf(" (default %s)", f.DefValue)
		}
		fmt.Fprintf(w, "  -%s\n    \t%s%s\n", f.Name, f.Usage, def)
	})
	fmt.Fprintln(w, "\nServer settings: see tailderp -help.")
}
