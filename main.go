// Command tailderp is a DERP relay for one tailnet. It serves DERP over
// HTTPS and STUN to the public internet, and runs its own embedded tailnet
// node (tsnet) to admit only that tailnet's clients and to serve /debug on
// the tailnet alone. See README.md.
//
// This file dispatches the subcommands (internal/commands: check,
// derpmap, cert renew, drain) and wires the server together; internal/config
// turns flags, environment and files into one Config; the work is done in
// relay, stun, node, verify and debugsrv.
package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"tailscale.com/envknob"
	"tailscale.com/ipn"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/debugsrv"
	"github.com/tailderp/tailderp/internal/commands"
	"github.com/tailderp/tailderp/internal/config"
	"github.com/tailderp/tailderp/internal/logs"
	"github.com/tailderp/tailderp/internal/registercmd"
	"github.com/tailderp/tailderp/internal/serving"
	"github.com/tailderp/tailderp/internal/tailnets"
	"github.com/tailderp/tailderp/node"
	"github.com/tailderp/tailderp/policy"
	"github.com/tailderp/tailderp/relay"
	"github.com/tailderp/tailderp/stun"
	"github.com/tailderp/tailderp/verify"
)

// version is stamped at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

func main() {
	os.Exit(realMain(os.Args[1:], os.Environ(), os.Stdout, os.Stderr))
}

// settingName is how messages name a setting: "-a (ADDR)".
var settingName = config.SettingName

// realMain runs a command line with the environment env ("NAME=value"
// entries) and returns the exit code.
func realMain(args []string, env []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "-version", "--version":
			if len(args) > 1 {
				// As -version after other flags is (migrate.go): one rule
				// whatever the order.
				fmt.Fprintln(stderr, "tailderp: -version takes no other arguments: run `tailderp -version` alone")
				return 2
			}
			fmt.Fprintln(stdout, "tailderp", version)
			return 0
		case "derpmap":
			return commands.DERPMap(args[1:], env, stdout, stderr)
		case "check":
			return commands.Check(args[1:], env, stdout, stderr)
		case "cert":
			return commands.Cert(args[1:], env, stdout, stderr)
		case "drain":
			return commands.Drain(args[1:], env, stdout, stderr)
		case "register":
			return registercmd.Run(args[1:], env, stdout, stderr, commands.Region)
		}
	}
	cfg, err := config.Load(config.Run, nil, args, env)
	if errors.Is(err, flag.ErrHelp) {
		config.PrintUsage(stderr)
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "tailderp: %v\n", err)
		return 2
	}
	logger, err := logs.New(stderr, cfg.LogFormat, cfg.LogLevel)
	if err != nil {
		fmt.Fprintf(stderr, "tailderp: -log-format/-log-level: %v\n", err)
		return 2
	}
	// Libraries that log through the standard logger (stunserver,
	// derpserver's rare lines) go to slog, each line bounded and all of
	// them rate-limited: some have quoted what a client sent, whole.
	log.SetFlags(0)
	log.SetOutput(logs.NewLimited(logger, "lines of the standard logger", 10, 10*time.Second, 512).Writer(slog.LevelInfo))
	for _, n := range cfg.Notes {
		logger.Warn(n)
	}
	if cfg.NeedsTempStateDir() {
		// Without a temporary directory (an image's empty root has no
		// /tmp), an open -dev relay runs with none: a new DERP key, no
		// serving.json. The node needs one.
		dir, err := os.MkdirTemp("", "tailderp-dev-")
		switch {
		case err == nil:
			defer os.RemoveAll(dir)
			cfg.StateDir = dir
		case cfg.VerifyClients:
			fmt.Fprintf(stderr, "tailderp: -dev without -state-dir: a temporary state directory: %v (give -state-dir)\n", err)
			return 2
		default:
			logger.Info("-dev without -state-dir and no temporary directory: running with no state", "err", err)
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, logger, stdout); err != nil {
		logger.Error(err.Error())
		if _, bad := errors.AsType[commands.SettingsError](err); bad {
			return 2 // the settings' fault: a restart changes nothing
		}
		return 1
	}
	return 0
}

// setupProcess does what must be set for the whole process, once, before
// a relay with admission or a tailnet node starts.
var setupProcess = sync.OnceValue(func() error {
	// derpserver asks its admission URL through http.DefaultClient, so the
	// in-process admission scheme must live on http.DefaultTransport.
	return relay.RegisterAdmissionScheme(http.DefaultTransport)
})

// setupTailnetEnv sets tsnet's process-wide environment for cfg's node.
// tsnet has no per-node option for either: its network-statistics logger
// finds its directory through TS_LOGS_DIR (else under HOME or the working
// directory; in a read-only container with no HOME it panics), and log
// uploads are switched off by envknob for the whole process.
func setupTailnetEnv(cfg *config.Config) {
	if os.Getenv("TS_LOGS_DIR") == "" {
		os.Setenv("TS_LOGS_DIR", cfg.NodeDir())
	}
	noLogs := cfg.NoLogsNoSupport
	for _, t := range cfg.Tailnets() {
		// No log uploads to Tailscale from a node of another control server.
		noLogs = noLogs || (t.ControlURL != "" && t.ControlURL != ipn.DefaultControlURL)
	}
	if noLogs {
		envknob.SetNoLogsNoSupport()
	}
}

// run serves until ctx ends (SIGTERM/SIGINT: nil) or something fails.
// SIGHUP reloads what can change without a restart (reloadOnHUP); it
// never stops the server.
func run(ctx context.Context, cfg *config.Config, logger *slog.Logger, out io.Writer) error {
	// First of all: SIGHUP's default action ends the process (status 129,
	// which systemd's Restart=on-failure does not restart).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	logger.Info("tailderp starting", "version", version, "hostname", cfg.Hostname, "certmode", cfg.Mode().String(),
		"addr", cfg.Addr, "state_dir", cfg.StateDir, "verify_clients", cfg.VerifyClients,
		"control_url", cfg.ControlURL, "auth_key", cfg.AuthKeyState(), "auth_key_from", cfg.AuthKeyFrom(), "dev", cfg.Dev)
	stateWritable := checkWritableDir(cfg.StateDir)
	if stateWritable != nil && (cfg.VerifyClients || !cfg.Dev) {
		return stateWritable
	}
	if err := setupProcess(); err != nil {
		return err
	}
	certs, err := makeCerts(cfg, logger)
	if err != nil {
		return err
	}
	derpKey, err := loadDERPKey(cfg)
	if err != nil {
		return err
	}
	meshPeers := cfg.MeshPeers()
	if cfg.MeshSelfListed() {
		logger.Info("mesh: this relay's own entry in -mesh-with is skipped", "hostname", cfg.Hostname)
	}

	var tns []*tailnets.Tailnet
	var verifier *verify.Verifier
	if cfg.VerifyClients || cfg.VerifyClientURL != "" {
		verifier = &verify.Verifier{URL: cfg.VerifyClientURL, FailOpen: cfg.VerifyClientsFailOpen, URLFailOpen: cfg.VerifyClientURLFailOpen, Logger: logger}
		if cfg.VerifyClients {
			setupTailnetEnv(cfg)
			tns = tailnets.New(cfg, verifier, logger)
		}
		if cfg.VerifyClientsFailOpen {
			logger.Warn("admission fails open: clients are admitted unverified while a check cannot answer (-verify-clients-fail-open)")
		} else if cfg.VerifyClientURLFailOpen && cfg.VerifyClientURL != "" {
			logger.Warn("admission fails open while the admission URL is unreachable: clients are admitted unverified then (-verify-client-url-fail-open)")
		}
	}
	switch {
	case !cfg.VerifyClients && cfg.VerifyClientURL != "":
		logger.Info("the tailnet check is off (-verify-clients=false): the admission URL alone decides who may relay; /debug is not served (it needs the tailnet node)")
	case !cfg.VerifyClients:
		logger.Warn("client verification is off (-verify-clients=false): anyone who finds this relay can relay through it, and /debug is not served")
	}

	pins := &commands.PinFollower{Config: cfg, Out: out, Logger: logger}
	rs := &relay.Server{
		Addr:       cfg.Addr,
		HTTPPort:   cfg.HTTPPort,
		Certs:      certs,
		PrivateKey: derpKey,
		Home:       cfg.Home,
		MeshKey:    cfg.MeshKey,
		Logger:     logger,

		TCPKeepAlive:                 cfg.TCPKeepAlive,
		TCPUserTimeout:               cfg.TCPUserTimeout,
		TCPWriteTimeout:              cmp.Or(cfg.TCPWriteTimeout, -1), // 0 in the settings means none
		AcceptConnectionLimit:        cfg.AcceptConnectionLimit,
		AcceptConnectionBurst:        cfg.AcceptConnectionBurst,
		MeshWith:                     meshPeers,
		MeshRootCAs:                  cfg.MeshRoots,
		BootstrapDNSNames:            cfg.BootstrapNames(),
		UnpublishedBootstrapDNSNames: cfg.UnpublishedBootstrapNames(),
		CertAdvice:                   func(p relay.CertProblem) string { return cfg.CertAdvice(p) },
		OnCertChange:                 pins.Changed,

		Hostname:      cfg.Hostname,
		PublicPort:    cfg.PublicPort,
		MaxConnsPerIP: cfg.MaxConnsPerIP,
	}
	rs.ProxyProtocolFrom, _ = cfg.ProxyProtocolSources() // checked by config.Load
	switch {
	case len(tns) > 1:
		// Several tailnets: one DERP server each (see relay/tenants.go).
		verifier.Isolated = true
		for _, t := range tns {
			rs.Tenants = append(rs.Tenants, relay.Tenant{Name: t.Name, Admitter: verifier.ForTailnet(t.Name)})
		}
		rs.TenantOf = verifier.TenantOf
		rs.MaxConnsPerTenant = cfg.MaxConnsPerTailnet
		logger.Info("several tailnets: each has a DERP server of its own behind the one port, so the clients of one can neither reach nor see another's",
			"tailnets", len(tns), "max_conns_per_tailnet", cfg.MaxConnsPerTailnet)
	case verifier != nil:
		rs.Admitter = verifier
	}
	if verifier != nil {
		verifier.Conns = rs // revocations close the relay's connections
	}
	// Each node reads its known-peers cache before the relay serves, so a
	// restart's first clients are answered from it (or held until the
	// node's map arrives); the nodes log in only once the ports are bound,
	// so a port in use leaves no half-made login behind.
	for _, t := range tns {
		if err := t.Node.Load(); err != nil {
			return fmt.Errorf("%s %s: %w", settingName("state-dir"), cfg.StateDir, err)
		}
	}
	if err := rs.Start(); err != nil {
		return explainListenError(err)
	}
	if verifier != nil {
		go verifier.Watch(ctx, 0)
	}
	// Stopping the relay and the node (once started below) is the first
	// thing done on SIGTERM (see the loop at the end), and on any error
	// return, after the deferred calls below.
	rel := &tailnets.Relay{Tailnets: tns, Verifier: verifier, Server: rs, URLFailOpen: cfg.VerifyClientURLFailOpen, Started: time.Now()}
	var pub *serving.Publisher // set once serving; stopping before that publishes nothing
	stopServing := sync.OnceFunc(func() { shutdown(rel, pub, cfg.DrainTimeout, logger) })
	defer stopServing()
	if ipc, ok := certs.(*relay.ACMEIPCerts); ok {
		// The CA validates against the listeners: start once they are up.
		ipc.Start()
		defer ipc.Close()
	}
	var rates *relay.RateConfigFile
	if cfg.RateConfig != "" {
		if rates, err = relay.WatchRateConfig(rs, cfg.RateConfig, 0, logger); err != nil {
			return fmt.Errorf("%s %s: %w", settingName("rate-config"), cfg.RateConfig, err)
		}
		defer rates.Close()
	}
	stunAddr := ""
	if addr := cfg.STUNAddr(); addr != "" {
		ss := &stun.Server{Addr: addr}
		if err := ss.Start(); err != nil {
			return fmt.Errorf("%s %d: %v (is another server using the port? -stun=false turns STUN off)", settingName("stun-port"), cfg.STUNPort, err)
		}
		defer ss.Close()
		stunAddr = ss.LocalAddr().String()
		logger.Info("stun: serving", "addr", stunAddr)
	}

	sv := servingNow(cfg, rs, certs, stunAddr)
	rd := rel.Readiness()
	sv.Readiness = &rd
	path := ""
	if stateWritable == nil {
		path = cfg.ServingPath()
	}
	// serving.json first: once the snippet is printed, `check -local` and
	// `derpmap` find what this relay serves.
	pub, err = serving.NewPublisher(path, *sv)
	if err != nil {
		logger.Warn("cannot write serving.json: `tailderp check -local` falls back to the settings it is given", "err", err)
	}
	// On any return: stop (which says draining in serving.json) before
	// the file goes, so no stopped relay's file is left behind.
	defer func() { stopServing(); pub.Remove() }()
	pins.Serving(pub, rs)
	fleet := cfg.FleetRegion(sv.Region)
	if err := commands.WriteSnippet(out, fleet); err != nil {
		return err
	}
	// /derpmap.json: this relay's node, and its fleet's as they are heard
	// of (relay/fleet.go), in the order of the snippet.
	rs.SetFleetOrder(relay.FleetOrder(fleet))
	if err := rs.PublishRegion(sv.Region); err != nil {
		return err
	}
	go rel.Publish(ctx, pub, logger)
	if cfg.Register {
		pc, err := cfg.PolicyClient() // checked by config.Load
		if err != nil {
			return err
		}
		go (&policy.Keeper{Client: pc, Logger: logger, Advice: config.PolicyAdvice}).Run(ctx, rs.WatchRegion(ctx))
	}
	d := &tailnets.Debug{Relay: rel, Port: cfg.DebugPort, Version: version}
	if cfg.DebugListen != "" {
		ln, err := debugsrv.ListenLoopback(cfg.DebugListen)
		if err != nil {
			return fmt.Errorf("%s: %w", settingName("debug-listen"), err)
		}
		defer ln.Close()
		go debugsrv.Serve(ln, d.LocalHandler())
		logger.Info("debug: serving on loopback only", "addr", ln.Addr().String())
	}

	// The default tailnet's login rejected ends the process (the operator
	// must fix TAILSCALE_AUTH_KEY); another tailnet's is that tailnet's
	// problem, said on every status page.
	var fatal <-chan error
	for i, t := range tns {
		if err := t.Node.Start(); err != nil {
			return fmt.Errorf("%s %s: %w", settingName("state-dir"), cfg.StateDir, err)
		}
		if i == 0 {
			fatal = t.Node.Fatal()
		} else {
			go t.WatchFatal(ctx, logger)
		}
		go d.Serve(ctx, t, logger)
	}

	for {
		select {
		case <-ctx.Done():
			logger.Info("shutting down: not ready from now on; the clients are closed so they reconnect to another relay of the region", "within", cfg.DrainTimeout)
			stopServing()
			return nil
		case <-hup:
			reloadOnHUP(cfg, certs, rates, logger)
		case err := <-fatal:
			if _, ok := errors.AsType[*node.LoginError](err); ok {
				return fmt.Errorf("%w (%s)", err, tns[0].Advice(node.ProblemLoginRejected))
			}
			return err
		case err := <-rs.Err():
			return fmt.Errorf("relay: %w", err)
		}
	}
}

// reloadOnHUP reads again what can change without a restart: manual
// certificate files (also when a copy kept their times, which the check
// on each handshake would miss) and -rate-config. It says what it did,
// one line each; what does not load keeps the old state, with a warning.
func reloadOnHUP(cfg *config.Config, certs relay.Certificates, rates *relay.RateConfigFile, logger *slog.Logger) {
	logger.Info("SIGHUP: reloading the certificate files and the rate config; the server keeps running")
	switch c := certs.(type) {
	case *relay.ManualCerts:
		crt, _ := c.Paths()
		changed, err := c.Reload()
		info, _ := c.Current()
		switch {
		case err != nil:
			logger.Warn("SIGHUP: certificate files not reloaded", "err", err,
				"fix", fmt.Sprintf("put a certificate for %s and its key in %s (%s)", cfg.Hostname, cfg.CertsDir(), settingName("certdir")))
		case changed:
			logger.Info("SIGHUP: certificate reloaded", "path", crt, "not_after", info.NotAfter.Format(time.RFC3339))
		default:
			logger.Info("SIGHUP: certificate files unchanged", "path", crt, "not_after", info.NotAfter.Format(time.RFC3339))
		}
	default:
		logger.Info("SIGHUP: certificates in this mode are renewed in the background; nothing to reload", "certmode", cfg.Mode().String())
	}
	if rates == nil {
		logger.Info("SIGHUP: no rate config to reload (" + settingName("rate-config") + " is not set)")
		return
	}
	changed, err := rates.Reload()
	in := rates.Applied()
	switch {
	case err != nil:
		logger.Warn("SIGHUP: rate config not reloaded; the limits in force stay", "err", err,
			"in_force_bytes_per_sec", in.PerClientRateLimitBytesPerSec, "fix", "correct the JSON in "+cfg.RateConfig+" ("+settingName("rate-config")+")")
	case changed:
		logger.Info("SIGHUP: rate config reloaded", "path", cfg.RateConfig, "in_force_bytes_per_sec", in.PerClientRateLimitBytesPerSec, "in_force_burst_bytes", in.PerClientRateBurstBytes)
	default:
		logger.Info("SIGHUP: rate config unchanged", "path", cfg.RateConfig, "in_force_bytes_per_sec", in.PerClientRateLimitBytesPerSec, "in_force_burst_bytes", in.PerClientRateBurstBytes)
	}
}

// servingNow describes what the started relay serves.
func servingNow(cfg *config.Config, rs *relay.Server, certs relay.Certificates, stunAddr string) *serving.Serving {
	certName := ""
	if cfg.Mode().Pinned() {
		info, _ := certs.Current()
		certName = info.CertName
	}
	stunPort := -1
	if stunAddr != "" {
		_, p, _ := net.SplitHostPort(stunAddr)
		stunPort, _ = strconv.Atoi(p)
	}
	return &serving.Serving{
		PID:               os.Getpid(),
		Version:           version,
		Since:             time.Now().UTC(),
		HTTPSAddr:         rs.LocalAddr().String(),
		STUNAddr:          stunAddr,
		ServerName:        cfg.Hostname,
		VerifyClients:     cfg.VerifyClients,
		Region:            cfg.DERPRegion(rs.LocalAddr().(*net.TCPAddr).Port, stunPort, certName),
		ProxyProtocolFrom: rs.ProxyProtocolFrom,
		DrainTimeout:      cfg.DrainTimeout,
	}
}

// explainListenError names the setting behind a port the relay could not
// bind, and what to do.
func explainListenError(err error) error {
	le, ok := errors.AsType[*relay.ListenError](err)
	if !ok {
		return err
	}
	setting := settingName("a")
	if le.Listener == "http" {
		setting = settingName("http-port")
	}
	hint := "is another server using the port?"
	if errors.Is(le.Err, syscall.EACCES) {
		hint = fmt.Sprintf("uid %d may not bind ports below 1024: give it CAP_NET_BIND_SERVICE (the systemd unit in deploy/ does), run the container image (it binds them unprivileged in its own network namespace), or choose a port above 1023", os.Getuid())
	}
	if le.Listener == "http" {
		hint += "; -http-port -1 turns the HTTP port off"
	}
	return fmt.Errorf("%s: cannot listen on %s: %v (%s)", setting, le.Addr, le.Err, hint)
}

// The node tells admission when its answers are about to arrive, so a
// client connecting just after a start is held for them, not refused
// (verify.Verifier.NotReadyWait).
var _ verify.Settling = (*node.Node)(nil)

// nodeShutdownTimeout bounds the node's part of shutdown: it stops
// following the tailnet and writes its known-peers cache (milliseconds).
const nodeShutdownTimeout = 2 * time.Second

// shutdown stops serving, fast: a restart (systemd, a container, a
// rolling upgrade) starts the next process only once this one has
// exited. First readiness turns false (serving.json says so before the
// listeners close, so a readiness probe sees it first); then the relay
// stops accepting, and its clients are closed so they reconnect at once to
// another relay of the region (which they dial when this one refuses),
// while the nodes write their known-peers caches for the next start; all
// bounded by within. tsnet's teardown (0.05–0.25 s) is left to the exit:
// it leaves nothing on disk.
func shutdown(rel *tailnets.Relay, pub *serving.Publisher, within time.Duration, logger *slog.Logger) {
	start := time.Now()
	rel.Drain()
	if pub != nil {
		if _, err := pub.SetReadiness(rel.Readiness()); err != nil {
			logger.Warn("cannot say in serving.json that the relay is stopping", "err", err)
		}
	}
	logger.Info("readiness: draining")
	rel.Server.StopAccepting()
	logger.Info("listeners closed: new clients go to another relay of the region")
	ctx, cancel := context.WithTimeout(context.Background(), max(within, nodeShutdownTimeout))
	defer cancel()
	var wg sync.WaitGroup
	wg.Go(func() {
		cctx, cancel := context.WithTimeout(ctx, within)
		defer cancel()
		if err := rel.Server.Close(cctx); err != nil {
			logger.Debug("closing the clients", "err", err)
		}
	})
	for _, t := range rel.Tailnets {
		wg.Go(func() {
			if err := t.Node.Shutdown(ctx); err != nil {
				logger.Warn("the known-peers cache may not hold the last network map", "tailnet", t.Name, "err", err)
			}
		})
	}
	wg.Wait()
	logger.Info("stopped serving", "took", time.Since(start).Round(time.Millisecond))
}

// makeCerts returns the certificates for the configured mode.
func makeCerts(cfg *config.Config, logger *slog.Logger) (relay.Certificates, error) {
	switch mode := cfg.Mode(); mode {
	case config.CertDev:
		return relay.NewSelfSigned("localhost", "127.0.0.1", "::1")
	case config.CertManualFiles, config.CertSelfSignedIP:
		dir := cfg.CertsDir()
		if mode == config.CertSelfSignedIP {
			created, err := relay.EnsureSelfSignedIPCert(dir, cfg.Hostname)
			if err != nil {
				return nil, fmt.Errorf("%s %s: %w", settingName("certdir"), dir, err)
			}
			if created {
				crt, _ := relay.CertPaths(dir, cfg.Hostname)
				logger.Info("relay: generated a self-signed certificate for the IP address; clients must pin it by CertName (see the derpMap snippet)", "path", crt)
			}
		}
		certs, err := relay.LoadManualCerts(dir, cfg.Hostname, logger)
		if err != nil {
			crt, key := relay.CertPaths(dir, cfg.Hostname)
			return nil, commands.SettingsError{Err: fmt.Errorf("-certmode manual (CERTMODE) for %s %s: %w (put a certificate for that name at %s and its key at %s, see %s; or use -certmode letsencrypt)",
				settingName("hostname"), cfg.Hostname, err, crt, key, settingName("certdir"))}
		}
		return certs, nil
	default:
		ac := relay.ACMEConfig{
			Hostname:     cfg.Hostname,
			CacheDir:     cfg.CertsDir(),
			Email:        cfg.ACMEEmail,
			DirectoryURL: cfg.ACMEDirectoryURL,
			Logger:       logger,
		}
		if cfg.ACMECABundle != "" {
			pool, err := config.LoadCertPool(cfg.ACMECABundle)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", settingName("acme-ca-bundle"), err)
			}
			ac.RootCAs = pool
		}
		if mode == config.CertACMEIP {
			certs, err := relay.NewACMEIP(ac)
			if err != nil {
				return nil, fmt.Errorf("%s, %s %s: %w", settingName("acme-ip-certs"), settingName("certdir"), cfg.CertsDir(), err)
			}
			return certs, nil
		}
		certs, err := relay.NewACME(ac)
		if err != nil {
			return nil, fmt.Errorf("-certmode letsencrypt (CERTMODE), %s %s: %w", settingName("certdir"), cfg.CertsDir(), err)
		}
		return certs, nil
	}
}

// loadDERPKey returns the relay's DERP identity from the state directory;
// -dev without a writable state directory gets a fresh one each start.
func loadDERPKey(cfg *config.Config) (key.NodePrivate, error) {
	if cfg.Dev && checkWritableDir(cfg.StateDir) != nil {
		return key.NewNode(), nil
	}
	k, err := relay.LoadOrCreateKey(cfg.DERPKeyPath())
	if err != nil {
		return key.NodePrivate{}, fmt.Errorf("%s %s: %w", settingName("state-dir"), cfg.StateDir, err)
	}
	return k, nil
}

// checkWritableDir makes sure dir exists and can be written, so a
// read-only volume fails at start with the setting named, not later.
func checkWritableDir(dir string) error {
	fix := fmt.Sprintf("mount a writable volume there (owned by uid %d, which this process runs as), or point -state-dir at one", os.Getuid())
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("%s %s: %w (%s)", settingName("state-dir"), dir, err, fix)
	}
	f, err := os.CreateTemp(dir, ".write-test-*")
	if err != nil {
		return fmt.Errorf("%s %s is not writable: %w (%s)", settingName("state-dir"), dir, err, fix)
	}
	f.Close()
	os.Remove(f.Name())
	return nil
}
