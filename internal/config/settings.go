package config

import (
	"flag"
	"fmt"
	"io"
	"strings"
	"time"
)

// setting is one configuration knob: a flag, the environment variable
// that sets it when the flag is not given, and older names (derper's,
// popular derper images') that still work. The table of them is
// settingsFor (config.go).
type setting struct {
	flag    string   // flag name, without "-"; "" for environment-only settings
	env     string   // primary environment variable
	aliases []string // other environment variables accepted, in order
	group   string   // heading in --help
	usage   string
	bind    func(fs *flag.FlagSet, name, usage string) // defines the flag
	secret  bool                                       // never print the value
	target  *string                                    // for environment-only settings
}

// Groups in --help order.
var settingGroups = []string{"Relay", "Certificates", "Tailnet node", "Admission", "derpMap snippet", "Policy file", "Logging"}

func strVar(p *string, def string) func(*flag.FlagSet, string, string) {
	return func(fs *flag.FlagSet, name, usage string) { fs.StringVar(p, name, def, usage) }
}

func intVar(p *int, def int) func(*flag.FlagSet, string, string) {
	return func(fs *flag.FlagSet, name, usage string) { fs.IntVar(p, name, def, usage) }
}

func durationVar(p *time.Duration, def time.Duration) func(*flag.FlagSet, string, string) {
	return func(fs *flag.FlagSet, name, usage string) { fs.DurationVar(p, name, def, usage) }
}

func boolVar(p *bool, def bool) func(*flag.FlagSet, string, string) {
	return func(fs *flag.FlagSet, name, usage string) { fs.BoolVar(p, name, def, usage) }
}

func floatVar(p *float64, def float64) func(*flag.FlagSet, string, string) {
	return func(fs *flag.FlagSet, name, usage string) { fs.Float64Var(p, name, def, usage) }
}

// name is how messages name the setting: "-flag (ENV)", or "ENV" for an
// environment-only setting.
func (s *setting) name() string {
	if s.flag == "" {
		return s.env
	}
	return "-" + s.flag + " (" + s.env + ")"
}

// key identifies the setting in a sources map: its flag name, or its
// variable for an environment-only setting.
func (s *setting) key() string {
	if s.flag == "" {
		return s.env
	}
	return s.flag
}

// sources says where each setting that was given came from, by key: "-" +
// the flag name for the command line, or the environment variable's name.
// A setting left at its default is absent.
type sources map[string]string

// byFlag reports whether the setting with key k was given on the command
// line.
func (src sources) byFlag(k string) bool { return strings.HasPrefix(src[k], "-") }

// parseSettings fills the config from args, then from the environment
// for every flag not given on the command line, and says where each value
// came from. It returns a clear error naming the flag or variable on bad
// input.
func parseSettings(fs *flag.FlagSet, settings []setting, args []string, getenv func(string) string) (sources, error) {
	byFlag := map[string]*setting{}
	for i := range settings {
		s := &settings[i]
		if s.flag != "" {
			s.bind(fs, s.flag, s.usage)
			byFlag[s.flag] = s
		}
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	src := sources{}
	fs.Visit(func(f *flag.Flag) {
		if byFlag[f.Name] != nil {
			src[f.Name] = "-" + f.Name
		}
	})
	for i := range settings {
		s := &settings[i]
		if s.flag != "" && src.byFlag(s.flag) {
			continue
		}
		name, val, err := lookupEnv(s, getenv)
		if err != nil {
			return nil, err
		}
		if name == "" {
			continue
		}
		src[s.key()] = name
		if s.flag == "" {
			*s.target = val
			continue
		}
		if err := fs.Set(s.flag, val); err != nil {
			shown := val
			if s.secret {
				shown = "(hidden)"
			}
			return nil, fmt.Errorf("%s=%q: %v (it sets -%s: %s)", name, shown, err, s.flag, s.usage)
		}
	}
	return src, nil
}

// lookupEnv returns the variable that sets s and its value: the first of
// its names that is set. Two of its names set to different values are an
// error naming both, since either could be the one meant.
func lookupEnv(s *setting, getenv func(string) string) (name, val string, err error) {
	for _, n := range append([]string{s.env}, s.aliases...) {
		if n == "" {
			continue
		}
		v := getenv(n)
		switch {
		case v == "":
		case name == "":
			name, val = n, v
		case v != val:
			shown := fmt.Sprintf("%s=%q and %s=%q", name, val, n, v)
			if s.secret {
				shown = name + " and " + n + " (values not shown)"
			}
			return "", "", fmt.Errorf("%s are both set, to different values, and both set %s: keep one of them", shown, s.name())
		}
	}
	return name, val, nil
}

// PrintUsage writes tailderp -help: the subcommands, then the settings by
// group, each with its environment variable.
func PrintUsage(w io.Writer) {
	fs := flag.NewFlagSet("tailderp", flag.ContinueOnError)
	settings := settingsFor(&Config{})
	for _, s := range settings {
		if s.flag != "" {
			s.bind(fs, s.flag, s.usage)
		}
	}
	fmt.Fprintf(w, `tailderp: a DERP relay for one tailnet, with its own embedded tailnet node.

Usage:
  tailderp [flags]            run the relay
  tailderp derpmap [flags]    print the derpMap snippet for the tailnet policy and exit
  tailderp check [flags] [URL] check a relay from here (see tailderp check -h)
  tailderp cert renew [-activate] [flags]
                              renew an IP-only server's self-signed certificate (see tailderp cert -h)
  tailderp register [-dry-run] [-remove] [flags]
                              write this relay's region into the Tailscale policy file (see tailderp register -h)
  tailderp drain [-wait D] [flags]
                              stop the relay on this machine gracefully (SIGTERM) and wait for its exit (see tailderp drain -h)
  tailderp -version           print the version and exit

Every flag can also be set by the environment variable shown beside it;
a flag on the command line wins. Two names of one setting set to different
values are an error. The auth key: an -auth-key-file flag wins over
TAILSCALE_AUTH_KEY; in the environment, TAILSCALE_AUTH_KEY wins over
TAILSCALE_AUTH_KEY_FILE; the start line says which was used.
`)
	for _, g := range settingGroups {
		fmt.Fprintf(w, "\n%s:\n", g)
		for _, s := range settings {
			if s.group != g {
				continue
			}
			names := s.env
			if len(s.aliases) > 0 {
				names += " (or " + strings.Join(s.aliases, ", ") + ")"
			}
			if s.flag == "" {
				fmt.Fprintf(w, "  env %s\n", names)
				fmt.Fprintf(w, "    \t%s\n", s.usage)
				continue
			}
			f := fs.Lookup(s.flag)
			def := ""
			if f.DefValue != "" && f.DefValue != "false" {
				def = fmt.Sprintf(" (default %s)", f.DefValue)
			}
			fmt.Fprintf(w, "  -%s  [env %s]\n", s.flag, names)
			fmt.Fprintf(w, "    \t%s%s\n", s.usage, def)
		}
	}
}

// Name is a setting's names: its flag ("" for an environment-only
// setting), its variable and the variable's aliases.
type Name struct {
	Flag, Env string
	Aliases   []string
}

// Names lists every setting's names, in the table's order.
func Names() []Name {
	var out []Name
	for _, s := range settingsFor(&Config{}) {
		out = append(out, Name{Flag: s.flag, Env: s.env, Aliases: s.aliases})
	}
	return out
}

// ForeignEnv says, for each variable of derper's images that tailderp
// does not read, what to do instead (the notes Load gives when one is
// set).
func ForeignEnv() map[string]string { return foreignEnv() }
