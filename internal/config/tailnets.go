package config

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/tailscale/hujson"
	"tailscale.com/ipn"

	"github.com/tailderp/tailderp/node"
	"github.com/tailderp/tailderp/relay"
)

// The tailnets this relay serves: the default one (TAILSCALE_AUTH_KEY,
// -control-url, the node in <state-dir>/tailscale) and any more from the
// -tailnets file, each with its own embedded node in
// <state-dir>/tailnets/<name>.

// DefaultTailnet names the tailnet of TAILSCALE_AUTH_KEY in metrics, logs
// and the -tailnets file (which may not use the name).
const DefaultTailnet = "default"

// Tailnet is one tailnet's settings, worked out from the flags and
// environment (the default tailnet) or a -tailnets entry.
type Tailnet struct {
	Name       string
	Dir        string // the node's state
	Hostname   string // the node's name on the tailnet
	AuthKey    string // secret; "" once the node's state holds a login
	ControlURL string // "" for Tailscale's
	Tags       []string
	Port       int
	// KeySetting and URLSetting say, in messages, where the auth key and
	// the control URL are set.
	KeySetting, URLSetting string
}

// tailnetsFile is the -tailnets file: HuJSON (JSON with comments and
// trailing commas), every field known.
type tailnetsFile struct {
	Tailnets []json.RawMessage `json:"tailnets"`
}

// tailnetEntry is one tailnet of the file.
type tailnetEntry struct {
	Name          string   `json:"name"`
	ControlURL    string   `json:"control_url"`
	AuthKeyFile   string   `json:"auth_key_file"`
	Hostname      string   `json:"hostname"`
	AdvertiseTags []string `json:"advertise_tags"`
	TailnetPort   int      `json:"tailnet_port"`
}

// tailnetNameRE is what a tailnet's name may be: it names a directory and
// a metric label.
var tailnetNameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// tailnets returns every tailnet the relay serves, the default first.
// The extra ones come from the -tailnets file, read and checked by
// loadConfig.
func (c *Config) Tailnets() []Tailnet {
	def := Tailnet{
		Name: DefaultTailnet, Dir: c.NodeDir(), Hostname: c.tailnetHostname(), AuthKey: c.AuthKey,
		ControlURL: c.ControlURL, Tags: c.tags(), Port: c.TailnetPort,
		KeySetting: "TAILSCALE_AUTH_KEY", URLSetting: SettingName("control-url"),
	}
	return append([]Tailnet{def}, c.extraTailnets...)
}

// readTailnetsFile reads and checks the -tailnets file. Every error names
// the file and the entry.
func (c *Config) readTailnetsFile() error {
	if c.TailnetsFile == "" {
		return nil
	}
	fail := func(format string, args ...any) error {
		return fmt.Errorf("%s %s: %s", SettingName("tailnets"), c.TailnetsFile, fmt.Sprintf(format, args...))
	}
	if !c.VerifyClients {
		return fail("needs %s: the extra tailnets are admitted beside the default one (TAILSCALE_AUTH_KEY)", SettingName("verify-clients"))
	}
	b, err := ReadFileLimited(c.TailnetsFile, maxSettingsFileSize)
	if err != nil {
		return fmt.Errorf("%s: %w", SettingName("tailnets"), err)
	}
	b, err = hujson.Standardize(b)
	if err != nil {
		return fail("not JSON (HuJSON: comments and trailing commas are fine): %v", err)
	}
	var f tailnetsFile
	if err := strictJSON(b, &f); err != nil {
		return fail("%v (want {\"tailnets\": [{\"name\": …, \"control_url\": …, \"auth_key_file\": …}]})", err)
	}
	if len(f.Tailnets) == 0 {
		return fail("lists no tailnets")
	}
	names := map[string]int{}
	ports := map[int]string{}
	if c.TailnetPort != 0 {
		ports[c.TailnetPort] = "the default tailnet (" + SettingName("tailnet-port") + ")"
	}
	if c.STUN {
		ports[c.STUNPort] = "STUN (" + SettingName("stun-port") + ")"
	}
	// Two nodes on one control server would be one tailnet admitted twice
	// (or two logins racing for one): each control URL once.
	controls := map[string]string{controlKey(c.ControlURL): "the default tailnet (" + SettingName("control-url") + ")"}
	for i, raw := range f.Tailnets {
		var e tailnetEntry
		what := fmt.Sprintf("tailnet %d", i+1)
		if err := strictJSON(raw, &e); err != nil {
			return fail("%s: %v", what, err)
		}
		if e.Name != "" {
			what = fmt.Sprintf("tailnet %d (%q)", i+1, e.Name)
		}
		switch {
		case e.Name == "":
			return fail("%s: no name", what)
		case !tailnetNameRE.MatchString(e.Name):
			return fail("%s: the name must be lower-case letters, digits and dashes (it names the directory %s and a metric label)", what, filepath.Join(c.StateDir, "tailnets", "NAME"))
		case e.Name == DefaultTailnet:
			return fail("%s: %q is the name of the tailnet of TAILSCALE_AUTH_KEY (its state is %s): choose another", what, DefaultTailnet, c.NodeDir())
		case names[e.Name] > 0:
			return fail("%s: the name is also tailnet %d's: each tailnet needs its own (and its own state directory)", what, names[e.Name])
		}
		names[e.Name] = i + 1
		t := Tailnet{
			Name: e.Name, Dir: filepath.Join(c.StateDir, "tailnets", e.Name), ControlURL: e.ControlURL,
			Hostname: cmp.Or(e.Hostname, c.tailnetHostname()+"-"+e.Name), Tags: e.AdvertiseTags, Port: e.TailnetPort,
			KeySetting: fmt.Sprintf("auth_key_file of tailnet %q in %s", e.Name, c.TailnetsFile),
			URLSetting: fmt.Sprintf("control_url of tailnet %q in %s", e.Name, c.TailnetsFile),
		}
		if e.ControlURL != "" {
			if err := checkHTTPURL(e.ControlURL); err != nil {
				return fail("%s: control_url %q: %v", what, e.ControlURL, err)
			}
		}
		if !relay.ValidBootstrapDNSName(t.Hostname) || strings.Contains(t.Hostname, ".") { // not an IP address either
			return fail("%s: hostname %q: want one DNS label (letters, digits, dashes)", what, t.Hostname)
		}
		for _, tag := range t.Tags {
			if !strings.HasPrefix(tag, "tag:") {
				return fail("%s: advertise_tags %q: each tag must start with \"tag:\"", what, tag)
			}
		}
		if err := checkTailnetPort(t.Port); err != nil {
			return fail("%s: tailnet_port %v", what, err)
		}
		if other, taken := ports[t.Port]; t.Port != 0 && taken {
			return fail("%s: tailnet_port %d is also %s's", what, t.Port, other)
		}
		ports[t.Port] = e.Name
		if other, taken := controls[controlKey(e.ControlURL)]; taken {
			return fail("%s: control_url %q is also %s's: a control server is one tailnet here; give each tailnet its own control_url", what, cmp.Or(e.ControlURL, ipn.DefaultControlURL), other)
		}
		controls[controlKey(e.ControlURL)] = e.Name
		if e.AuthKeyFile != "" {
			k, err := c.readKeyFile(e.AuthKeyFile, fmt.Sprintf("auth_key_file of tailnet %q in %s", e.Name, c.TailnetsFile))
			if err != nil {
				return fail("%s: auth_key_file: %v", what, err)
			}
			if t.AuthKey = k; t.AuthKey == "" {
				return fail("%s: auth_key_file %s is empty: put the tailnet's auth key in it", what, e.AuthKeyFile)
			}
			if err := CheckAuthKey(t.AuthKey); err != nil {
				return fail("%s: auth_key_file %s holds what looks like a placeholder, not an auth key; the value is not shown", what, e.AuthKeyFile)
			}
			if strings.HasPrefix(t.AuthKey, "tskey-client-") && len(t.Tags) == 0 {
				return fail("%s: an OAuth client secret in auth_key_file needs advertise_tags, e.g. [\"tag:derp\"]", what)
			}
		} else if !node.HasLogin(t.Dir) {
			return fail("%s: no auth_key_file, and %s holds no earlier login: give the file holding an auth key of that tailnet", what, t.Dir)
		}
		c.extraTailnets = append(c.extraTailnets, t)
	}
	return nil
}

// controlKey is a control URL as compared for sameness: Tailscale's for
// "", no trailing slash, the scheme and host in lower case.
func controlKey(u string) string {
	u = strings.TrimSuffix(cmp.Or(u, ipn.DefaultControlURL), "/")
	if scheme, rest, ok := strings.Cut(u, "://"); ok {
		host, path, _ := strings.Cut(rest, "/")
		u = strings.ToLower(scheme) + "://" + strings.ToLower(host)
		if path != "" {
			u += "/" + path
		}
	}
	return u
}

// strictJSON decodes b into v: every field known, nothing after it.
func strictJSON(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("more after the JSON value")
	}
	return nil
}

// Advice is what the operator should do about a tailnet node's
// problem.
func (tc Tailnet) Advice(p node.Problem) string {
	switch p {
	case node.ProblemLoggedOut:
		return fmt.Sprintf("disable key expiry for this node in the tailnet's admin console, and restart with a new auth key (%s) if it was removed", tc.KeySetting)
	case node.ProblemNeedsApproval:
		return "approve this node in the tailnet's admin console"
	case node.ProblemLoginRejected:
		return fmt.Sprintf("check the auth key (%s): it may be mistyped, expired, revoked, for another control server, or a single-use key that was already used", tc.KeySetting)
	case node.ProblemControlUnreachable:
		return fmt.Sprintf("check that this server reaches %s (DNS, firewall, proxy) and that the control server runs; it is %s",
			cmp.Or(tc.ControlURL, ipn.DefaultControlURL), tc.URLSetting)
	case node.ProblemNodeRemoved, node.ProblemControlRefused:
		return fmt.Sprintf("the control server at %s no longer accepts this relay's node (deleted, or its key revoked): with a reusable auth key in %s the relay logs in again as a new node by itself; otherwise put a new auth key there and restart",
			cmp.Or(tc.ControlURL, ipn.DefaultControlURL), tc.KeySetting)
	case node.ProblemReloginFailed:
		return fmt.Sprintf("the auth key in %s could not log in again (single-use, expired or revoked): put a reusable auth key there and restart", tc.KeySetting)
	case node.ProblemStarting:
		return fmt.Sprintf("wait for the login to %s; if it lasts, check that this server reaches it (%s)", cmp.Or(tc.ControlURL, ipn.DefaultControlURL), tc.URLSetting)
	case node.ProblemStopped:
		return "see the log for why the tailnet's node stopped, fix it, and restart"
	}
	return string(p)
}
