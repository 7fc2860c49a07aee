package config

import (
	"fmt"
	"slices"
	"strings"
)

// ourPrefixes start the names of tailderp's settings: an unknown name
// with one of them is likely a mistyped setting.
var ourPrefixes = []string{"TAILSCALE_", "TS_", "DERP_", "STUN_", "MESH_", "VERIFY_", "ACME_", "CERT"}

// notOurs are names with our prefixes that others set and read: tsnet's
// and tailscaled's knobs (TS_DEBUG_*, TS_LOGS_DIR, …) and what container
// images set. They are never warned about.
var notOurs = []string{"TS_DEBUG_", "TS_LOGS_DIR", "TS_LOG_", "TS_PANIC_", "TS_DISABLE_", "TS_FORCE_", "TS_NO_LOGS", "TS_ENABLE_", "TS_INTERNAL_", "TS_PERMIT_", "TS_USE_", "TS_SERVE_", "TS_OMIT_", "TS_STATE_DIR", "TS_SOCKET", "TS_USERSPACE", "TS_TEST_", "TS_NETMON_", "TS_HEALTH_", "TAILSCALE_USE_", "TS_DNS_", "TS_GO_", "TS_KUBE_", "TS_CERT_"}

// ourNames are every environment name tailderp reads: its settings, their
// aliases, and derper's names it explains (migrate.go).
func ourNames() []string {
	var names []string
	for _, s := range settingsFor(&Config{}) {
		names = append(names, s.env)
		names = append(names, s.aliases...)
	}
	for n := range foreignEnv() {
		names = append(names, n)
	}
	return names
}

// nearNames are the warnings about env names that are not ours but look
// like one of ours: a small edit away ("STUN_PROT is not a setting; did
// you mean STUN_PORT?"), or one of our prefixes with an unknown rest. One
// line per name.
func nearNames(env []string) []string {
	ours := ourNames()
	var out []string
	seen := map[string]bool{}
	for _, kv := range env {
		n, v, _ := strings.Cut(kv, "=")
		if n == "" || v == "" || seen[n] || slices.Contains(ours, n) || n == "HOSTNAME" {
			continue
		}
		seen[n] = true
		best, bestD := "", 3
		for _, o := range ours {
			if d := editDistance(n, o); d < bestD {
				best, bestD = o, d
			}
		}
		// A short name is "near" many others by chance: ask for a closer
		// match there.
		if best != "" && (bestD == 1 || len(n) >= 8) && !foreignKnob(n) {
			out = append(out, fmt.Sprintf("%s is not a setting; did you mean %s?", n, best))
			continue
		}
		if foreignKnob(n) {
			continue
		}
		for _, p := range ourPrefixes {
			if strings.HasPrefix(n, p) {
				out = append(out, fmt.Sprintf("%s is not a setting, though it starts like tailderp's (%s…): see tailderp -help for the names", n, p))
				break
			}
		}
	}
	slices.Sort(out)
	return out
}

// foreignKnob reports whether n is a variable of tsnet or of the system
// that merely shares a prefix with ours.
func foreignKnob(n string) bool {
	for _, p := range notOurs {
		if strings.HasPrefix(n, p) {
			return true
		}
	}
	return false
}

// editDistance is the Levenshtein distance of a and b, with a swap of two
// neighbours counted as one edit (STUN_PROT, STUN_PORT).
func editDistance(a, b string) int {
	d := make([][]int, len(a)+1)
	for i := range d {
		d[i] = make([]int, len(b)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(a); i++ {
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(a)][len(b)]
}
