package config

import (
	"cmp"
	"fmt"
	"net"
	"os"
	"strconv"

	"github.com/tailderp/tailderp/relay"
)

// CertMode is how the relay gets its certificate, decided from -certmode,
// -hostname, -acme-ip-certs and -dev by Config.Mode alone.
type CertMode int

const (
	// CertACME: -certmode letsencrypt for a DNS name, from any ACME CA,
	// renewed in the background.
	CertACME CertMode = iota
	// CertACMEIP: -certmode letsencrypt -acme-ip-certs for an IP address
	// (short-lived IP certificates), renewed in the background.
	CertACMEIP
	// CertManualFiles: -certmode manual for a DNS name: the operator's
	// files in the certificate directory, reloaded when they change.
	CertManualFiles
	// CertSelfSignedIP: -certmode manual for an IP address: a self-signed
	// certificate made once, which clients pin by CertName; renewed with
	// `tailderp cert renew`.
	CertSelfSignedIP
	// CertDev: -dev: a self-signed certificate for localhost, new at every
	// start (its pin is printed).
	CertDev
)

// String is how the start line and messages name the mode.
func (m CertMode) String() string {
	switch m {
	case CertACME:
		return "letsencrypt"
	case CertACMEIP:
		return "letsencrypt-ip"
	case CertManualFiles:
		return "manual"
	case CertSelfSignedIP:
		return "manual-self-signed-ip"
	case CertDev:
		return "dev-self-signed"
	}
	return "unknown"
}

// Pinned reports whether clients must pin the certificate by CertName:
// the self-signed ones.
func (m CertMode) Pinned() bool { return m == CertSelfSignedIP || m == CertDev }

// Mode is the certificate mode the settings give: the one place it is
// decided. (Validate refuses letsencrypt for an IP address without
// -acme-ip-certs, and -acme-ip-certs with anything but letsencrypt.)
func (c *Config) Mode() CertMode {
	switch {
	case c.Dev:
		return CertDev
	case c.CertMode == "manual" && net.ParseIP(c.Hostname) != nil:
		return CertSelfSignedIP
	case c.CertMode == "manual":
		return CertManualFiles
	case c.ACMEIPCerts:
		return CertACMEIP
	}
	return CertACME
}

// CertAdvice is what the operator should do about a problem with the
// dates of the certificate served, in each certificate mode.
func (cfg *Config) CertAdvice(p relay.CertProblem) string {
	crt, key := relay.CertPaths(cfg.CertsDir(), cfg.Hostname)
	if p == relay.CertNotYetValid {
		fix := "check this machine's clock (timedatectl; in a container, the host's)"
		if cfg.Mode() == CertManualFiles {
			fix += fmt.Sprintf(", and the not-before date of %s", crt)
		}
		return fix
	}
	switch cfg.Mode() {
	case CertDev:
		return "restart: -dev makes a new certificate at every start"
	case CertSelfSignedIP:
		const steps = `docs/DEPLOY.md, "Renewing the IP certificate"`
		if ncrt, _ := relay.NextCertPaths(cfg.CertsDir(), cfg.Hostname); fileExists(ncrt) {
			return fmt.Sprintf("the next certificate is ready at %s: run `tailderp cert renew -activate` with this server's settings, then at once put its CertName (printed) into the derpMap (%s)", ncrt, steps)
		}
		return fmt.Sprintf("run `tailderp cert renew` with this server's settings: it writes the next certificate and prints the derpMap with its CertName; then `tailderp cert renew -activate`, and at once put that derpMap into the tailnet policy (%s)", steps)
	case CertManualFiles:
		return fmt.Sprintf("put a renewed certificate at %s and its key at %s (e.g. from certbot's deploy hook): they are reloaded without a restart", crt, key)
	}
	ports := "443"
	if cfg.HTTPPort >= 0 {
		ports += " or " + strconv.Itoa(cfg.HTTPPort)
	}
	reach := fmt.Sprintf("check that this server reaches the CA (%s %s) and that the CA reaches %s on port %s (DNS, firewall)",
		SettingName("acme-directory-url"), cmp.Or(cfg.ACMEDirectoryURL, "Let's Encrypt"), cfg.Hostname, ports)
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
