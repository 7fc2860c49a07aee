// Command tailderp is a DERP relay for one tailnet. It serves DERP over
// HTTPS and STUN to the public internet, and runs its own embedded tailnet
// node (tsnet) to admit only that tailnet's clients and to serve /debug on
// the tailnet alone. See README.md.
//
// This file wires the packages together; config.go turns flags and
// environment into one config; the work is done in relay, stun, node,
// verify and debugsrv.
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
	"strings"
	"sync"
	"syscall"
	"time"

	"tailscale.com/envknob"
	"tailscale.com/ipn"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/logs"
	"github.com/tailderp/tailderp/node"
	"github.com/tailderp/tailderp/relay"
	"github.com/tailderp/tailderp/stun"
	"github.com/tailderp/tailderp/verify"
)

// version is stamped at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

func main() {
	os.Exit(realMain(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

// subcommands are the first arguments that are not a server's.
var subcommands = []string{"derpmap", "check", "cert"}

// realMain runs a command line and returns the exit code.
func realMain(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "-version", "--version":
			fmt.Fprintln(stdout, "tailderp", version)
			return 0
		case "derpmap":
			return runDERPMap(args[1:], getenv, stdout, stderr)
		case "check":
			return runCheck(args[1:], getenv, stdout, stderr)
		case "cert":
			return runCert(args[1:], getenv, stdout, stderr)
		}
	}
	cfg, err := loadConfig("tailderp", args, getenv, stderr)
	if errors.Is(err, flag.ErrHelp) {
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
	for _, n := range cfg.notes {
		logger.Warn(n)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, logger, stdout); err != nil {
		logger.Error(err.Error())
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
func setupTailnetEnv(cfg *config) {
	if os.Getenv("TS_LOGS_DIR") == "" {
		os.Setenv("TS_LOGS_DIR", cfg.nodeDir())
	}
	noLogs := cfg.NoLogsNoSupport
	for _, t := range cfg.tailnets() {
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
func run(ctx context.Context, cfg *config, logger *slog.Logger, out io.Writer) error {
	// First of all: SIGHUP's default action ends the process (status 129,
	// which systemd's Restart=on-failure does not restart).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	logger.Info("tailderp starting", "version", version, "hostname", cfg.Hostname, "certmode", cfg.CertMode,
		"addr", cfg.Addr, "state_dir", cfg.StateDir, "verify_clients", cfg.VerifyClients,
		"control_url", cfg.ControlURL, "auth_key", authKeyState(cfg), "dev", cfg.Dev)
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
	meshPeers := cfg.meshPeers()
	if _, self, _ := cfg.meshEntries(); self >= 0 {
		logger.Info("mesh: this relay's own entry in -mesh-with is skipped", "hostname", cfg.Hostname)
	}

	var tailnets []*tailnet
	var verifier *verify.Verifier
	if cfg.VerifyClients || cfg.VerifyClientURL != "" {
		verifier = &verify.Verifier{URL: cfg.VerifyClientURL, FailOpen: cfg.VerifyClientsFailOpen, URLFailOpen: cfg.VerifyClientURLFailOpen, Logger: logger}
		if cfg.VerifyClients {
			setupTailnetEnv(cfg)
			tailnets = newTailnets(cfg, verifier, logger)
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

	pins := &pinFollower{cfg: cfg, out: out, logger: logger}
	rs := &relay.Server{
		Addr:       cfg.Addr,
		HTTPPort:   cfg.HTTPPort,
		Certs:      certs,
		PrivateKey: derpKey,
		Home:       cfg.Home,
		MeshKey:    cfg.meshKey,
		Logger:     logger,

		TCPKeepAlive:                 cfg.TCPKeepAlive,
		TCPUserTimeout:               cfg.TCPUserTimeout,
		TCPWriteTimeout:              cmp.Or(cfg.TCPWriteTimeout, -1), // 0 in the settings means none
		AcceptConnectionLimit:        cfg.AcceptConnectionLimit,
		AcceptConnectionBurst:        cfg.AcceptConnectionBurst,
		MeshWith:                     meshPeers,
		MeshRootCAs:                  cfg.meshRoots,
		BootstrapDNSNames:            splitList(cfg.BootstrapDNSNames),
		UnpublishedBootstrapDNSNames: cfg.unpublishedBootstrapNames(),
		CertAdvice:                   func(p relay.CertProblem) string { return certAdvice(cfg, p) },
		OnCertChange:                 pins.changed,
	}
	if verifier != nil {
		rs.Admitter = verifier
		verifier.Conns = rs
	}
	// Each node reads its known-peers cache before the relay serves, so a
	// restart's first clients are answered from it (or held until the
	// node's map arrives); the nodes log in only once the ports are bound,
	// so a port in use leaves no half-made login behind.
	for _, t := range tailnets {
		if err := t.node.Load(); err != nil {
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
	stopServing := sync.OnceFunc(func() { shutdown(rs, tailnets, logger) })
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
	if addr := cfg.stunAddr(); addr != "" {
		ss := &stun.Server{Addr: addr}
		if err := ss.Start(); err != nil {
			return fmt.Errorf("%s %d: %v (is another server using the port? -stun=false turns STUN off)", settingName("stun-port"), cfg.STUNPort, err)
		}
		defer ss.Close()
		stunAddr = ss.LocalAddr().String()
		logger.Info("stun: serving", "addr", stunAddr)
	}

	sv := servingNow(cfg, rs, certs, stunAddr)
	if err := writeSnippet(out, cfg.fleetRegion(sv.Region)); err != nil {
		return err
	}
	if stateWritable == nil {
		if err := writeServing(cfg.servingPath(), sv); err != nil {
			logger.Warn("cannot write serving.json: `tailderp check -local` falls back to the settings it is given", "err", err)
		}
		defer removeServing(cfg.servingPath())
	}
	pins.serving(sv, stateWritable == nil)

	// The default tailnet's login rejected ends the process (the operator
	// must fix TAILSCALE_AUTH_KEY); another tailnet's is that tailnet's
	// problem, said on every status page.
	var fatal <-chan error
	d := &debugParts{cfg: cfg, tailnets: tailnets, relay: rs, verifier: verifier, started: time.Now()}
	for i, t := range tailnets {
		if err := t.node.Start(); err != nil {
			return fmt.Errorf("%s %s: %w", settingName("state-dir"), cfg.StateDir, err)
		}
		if i == 0 {
			fatal = t.node.Fatal()
		} else {
			go t.watchFatal(ctx, logger)
		}
		go d.serve(ctx, t, logger)
	}

	for {
		select {
		case <-ctx.Done():
			logger.Info("shutting down")
			stopServing()
			return nil
		case <-hup:
			reloadOnHUP(cfg, certs, rates, logger)
		case err := <-fatal:
			if _, ok := errors.AsType[*node.LoginError](err); ok {
				return fmt.Errorf("%w (%s)", err, nodeAdvice(tailnets[0].tailnetConfig, node.ProblemLoginRejected))
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
func reloadOnHUP(cfg *config, certs relay.Certificates, rates *relay.RateConfigFile, logger *slog.Logger) {
	logger.Info("SIGHUP: reloading the certificate files and the rate config; the server keeps running")
	switch c := certs.(type) {
	case *relay.ManualCerts:
		crt, _ := c.Paths()
		changed, err := c.Reload()
		info, _ := c.Current()
		switch {
		case err != nil:
			logger.Warn("SIGHUP: certificate files not reloaded", "err", err,
				"fix", fmt.Sprintf("put a certificate for %s and its key in %s (%s)", cfg.Hostname, cfg.certDir(), settingName("certdir")))
		case changed:
			logger.Info("SIGHUP: certificate reloaded", "path", crt, "not_after", info.NotAfter.Format(time.RFC3339))
		default:
			logger.Info("SIGHUP: certificate files unchanged", "path", crt, "not_after", info.NotAfter.Format(time.RFC3339))
		}
	default:
		logger.Info("SIGHUP: certificates in this mode are renewed in the background; nothing to reload", "certmode", cfg.CertMode, "dev", cfg.Dev)
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
func servingNow(cfg *config, rs *relay.Server, certs relay.Certificates, stunAddr string) *serving {
	certName := ""
	if cfg.ipMode() || cfg.Dev {
		info, _ := certs.Current()
		certName = info.CertName
	}
	stunPort := -1
	if stunAddr != "" {
		_, p, _ := net.SplitHostPort(stunAddr)
		stunPort, _ = strconv.Atoi(p)
	}
	return &serving{
		PID:           os.Getpid(),
		Version:       version,
		Since:         time.Now().UTC(),
		HTTPSAddr:     rs.LocalAddr().String(),
		STUNAddr:      stunAddr,
		ServerName:    cfg.Hostname,
		VerifyClients: cfg.VerifyClients,
		Region:        cfg.derpRegion(rs.LocalAddr().(*net.TCPAddr).Port, stunPort, certName),
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

// certAdvice is what the operator should do about a problem with the
// dates of the certificate served, in each certificate mode.
func certAdvice(cfg *config, p relay.CertProblem) string {
	crt, key := relay.CertPaths(cfg.certDir(), cfg.Hostname)
	if p == relay.CertNotYetValid {
		fix := "check this machine's clock (timedatectl; in a container, the host's)"
		if cfg.CertMode == "manual" && !cfg.ipMode() && !cfg.Dev {
			fix += fmt.Sprintf(", and the not-before date of %s", crt)
		}
		return fix
	}
	switch {
	case cfg.Dev:
		return "restart: -dev makes a new certificate at every start"
	case cfg.ipMode():
		const steps = `docs/DEPLOY.md, "Renewing the IP certificate"`
		if ncrt, _ := relay.NextCertPaths(cfg.certDir(), cfg.Hostname); fileExists(ncrt) {
			return fmt.Sprintf("the next certificate is ready at %s: run `tailderp cert renew -activate` with this server's settings, then at once put its CertName (printed) into the derpMap (%s)", ncrt, steps)
		}
		return fmt.Sprintf("run `tailderp cert renew` with this server's settings: it writes the next certificate and prints the derpMap with its CertName; then `tailderp cert renew -activate`, and at once put that derpMap into the tailnet policy (%s)", steps)
	case cfg.CertMode == "manual":
		return fmt.Sprintf("put a renewed certificate at %s and its key at %s (e.g. from certbot's deploy hook): they are reloaded without a restart", crt, key)
	}
	ports := "443"
	if cfg.HTTPPort >= 0 {
		ports += " or " + strconv.Itoa(cfg.HTTPPort)
	}
	reach := fmt.Sprintf("check that this server reaches the CA (%s %s) and that the CA reaches %s on port %s (DNS, firewall)",
		settingName("acme-directory-url"), cmp.Or(cfg.ACMEDirectoryURL, "Let's Encrypt"), cfg.Hostname, ports)
	if p == relay.CertExpired {
		return reach + `; then restart: the first handshake requests a new certificate, and a failure is logged ("ACME certificate not available")`
	}
	// autocert's background renewal retries every 30 to 60 minutes and
	// logs nothing: the relay serves the old certificate meanwhile.
	return "-certmode letsencrypt renews by itself when a third of the lifetime (at most 30 days) is left, so renewal is failing: " + reach
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// authKeyState says whether an auth key was given, never what it is.
func authKeyState(cfg *config) string {
	switch {
	case cfg.AuthKey == "":
		return "none"
	case strings.HasPrefix(cfg.AuthKey, "tskey-client-"):
		return "oauth-client-secret"
	default:
		return "set"
	}
}

// nodeShutdownTimeout bounds the node's part of shutdown: it stops
// following the tailnet and writes its known-peers cache (milliseconds).
const nodeShutdownTimeout = 2 * time.Second

// shutdown stops serving, fast: a restart (systemd, a container) starts
// the next process only once this one has exited, and meanwhile every
// client retries with a growing backoff. The relay stops accepting; the
// node writes its known-peers cache for the next start; the rest is left
// to the exit, as derper does: the kernel closes the clients' connections
// at once (closing 2,000 one by one took 0.2–0.3 s), and tsnet's teardown
// (0.05–0.25 s) leaves nothing on disk. The nodes (none when the tailnet
// check is off) shut down side by side; a node never started returns at
// once.
func shutdown(rs *relay.Server, tailnets []*tailnet, logger *slog.Logger) {
	start := time.Now()
	rs.StopAccepting()
	ctx, cancel := context.WithTimeout(context.Background(), nodeShutdownTimeout)
	defer cancel()
	var wg sync.WaitGroup
	for _, t := range tailnets {
		wg.Go(func() {
			if err := t.node.Shutdown(ctx); err != nil {
				logger.Warn("the known-peers cache may not hold the last network map", "tailnet", t.Name, "err", err)
			}
		})
	}
	wg.Wait()
	logger.Info("stopped serving", "took", time.Since(start).Round(time.Millisecond))
}

// makeCerts returns the certificates for the configured mode.
func makeCerts(cfg *config, logger *slog.Logger) (relay.Certificates, error) {
	if cfg.Dev {
		return relay.NewSelfSigned("localhost", "127.0.0.1", "::1")
	}
	switch cfg.CertMode {
	case "manual":
		dir := cfg.certDir()
		if cfg.ipMode() {
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
			return nil, fmt.Errorf("-certmode manual (CERTMODE) for %s %s: %w (put a certificate for that name at %s and its key at %s, see %s; or use -certmode letsencrypt)",
				settingName("hostname"), cfg.Hostname, err, crt, key, settingName("certdir"))
		}
		return certs, nil
	default:
		ac := relay.ACMEConfig{
			Hostname:     cfg.Hostname,
			CacheDir:     cfg.certDir(),
			Email:        cfg.ACMEEmail,
			DirectoryURL: cfg.ACMEDirectoryURL,
			Logger:       logger,
		}
		if cfg.ACMECABundle != "" {
			pool, err := loadCertPool(cfg.ACMECABundle)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", settingName("acme-ca-bundle"), err)
			}
			ac.RootCAs = pool
		}
		if cfg.ACMEIPCerts {
			certs, err := relay.NewACMEIP(ac)
			if err != nil {
				return nil, fmt.Errorf("%s, %s %s: %w", settingName("acme-ip-certs"), settingName("certdir"), cfg.certDir(), err)
			}
			return certs, nil
		}
		certs, err := relay.NewACME(ac)
		if err != nil {
			return nil, fmt.Errorf("-certmode letsencrypt (CERTMODE), %s %s: %w", settingName("certdir"), cfg.certDir(), err)
		}
		return certs, nil
	}
}

// loadDERPKey returns the relay's DERP identity from the state directory;
// -dev without a writable state directory gets a fresh one each start.
func loadDERPKey(cfg *config) (key.NodePrivate, error) {
	if cfg.Dev && checkWritableDir(cfg.StateDir) != nil {
		return key.NewNode(), nil
	}
	k, err := relay.LoadOrCreateKey(cfg.derpKeyPath())
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
