package commands

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/tailderp/tailderp/check"
	"github.com/tailderp/tailderp/internal/testutil"
)

// FuzzParseCheckArgs: `tailderp check`'s command line, whose URL may stand
// before, between or after the flags, parses to options or an error of
// whole lines that never shows the auth key; where the URL stands changes
// nothing (a flag after it is parsed, a bad one reported, as when it comes
// last); the URL is one of the arguments, and when it parses, its derpMap
// node says the same when written back as a URL.
func FuzzParseCheckArgs(f *testing.F) {
	for _, s := range []struct{ args, env string }{
		{"", ""},
		{"https://derp.example.com", ""},
		{"https://derp.example.com:8443\x00-cert-name\x00sha256-raw:" + strings.Repeat("ab", 32), ""},
		{"-timeout\x005s\x00https://203.0.113.7\x00-stun-port\x003479\x00-json", "TAILSCALE_DERP_HOSTNAME=derp.example.com"},
		{"derp.example.com\x00-bogus", ""},
		{"https://derp.example.com\x00-cert-name\x00x\x00-tyop", ""},
		{"https://a\x00https://b", ""},
		{"-local", "TAILSCALE_AUTH_KEY=tskey-auth-x\x00STATE_DIR=/nonexistent"},
		{"-load\x00-pairs\x001,8\x00-sizes\x001200\x00https://[::1]:3340\x00-dev", ""},
		{"--\x00-x", ""},
		{"https://derp.example.com\x00--\x00-x", ""},
		{"-stun=false\x00https://derp.example.com/derp\x00-ipv4\x00192.0.2.1\x00-ipv6\x00none", ""},
		{"ftp://derp.example.com", ""},
		{"https://derp.example.com/path", ""},
		{"https://derp.example.com:0", ""},
		{"-h", ""},
	} {
		f.Add(s.args, s.env)
	}
	f.Fuzz(func(t *testing.T, args, env string) {
		argv := testutil.SplitNUL(args)
		getenv, envm := testutil.FuzzEnv(env)
		checkSecret := !testutil.MarkElsewhere(argv, envm)

		o, cfg, target, err := parseCheckArgs(argv, getenv, io.Discard)
		if err != nil {
			if o != nil || cfg != nil {
				t.Fatalf("parseCheckArgs returned options and an error: %v", err)
			}
			if !errors.Is(err, flag.ErrHelp) {
				testutil.CheckMessage(t, "parseCheckArgs", err.Error(), checkSecret)
			}
		}

		if err != nil {
			return
		}
		// Where the URL stands changes nothing: moved to the end (after
		// "--", so it stays the URL), the command line parses the same,
		// and the flags alone parse too (every flag counts, none is
		// dropped for standing after the URL). The URL is one of the
		// arguments; which one, when its text is there twice (as a flag's
		// value too), is the one for which this holds.
		if target != "" {
			var problems []string
			found := false
			for i, a := range argv {
				if a != target {
					continue
				}
				if i > 0 && argv[i-1] == "--" {
					found = true // "-- URL" ends the flags: nothing to move
					break
				}
				rest := slices.Concat(argv[:i], argv[i+1:])
				_, _, _, err3 := parseCheckArgs(rest, getenv, io.Discard)
				// Moved last after a "--" of its own; or, when the flags
				// already end with a "--" (one that stood after the URL
				// and ended nothing), after that one.
				for _, moved := range [][]string{slices.Concat(rest, []string{"--", target}), slices.Concat(rest, []string{target})} {
					o2, cfg2, target2, err2 := parseCheckArgs(moved, getenv, io.Discard)
					same := reflect.DeepEqual(o, o2) && reflect.DeepEqual(cfg, cfg2)
					if err2 == nil && target2 == target && same && err3 == nil {
						found = true
						break
					}
					problems = append(problems, fmt.Sprintf("URL at %d moved last (%q): %v, %q, same options %v; flags alone: %v", i, moved, err2, target2, same, err3))
				}
				if found {
					break
				}
			}
			if !found {
				t.Fatalf("%q (URL %q) parses, but %s", argv, target, strings.Join(problems, "; "))
			}
		}

		if target == "" {
			return
		}
		n, err := check.ParseURL(target)
		if err != nil {
			testutil.CheckMessage(t, "check.ParseURL", err.Error(), checkSecret)
			return
		}
		if n.HostName == "" || n.DERPPort < 0 || n.DERPPort > 65535 || n.DERPPort == 443 {
			t.Fatalf("ParseURL(%q) = %+v", target, n)
		}
		port := n.DERPPort
		if port == 0 {
			port = 443
		}
		back, err := check.ParseURL("https://" + net.JoinHostPort(n.HostName, strconv.Itoa(port)))
		if err != nil || !reflect.DeepEqual(back, n) {
			t.Fatalf("ParseURL(%q) = %+v; written back, %+v, %v", target, n, back, err)
		}
		// What the check would run against, without reading any file.
		o.caFile, o.meshKeyFile = "", ""
		tgt, err := checkTarget(o, cfg, target, io.Discard)
		if err != nil {
			t.Fatalf("checkTarget of a parsed URL: %v", err)
		}
		if d := describeTarget(tgt); strings.ContainsAny(d, "\n\r") {
			t.Fatalf("target described on several lines: %q", d)
		}
	})
}
