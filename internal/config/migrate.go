package config

import (
	"errors"
	"flag"
	"fmt"
	"maps"
	"net"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"unicode"
)

// Moving from derper and its images: their names whose meaning is the
// same are aliases in settingsFor; the rest are here, each with one line
// saying what to use instead (or that it is not needed). Every name is
// said, whatever its value: someone who wrote it down meant something by
// it, and tailderp does not do it.
//
// The images, whose environment packaging/derper_images_test.go runs the
// binary with, as their repositories ship it:
//   - camllia/derper: github.com/XavierAlpha/derper, Dockerfile (ENV) and
//     README.md;
//   - ghcr.io/kaaanata/derper: github.com/kaaanata/derper-docker,
//     Dockerfile and entrypoint.sh (fredliang44/derper-docker's README
//     points at it);
//   - docker.horse/oss-images/derper: its README.md, Dockerfile (ENV) and
//     src/entrypoint.sh (derived from kaaanata/derper-docker);
//   - ngc7331/derper: github.com/ngc7331/docker-derper, Dockerfile and
//     root/etc/s6-overlay/s6-rc.d/svc-derper/run;
//   - tijjjy/Tailscale-DERP-Docker: .env and init.sh.

// foreignFlags says, for each of derper's flags that tailderp does not
// have, what to do instead. With tailderp's own flags of the same names,
// this covers every flag of cmd/derper/derper.go (tailscale.com v1.102.5;
// packaging/derper_images_test.go reads that file to keep it so).
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
		"ace":                 "not supported: tailderp has no ACE CONNECT proxy",
		"version":             "`tailderp -version`, alone on the command line, prints the version",
	}
}

// foreignBoolFlags are the flags of foreignFlags that take no value, so
// the argument after them is not theirs.
func foreignBoolFlags() []string { return []string{"derp", "ace", "version"} }

// foreignEnv says, for each variable derper images use that tailderp does
// not read, what to do instead.
func foreignEnv() map[string]string {
	const key = "the DERP key is <state-dir>/derp.key, in derper's format: copy your derper.key there to keep the server's identity (STATE_DIR)"
	const socket = "not needed: tailderp runs its own tailnet node (TAILSCALE_AUTH_KEY); no tailscaled socket"
	const secrets = "not supported: put the mesh key in a file and set MESH_PSK_FILE"
	const ace = "not supported: tailderp has no ACE CONNECT proxy"
	const eab = "not supported (derper's -certmode gcp): set ACME_DIRECTORY_URL to a CA that needs no external account binding, or CERTMODE=manual"
	const acmesh = "not read: tailderp has no acme.sh; CERTMODE=letsencrypt gets and renews the certificate itself (HTTP-01 on port 80 or TLS-ALPN-01 on 443, no DNS-01), or keep acme.sh outside and use CERTMODE=manual with CERTDIR"
	const user = "not read: tailderp's image runs as uid:gid 65532:65532; pick another with compose's user: (docker run --user) and make the state volume writable by it"
	return map[string]string{
		// derper's -c, -version and -derp, under the images' names.
		"CONFIG_PATH":  key,                                          // camllia/derper
		"DERP_CONFIG":  key,                                          // docker.horse/oss-images/derper
		"VERSION_FLAG": "not read: run `tailderp -version`",          // camllia/derper
		"RUN_DERP":     "not supported: tailderp always serves DERP", // camllia/derper

		// derper's -verify-clients through a tailscaled socket.
		"SOCKET":      socket, // camllia/derper
		"DERP_SOCKET": socket,

		// derper's mesh key from setec, or from a variable.
		"SECRETS_URL":               secrets, // camllia/derper
		"SECRET_PREFIX":             secrets, // camllia/derper (older Dockerfile)
		"SECRETS_PREFIX":            secrets, // camllia/derper
		"SECRETS_CACHEDIR":          secrets, // camllia/derper
		"DERP_SECRETS_URL":          secrets,
		"DERP_SECRETS_PATH_PREFIX":  secrets,
		"DERP_SECRETS_CACHE_DIR":    secrets,
		"TAILSCALE_DERPER_MESH_KEY": "not read: put the mesh key in a file and set MESH_PSK_FILE", // docker.horse/oss-images/derper

		// docker.horse/oss-images/derper's patched derper.
		"DERP_ACE":                ace,
		"DERP_ACE_ALLOWED_TARGET": ace,
		"TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_MAX_AGE_MS": "not read: a patched derper's; tailderp runs upstream derpserver, which has no send-queue age limit",

		// ngc7331/derper: ports as numbers, switches, acme.sh, the
		// linuxserver base image's user.
		"DERP_PORT_HTTPS":     "not read: set ADDR=:<port> (-a); tailderp serves HTTPS on ADDR's port, 443 unless set",
		"DERP_ENABLE_HTTP":    "not read: plain HTTP is on (HTTP_PORT, 80); HTTP_PORT=-1 turns it off",
		"DERP_ACME_EABKID":    eab,
		"DERP_ACME_EABKEY":    eab,
		"ACME_SH_EMAIL":       acmesh + "; the ACME account's contact is ACME_EMAIL",
		"ACME_SH_DNSAPI":      acmesh,
		"ACME_SH_CA":          acmesh + "; another CA is ACME_DIRECTORY_URL",
		"ACME_SH_FORCE_RENEW": acmesh,
		"PUID":                user,
		"PGID":                user,
	}
}

// certModeHint says what to do about a -certmode value of derper or of a
// derper image that tailderp does not have ("" for any other).
func certModeHint(mode string) string {
	switch mode {
	case "gcp":
		return " (derper's gcp mode, a CA with external account binding, is not supported: use letsencrypt with -acme-directory-url for a CA that needs no binding, or manual)"
	case "acme.sh": // ngc7331/derper
		return " (tailderp has no acme.sh: letsencrypt gets and renews the certificate itself, or keep acme.sh outside and use manual with -certdir)"
	}
	return ""
}

// unknownFlagRE matches the flag package's error for a flag it does not
// know, and badSyntaxRE its error for an argument that is no flag at all
// ("-=x", "---x"). Both quote the argument raw, control characters and all.
var (
	unknownFlagRE = regexp.MustCompile(`(?s)^flag provided but not defined: -+(.+)$`)
	badSyntaxRE   = regexp.MustCompile(`(?s)^bad flag syntax: (.*)$`)
)

// explainArgs turns what is wrong with a command line into one line per
// thing to change: derper's program name in front of the flags, each of
// derper's flags tailderp does not have, with what to use instead, and
// unknown flags. err is the flag package's error (nil if it parsed); other
// errors pass through: the flag package quotes the values in them. An
// argument with a control character in it (a stray CR from a file edited
// on Windows, say) is shown quoted, so each line stays one line. Each line after the first starts with fs's name, as
// the caller prints the first.
func explainArgs(fs *flag.FlagSet, args []string, err error) error {
	derper := len(args) > 0 && path.Base(args[0]) == "derper"
	var m []string
	if err != nil {
		if bad := badSyntaxRE.FindStringSubmatch(err.Error()); bad != nil {
			err = fmt.Errorf("bad flag syntax: %s (see -help)", shownArg(bad[1]))
		}
		m = unknownFlagRE.FindStringSubmatch(err.Error())
	}
	if !derper && m == nil {
		return err
	}
	var lines []string
	if derper {
		// Compose's command: as derper images have it ("derper -a :443 …"):
		// the flag package stops at the first argument that is no flag.
		lines = append(lines, fmt.Sprintf("the command line starts with %q, derper's program: tailderp's image runs /tailderp with the command's arguments, so drop %q and keep the flags", args[0], args[0]))
		args = args[1:]
		if err != nil && m == nil {
			lines = append(lines, err.Error())
		}
	}
	unknown := ""
	if m != nil {
		unknown = m[1]
	}
	hints := foreignFlags()
	found, others := undefinedFlags(fs, args)
	if _, ok := hints[unknown]; ok && !slices.Contains(found, unknown) {
		found = append(found, unknown)
	} else if !ok && unknown != "" && !slices.Contains(others, unknown) {
		others = append(others, unknown)
	}
	for _, name := range found {
		lines = append(lines, fmt.Sprintf("-%s is derper's and not tailderp's: %s", name, hints[name]))
	}
	for _, name := range others {
		lines = append(lines, fmt.Sprintf("unknown flag %s (see -help)", shownArg("-"+name)))
	}
	return errors.New(strings.Join(lines, "\n"+fs.Name()+": "))
}

// undefinedFlags returns the flags among args that fs does not define, in
// order, once each: derper's that tailderp does not have, and the others.
// It reads args as the flag package would, but on past where that stops:
// the value after a flag that takes one is skipped, and so is any other
// argument that is no flag (an unknown flag is taken to have no value).
func undefinedFlags(fs *flag.FlagSet, args []string) (derpers, others []string) {
	hints := foreignFlags()
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			break
		}
		if len(a) < 2 || a[0] != '-' {
			continue
		}
		name, _, inline := strings.Cut(strings.TrimPrefix(strings.TrimPrefix(a, "-"), "-"), "=")
		takesValue := false
		if f := fs.Lookup(name); f != nil {
			b, ok := f.Value.(interface{ IsBoolFlag() bool })
			takesValue = !ok || !b.IsBoolFlag()
		} else if _, ok := hints[name]; ok {
			if !slices.Contains(derpers, name) {
				derpers = append(derpers, name)
			}
			takesValue = !slices.Contains(foreignBoolFlags(), name)
		} else if !slices.Contains(others, name) {
			others = append(others, name)
		}
		if takesValue && !inline {
			i++
		}
	}
	return derpers, others
}

// shownArg is a command-line argument as a message shows it: as it is, or
// quoted if it holds anything but printable characters.
func shownArg(a string) string {
	if strings.IndexFunc(a, func(r rune) bool { return !unicode.IsPrint(r) }) >= 0 {
		return strconv.Quote(a)
	}
	return a
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
	// public name from it (its Dockerfile sets HOSTNAME=127.0.0.1). Never
	// act on it, but say so when it looks like a public name and none was
	// given.
	if h := getenv("HOSTNAME"); src["hostname"] == "" && (strings.Contains(h, ".") || net.ParseIP(h) != nil) {
		notes = append(notes, fmt.Sprintf("%s%s is not read (Docker sets HOSTNAME to the container's ID): set TAILSCALE_DERP_HOSTNAME (or -hostname) to this server's public name", hostnameNotePrefix, h))
	}
	return notes
}

// hostnameNotePrefix starts the note about HOSTNAME.
const hostnameNotePrefix = "HOSTNAME="

// missingHostnameHint is what to add to the error for a missing -hostname:
// the note about HOSTNAME when there is one, since that is where the name
// was, for camllia/derper.
func missingHostnameHint(notes []string) string {
	for _, n := range notes {
		if strings.HasPrefix(n, hostnameNotePrefix) {
			return "; " + n
		}
	}
	return ""
}
