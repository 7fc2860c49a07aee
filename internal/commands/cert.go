package commands

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/internal/config"
	"github.com/tailderp/tailderp/internal/serving"
	"github.com/tailderp/tailderp/relay"
)

// Cert is `tailderp cert renew [-activate]`: the renewal of an IP-only
// server's self-signed certificate, whose pin clients hold. Tailscale
// clients accept exactly the pinned certificate and do not try another
// node after a TLS failure, so a new certificate is a new pin that every
// client must be given; the renewal is two steps so the switch is as
// short as the protocol allows (docs/DEPLOY.md, "Renewing the IP
// certificate"):
//
//   - `cert renew` writes the next pair beside the current one (which the
//     relay keeps serving) and prints the derpMap with the new pin;
//   - `cert renew -activate` moves it into place: the running relay serves
//     it from its next handshake. The operator saves the new derpMap right
//     after, and each client reconnects with the new pin as it gets it.
//
// args follow "cert"; env holds "NAME=value" entries. It returns the
// exit code: 0 done, 1 failed, 2 bad settings.
func Cert(args []string, env []string, stdout, stderr io.Writer) int {
	switch {
	case len(args) > 0 && args[0] == "renew":
	case len(args) > 0 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help"):
		printCertUsage(stderr)
		return 0
	default:
		printCertUsage(stderr)
		return 2
	}
	fs := flag.NewFlagSet("tailderp cert renew", flag.ContinueOnError)
	activate := fs.Bool("activate", false, "make the next certificate (written by `tailderp cert renew`) the one served")
	cfg, err := config.Load(config.CertRenew, fs, args[1:], env)
	if errors.Is(err, flag.ErrHelp) {
		printCertUsage(stderr)
		return 0
	}
	if err == nil && cfg.Hostname == "" {
		// Run with no settings beside a server (`sudo tailderp cert
		// renew`): take the running server's.
		if _, scfg, _, _ := serving.Running(cfg); scfg != nil {
			cfg = scfg
		}
		err = cfg.Validate()
	}
	if err == nil {
		err = renewableHere(cfg)
	}
	if err != nil {
		fmt.Fprintf(stderr, "tailderp cert renew: %v\n", err)
		return 2
	}
	if *activate {
		err = activateNext(cfg, stdout, stderr)
	} else {
		err = writeNext(cfg, stdout, stderr)
	}
	if err != nil {
		fmt.Fprintf(stderr, "tailderp cert renew: %v\n", err)
		return 1
	}
	return 0
}

// renewableHere says why cfg's certificate is not one `cert renew` makes.
func renewableHere(cfg *config.Config) error {
	switch cfg.Mode() {
	case config.CertSelfSignedIP:
		return nil
	case config.CertDev:
		return errors.New("-dev makes a new certificate at every start: there is nothing to renew")
	case config.CertManualFiles:
		crt, key := relay.CertPaths(cfg.CertsDir(), cfg.Hostname)
		return fmt.Errorf("%s %s is a DNS name: its certificate comes from your own tooling (certbot, acme.sh); put the renewed certificate at %s and its key at %s, and the relay reloads them without a restart. `tailderp cert renew` is for the self-signed certificate of an IP-only server", settingName("hostname"), cfg.Hostname, crt, key)
	}
	return fmt.Errorf("-certmode %s renews its certificate by itself (a third of its lifetime, at most 30 days, before it expires); `tailderp cert renew` is for the self-signed certificate of an IP-only server (%s an IP address, -certmode manual)", cfg.CertMode, settingName("hostname"))
}

// writeNext is `cert renew`: it writes the next pair (or keeps one
// written before that is still good) and prints its derpMap.
func writeNext(cfg *config.Config, stdout, stderr io.Writer) error {
	dir, ip := cfg.CertsDir(), cfg.Hostname
	cur, err := cfg.CurrentIPCert()
	if errors.Is(err, config.ErrNoCertYet) {
		return err
	}
	if err != nil {
		return fmt.Errorf("%s %s: %w", settingName("certdir"), dir, err)
	}
	ncrt, nkey := relay.NextCertPaths(dir, ip)
	now := time.Now()
	next, err := relay.ReadCertPair(ncrt, nkey, ip)
	switch {
	case err == nil && next.Problem(now) == relay.CertOK:
		fmt.Fprintf(stderr, "tailderp cert renew: the next certificate (valid until %s) is still waiting at %s; printing its pin again (delete %s and %s to make another)\n",
			next.NotAfter.UTC().Format(time.DateOnly), ncrt, ncrt, nkey)
	default:
		if next, err = relay.WriteNextSelfSignedIPCert(dir, ip); err != nil {
			return fmt.Errorf("%s %s: %w", settingName("certdir"), dir, err)
		}
		fmt.Fprintf(stderr, "tailderp cert renew: wrote the next certificate for %s to %s (valid until %s)\n",
			ip, ncrt, next.NotAfter.UTC().Format(time.DateOnly))
	}
	region, err := regionWithPin(cfg, next.CertName)
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, `The relay still serves the current certificate (valid until %s, %d days left).
Switch to the new one with the shortest outage (docs/DEPLOY.md, "Renewing the IP certificate"):
  1. Put the derpMap printed on stdout into your tailnet policy file (Headscale:
     its DERP map file), but do not save it yet. Its CertName is new:
     %s
  2. Run `+"`tailderp cert renew -activate`"+` with the same settings: the relay serves the
     new certificate from its next TLS handshake; connected clients stay connected.
  3. Save the derpMap at once. Each client reconnects with the new pin when it
     gets the map (seconds); until then, a client opening a new connection is refused.
`, cur.NotAfter.UTC().Format(time.DateOnly), cur.DaysLeft(now), next.CertName)
	return printSnippet(stdout, region)
}

// activateNext is `cert renew -activate`.
func activateNext(cfg *config.Config, stdout, stderr io.Writer) error {
	dir, ip := cfg.CertsDir(), cfg.Hostname
	ncrt, _ := relay.NextCertPaths(dir, ip)
	if _, err := os.Stat(ncrt); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("no next certificate at %s: run `tailderp cert renew` first (with the same settings)", ncrt)
	}
	info, err := relay.ActivateNextCert(dir, ip)
	if err != nil {
		return fmt.Errorf("%s %s: %w (run `tailderp cert renew` again to write a new one)", settingName("certdir"), dir, err)
	}
	region, err := regionWithPin(cfg, info.CertName)
	if err != nil {
		return err
	}
	pcrt, pkey := relay.PrevCertPaths(dir, ip)
	who := "tailderp serves it when it starts"
	if s, _, _, _ := serving.Running(cfg); s != nil {
		who = fmt.Sprintf("the running relay (pid %d) serves it from its next TLS handshake; connected clients stay connected", s.PID)
	}
	fmt.Fprintf(stderr, `tailderp cert renew: %s is now the certificate (valid until %s): %s.
Now save the derpMap with CertName %s (printed on stdout) at once: until a client
has it, its new connections are refused. The previous pair is kept as %s and %s.
`, info.File, info.NotAfter.UTC().Format(time.DateOnly), who, info.CertName, pcrt, pkey)
	return printSnippet(stdout, region)
}

// regionWithPin is the region `tailderp derpmap` prints (the fleet's,
// with -mesh-with) with this relay's node pinned by certName.
func regionWithPin(cfg *config.Config, certName string) (*tailcfg.DERPRegion, error) {
	region, _, err := derpMapRegion(cfg)
	if err != nil {
		return nil, err
	}
	return cfg.FleetRegion(withCertName(region, certName)), nil
}

func printCertUsage(w io.Writer) {
	fmt.Fprint(w, `tailderp cert renew: renew the self-signed certificate of an IP-only server
(-hostname an IP address, -certmode manual), whose pin (CertName) clients hold.

Usage:
  tailderp cert renew [flags]             write the next certificate beside the current
                                          one and print the derpMap with its pin (JSON
                                          on stdout); the relay keeps serving the current one
  tailderp cert renew -activate [flags]   make the next certificate the current one: the
                                          running relay serves it from its next handshake

It takes the server's own settings (flags and environment, see tailderp -help):
-hostname, -certmode, -certdir, -state-dir, and those of the derpMap. Run it
as the server's user, or as root (the files get the owner of the current
certificate). Steps, and the outage they imply: docs/DEPLOY.md, "Renewing the
IP certificate". A certificate from Let's Encrypt or another ACME CA needs
none of this: it renews by itself, and needs no pin.

Exit status: 0 done, 1 failed (nothing to renew yet, files), 2 bad settings.
`)
}

// PinFollower is the running server's half of the renewal: when the
// certificate it serves changes while the derpMap pins it (IP mode, after
// `cert renew -activate`), it prints the new snippet and rewrites
// serving.json, so the log, `tailderp derpmap` and `tailderp check` show
// the pin served now. The server sets its fields, hands Changed to the
// relay (relay.Server.OnCertChange) and calls Serving once it serves.
type PinFollower struct {
	Config *config.Config // the server's settings
	Out    io.Writer      // where the server prints its derpMap snippet
	Logger *slog.Logger

	mu    sync.Mutex
	pub   *serving.Publisher // nil until the server serves
	relay *relay.Server      // publishes the region at /derpmap.json
}

// Serving hands over where the server says what it serves (serving.json)
// and the relay that publishes its region.
func (f *PinFollower) Serving(pub *serving.Publisher, rs *relay.Server) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pub, f.relay = pub, rs
}

// Changed is the relay's OnCertChange.
func (f *PinFollower) Changed(st relay.CertStatus) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.pub == nil || f.Config.Mode() != config.CertSelfSignedIP {
		return
	}
	cur := f.pub.Serving().Region
	if cur.Nodes[0].CertName == st.CertName {
		return
	}
	region := withCertName(cur, st.CertName)
	f.Logger.Info("serving a new certificate, pinned by a new CertName: clients need the derpMap below", "cert_name", st.CertName,
		"not_after", st.NotAfter.UTC().Format(time.RFC3339))
	if err := WriteSnippet(f.Out, f.Config.FleetRegion(region)); err != nil {
		f.Logger.Warn("cannot print the derpMap snippet", "err", err)
	}
	if err := f.relay.PublishRegion(region); err != nil {
		f.Logger.Warn("cannot publish the new region at /derpmap.json", "err", err)
	}
	if err := f.pub.SetRegion(region); err != nil {
		f.Logger.Warn("cannot write serving.json: `tailderp derpmap` and `tailderp check -local` show the previous pin", "err", err)
	}
}
