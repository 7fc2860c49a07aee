// Command tailderp is a DERP relay for one tailnet. It serves DERP over
// HTTPS and STUN to the public internet, and runs its own embedded tailnet
// node (tsnet) to admit only that tailnet's clients and to serve /debug on
// the tailnet alone. See README.md.
//
// This file turns flags and environment into one config and wires the
// packages together; the work is done in relay, stun, node, verify and
// debugsrv.
package main

import (
	"context"
	"crypto/x509"
	"errors"
	"expvar"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"tailscale.com/envknob"
	"tailscale.com/ipn"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/debugsrv"
	"github.com/tailderp/tailderp/internal/logs"
	"github.com/tailderp/tailderp/node"
	"github.com/tailderp/tailderp/relay"
	"github.com/tailderp/tailderp/stun"
	"github.com/tailderp/tailderp/verify"
)

// version is stamped at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

// config is every setting of a tailderp run.
type config struct {
	// Relay
	Addr     string
	HTTPPort int
	STUNPort int
	STUN     bool
	Hostname string
	Home     string
	Dev      bool
	StateDir string
	MeshPSK  string

	// Certificates
	CertMode         string
	CertDir          string
	ACMEEmail        string
	ACMEDirectoryURL string
	ACMECABundle     string

	// Tailnet node
	AuthKey         string // secret: from the environment or a file only
	AuthKeyFile     string
	ControlURL      string
	TailnetHostname string
	AdvertiseTags   string
	NoLogsNoSupport bool
	DebugPort       int

	// Admission
	VerifyClients         bool
	VerifyClientURL       string
	VerifyClientsFailOpen bool

	// derpMap snippet
	RegionID   int
	RegionCode string
	RegionName string
	IPv4       string
	IPv6       string

	// Logging
	LogFormat string
	LogLevel  string
}

// settingsFor lists every setting, bound to c.
func settingsFor(c *config) []setting {
	return []setting{
		{flag: "a", env: "ADDR", aliases: []string{"DERP_ADDR"}, group: "Relay", bind: strVar(&c.Addr, ":443"),
			usage: "HTTPS listen address for DERP: :port, ip:port or [ipv6]:port"},
		{flag: "http-port", env: "HTTP_PORT", aliases: []string{"DERP_HTTP_PORT"}, group: "Relay", bind: intVar(&c.HTTPPort, 80),
			usage: "plain-HTTP port on the same IP (ACME HTTP-01, /generate_204, redirect to HTTPS); -1 turns it off"},
		{flag: "stun-port", env: "STUN_PORT", aliases: []string{"DERP_STUN_PORT"}, group: "Relay", bind: intVar(&c.STUNPort, 3478),
			usage: "UDP port for STUN, on the same IP"},
		{flag: "stun", env: "STUN", aliases: []string{"DERP_STUN"}, group: "Relay", bind: boolVar(&c.STUN, true),
			usage: "serve STUN (clients need it to find direct paths and measure latency)"},
		{flag: "hostname", env: "TAILSCALE_DERP_HOSTNAME", aliases: []string{"DERP_DOMAIN", "DERP_HOSTNAME"}, group: "Relay", bind: strVar(&c.Hostname, ""),
			usage: "this server's public DNS name (or IP address, with -certmode manual); required"},
		{flag: "home", env: "HOME_PAGE", group: "Relay", bind: strVar(&c.Home, ""),
			usage: `what "/" serves: empty for a neutral page, "blank", or a URL to redirect to`},
		{flag: "state-dir", env: "STATE_DIR", aliases: []string{"TAILDERP_STATE_DIR"}, group: "Relay", bind: strVar(&c.StateDir, "/var/lib/tailderp"),
			usage: "directory for all state: DERP key, certificates, tailnet node; must persist and be writable"},
		{flag: "mesh-psk-file", env: "MESH_PSK_FILE", group: "Relay", bind: strVar(&c.MeshPSK, ""),
			usage: "file holding the relay fleet's mesh key (64 hex digits); clients presenting it skip admission"},
		{flag: "dev", env: "DEV", group: "Relay", bind: boolVar(&c.Dev, false),
			usage: "try it out: serve on 127.0.0.1:3340 with a self-signed certificate, no port 80, and no tailnet node unless a key is set"},

		{flag: "certmode", env: "CERTMODE", aliases: []string{"TAILSCALE_DERP_CERTMODE", "CERT_MODE", "DERP_CERT_MODE"}, group: "Certificates", bind: strVar(&c.CertMode, "letsencrypt"),
			usage: "letsencrypt (any ACME CA; automatic, renewed in the background) or manual (<certdir>/<hostname>.crt and .key, reloaded when they change; self-signed and generated when -hostname is an IP)"},
		{flag: "certdir", env: "CERTDIR", aliases: []string{"CERT_DIR", "DERP_CERT_DIR"}, group: "Certificates", bind: strVar(&c.CertDir, ""),
			usage: "certificate directory (default <state-dir>/certs)"},
		{flag: "acme-email", env: "ACME_EMAIL", group: "Certificates", bind: strVar(&c.ACMEEmail, ""),
			usage: "contact address for the ACME account (expiry notices); optional"},
		{flag: "acme-directory-url", env: "ACME_DIRECTORY_URL", group: "Certificates", bind: strVar(&c.ACMEDirectoryURL, ""),
			usage: "ACME directory URL (default Let's Encrypt production; e.g. staging, ZeroSSL, step-ca)"},
		{flag: "acme-ca-bundle", env: "ACME_CA_BUNDLE", group: "Certificates", bind: strVar(&c.ACMECABundle, ""),
			usage: "PEM file of extra root CAs to trust when talking to -acme-directory-url (a private CA)"},

		{flag: "", env: "TAILSCALE_AUTH_KEY", aliases: []string{"TS_AUTHKEY"}, group: "Tailnet node", secret: true, target: &c.AuthKey,
			usage: "auth key (tskey-auth-…) or OAuth client secret (tskey-client-…, needs -advertise-tags) for the first login; never printed. Environment only, so it stays out of process listings"},
		{flag: "auth-key-file", env: "TAILSCALE_AUTH_KEY_FILE", group: "Tailnet node", bind: strVar(&c.AuthKeyFile, ""),
			usage: "file holding the auth key (Docker or systemd secrets)"},
		{flag: "control-url", env: "TAILSCALE_CONTROL_URL", aliases: []string{"TS_CONTROL_URL"}, group: "Tailnet node", bind: strVar(&c.ControlURL, ""),
			usage: "coordination server URL: empty for Tailscale, or your Headscale URL"},
		{flag: "tailnet-hostname", env: "TAILSCALE_HOSTNAME", group: "Tailnet node", bind: strVar(&c.TailnetHostname, ""),
			usage: "the node's name on the tailnet (default from -hostname: derp.example.com → derp-example-com)"},
		{flag: "advertise-tags", env: "TAILSCALE_ADVERTISE_TAGS", group: "Tailnet node", bind: strVar(&c.AdvertiseTags, ""),
			usage: "comma-separated ACL tags for the node, e.g. tag:derp (required with an OAuth client secret)"},
		{flag: "no-logs-no-support", env: "TS_NO_LOGS_NO_SUPPORT", group: "Tailnet node", bind: boolVar(&c.NoLogsNoSupport, false),
			usage: "do not upload the node's logs to Tailscale (always off with a non-Tailscale -control-url)"},
		{flag: "debug-port", env: "DEBUG_PORT", group: "Tailnet node", bind: intVar(&c.DebugPort, 80),
			usage: "tailnet-only port for /debug (pprof, metrics, clients); never served publicly"},

		{flag: "verify-clients", env: "VERIFY_CLIENTS", aliases: []string{"DERP_VERIFY_CLIENTS", "TAILSCALE_DERP_VERIFY_CLIENTS"}, group: "Admission", bind: boolVar(&c.VerifyClients, true),
			usage: "admit only clients of our tailnet, as the embedded node sees it; false makes an open relay"},
		{flag: "verify-client-url", env: "VERIFY_CLIENT_URL", aliases: []string{"DERP_VERIFY_CLIENT_URL"}, group: "Admission", bind: strVar(&c.VerifyClientURL, ""),
			usage: "admission controller URL (derper's JSON contract); when set it must admit too"},
		{flag: "verify-clients-fail-open", env: "VERIFY_CLIENTS_FAIL_OPEN", group: "Admission", bind: boolVar(&c.VerifyClientsFailOpen, false),
			usage: "admit clients when a check cannot answer (node not logged in yet, URL down); default refuses"},

		{flag: "region-id", env: "DERP_REGION_ID", group: "derpMap snippet", bind: intVar(&c.RegionID, 900),
			usage: "derpMap region ID (900 and up are for custom relays)"},
		{flag: "region-code", env: "DERP_REGION_CODE", group: "derpMap snippet", bind: strVar(&c.RegionCode, "tailderp"),
			usage: "derpMap region code"},
		{flag: "region-name", env: "DERP_REGION_NAME", group: "derpMap snippet", bind: strVar(&c.RegionName, "tailderp"),
			usage: "derpMap region name"},
		{flag: "ipv4", env: "DERP_IPV4", group: "derpMap snippet", bind: strVar(&c.IPv4, ""),
			usage: "public IPv4 address to put in the derpMap (lets clients skip DNS)"},
		{flag: "ipv6", env: "DERP_IPV6", group: "derpMap snippet", bind: strVar(&c.IPv6, ""),
			usage: "public IPv6 address to put in the derpMap"},

		{flag: "log-format", env: "LOG_FORMAT", group: "Logging", bind: strVar(&c.LogFormat, "text"),
			usage: "text or json"},
		{flag: "log-level", env: "LOG_LEVEL", group: "Logging", bind: strVar(&c.LogLevel, "info"),
			usage: "debug, info, warn or error"},
	}
}

func main() {
	os.Exit(realMain(os.Args[1:], os.Getenv, os.Stdout, os.Stderr))
}

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
	// Libraries that log through the standard logger (stunserver) go to slog.
	log.SetFlags(0)
	log.SetOutput(logs.Writer(logger, slog.LevelInfo))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, logger, stderr); err != nil {
		logger.Error(err.Error())
		return 1
	}
	return 0
}

// loadConfig parses and validates the settings. Validation that needs no
// I/O happens here, so a typo fails before anything is written.
func loadConfig(name string, args []string, getenv func(string) string, stderr io.Writer) (*config, error) {
	cfg := &config{}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	settings := settingsFor(cfg)
	fs.Usage = func() { printUsage(stderr, fs, settings) }
	if err := parseSettings(fs, settings, args, getenv); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q (settings are flags: see -help)", fs.Arg(0))
	}
	if cfg.AuthKeyFile != "" && cfg.AuthKey == "" {
		b, err := os.ReadFile(cfg.AuthKeyFile)
		if err != nil {
			return nil, fmt.Errorf("-auth-key-file (TAILSCALE_AUTH_KEY_FILE): %w", err)
		}
		cfg.AuthKey = strings.TrimSpace(string(b))
	}
	if cfg.Dev {
		given := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
		if !given["a"] && getenv("ADDR") == "" {
			cfg.Addr = "127.0.0.1:3340"
		}
		cfg.HTTPPort = -1
		if cfg.Hostname == "" {
			cfg.Hostname = "localhost"
		}
		if cfg.AuthKey == "" {
			cfg.VerifyClients = false
		}
	}
	return cfg, cfg.validate()
}

func (c *config) validate() error {
	host, port, err := net.SplitHostPort(c.Addr)
	if err != nil {
		return fmt.Errorf("-a (ADDR) %q: want :port, ip:port or [ipv6]:port", c.Addr)
	}
	if host != "" && net.ParseIP(host) == nil && host != "localhost" {
		return fmt.Errorf("-a (ADDR) %q: the host part must be an IP address (or empty for all addresses)", c.Addr)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
		return fmt.Errorf("-a (ADDR) %q: port must be a number from 0 to 65535", c.Addr)
	}
	if c.HTTPPort < -1 || c.HTTPPort > 65535 {
		return fmt.Errorf("-http-port (HTTP_PORT) %d: want a port from 0 to 65535, or -1 to turn it off", c.HTTPPort)
	}
	if c.STUNPort < 0 || c.STUNPort > 65535 {
		return fmt.Errorf("-stun-port (STUN_PORT) %d: want a port from 0 to 65535", c.STUNPort)
	}
	if c.DebugPort < 1 || c.DebugPort > 65535 {
		return fmt.Errorf("-debug-port (DEBUG_PORT) %d: want a port from 1 to 65535", c.DebugPort)
	}
	if c.Hostname == "" {
		return errors.New("-hostname (TAILSCALE_DERP_HOSTNAME) is required: the DNS name clients reach this server by, or its public IP address with -certmode manual")
	}
	if !c.Dev {
		switch c.CertMode {
		case "letsencrypt":
			if net.ParseIP(c.Hostname) != nil {
				return fmt.Errorf("-hostname (TAILSCALE_DERP_HOSTNAME) %s is an IP address, which -certmode letsencrypt cannot get a certificate for: use -certmode manual (CERTMODE=manual) for a self-signed certificate that clients pin by CertName", c.Hostname)
			}
		case "manual":
		default:
			return fmt.Errorf("-certmode (CERTMODE) %q: want letsencrypt or manual", c.CertMode)
		}
	}
	if c.StateDir == "" {
		return errors.New("-state-dir (STATE_DIR) must not be empty")
	}
	if c.RegionID < 1 {
		return fmt.Errorf("-region-id (DERP_REGION_ID) %d: want a positive number, 900 or more for a custom relay", c.RegionID)
	}
	for _, ip := range []struct{ name, val string }{{"-ipv4 (DERP_IPV4)", c.IPv4}, {"-ipv6 (DERP_IPV6)", c.IPv6}} {
		if ip.val != "" && ip.val != "none" {
			if _, err := netip.ParseAddr(ip.val); err != nil {
				return fmt.Errorf("%s %q: not an IP address", ip.name, ip.val)
			}
		}
	}
	if c.VerifyClients && c.AuthKey == "" && !node.HasLogin(c.nodeDir()) {
		return fmt.Errorf("TAILSCALE_AUTH_KEY is not set and %s holds no earlier login: set TAILSCALE_AUTH_KEY (or TAILSCALE_AUTH_KEY_FILE) to an auth key of your tailnet so the relay can admit its clients, or set -verify-clients=false to run an open relay", c.nodeDir())
	}
	if strings.HasPrefix(c.AuthKey, "tskey-client-") && c.AdvertiseTags == "" {
		return errors.New("TAILSCALE_AUTH_KEY holds an OAuth client secret (tskey-client-…), which needs -advertise-tags (TAILSCALE_ADVERTISE_TAGS), e.g. tag:derp")
	}
	for _, t := range c.tags() {
		if !strings.HasPrefix(t, "tag:") {
			return fmt.Errorf("-advertise-tags (TAILSCALE_ADVERTISE_TAGS) %q: each tag must start with \"tag:\"", t)
		}
	}
	return nil
}

func (c *config) nodeDir() string { return filepath.Join(c.StateDir, "tailscale") }

func (c *config) certDir() string {
	if c.CertDir != "" {
		return c.CertDir
	}
	return filepath.Join(c.StateDir, "certs")
}

func (c *config) tags() []string {
	var out []string
	for t := range strings.SplitSeq(c.AdvertiseTags, ",") {
		if t = strings.TrimSpace(t); t != "" {
			out = append(out, t)
		}
	}
	return out
}

// tailnetHostname is the node's name: -tailnet-hostname, or -hostname
// with dots turned into dashes.
func (c *config) tailnetHostname() string {
	if c.TailnetHostname != "" {
		return c.TailnetHostname
	}
	h := strings.NewReplacer(".", "-", ":", "-").Replace(c.Hostname)
	if c.Dev {
		return "tailderp-dev"
	}
	return h
}

// run serves until ctx ends (SIGTERM/SIGINT: nil) or something fails.
func run(ctx context.Context, cfg *config, logger *slog.Logger, out io.Writer) error {
	logger.Info("tailderp starting", "version", version, "hostname", cfg.Hostname, "certmode", cfg.CertMode,
		"addr", cfg.Addr, "state_dir", cfg.StateDir, "verify_clients", cfg.VerifyClients,
		"control_url", cfg.ControlURL, "auth_key", authKeyState(cfg), "dev", cfg.Dev)
	if cfg.VerifyClients || !cfg.Dev {
		if err := checkWritableDir(cfg.StateDir); err != nil {
			return err
		}
	}
	certs, err := makeCerts(cfg, logger)
	if err != nil {
		return err
	}
	derpKey, err := loadDERPKey(cfg)
	if err != nil {
		return err
	}
	meshKey, err := readMeshKey(cfg.MeshPSK)
	if err != nil {
		return err
	}

	var n *node.Node
	var verifier *verify.Verifier
	if cfg.VerifyClients {
		// tsnet's log policy looks for a writable place under HOME or the
		// working directory unless told; in a read-only container with no
		// HOME it panics. The node's state directory is the right place.
		if os.Getenv("TS_LOGS_DIR") == "" {
			os.Setenv("TS_LOGS_DIR", cfg.nodeDir())
		}
		if cfg.NoLogsNoSupport || (cfg.ControlURL != "" && cfg.ControlURL != ipn.DefaultControlURL) {
			envknob.SetNoLogsNoSupport()
		}
		n = &node.Node{
			Dir:           cfg.nodeDir(),
			Hostname:      cfg.tailnetHostname(),
			AuthKey:       cfg.AuthKey,
			ControlURL:    cfg.ControlURL,
			AdvertiseTags: cfg.tags(),
			Logger:        logger,
		}
	}
	if cfg.VerifyClients || cfg.VerifyClientURL != "" {
		verifier = &verify.Verifier{URL: cfg.VerifyClientURL, FailOpen: cfg.VerifyClientsFailOpen, Logger: logger}
		if n != nil {
			verifier.Tailnet = n
		}
		if cfg.VerifyClientsFailOpen {
			logger.Warn("admission fails open: clients are admitted unverified while a check cannot answer (-verify-clients-fail-open)")
		}
	}
	if !cfg.VerifyClients {
		logger.Warn("client verification is off (-verify-clients=false): anyone who finds this relay can relay through it, and /debug is not served")
	}

	rs := &relay.Server{
		Addr:       cfg.Addr,
		HTTPPort:   cfg.HTTPPort,
		Certs:      certs,
		PrivateKey: derpKey,
		Home:       cfg.Home,
		MeshKey:    meshKey,
		Logger:     logger,
	}
	if verifier != nil {
		rs.Admitter = verifier
	}
	if err := rs.Start(); err != nil {
		return err
	}
	defer closeRelay(rs)
	stunPort := -1
	if cfg.STUN {
		host, _, _ := net.SplitHostPort(cfg.Addr)
		ss := &stun.Server{Addr: net.JoinHostPort(host, strconv.Itoa(cfg.STUNPort))}
		if err := ss.Start(); err != nil {
			return err
		}
		defer ss.Close()
		stunPort = ss.LocalAddr().(*net.UDPAddr).Port
		logger.Info("stun: serving", "addr", ss.LocalAddr().String())
	}
	if err := printDERPMap(out, cfg, rs, certs, stunPort); err != nil {
		return err
	}

	var fatal <-chan error
	if n != nil {
		if err := n.Start(); err != nil {
			return err
		}
		defer n.Close()
		fatal = n.Fatal()
		go serveDebug(ctx, cfg, n, rs, verifier, logger)
	}

	select {
	case <-ctx.Done():
		logger.Info("shutting down")
		return nil
	case err := <-fatal:
		return err
	case err := <-rs.Err():
		return fmt.Errorf("relay: %w", err)
	}
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

func closeRelay(rs *relay.Server) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	rs.Close(ctx)
}

// serveDebug serves /debug on the node's tailnet address once it is up.
func serveDebug(ctx context.Context, cfg *config, n *node.Node, rs *relay.Server, v *verify.Verifier, logger *slog.Logger) {
	ln, err := n.Listen(ctx, "tcp", ":"+strconv.Itoa(cfg.DebugPort))
	if err != nil {
		if ctx.Err() == nil {
			logger.Warn("debug: not served", "err", err)
		}
		return
	}
	h := debugsrv.Handler(debugsrv.Config{
		Vars: map[string]expvar.Var{
			"tailderp_relay":     rs.ExpVar(),
			"tailderp_admission": v.ExpVar(),
			"tailderp_node":      n.ExpVar(),
		},
		DERP:     rs.DERP(),
		Verifier: v,
		NodeName: n.NodeName,
		Info: map[string]func() any{
			"TLS hostname": func() any { return cfg.Hostname },
			"Node state":   func() any { return n.State() },
			"Peers seen":   func() any { return n.PeerCount() },
			"Version":      func() any { return version },
		},
	})
	logger.Info("debug: serving on the tailnet only", "port", cfg.DebugPort)
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	debugsrv.Serve(ln, h)
}

// makeCerts returns the certificates for the configured mode.
func makeCerts(cfg *config, logger *slog.Logger) (relay.Certificates, error) {
	if cfg.Dev {
		return relay.NewSelfSigned("localhost", "127.0.0.1", "::1")
	}
	switch cfg.CertMode {
	case "manual":
		if net.ParseIP(cfg.Hostname) != nil {
			created, err := relay.EnsureSelfSignedIPCert(cfg.certDir(), cfg.Hostname)
			if err != nil {
				return nil, err
			}
			if created {
				crt, _ := relay.CertPaths(cfg.certDir(), cfg.Hostname)
				logger.Info("relay: generated a self-signed certificate for the IP address; clients must pin it by CertName (see the derpMap snippet)", "path", crt)
			}
		}
		return relay.LoadManualCerts(cfg.certDir(), cfg.Hostname, logger)
	default:
		ac := relay.ACMEConfig{
			Hostname:     cfg.Hostname,
			CacheDir:     cfg.certDir(),
			Email:        cfg.ACMEEmail,
			DirectoryURL: cfg.ACMEDirectoryURL,
			Logger:       logger,
		}
		if cfg.ACMECABundle != "" {
			pem, err := os.ReadFile(cfg.ACMECABundle)
			if err != nil {
				return nil, fmt.Errorf("-acme-ca-bundle (ACME_CA_BUNDLE): %w", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("-acme-ca-bundle (ACME_CA_BUNDLE) %s: no PEM certificates in it", cfg.ACMECABundle)
			}
			ac.RootCAs = pool
		}
		return relay.NewACME(ac)
	}
}

func loadDERPKey(cfg *config) (key.NodePrivate, error) {
	if cfg.Dev && !cfg.VerifyClients {
		return key.NewNode(), nil
	}
	return relay.LoadOrCreateKey(filepath.Join(cfg.StateDir, "derp.key"))
}

func readMeshKey(path string) (string, error) {
	if path == "" {
		return "", nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("-mesh-psk-file (MESH_PSK_FILE): %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// checkWritableDir makes sure dir exists and can be written, so a
// read-only volume fails at start with the setting named, not later.
func checkWritableDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("-state-dir (STATE_DIR) %s: %w (mount a writable volume there, or point -state-dir at one)", dir, err)
	}
	f, err := os.CreateTemp(dir, ".write-test-*")
	if err != nil {
		return fmt.Errorf("-state-dir (STATE_DIR) %s is not writable: %w (mount a writable volume there, or point -state-dir at one)", dir, err)
	}
	f.Close()
	os.Remove(f.Name())
	return nil
}
