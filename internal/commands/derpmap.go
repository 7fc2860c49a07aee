package commands

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"

	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/internal/config"
	"github.com/tailderp/tailderp/internal/registercmd"
	"github.com/tailderp/tailderp/internal/serving"
	"github.com/tailderp/tailderp/relay"
)

// WriteSnippet writes the derpMap snippet of r between two banner lines,
// as the server prints it at start.
func WriteSnippet(w io.Writer, r *tailcfg.DERPRegion) error {
	b, err := relay.PolicySnippet(r)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "--- derpMap for your tailnet policy file (merge into its \"derpMap\") ---\n%s\n---\n", b)
	return err
}

// printSnippet writes the region as pure JSON, as `tailderp derpmap` does.
func printSnippet(w io.Writer, r *tailcfg.DERPRegion) error {
	b, err := relay.PolicySnippet(r)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

// withCertName returns a copy of r, this relay's one-node region, whose
// node is pinned by certName.
func withCertName(r *tailcfg.DERPRegion, certName string) *tailcfg.DERPRegion {
	c := *r
	n := *r.Nodes[0]
	n.CertName = certName
	c.Nodes = []*tailcfg.DERPNode{&n}
	return &c
}

// DERPMap is `tailderp derpmap ARGS` with the environment env ("NAME=value"
// entries): it prints the snippet as JSON on stdout (notes go to stderr),
// without serving, and returns the exit code: 0 printed, 1 nothing to
// print yet, 2 bad settings.
func DERPMap(args []string, env []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("tailderp derpmap", flag.ContinueOnError)
	cfg, err := config.Load(config.DERPMap, fs, args, env)
	if errors.Is(err, flag.ErrHelp) {
		printDERPMapUsage(stderr)
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "tailderp derpmap: %v\n", err)
		return 2
	}
	for _, n := range cfg.Notes {
		fmt.Fprintf(stderr, "tailderp derpmap: %s\n", n)
	}
	region, notes, err := Region(cfg)
	for _, n := range notes {
		fmt.Fprintf(stderr, "tailderp derpmap: %s\n", n)
	}
	if _, bad := errors.AsType[SettingsError](err); bad {
		fmt.Fprintf(stderr, "tailderp derpmap: %v\n", err)
		return 2
	}
	if err != nil {
		fmt.Fprintf(stderr, "tailderp derpmap: %v\n", err)
		return 1
	}
	if err := printSnippet(stdout, region); err != nil {
		fmt.Fprintf(stderr, "tailderp derpmap: %v\n", err)
		return 1
	}
	return 0
}

// SettingsError is a Region error that is the settings' fault (exit 2).
type SettingsError = registercmd.SettingsError

// Region is the region `tailderp derpmap` prints for cfg, and `tailderp
// register` writes: the running server's (derpMapRegion), with
// -mesh-with the fleet's; notes are for stderr. An error that is the
// settings' fault is a SettingsError.
func Region(cfg *config.Config) (*tailcfg.DERPRegion, []string, error) {
	region, note, err := derpMapRegion(cfg)
	if err != nil {
		return nil, nil, err
	}
	var notes []string
	if note != "" {
		notes = append(notes, note)
	}
	if fleet := cfg.FleetRegion(region); len(fleet.Nodes) > 1 {
		notes = append(notes, fmt.Sprintf("the fleet's region: this relay and %d peers of %s, in its order (clients use the first node they reach); peers are assumed to serve STUN like this relay", len(fleet.Nodes)-1, settingName("mesh-with")))
		region = fleet
	}
	return region, notes, nil
}

// derpMapRegion is this relay's derpMap region: as the running server on
// this machine serves it (its serving.json) when one is found for the same
// -hostname (or cfg names none), else as cfg describes it. note says
// which, or what the snippet cannot know.
func derpMapRegion(cfg *config.Config) (r *tailcfg.DERPRegion, note string, err error) {
	if s, _, from, _ := serving.Running(cfg); s != nil && (cfg.Hostname == "" || strings.EqualFold(cfg.Hostname, s.ServerName)) {
		return s.Region, fmt.Sprintf("as the running server (pid %d) serves it (%s)", s.PID, from), nil
	}
	// The node is not started: no auth key is needed to print.
	if err := cfg.Validate(); err != nil {
		return nil, "", SettingsError{Err: err}
	}
	httpsPort, stunPort := cfg.ConfiguredPorts()
	certName := ""
	switch cfg.Mode() {
	case config.CertSelfSignedIP:
		cur, err := cfg.CurrentIPCert()
		if err != nil {
			return nil, "", err
		}
		certName = cur.CertName
	case config.CertDev:
		note = "-dev makes a new certificate at every start, and no running server was found that says its CertName (a -dev server without -state-dir keeps it in a temporary directory): it is in the server's output, or give both the same -state-dir"
	}
	return cfg.DERPRegion(httpsPort, stunPort, certName), note, nil
}

func printDERPMapUsage(w io.Writer) {
	fmt.Fprint(w, `tailderp derpmap: print the derpMap snippet for your tailnet policy file, as JSON
on stdout (merge its "derpMap" into the policy; Headscale: see docs/DEPLOY.md).

Usage:
  tailderp derpmap [flags]

It takes the server's own settings (flags and environment, see tailderp -help):
-hostname, -a, -stun-port, -stun, -certmode, -certdir, -state-dir, -region-id,
-region-code, -region-name, -ipv4, -ipv6, -mesh-with. With -mesh-with the
region is the fleet's: a node for this relay and one for each peer, in the
list's order (a peer's node has its host, port and pin from its entry, its
address when the entry is an IP, and this relay's STUN port). While the server runs on this
machine, it prints what that server serves (its serving.json in the state
directory): the bound ports and the certificate pin. In IP mode the pin is
read from the certificate in the certificate directory. Notes go to stderr.

Exit status: 0 printed, 1 nothing to print yet (IP mode before the first
start), 2 bad settings.
`)
}
