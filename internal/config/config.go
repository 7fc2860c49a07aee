// Package config turns tailderp's flags, environment and the files they
// name into one validated Config, built once by Load for a purpose (the
// server, `derpmap`, `cert renew`, `check`). Every decision that follows
// from the settings is made here, each in one function: the certificate
// mode (Config.Mode), the mesh peers (parsed once, Config.MeshPeers), the
// auth key and where it came from (Config.AuthKeyState), each tailnet's
// settings (Config.Tailnets), the known-peers cache's max age
// (VerifyClientsCacheMaxAge, defaultCacheMaxAge), the state directory's
// paths (NodeDir, DERPKeyPath, ServingPath, CertsDir). Messages name the
// setting (SettingName) and the fix.
package config

import (
	"crypto/x509"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"tailscale.com/ipn"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/relayrules"
	"github.com/tailderp/tailderp/policy"
	"github.com/tailderp/tailderp/relay"
)

// Config is every setting of a tailderp run, as the flags and the
// environment give them, with the -dev defaults applied. What follows from
// the settings (paths in the state directory, the addresses served, the
// derpMap node) is a method here, so each is worked out in one place and
// `tailderp`, `tailderp derpmap` and `tailderp check` agree.
type Config struct {
	// Relay
	Addr        string
	HTTPPort    int
	STUNPort    int
	STUN        bool
	Hostname    string
	Home        string
	Dev         bool
	StateDir    string
	MeshPSKFile string
	RateConfig  string

	TCPKeepAlive    time.Duration
	TCPUserTimeout  time.Duration
	TCPWriteTimeout time.Duration

	// Relay: limits against a hostile internet
	AcceptConnectionLimit float64
	AcceptConnectionBurst int
	MaxConnsPerIP         int
	MaxConnsPerTailnet    int

	// Relay: shared 443, stopping, local /debug
	ProxyProtocolFrom string
	DrainTimeout      time.Duration
	DebugListen       string

	// Fleet and bootstrap DNS
	MeshWith                     string
	MeshCABundle                 string
	BootstrapDNSNames            string
	UnpublishedBootstrapDNSNames string

	// Certificates
	CertMode         string
	CertDir          string
	ACMEEmail        string
	ACMEDirectoryURL string
	ACMECABundle     string
	ACMEIPCerts      bool

	// Tailnet node
	AuthKey         string // secret: from the environment or a file only
	AuthKeyFile     string
	ControlURL      string
	TailnetHostname string
	AdvertiseTags   string
	NoLogsNoSupport bool
	DebugPort       int
	TailnetPort     int
	TailnetsFile    string

	// Admission
	VerifyClients            bool
	VerifyClientURL          string
	VerifyClientsFailOpen    bool
	VerifyClientURLFailOpen  bool
	VerifyClientsCacheMaxAge time.Duration

	// derpMap snippet
	RegionID   int
	RegionCode string
	RegionName string
	IPv4       string
	IPv6       string
	PublicPort int

	// Tailscale policy file (policy.go)
	Register          bool
	APIURL            string
	Tailnet           string
	APIKey            string // secret: from the environment only
	OAuthClientID     string
	OAuthClientSecret string // secret: from the environment only

	// Logging
	LogFormat string
	LogLevel  string

	// Notes are warnings for the operator about the input, to be said at
	// start: names tailderp does not read (derper's, its images', names
	// close to ours), key files others may read, which auth key won.
	Notes []string

	// MeshKey and MeshRoots are read from MeshPSKFile and MeshCABundle by
	// Load(Run, …).
	MeshKey   key.DERPMesh
	MeshRoots *x509.CertPool

	// src says which settings were given, and how.
	src sources
	// extraTailnets are the tailnets of TailnetsFile, read by Load(Run, …).
	extraTailnets []Tailnet
	// mesh is -mesh-with parsed (by parse, once), meshSelf the index of
	// this relay's own entry (-1: none), meshErr what was wrong with it.
	mesh     []relay.MeshPeer
	meshSelf int
	meshErr  error
	// authKeyFrom names where AuthKey came from, for AuthKeyState.
	authKeyFrom string
}

// settingsFor lists every setting, bound to c: the one table of settings.
// --help, the README's table and the packaging tests are made from it.
func settingsFor(c *Config) []setting {
	return []setting{
		{flag: "a", env: "ADDR", aliases: []string{"DERP_ADDR"}, group: "Relay", bind: strVar(&c.Addr, ":443"),
			usage: "HTTPS listen address for DERP: :port, ip:port or [ipv6]:port"},
		{flag: "http-port", env: "HTTP_PORT", aliases: []string{"DERP_HTTP_PORT", "DERP_PORT_HTTP"}, group: "Relay", bind: intVar(&c.HTTPPort, 80),
			usage: "plain-HTTP port on the same IP (ACME HTTP-01, /generate_204, redirect to HTTPS); -1 turns it off"},
		{flag: "stun-port", env: "STUN_PORT", aliases: []string{"DERP_STUN_PORT", "DERP_PORT_STUN"}, group: "Relay", bind: intVar(&c.STUNPort, 3478),
			usage: "UDP port for STUN, on the same IP"},
		{flag: "stun", env: "STUN", aliases: []string{"DERP_STUN", "RUN_STUN", "DERP_STUN_ENABLE", "DERP_ENABLE_STUN"}, group: "Relay", bind: boolVar(&c.STUN, true),
			usage: "serve STUN (clients need it to find direct paths and measure latency)"},
		{flag: "hostname", env: "TAILSCALE_DERP_HOSTNAME", aliases: []string{"DERP_DOMAIN", "DERP_HOSTNAME"}, group: "Relay", bind: strVar(&c.Hostname, ""),
			usage: "this server's public DNS name (or IP address: with -certmode manual, or -acme-ip-certs); required"},
		{flag: "home", env: "HOME_PAGE", aliases: []string{"FLAGHOME", "DERP_HOME"}, group: "Relay", bind: strVar(&c.Home, ""),
			usage: `what "/" serves: empty for a neutral page, "blank", or a URL to redirect to`},
		{flag: "state-dir", env: "STATE_DIR", aliases: []string{"TAILDERP_STATE_DIR"}, group: "Relay", bind: strVar(&c.StateDir, "/var/lib/tailderp"),
			usage: "directory for all state: DERP key, certificates, tailnet node; must persist and be writable"},
		{flag: "mesh-psk-file", env: "MESH_PSK_FILE", aliases: []string{"MESH_PSKFILE", "DERP_MESH_PSK_FILE"}, group: "Relay", bind: strVar(&c.MeshPSKFile, ""),
			usage: "file holding the relay fleet's mesh key (64 hex digits); clients presenting it skip admission"},
		{flag: "mesh-with", env: "MESH_WITH", aliases: []string{"DERP_MESH_WITH"}, group: "Relay", bind: strVar(&c.MeshWith, ""),
			usage: "the relays of this fleet (one derpMap region), comma-separated host[:port]; needs -mesh-psk-file. Each is dialed with the mesh key and packets for its clients are forwarded to it, as derper does (derper and tailderp mix). This relay's own entry is skipped, so all can be given the same list. [sha256-raw:HEX@]host pins a self-signed peer (its CertName); host/ip dials ip (a private address) instead of resolving host"},
		{flag: "mesh-ca-bundle", env: "MESH_CA_BUNDLE", group: "Relay", bind: strVar(&c.MeshCABundle, ""),
			usage: "PEM file of extra root CAs to trust for -mesh-with peers' certificates (a fleet whose certificates a private CA signs); the system's roots are always trusted"},
		{flag: "bootstrap-dns-names", env: "BOOTSTRAP_DNS_NAMES", aliases: []string{"BOOTSTRAP_DNS", "DERP_BOOTSTRAP_DNS_NAMES"}, group: "Relay", bind: strVar(&c.BootstrapDNSNames, ""),
			usage: "comma-separated DNS names served with their addresses at /bootstrap-dns, for clients whose own DNS fails (resolved here every 10 minutes)"},
		{flag: "unpublished-bootstrap-dns-names", env: "UNPUBLISHED_BOOTSTRAP_DNS_NAMES", aliases: []string{"UNPUBLISHED_DNS", "DERP_UNPUBLISHED_BOOTSTRAP_DNS_NAMES"}, group: "Relay", bind: strVar(&c.UnpublishedBootstrapDNSNames, ""),
			usage: "comma-separated DNS names answered at /bootstrap-dns?q=NAME only, never listed. Default: the control server's host name (-control-url's, or Tailscale's) when the relay runs its tailnet node; none to turn it off"},
		{flag: "dev", env: "DEV", group: "Relay", bind: boolVar(&c.Dev, false),
			usage: "try it out: serve on 127.0.0.1:3340 with a self-signed certificate, no port 80, and no tailnet node unless a key is set"},
		{flag: "tcp-keepalive-time", env: "TCP_KEEPALIVE_TIME", aliases: []string{"DERP_TCP_KEEPALIVE_TIME"}, group: "Relay", bind: durationVar(&c.TCPKeepAlive, relay.DefaultTCPKeepAlive),
			usage: "TCP keepalive time of client connections (long, to spare mobile batteries: DERP has its own keepalive)"},
		{flag: "tcp-user-timeout", env: "TCP_USER_TIMEOUT", aliases: []string{"DERP_TCP_USER_TIMEOUT"}, group: "Relay", bind: durationVar(&c.TCPUserTimeout, relay.DefaultTCPUserTimeout),
			usage: "TCP user timeout of client connections: a dead connection is dropped after this long without acknowledgement"},
		{flag: "tcp-write-timeout", env: "TCP_WRITE_TIMEOUT", aliases: []string{"DERP_TCP_WRITE_TIMEOUT"}, group: "Relay", bind: durationVar(&c.TCPWriteTimeout, relay.DefaultTCPWriteTimeout),
			usage: "write timeout to a client; a client that cannot take a write for this long is dropped (0: none)"},
		{flag: "rate-config", env: "RATE_CONFIG", group: "Relay", bind: strVar(&c.RateConfig, ""),
			usage: `JSON file of per-client rate limits, derper's format: {"PerClientRateLimitBytesPerSec": N, "PerClientRateBurstBytes": N}; read again on SIGHUP and when it changes`},
		{flag: "accept-connection-limit", env: "ACCEPT_CONNECTION_LIMIT", group: "Relay", bind: floatVar(&c.AcceptConnectionLimit, 0),
			usage: "new HTTPS connections accepted per second once -accept-connection-burst have been; the rest are closed at once. 0: no limit (as derper)"},
		{flag: "max-conns-per-ip", env: "MAX_CONNS_PER_IP", group: "Relay", bind: intVar(&c.MaxConnsPerIP, 0),
			usage: "open HTTPS connections allowed per client address (IPv6: per /64); more are refused before TLS, the top sources warned about once a minute; mesh peers exempt. 0: no cap"},
		{flag: "max-conns-per-tailnet", env: "MAX_CONNS_PER_TAILNET", group: "Relay", bind: intVar(&c.MaxConnsPerTailnet, 0),
			usage: "with several tailnets: client connections each tailnet may hold at once (its share of the relay); more of its clients are refused, counted, and warned about once a minute; mesh peers exempt. 0: no cap"},
		{flag: "proxy-protocol-from", env: "PROXY_PROTOCOL_FROM", group: "Relay", bind: strVar(&c.ProxyProtocolFrom, ""),
			usage: "comma-separated addresses or CIDRs of TCP proxies sharing port 443 by SNI without terminating TLS (HAProxy mode tcp, nginx stream, Traefik TCP): their connections must start with a PROXY protocol v1/v2 header, whose client address the relay then uses everywhere; a header from any other source is refused"},
		{flag: "drain-timeout", env: "DRAIN_TIMEOUT", group: "Relay", bind: durationVar(&c.DrainTimeout, DefaultDrainTimeout),
			usage: "on SIGTERM: readiness turns false at once, no new clients are taken, and the clients are closed so they reconnect to another relay of the region; the process exits within this long (keep it under the stop timeout: docker stop's is 10s)"},
		{flag: "debug-listen", env: "DEBUG_LISTEN", group: "Relay", bind: strVar(&c.DebugListen, ""),
			usage: "a loopback address (127.0.0.1:PORT or [::1]:PORT) to serve /debug on too: the metrics of an open relay (-verify-clients=false), which has no tailnet address, or a local Prometheus; never a public address"},
		{flag: "accept-connection-burst", env: "ACCEPT_CONNECTION_BURST", group: "Relay", bind: intVar(&c.AcceptConnectionBurst, 1000),
			usage: "new HTTPS connections accepted at once before -accept-connection-limit applies (e.g. every client reconnecting after a restart)"},

		{flag: "certmode", env: "CERTMODE", aliases: []string{"TAILSCALE_DERP_CERTMODE", "CERT_MODE", "DERP_CERT_MODE", "DERP_CERTMODE"}, group: "Certificates", bind: strVar(&c.CertMode, "letsencrypt"),
			usage: "letsencrypt (any ACME CA; automatic, renewed in the background) or manual (<certdir>/<hostname>.crt and .key, reloaded when they change; self-signed and generated when -hostname is an IP)"},
		{flag: "certdir", env: "CERTDIR", aliases: []string{"CERT_DIR", "DERP_CERT_DIR"}, group: "Certificates", bind: strVar(&c.CertDir, ""),
			usage: "certificate directory (default <state-dir>/certs)"},
		{flag: "acme-email", env: "ACME_EMAIL", aliases: []string{"DERP_ACME_EMAIL"}, group: "Certificates", bind: strVar(&c.ACMEEmail, ""),
			usage: "contact address for the ACME account (expiry notices); optional"},
		{flag: "acme-directory-url", env: "ACME_DIRECTORY_URL", group: "Certificates", bind: strVar(&c.ACMEDirectoryURL, ""),
			usage: "ACME directory URL (default Let's Encrypt production; e.g. staging, ZeroSSL, step-ca)"},
		{flag: "acme-ca-bundle", env: "ACME_CA_BUNDLE", group: "Certificates", bind: strVar(&c.ACMECABundle, ""),
			usage: "PEM file of extra root CAs to trust when talking to -acme-directory-url (a private CA)"},
		{flag: "acme-ip-certs", env: "ACME_IP_CERTS", group: "Certificates", bind: boolVar(&c.ACMEIPCerts, false),
			usage: "with -certmode letsencrypt and an IP address as -hostname: get the address a certificate from the ACME CA (Let's Encrypt's ~6-day profile; HTTP-01 on port 80 or TLS-ALPN-01), renewed in the background; clients need no CertName pin"},

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
		{flag: "tailnet-port", env: "TAILNET_PORT", group: "Tailnet node", bind: intVar(&c.TailnetPort, 0),
			usage: "UDP port of the tailnet node's WireGuard (0: a random port); fix it to open it in a firewall"},
		{flag: "tailnets", env: "TAILNETS_FILE", group: "Tailnet node", bind: strVar(&c.TailnetsFile, ""),
			usage: `file (JSON, comments allowed) of more tailnets to admit, each with its own node: {"tailnets": [{"name", "control_url", "auth_key_file", "hostname", "advertise_tags", "tailnet_port"}]}`},

		{flag: "verify-clients", env: "VERIFY_CLIENTS", aliases: []string{"DERP_VERIFY_CLIENTS", "TAILSCALE_DERP_VERIFY_CLIENTS"}, group: "Admission", bind: boolVar(&c.VerifyClients, true),
			usage: "admit only clients of our tailnet, as the embedded node sees it; false makes an open relay"},
		{flag: "verify-client-url", env: "VERIFY_CLIENT_URL", aliases: []string{"DERP_VERIFY_CLIENT_URL"}, group: "Admission", bind: strVar(&c.VerifyClientURL, ""),
			usage: "admission controller URL (derper's JSON contract); when set it must admit too"},
		{flag: "verify-clients-fail-open", env: "VERIFY_CLIENTS_FAIL_OPEN", group: "Admission", bind: boolVar(&c.VerifyClientsFailOpen, false),
			usage: "admit clients when a check cannot answer (node not logged in yet, URL down); default refuses"},
		{flag: "verify-client-url-fail-open", env: "VERIFY_CLIENT_URL_FAIL_OPEN", aliases: []string{"VERIFY_FAIL_OPEN", "DERP_VERIFY_CLIENT_URL_FAIL_OPEN"}, group: "Admission", bind: boolVar(&c.VerifyClientURLFailOpen, false),
			usage: "admit clients when -verify-client-url is unreachable (derper's flag; its default is true, tailderp's refuses)"},
		{flag: "verify-clients-cache-max-age", env: "VERIFY_CLIENTS_CACHE_MAX_AGE", group: "Admission", bind: durationVar(&c.VerifyClientsCacheMaxAge, defaultCacheMaxAge),
			usage: "while the node has no network map (a restart with the control server down, or logged out), admit the keys of the last map for this long after it arrived; 0 turns that off"},

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
		{flag: "public-port", env: "DERP_PUBLIC_PORT", group: "derpMap snippet", bind: intVar(&c.PublicPort, 0),
			usage: "the HTTPS port clients dial, for the derpMap, when it is not -a's: a TCP proxy sharing 443 in front of -a :8443, or a published container port (0: -a's port as bound)"},

		{flag: "register", env: "REGISTER", group: "Policy file", bind: boolVar(&c.Register, false),
			usage: "keep this relay's region written in the Tailscale policy file's derpMap while it runs: at start, when it changes (a new pin, a fleet's relay joining or leaving) and hourly; API errors are retried with a warning and never stop the relay. `tailderp register` writes it once. Needs TAILSCALE_API_KEY, or TAILSCALE_OAUTH_CLIENT_ID and TAILSCALE_OAUTH_CLIENT_SECRET"},
		{flag: "api-url", env: "TAILSCALE_API_URL", aliases: []string{"TAILSCALE_BASE_URL"}, group: "Policy file", bind: strVar(&c.APIURL, policy.DefaultBaseURL),
			usage: "Tailscale's API, where -register and `tailderp register` write the policy file (https; http only on loopback)"},
		{flag: "tailnet", env: "TAILSCALE_TAILNET", group: "Policy file", bind: strVar(&c.Tailnet, "-"),
			usage: `the tailnet whose policy file -register and ` + "`tailderp register`" + ` write: "-" for the credentials' own, or the tailnet ID (admin console, Settings → General). Not -tailnets, the tailnets whose clients are admitted`},
		{flag: "", env: "TAILSCALE_API_KEY", group: "Policy file", secret: true, target: &c.APIKey,
			usage: "API access token (tskey-api-…) for -register and `tailderp register`, made by an Owner, Admin or Network admin (Settings → Keys); it expires (90 days at most): an OAuth client does not. Never printed; environment only"},
		{flag: "", env: "TAILSCALE_OAUTH_CLIENT_ID", group: "Policy file", target: &c.OAuthClientID,
			usage: "OAuth client ID, for -register and `tailderp register` instead of an access token: a client with the policy_file scope (write), made in Settings → Trust credentials. Environment only"},
		{flag: "", env: "TAILSCALE_OAUTH_CLIENT_SECRET", group: "Policy file", secret: true, target: &c.OAuthClientSecret,
			usage: "the OAuth client's secret (tskey-client-…); never printed; environment only"},

		{flag: "log-format", env: "LOG_FORMAT", group: "Logging", bind: strVar(&c.LogFormat, "text"),
			usage: "text or json"},
		{flag: "log-level", env: "LOG_LEVEL", group: "Logging", bind: strVar(&c.LogLevel, "info"),
			usage: "debug, info, warn or error"},
	}
}

// settingName is how messages name the setting with key k (a flag name,
// or the variable of an environment-only setting): "-a (ADDR)".
func SettingName(k string) string {
	for _, s := range settingsFor(&Config{}) {
		if s.key() == k {
			return s.name()
		}
	}
	return k
}

// isSetting reports whether name is a flag of the server's settings.
func IsSetting(name string) bool {
	for _, s := range settingsFor(&Config{}) {
		if s.flag != "" && s.flag == name {
			return true
		}
	}
	return false
}

// defaultCacheMaxAge is how long the keys of the last network map admit
// clients without a live one (docs/DESIGN.md, "Known peers"): a day covers
// an overnight control-server outage or upgrade, and bounds how long a
// node removed while the relay could not hear it stays admitted.
const defaultCacheMaxAge = 24 * time.Hour

// checkHostname checks a public name: a DNS name or an IP address, no
// scheme, port or path.
func checkHostname(h string) error {
	if net.ParseIP(h) != nil {
		return nil
	}
	if strings.Contains(h, "://") || strings.ContainsAny(h, "/:") {
		return errors.New("want a bare DNS name or IP address, without scheme, port or path")
	}
	if len(h) > 253 {
		return errors.New("longer than 253 characters")
	}
	for _, label := range strings.Split(strings.TrimSuffix(h, "."), ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return errors.New("not a valid DNS name (empty, over-long or dash-edged label)")
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return fmt.Errorf("not a valid DNS name (character %q)", r)
			}
		}
	}
	return nil
}

// checkHTTPURL checks a URL tailderp will call: http or https, with a
// host.
func checkHTTPURL(s string) error {
	u, err := url.Parse(s)
	switch {
	case err != nil:
		return err
	case u.Scheme != "http" && u.Scheme != "https":
		return fmt.Errorf("scheme %q: want http:// or https://", u.Scheme)
	case u.Host == "" || u.Hostname() == "":
		return errors.New("no host")
	}
	return nil
}

// Validate checks every setting that can be checked without I/O. Load
// calls it; `derpmap` and `cert renew` call it again on the running
// server's settings when their own named no -hostname.
func (c *Config) Validate() error {
	host, port, err := net.SplitHostPort(c.Addr)
	if err != nil {
		return fmt.Errorf("%s %q: want :port, ip:port or [ipv6]:port", SettingName("a"), c.Addr)
	}
	if host != "" && net.ParseIP(host) == nil && host != "localhost" {
		return fmt.Errorf("%s %q: the host part must be an IP address (or empty for all addresses)", SettingName("a"), c.Addr)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
		return fmt.Errorf("%s %q: port must be a number from 0 to 65535", SettingName("a"), c.Addr)
	}
	if c.HTTPPort < -1 || c.HTTPPort > 65535 {
		return fmt.Errorf("%s %d: want a port from 0 to 65535, or -1 to turn it off", SettingName("http-port"), c.HTTPPort)
	}
	if c.STUNPort < 0 || c.STUNPort > 65535 {
		return fmt.Errorf("%s %d: want a port from 0 to 65535", SettingName("stun-port"), c.STUNPort)
	}
	if err := checkTailnetPort(c.TailnetPort); err != nil {
		return fmt.Errorf("%s %w", SettingName("tailnet-port"), err)
	}
	for _, d := range []struct {
		key string
		val time.Duration
	}{{"tcp-keepalive-time", c.TCPKeepAlive}, {"tcp-user-timeout", c.TCPUserTimeout}, {"tcp-write-timeout", c.TCPWriteTimeout}} {
		if d.val < 0 {
			return fmt.Errorf("%s %v: a duration cannot be negative: give one like 30s, or 0", SettingName(d.key), d.val)
		}
	}
	if c.STUN && c.TailnetPort != 0 && c.TailnetPort == c.STUNPort {
		return fmt.Errorf("%s %d is also %s: the node's WireGuard and STUN cannot share a UDP port: choose another, or 0 for a random one", SettingName("tailnet-port"), c.TailnetPort, SettingName("stun-port"))
	}
	if c.VerifyClientsCacheMaxAge < 0 {
		return fmt.Errorf("%s %v: want a duration like 24h, or 0 to turn the cache off", SettingName("verify-clients-cache-max-age"), c.VerifyClientsCacheMaxAge)
	}
	if c.AcceptConnectionLimit < 0 || math.IsNaN(c.AcceptConnectionLimit) {
		return fmt.Errorf("%s %v: want a number of new connections per second, or 0 for no limit", SettingName("accept-connection-limit"), c.AcceptConnectionLimit)
	}
	if c.AcceptConnectionBurst < 1 {
		return fmt.Errorf("%s %d: want at least 1: how many new connections are accepted at once before %s applies", SettingName("accept-connection-burst"), c.AcceptConnectionBurst, SettingName("accept-connection-limit"))
	}
	if c.PublicPort < 0 || c.PublicPort > 65535 {
		return fmt.Errorf("%s %d: want the port clients dial, from 1 to 65535, or 0 for -a's", SettingName("public-port"), c.PublicPort)
	}
	if c.MaxConnsPerIP < 0 {
		return fmt.Errorf("%s %d: want a number of connections per address, or 0 for no cap", SettingName("max-conns-per-ip"), c.MaxConnsPerIP)
	}
	if c.MaxConnsPerTailnet < 0 {
		return fmt.Errorf("%s %d: want a number of connections per tailnet, or 0 for no cap", SettingName("max-conns-per-tailnet"), c.MaxConnsPerTailnet)
	}
	if c.DrainTimeout < 0 {
		return fmt.Errorf("%s %v: a duration cannot be negative: give one like 5s, or 0 to exit at once", SettingName("drain-timeout"), c.DrainTimeout)
	}
	if _, err := c.ProxyProtocolSources(); err != nil {
		return fmt.Errorf("%s %q: %v (give addresses or CIDRs of your proxies, e.g. 127.0.0.1 or 10.0.0.0/24)", SettingName("proxy-protocol-from"), c.ProxyProtocolFrom, err)
	}
	if c.DebugListen != "" {
		if err := checkLoopbackAddr(c.DebugListen); err != nil {
			return fmt.Errorf("%s %q: %v", SettingName("debug-listen"), c.DebugListen, err)
		}
	}
	if c.DebugPort < 1 || c.DebugPort > 65535 {
		return fmt.Errorf("%s %d: want a port from 1 to 65535", SettingName("debug-port"), c.DebugPort)
	}
	if c.Hostname == "" {
		return fmt.Errorf("%s is required: the DNS name clients reach this server by, or its public IP address with -certmode manual%s", SettingName("hostname"), missingHostnameHint(c.Notes))
	}
	if err := checkHostname(c.Hostname); err != nil {
		return fmt.Errorf("%s %q: %v", SettingName("hostname"), c.Hostname, err)
	}
	for _, u := range []struct{ key, val string }{{"verify-client-url", c.VerifyClientURL}, {"acme-directory-url", c.ACMEDirectoryURL}, {"control-url", c.ControlURL}} {
		if u.val == "" {
			continue
		}
		if err := checkHTTPURL(u.val); err != nil {
			return fmt.Errorf("%s %q: %v", SettingName(u.key), u.val, err)
		}
	}
	if !c.Dev {
		switch c.CertMode {
		case "letsencrypt":
			if net.ParseIP(c.Hostname) != nil && !c.ACMEIPCerts {
				return fmt.Errorf("%s %s is an IP address: set %s to get a certificate for it from the ACME CA (Let's Encrypt issues ~6-day IP certificates; it must reach port 80 or 443), or use -certmode manual (CERTMODE=manual) for a self-signed certificate that clients pin by CertName", SettingName("hostname"), c.Hostname, SettingName("acme-ip-certs"))
			}
		case "manual":
		default:
			return fmt.Errorf("%s %q: want letsencrypt or manual%s", SettingName("certmode"), c.CertMode, certModeHint(c.CertMode))
		}
	}
	if err := c.validateACMEIPCerts(); err != nil {
		return err
	}
	if _, err := relay.HomeHandler(c.Home); err != nil {
		return fmt.Errorf("%s: %w", SettingName("home"), err)
	}
	if c.StateDir == "" && !c.NeedsTempStateDir() {
		return fmt.Errorf("%s must not be empty", SettingName("state-dir"))
	}
	if c.RegionID < 1 {
		return fmt.Errorf("%s %d: want a positive number, 900 or more for a custom relay", SettingName("region-id"), c.RegionID)
	}
	for _, ip := range []struct {
		key, val string
		want4    bool
	}{{"ipv4", c.IPv4, true}, {"ipv6", c.IPv6, false}} {
		if ip.val == "" || ip.val == "none" {
			continue
		}
		a, err := netip.ParseAddr(ip.val)
		switch {
		case err != nil:
			return fmt.Errorf("%s %q: not an IP address (or \"none\")", SettingName(ip.key), ip.val)
		case ip.want4 && !a.Is4():
			return fmt.Errorf("%s %q: not an IPv4 address (IPv6 goes in %s)", SettingName(ip.key), ip.val, SettingName("ipv6"))
		case !ip.want4 && !a.Is6():
			return fmt.Errorf("%s %q: not an IPv6 address (IPv4 goes in %s)", SettingName(ip.key), ip.val, SettingName("ipv4"))
		}
	}
	if err := c.validateFleet(); err != nil {
		return err
	}
	if strings.HasPrefix(c.AuthKey, "tskey-client-") && c.AdvertiseTags == "" {
		return fmt.Errorf("TAILSCALE_AUTH_KEY holds an OAuth client secret (tskey-client-…), which needs %s, e.g. tag:derp", SettingName("advertise-tags"))
	}
	for _, t := range c.tags() {
		if !strings.HasPrefix(t, "tag:") {
			return fmt.Errorf("%s %q: each tag must start with \"tag:\"", SettingName("advertise-tags"), t)
		}
	}
	return nil
}

// validateACMEIPCerts checks that -acme-ip-certs goes with what it needs:
// an ACME CA and an IP address to get the certificate for.
func (c *Config) validateACMEIPCerts() error {
	if !c.ACMEIPCerts {
		return nil
	}
	switch {
	case c.Dev:
		return fmt.Errorf("%s does not go with %s, which serves a self-signed certificate for localhost: drop one of them", SettingName("acme-ip-certs"), SettingName("dev"))
	case c.CertMode != "letsencrypt":
		return fmt.Errorf("%s gets the certificate from an ACME CA, which needs -certmode letsencrypt (CERTMODE), not %q: drop %s for a self-signed certificate pinned by CertName", SettingName("acme-ip-certs"), c.CertMode, SettingName("acme-ip-certs"))
	case net.ParseIP(c.Hostname) == nil:
		return fmt.Errorf("%s gets a certificate for an IP address, and %s %s is a DNS name, for which -certmode letsencrypt gets one already: drop %s, or set %s to the server's public IP address", SettingName("acme-ip-certs"), SettingName("hostname"), c.Hostname, SettingName("acme-ip-certs"), SettingName("hostname"))
	}
	return nil
}

// checkRateConfig reads -rate-config once, so a file that does not load
// stops the start with the setting named.
func (c *Config) checkRateConfig() error {
	if c.RateConfig == "" {
		return nil
	}
	if _, err := ReadFileLimited(c.RateConfig, maxSettingsFileSize); err != nil {
		return fmt.Errorf("%s: %w", SettingName("rate-config"), err)
	}
	if _, err := relay.LoadRateConfig(c.RateConfig); err != nil {
		return fmt.Errorf("%s %s: %v (fix the file, or leave %s empty for no limits)", SettingName("rate-config"), c.RateConfig, err, SettingName("rate-config"))
	}
	return nil
}

// The state directory's layout.

func (c *Config) NodeDir() string     { return filepath.Join(c.StateDir, "tailscale") }
func (c *Config) DERPKeyPath() string { return filepath.Join(c.StateDir, "derp.key") }

// ServingPath is where the running server says what it serves ("" when
// there is no state directory yet: -dev's temporary one).
func (c *Config) ServingPath() string {
	if c.StateDir == "" {
		return ""
	}
	return filepath.Join(c.StateDir, ServingFile)
}

// ServingFile is the file, in the state directory, where a running server
// says what it serves (internal/serving).
const ServingFile = "serving.json"

func (c *Config) CertsDir() string {
	if c.CertDir != "" {
		return c.CertDir
	}
	return filepath.Join(c.StateDir, "certs")
}

// stunAddr is the STUN listen address (the HTTPS listener's IP), "" when
// STUN is off.
func (c *Config) STUNAddr() string {
	if !c.STUN {
		return ""
	}
	host, _, _ := net.SplitHostPort(c.Addr)
	return net.JoinHostPort(host, strconv.Itoa(c.STUNPort))
}

func (c *Config) tags() []string { return splitList(c.AdvertiseTags) }

// tailnetHostname is the node's name: -tailnet-hostname, or -hostname
// with dots turned into dashes.
func (c *Config) tailnetHostname() string {
	switch {
	case c.TailnetHostname != "":
		return c.TailnetHostname
	case c.Dev:
		return "tailderp-dev"
	}
	return strings.NewReplacer(".", "-", ":", "-").Replace(c.Hostname)
}

// derpRegion is the derpMap region of this relay, its node reached on
// httpsPort and stunPort (-1: no STUN) and pinned by certName ("" for a
// certificate a public CA signed).
func (c *Config) DERPRegion(httpsPort, stunPort int, certName string) *tailcfg.DERPRegion {
	if c.PublicPort != 0 {
		httpsPort = c.PublicPort // clients dial the proxy or the published port
	}
	n := relay.NodeInfo{HostName: c.Hostname, IPv4: c.IPv4, IPv6: c.IPv6, DERPPort: httpsPort, STUNPort: stunPort, CertName: certName}
	if ip := net.ParseIP(c.Hostname); ip != nil {
		if ip.To4() != nil && n.IPv4 == "" {
			n.IPv4 = c.Hostname
		} else if ip.To4() == nil && n.IPv6 == "" {
			n.IPv6 = c.Hostname
		}
	}
	return relay.DERPRegion(relay.RegionConfig{RegionID: c.RegionID, RegionCode: c.RegionCode, RegionName: c.RegionName}, n)
}

// configuredPorts are the HTTPS and STUN ports the settings name (STUN -1
// when off); a running server's bound ports are in its serving.json.
func (c *Config) ConfiguredPorts() (https, stun int) {
	_, p, _ := net.SplitHostPort(c.Addr)
	https, _ = strconv.Atoi(p)
	stun = c.STUNPort
	if !c.STUN {
		stun = -1
	}
	return https, stun
}

// ErrNoCertYet means IP mode has not generated its certificate yet.
var ErrNoCertYet = errors.New("no certificate yet")

// currentIPCert describes the self-signed certificate IP mode keeps in
// the certificate directory.
func (c *Config) CurrentIPCert() (relay.CertInfo, error) {
	crt, key := relay.CertPaths(c.CertsDir(), c.Hostname)
	info, err := relay.ReadCertPair(crt, key, c.Hostname)
	if err != nil {
		if _, statErr := os.Stat(crt); errors.Is(statErr, os.ErrNotExist) {
			return relay.CertInfo{}, fmt.Errorf("%w at %s: start tailderp once to generate it", ErrNoCertYet, crt)
		}
		return relay.CertInfo{}, err
	}
	return info, nil
}

// loadCertPool reads a PEM bundle of CA certificates.
func LoadCertPool(path string) (*x509.CertPool, error) {
	b, err := ReadFileLimited(path, maxSettingsFileSize)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s: no PEM certificates in it", path)
	}
	return pool, nil
}

// readMeshKey reads the fleet's mesh key from -mesh-psk-file ("" means no
// mesh), by the rule the relay and `check` share (relayrules.ParseMeshKey).
func readMeshKey(path string) (key.DERPMesh, error) {
	if path == "" {
		return key.DERPMesh{}, nil
	}
	b, err := ReadFileLimited(path, maxKeyFileSize)
	if err != nil {
		return key.DERPMesh{}, fmt.Errorf("%s: %w", SettingName("mesh-psk-file"), err)
	}
	k, err := relayrules.ParseMeshKey(string(b))
	switch {
	case errors.Is(err, relayrules.ErrEmptyMeshKey):
		return key.DERPMesh{}, fmt.Errorf("%s %s is empty: put the fleet's mesh key in it, 64 hex digits (e.g. from `openssl rand -hex 32`), the same file on every relay of the fleet", SettingName("mesh-psk-file"), path)
	case errors.Is(err, relayrules.ErrZeroMeshKey):
		return key.DERPMesh{}, fmt.Errorf("%s %s holds a key of all zeros, which is no secret: make one with `openssl rand -hex 32`", SettingName("mesh-psk-file"), path)
	case err != nil:
		return key.DERPMesh{}, fmt.Errorf("%s %s: %v", SettingName("mesh-psk-file"), path, err)
	}
	return k, nil
}

// The fleet: -mesh-with and bootstrap DNS.

// checkTailnetPort checks the UDP port of a tailnet's node (-tailnet-port,
// or tailnet_port in -tailnets).
func checkTailnetPort(p int) error {
	if p < 0 || p > 65535 {
		return fmt.Errorf("%d: want a UDP port from 1 to 65535, or 0 for a random one", p)
	}
	return nil
}

// splitList splits a comma-separated setting, dropping empty entries.
func splitList(s string) []string {
	var out []string
	for e := range strings.SplitSeq(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	return out
}

// meshEntries parses -mesh-with: every entry, and the index of the one
// that is this relay (-1 if none): -hostname at the port of -a. derper
// lists its own name too; a relay reached under another name is still
// found out by its DERP key when dialed, and dropped then.
func (c *Config) meshEntries() (entries []relay.MeshPeer, self int, err error) {
	self = -1
	httpsPort, _ := c.ConfiguredPorts()
	seen := map[string]bool{}
	for _, e := range splitList(c.MeshWith) {
		p, err := relay.ParseMeshPeer(e)
		if err != nil {
			return nil, -1, err
		}
		if seen[p.String()] {
			return nil, -1, fmt.Errorf("%s is listed twice", p)
		}
		seen[p.String()] = true
		port := p.Port
		if port == 0 {
			port = 443
		}
		if self < 0 && strings.EqualFold(p.Host, strings.TrimSuffix(c.Hostname, ".")) && port == httpsPort {
			self = len(entries)
		}
		entries = append(entries, p)
	}
	return entries, self, nil
}

// MeshPeers are the relays to dial: -mesh-with without this relay, as
// parse read it once.
func (c *Config) MeshPeers() []relay.MeshPeer {
	entries, self := c.mesh, c.meshSelf
	if self >= 0 {
		entries = append(entries[:self:self], entries[self+1:]...)
	}
	return entries
}

// MeshSelfListed reports whether -mesh-with lists this relay itself (an
// entry that is skipped).
func (c *Config) MeshSelfListed() bool { return c.meshSelf >= 0 }

// BootstrapNames are the names listed at /bootstrap-dns
// (-bootstrap-dns-names).
func (c *Config) BootstrapNames() []string { return splitList(c.BootstrapDNSNames) }

// fleetRegion is the derpMap region to print: self (this relay's region)
// alone, or with a node per -mesh-with peer.
func (c *Config) FleetRegion(self *tailcfg.DERPRegion) *tailcfg.DERPRegion {
	entries, i := c.mesh, c.meshSelf
	if c.meshErr != nil || len(entries) == 0 || (len(entries) == 1 && i == 0) {
		return self
	}
	return relay.FleetRegion(self, entries, i)
}

// unpublishedBootstrapNames are the names answered at /bootstrap-dns only
// to a query for them: -unpublished-bootstrap-dns-names, by default the
// control server's host name when the relay runs its node, so a client
// whose DNS fails still finds its control server; a name, not an IP
// address, and not listed, so the relay does not tell who asks which
// control server it serves.
func (c *Config) UnpublishedBootstrapNames() []string {
	if c.src["unpublished-bootstrap-dns-names"] != "" {
		if strings.EqualFold(strings.TrimSpace(c.UnpublishedBootstrapDNSNames), "none") {
			return nil
		}
		return splitList(c.UnpublishedBootstrapDNSNames)
	}
	if !c.VerifyClients {
		return nil
	}
	control := c.ControlURL
	if control == "" {
		control = ipn.DefaultControlURL
	}
	u, err := url.Parse(control)
	if err != nil || !relay.ValidBootstrapDNSName(u.Hostname()) {
		return nil
	}
	return []string{strings.ToLower(u.Hostname())}
}

// validateFleet checks -mesh-with and the bootstrap DNS names.
func (c *Config) validateFleet() error {
	if c.meshErr != nil {
		return fmt.Errorf("%s: %v", SettingName("mesh-with"), c.meshErr)
	}
	published := splitList(c.BootstrapDNSNames)
	unpublished := c.UnpublishedBootstrapNames()
	for _, s := range []struct {
		key   string
		names []string
	}{{"bootstrap-dns-names", published}, {"unpublished-bootstrap-dns-names", unpublished}} {
		for _, n := range s.names {
			if strings.Contains(n, "/") && !strings.Contains(n, "://") {
				return fmt.Errorf("%s %q: derper's name/TXT-record rollout percentages are not supported; give the name alone", SettingName(s.key), n)
			}
			if !relay.ValidBootstrapDNSName(n) {
				return fmt.Errorf("%s %q: not a DNS name (give host names, no URL, port or IP address)", SettingName(s.key), n)
			}
		}
	}
	if n := len(published) + len(unpublished); n > relay.MaxBootstrapDNSNames {
		return fmt.Errorf("%s and %s name %d names together: at most %d", SettingName("bootstrap-dns-names"), SettingName("unpublished-bootstrap-dns-names"), n, relay.MaxBootstrapDNSNames)
	}
	return nil
}

// DefaultDrainTimeout is how long a stopping relay takes at most: well
// under docker stop's 10 s and Kubernetes' 30 s grace.
const DefaultDrainTimeout = 5 * time.Second

// ProxyProtocolSources are the sources -proxy-protocol-from names: each
// an address (a /32 or /128) or a CIDR.
func (c *Config) ProxyProtocolSources() ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, e := range splitList(c.ProxyProtocolFrom) {
		if a, err := netip.ParseAddr(e); err == nil {
			out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
			continue
		}
		p, err := netip.ParsePrefix(e)
		if err != nil {
			return nil, fmt.Errorf("%q is neither an IP address nor a CIDR", e)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// checkLoopbackAddr checks an address to serve on loopback only: a
// loopback IP and a port.
func checkLoopbackAddr(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return errors.New("want 127.0.0.1:PORT or [::1]:PORT")
	}
	a, err := netip.ParseAddr(host)
	if err != nil || !a.IsLoopback() {
		return errors.New("the host must be a loopback address (127.0.0.1 or ::1): /debug is never served publicly")
	}
	if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
		return errors.New("the port must be a number from 0 to 65535")
	}
	return nil
}
