package config

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/tailderp/tailderp/node"
)

// Purpose says what a Load is for, and so what it checks and reads: every
// command reads the same settings the same way, and each checks what it
// needs of them.
type Purpose int

const (
	// Run is the server: every setting checked, every file it names read
	// (auth key, -tailnets, rate config, mesh key, CA bundles).
	Run Purpose = iota
	// DERPMap is `tailderp derpmap`: the public side's settings are
	// checked; no key or node file is read. Without -hostname the caller
	// takes the running server's settings (see Validate).
	DERPMap
	// CertRenew is `tailderp cert renew`: as DERPMap.
	CertRenew
	// Check is `tailderp check` (-local or a URL): the settings are parsed
	// and the mesh peers read, nothing more; with a URL only the flags
	// describe the target, and without one the server's settings may be
	// incomplete here (those of the running server are used).
	Check
	// Inspect is another process's command line (a server found in
	// /proc): parsed only.
	Inspect
	// Register is `tailderp register`: as DERPMap, and the policy file's
	// API settings and credentials are checked (PolicyClient).
	Register
)

// devAddr is where -dev serves unless -a (ADDR) says otherwise.
const devAddr = "127.0.0.1:3340"

// Load turns a command line and an environment ("NAME=value" entries, as
// os.Environ gives them; the first of a name wins) into a Config for
// purpose p. fs holds the command's own flags (`tailderp check`'s, `cert
// renew`'s) beside the settings; nil makes one named "tailderp". Load
// prints nothing and writes nothing: an error is one line (several for
// derper's flags, each naming what to use instead), naming the setting and
// the fix; -help returns flag.ErrHelp for the caller to print its usage
// (PrintUsage). Warnings about the input are in Config.Notes.
func Load(p Purpose, fs *flag.FlagSet, args []string, env []string) (*Config, error) {
	if fs == nil {
		fs = flag.NewFlagSet("tailderp", flag.ContinueOnError)
	}
	c, err := parse(fs, args, env)
	if err != nil || p == Inspect || p == Check {
		return c, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q (settings are flags: see %s -help)", fs.Arg(0), fs.Name())
	}
	if p == Register {
		if _, err := c.PolicyClient(); err != nil {
			return nil, err
		}
	}
	if p == DERPMap || p == CertRenew || p == Register {
		if c.Hostname == "" {
			return c, nil // the running server's settings are used, or Validate says what is missing
		}
		return c, c.Validate()
	}
	if err := c.ReadAuthKey(); err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if err := c.readTailnetsFile(); err != nil {
		return nil, err
	}
	if c.MaxConnsPerTailnet > 0 && (len(c.extraTailnets) == 0 || !c.VerifyClients) {
		return nil, fmt.Errorf("%s %d: a tailnet's share applies when the relay serves several tailnets (%s); with one, bound the relay with %s or %s instead",
			SettingName("max-conns-per-tailnet"), c.MaxConnsPerTailnet, SettingName("tailnets"), SettingName("max-conns-per-ip"), SettingName("accept-connection-limit"))
	}
	if err := c.checkRateConfig(); err != nil {
		return nil, err
	}
	// Only the server needs the key: `tailderp derpmap` prints the fleet
	// from -mesh-with alone.
	if len(c.MeshPeers()) > 0 && c.MeshPSKFile == "" {
		return nil, fmt.Errorf("%s needs %s: a file holding the fleet's mesh key, 64 hex digits (e.g. from `openssl rand -hex 32`), the same on every relay of the fleet", SettingName("mesh-with"), SettingName("mesh-psk-file"))
	}
	if c.MeshKey, err = readMeshKey(c.MeshPSKFile); err != nil {
		return nil, err
	}
	if c.MeshCABundle != "" {
		if c.MeshRoots, err = LoadCertPool(c.MeshCABundle); err != nil {
			return nil, fmt.Errorf("%s: %w", SettingName("mesh-ca-bundle"), err)
		}
	}
	if err := c.validateLogin(); err != nil {
		return nil, err
	}
	if c.Register {
		if _, err := c.PolicyClient(); err != nil {
			return nil, fmt.Errorf("%s: %w", SettingName("register"), err)
		}
	}
	return c, nil
}

// getenvOf is the lookup of env: the first entry of a name wins, as with
// os.Getenv.
func getenvOf(env []string) func(string) string {
	m := map[string]string{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		if _, ok := m[k]; !ok {
			m[k] = v
		}
	}
	return func(k string) string { return m[k] }
}

// parse reads the settings from args and env with the settings' flags
// defined on fs, then applies the -dev defaults and parses -mesh-with. It
// reads no file.
func parse(fs *flag.FlagSet, args []string, env []string) (*Config, error) {
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	getenv := getenvOf(env)
	c := &Config{}
	src, err := parseSettings(fs, settingsFor(c), args, getenv)
	if errors.Is(err, flag.ErrHelp) {
		return nil, err
	}
	if err := explainArgs(fs, args, err); err != nil {
		return nil, err
	}
	c.src = src
	c.Notes = append(envNotes(getenv, src), nearNames(env)...)
	if c.Dev {
		// -dev changes defaults only: whatever was given stays.
		if c.src["a"] == "" {
			c.Addr = devAddr
		}
		if c.src["http-port"] == "" {
			c.HTTPPort = -1
		}
		if c.Hostname == "" {
			c.Hostname = "localhost"
		}
		if c.src["verify-clients"] == "" && c.AuthKey == "" && c.AuthKeyFile == "" {
			c.VerifyClients = false
		}
		if c.src["state-dir"] == "" {
			// A try-out leaves nothing behind: no /var/lib/tailderp. The
			// server runs in a temporary directory (see NeedsTempStateDir).
			c.StateDir = ""
		}
	}
	c.mesh, c.meshSelf, c.meshErr = c.meshEntries()
	return c, nil
}

// NeedsTempStateDir reports whether the state is to live in a temporary
// directory that the server makes at start and removes at exit: -dev
// without -state-dir, so trying tailderp out writes nothing that stays (a
// new DERP key and, with an auth key, a new node at every start).
func (c *Config) NeedsTempStateDir() bool { return c.Dev && c.StateDir == "" }

// ByFlag reports whether the setting with key k (a flag name) was given
// on the command line, not by the environment: with a URL, `tailderp
// check` takes only those as describing the target.
func (c *Config) ByFlag(k string) bool { return c.src.byFlag(k) }

// Given reports whether the setting with key k was given at all, by a
// flag or the environment, rather than left at its default.
func (c *Config) Given(k string) bool { return c.src[k] != "" }

// maxKeyFileSize bounds an auth key file, a mesh key file: a key is a
// line; a bigger file is a mistake (or /dev/zero).
const maxKeyFileSize = 4 << 10

// maxSettingsFileSize bounds the other files a setting names (-tailnets,
// -rate-config, CA bundles).
const maxSettingsFileSize = 1 << 20

// ReadFileLimited reads the file at path, at most max bytes: a bigger
// file (or a device that never ends) is an error saying so, before it is
// read whole.
func ReadFileLimited(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%s: larger than %d bytes: not the file meant", path, max)
	}
	return b, nil
}

// readKeyFile reads a secret's file: bounded, trimmed, and with a warning
// in c.Notes when others than its owner may read it.
func (c *Config) readKeyFile(path, setting string) (string, error) {
	b, err := ReadFileLimited(path, maxKeyFileSize)
	if err != nil {
		return "", err
	}
	if fi, err := os.Stat(path); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o077 != 0 {
		c.Notes = append(c.Notes, fmt.Sprintf("%s %s is readable by others than its owner (mode %04o): chmod 600 it", setting, path, fi.Mode().Perm()))
	}
	return strings.TrimSpace(string(b)), nil
}

// ReadAuthKey settles the auth key, by the rule -help states: an
// -auth-key-file flag wins over TAILSCALE_AUTH_KEY; in the environment,
// TAILSCALE_AUTH_KEY wins over TAILSCALE_AUTH_KEY_FILE. The loser is
// named in Notes. Then the key is checked for a placeholder.
func (c *Config) ReadAuthKey() error {
	fromEnv := c.AuthKey != ""
	switch {
	case c.AuthKeyFile == "":
	case fromEnv && !c.src.byFlag("auth-key-file"):
		c.Notes = append(c.Notes, fmt.Sprintf("%s and %s are both set: the key of %s is used (in the environment the key itself wins; a flag -auth-key-file would win over both)", c.src["TAILSCALE_AUTH_KEY"], c.src["auth-key-file"], c.src["TAILSCALE_AUTH_KEY"]))
		c.authKeyFrom = c.src["TAILSCALE_AUTH_KEY"]
	default:
		if fromEnv {
			c.Notes = append(c.Notes, fmt.Sprintf("%s and -auth-key-file are both set: the key of -auth-key-file %s is used (a flag wins)", c.src["TAILSCALE_AUTH_KEY"], c.AuthKeyFile))
		}
		k, err := c.readKeyFile(c.AuthKeyFile, SettingName("auth-key-file"))
		if err != nil {
			return fmt.Errorf("%s: %w", SettingName("auth-key-file"), err)
		}
		if k == "" {
			return fmt.Errorf("%s %s is empty: put the auth key in it", SettingName("auth-key-file"), c.AuthKeyFile)
		}
		c.AuthKey, c.authKeyFrom = k, SettingName("auth-key-file")+" "+c.AuthKeyFile
	}
	if fromEnv && c.authKeyFrom == "" {
		c.authKeyFrom = c.src["TAILSCALE_AUTH_KEY"]
	}
	// The key matters only to the node: an open relay's shipped .env with
	// a placeholder in it (tijjjy/Tailscale-DERP-Docker) still serves.
	if err := CheckAuthKey(c.AuthKey); err != nil && c.VerifyClients {
		return fmt.Errorf("TAILSCALE_AUTH_KEY (from %s) %w", c.authKeyFrom, err)
	}
	return nil
}

// AuthKeyState says whether an auth key was given, never what it is:
// "none", "set" or "oauth-client-secret"; AuthKeyFrom says where from.
func (c *Config) AuthKeyState() string {
	switch {
	case c.AuthKey == "":
		return "none"
	case strings.HasPrefix(c.AuthKey, "tskey-client-"):
		return "oauth-client-secret"
	default:
		return "set"
	}
}

// AuthKeyFrom names where the auth key came from ("" for none): its
// variable, or the key file's setting and path, by the rule ReadAuthKey
// applies.
func (c *Config) AuthKeyFrom() string { return c.authKeyFrom }

// validateLogin checks that the node can log in: with a key, or with the
// login an earlier start left in the state directory.
func (c *Config) validateLogin() error {
	if !c.VerifyClients {
		return nil
	}
	if c.AuthKey == "" && (c.NeedsTempStateDir() || !node.HasLogin(c.NodeDir())) {
		where := c.NodeDir() + " holds no earlier login"
		if c.NeedsTempStateDir() {
			where = "-dev without -state-dir keeps no login"
		}
		return fmt.Errorf("TAILSCALE_AUTH_KEY is not set and %s: set TAILSCALE_AUTH_KEY (or TAILSCALE_AUTH_KEY_FILE) to an auth key of your tailnet so the relay can admit its clients, or set -verify-clients=false to run an open relay", where)
	}
	return nil
}

// Subcommands are the first arguments that are not a server's: a process
// started with one is no server (internal/serving skips it).
var Subcommands = []string{"derpmap", "check", "cert", "register", "drain"}
