// Package registercmd is `tailderp register`: it writes this relay's
// derpMap region — exactly what `tailderp derpmap` prints inside
// "derpMap" — into the Tailscale policy file through the API (package
// policy), keeping everything else in the file. It reads the relay's own
// settings (the same flags and environment as the server) and the API's
// credentials from the environment only.
package registercmd

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/tailscale/hujson"
	"tailscale.com/tailcfg"

	"github.com/tailderp/tailderp/internal/config"
	"github.com/tailderp/tailderp/policy"
)

// Region is this relay's region for cfg, as `tailderp derpmap` prints it
// (the running server's when there is one; with -mesh-with the fleet's).
// Notes are said on stderr. An error that is the settings' fault is a
// SettingsError (exit 2); any other error exits 1.
type Region func(cfg *config.Config) (region *tailcfg.DERPRegion, notes []string, err error)

// SettingsError marks an error as the settings' fault (exit 2): a
// Region error, or the server's (a manual certificate that does not load).
type SettingsError struct{ Err error }

func (e SettingsError) Error() string { return e.Err.Error() }
func (e SettingsError) Unwrap() error { return e.Err }

// timeout bounds the whole command: a few reads and writes of the file.
const timeout = 2 * time.Minute

// Run is `tailderp register`: args are the command's arguments (after
// "register"), env the environment ("NAME=value"). Outcomes go to stdout,
// one line each (a dry run prints the diff first); errors and notes to
// stderr. Exit status: 0 written, unchanged or dry run; 1 the API refused
// or failed, or there is no region yet; 2 bad settings or credentials.
func Run(args []string, env []string, stdout, stderr io.Writer, region Region) int {
	fs := flag.NewFlagSet("tailderp register", flag.ContinueOnError)
	dryRun := fs.Bool("dry-run", false, "print the change to the policy file as a diff, and write nothing")
	remove := fs.Bool("remove", false, "take this relay's node out of the region (and the region, when it is the last node)")
	cfg, err := config.Load(config.Register, fs, args, env)
	if errors.Is(err, flag.ErrHelp) {
		printUsage(stderr)
		return 0
	}
	say := func(format string, a ...any) { fmt.Fprintf(stderr, "tailderp register: "+format+"\n", a...) }
	if err != nil {
		say("%v", err)
		return 2
	}
	client, err := cfg.PolicyClient()
	for _, n := range cfg.Notes {
		say("%s", n)
	}
	if err != nil {
		say("%v", err)
		return 2
	}
	r, notes, err := region(cfg)
	for _, n := range notes {
		say("%s", n)
	}
	if err != nil {
		say("%v", err)
		if _, bad := errors.AsType[SettingsError](err); bad {
			return 2
		}
		return 1
	}
	if r == nil || len(r.Nodes) == 0 {
		say("this relay has no region to write")
		return 1
	}

	edit, what := policy.SetRegion(r), fmt.Sprintf("region %d (%s)", r.RegionID, nodes(len(r.Nodes)))
	var own *tailcfg.DERPNode
	if *remove {
		if own, err = ownNode(cfg, r); err != nil {
			say("%v", err)
			return 2
		}
		edit = policy.RemoveNode(r.RegionID, own.HostName, port(own))
	}

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	res, err := client.Apply(ctx, edit, *dryRun)
	if res != nil {
		for _, w := range res.Warnings {
			say("the API's validation warns: %s", w)
		}
	}
	if err != nil {
		msg := err.Error()
		if fix := config.PolicyAdvice(err); fix != "" {
			msg += " (" + fix + ")"
		}
		say("%s", msg)
		return 1
	}
	tailnet := cfg.Tailnet
	concurrent := ""
	if res.Attempts > 1 {
		concurrent = fmt.Sprintf(" (the file was read again after %d concurrent %s, which are kept)", res.Attempts-1, plural(res.Attempts-1, "edit", "edits"))
	}
	switch {
	case !res.Changed && *remove:
		fmt.Fprintf(stdout, "unchanged: region %d has no node %s; nothing written\n", r.RegionID, nodeID(own))
	case !res.Changed:
		fmt.Fprintf(stdout, "unchanged: region %d is already what it would write; nothing written\n", r.RegionID)
	case *dryRun:
		fmt.Fprint(stdout, res.Diff)
		if *remove {
			what = "node " + nodeID(own) + " out of region " + strconv.Itoa(r.RegionID)
		}
		fmt.Fprintf(stdout, "dry run: would write %s in tailnet %s; nothing written\n", what, tailnet)
	case *remove:
		if left := regionIn(res.File, r.RegionID); left != nil {
			fmt.Fprintf(stdout, "written: node %s removed from region %d (%s left) in tailnet %s%s\n", nodeID(own), r.RegionID, nodes(len(left.Nodes)), tailnet, concurrent)
		} else {
			fmt.Fprintf(stdout, "written: region %d removed with its last node, %s, in tailnet %s%s\n", r.RegionID, nodeID(own), tailnet, concurrent)
		}
	default:
		fmt.Fprintf(stdout, "written: %s in tailnet %s%s\n", what, tailnet, concurrent)
	}
	return 0
}

// ownNode is this relay's node in r: the one at -hostname and the port of
// -a, or r's only node.
func ownNode(cfg *config.Config, r *tailcfg.DERPRegion) (*tailcfg.DERPNode, error) {
	if cfg.Hostname != "" {
		https, _ := cfg.ConfiguredPorts()
		for _, n := range r.Nodes {
			if strings.EqualFold(strings.TrimSuffix(n.HostName, "."), strings.TrimSuffix(cfg.Hostname, ".")) && (https == 0 || port(n) == https) {
				return n, nil
			}
		}
	}
	if len(r.Nodes) == 1 {
		return r.Nodes[0], nil
	}
	return nil, fmt.Errorf("-remove: no node of region %d is this relay's: give %s (and %s) as the server has them", r.RegionID, config.SettingName("hostname"), config.SettingName("a"))
}

// port is a node's HTTPS port (0 in a derpMap means 443).
func port(n *tailcfg.DERPNode) int {
	if n.DERPPort == 0 {
		return 443
	}
	return n.DERPPort
}

func nodeID(n *tailcfg.DERPNode) string {
	return n.HostName + ":" + strconv.Itoa(port(n))
}

// regionIn is region id of a policy file, nil when it has none.
func regionIn(file []byte, id int) *tailcfg.DERPRegion {
	b, err := hujson.Standardize(append([]byte(nil), file...))
	if err != nil {
		return nil
	}
	var p struct {
		DERPMap struct {
			Regions map[string]*tailcfg.DERPRegion
		} `json:"derpMap"`
	}
	if json.Unmarshal(b, &p) != nil {
		return nil
	}
	return p.DERPMap.Regions[strconv.Itoa(id)]
}

func nodes(n int) string { return strconv.Itoa(n) + " " + plural(n, "node", "nodes") }

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

func printUsage(w io.Writer) {
	fmt.Fprint(w, `tailderp register: write this relay's derpMap region into the Tailscale
policy file, through Tailscale's API.

Usage:
  tailderp register [-dry-run] [-remove] [flags]

The region is what tailderp derpmap prints: the running server's on this
machine when there is one, else the settings' (with -mesh-with, the
fleet's). The file is read, region N of "derpMap"."Regions" is replaced or
added, everything else is kept byte for byte (comments, order, other
regions, acls), the result is validated and written only if nobody wrote
in between (If-Match; on a concurrent edit it reads again and reapplies).
When the region is already there, nothing is written.

  -dry-run   print the change as a diff; write nothing
  -remove    take this relay's node out (the region too, when it is the last)

It takes the server's own settings (see tailderp -help), and:
  -api-url   [env TAILSCALE_API_URL]   Tailscale's API (default https://api.tailscale.com)
  -tailnet   [env TAILSCALE_TAILNET]   "-" (the credentials' own tailnet) or the tailnet ID
Credentials, from the environment only, never printed:
  TAILSCALE_API_KEY                    an access token (tskey-api-…), or
  TAILSCALE_OAUTH_CLIENT_ID, TAILSCALE_OAUTH_CLIENT_SECRET
                                       an OAuth client with the policy_file scope

Exit status: 0 written, unchanged or dry run; 1 the API refused or failed;
2 bad settings or credentials. The server keeps its region written itself
with -register (REGISTER=true).
`)
}
