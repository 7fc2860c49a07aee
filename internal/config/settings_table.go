package config

import (
	"flag"
	"fmt"
	"io"
	"strings"
)

// writeSettingsTable writes the settings as a Markdown table, grouped as
// in --help; README.md carries its output (kept in step by a test).
// WriteSettingsTable writes the README's table of settings (markdown, by
// group), made from the one table of settings.
func WriteSettingsTable(w io.Writer) {
	cfg := &Config{}
	settings := settingsFor(cfg)
	fs := flag.NewFlagSet("tailderp", flag.ContinueOnError)
	for _, s := range settings {
		if s.flag != "" {
			s.bind(fs, s.flag, s.usage)
		}
	}
	for _, g := range settingGroups {
		fmt.Fprintf(w, "\n**%s**\n\n| flag | environment | default | meaning |\n|---|---|---|---|\n", g)
		for _, s := range settings {
			if s.group != g {
				continue
			}
			env := "`" + s.env + "`"
			for _, a := range s.aliases {
				env += ", `" + a + "`"
			}
			flagName, def := "—", ""
			if s.flag != "" {
				flagName = "`-" + s.flag + "`"
				if d := fs.Lookup(s.flag).DefValue; d != "" {
					def = "`" + d + "`"
				}
			}
			fmt.Fprintf(w, "| %s | %s | %s | %s |\n", flagName, env, def, strings.ReplaceAll(s.usage, "|", `\|`))
		}
	}
}
