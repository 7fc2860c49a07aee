package main

import (
	"fmt"
	"maps"
	"net"
	"regexp"
	"slices"
	"strings"
)

// Moving from derper and its images: their names whose meaning is the
// same are aliases in settingsFor; the rest are here, each with one line
// saying what to use instead (or that it is not needed).

// foreignFlags says, for each of derper's flags that tailderp does not
// have, what to do instead.
func foreignFlags() map[string]string {
	const mesh = "not supported: put the mesh key in a file and give it with -mesh-psk-file (MESH_PSK_FILE)"
	const eab = "not supported (derper's -certmode gcp): use -acme-directory-url with a CA that needs no external account binding, or -certmode manual"
	return map[string]string{
		"c":                   "the DERP key is <state-dir>/derp.key, in derper's format: copy your derper.key there to keep the server's identity (see -state-dir)",
		"socket":              "not needed: tailderp runs its own tailnet node; give it TAILSCALE_AUTH_KEY instead of a tailscaled socket",
		"derp":                "not supported: tailderp always serves DERP",
		"acme-eab-kid":        eab,
		"acme-eab-key":        eab,
		"secrets-url":         mesh,
		"secrets-path-prefix": mesh,
		"secrets-cache-dir":   mesh,
		"ace":                 "not supported",
	}
}

// foreignEnv says, for each variable derper images use that tailderp does
// not read, what to do instead.
func foreignEnv() map[string]string {
	const key = "the DERP key is <state-dir>/derp.key, in derper's format: copy your derper.key there to keep the server's identity (STATE_DIR)"
	const socket = "not needed: tailderp runs its own tailnet node (TAILSCALE_AUTH_KEY); no tailscaled socket"
	const secrets = "not supported: put the mesh key in a file and set MESH_PSK_FILE"
	return map[string]string{
		"CONFIG_PATH":               key,
		"DERP_CONFIG":               key,
		"SOCKET":                    socket,
		"DERP_SOCKET":               socket,
		"RUN_DERP":                  "not supported: tailderp always serves DERP",
		"SECRETS_URL":               secrets,
		"SECRET_PREFIX":             secrets,
		"SECRETS_PREFIX":            secrets,
		"SECRETS_CACHEDIR":          secrets,
		"DERP_SECRETS_URL":          secrets,
		"DERP_SECRETS_PATH_PREFIX":  secrets,
		"DERP_SECRETS_CACHE_DIR":    secrets,
		"TAILSCALE_DERPER_MESH_KEY": "not read: put the mesh key in a file and set MESH_PSK_FILE",
		"VERSION_FLAG":              "not read: run `tailderp -version`",
		"DERP_ACE":                  "not supported",
		"DERP_ACE_ALLOWED_TARGET":   "not supported",
	}
}

// unknownFlagRE matches the flag package's error for a flag it does not
// know.
var unknownFlagRE = regexp.MustCompile(`^flag provided but not defined: -+(.+)$`)

// explainFlagError turns the flag package's error for an unknown flag
// into one line: derper's flags get what to use instead. Other errors pass
// through.
func explainFlagError(err error) error {
	m := unknownFlagRE.FindStringSubmatch(err.Error())
	if m == nil {
		return err
	}
	if hint, ok := foreignFlags()[m[1]]; ok {
		return fmt.Errorf("-%s is derper's and not tailderp's: %s", m[1], hint)
	}
	return fmt.Errorf("unknown flag -%s (see -help)", m[1])
}

// envNotes are the lines to tell someone whose environment still names
// what derper or its images read: one line per variable set.
func envNotes(getenv func(string) string, src sources) []string {
	var notes []string
	hints := foreignEnv()
	for _, n := range slices.Sorted(maps.Keys(hints)) {
		if getenv(n) != "" {
			notes = append(notes, fmt.Sprintf("%s is set but is not a tailderp setting: %s", n, hints[n]))
		}
	}
	// Docker sets HOSTNAME to the container's ID; camllia/derper reads the
	// public name from it. Never act on it, but say so when it looks like
	// a public name and none was given.
	if h := getenv("HOSTNAME"); src["hostname"] == "" && (strings.Contains(h, ".") || net.ParseIP(h) != nil) {
		notes = append(notes, fmt.Sprintf("HOSTNAME=%s is not read (Docker sets HOSTNAME to the container's ID): set TAILSCALE_DERP_HOSTNAME (or -hostname) to this server's public name", h))
	}
	return notes
}
