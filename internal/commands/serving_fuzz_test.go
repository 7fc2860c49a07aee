package commands

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tailderp/tailderp/internal/config"
	"github.com/tailderp/tailderp/internal/serving"
	"github.com/tailderp/tailderp/internal/testutil"
)

// FuzzReadServing: a serving.json holding anything (a torn write of an
// older version, a hand edit) is refused with one line of error, or is
// complete enough for everything that reads it: `tailderp derpmap` prints
// its region, `tailderp check` takes its first node as the target, and a
// server stopping removes only its own file.
func FuzzReadServing(f *testing.F) {
	node := `{"Name":"900a","RegionID":900,"HostName":"derp.example.com","DERPPort":8443,"STUNPort":3478}`
	for _, s := range []string{
		`{"pid":1,"version":"1.0","since":"2025-01-02T03:04:05Z","https_addr":"[::]:8443","stun_addr":"[::]:3478","server_name":"derp.example.com","verify_clients":true,"region":{"RegionID":900,"RegionCode":"tailderp","RegionName":"tailderp","Nodes":[` + node + `]}}`,
		`{"pid":1,"https_addr":"127.0.0.1:3340","server_name":"203.0.113.7","region":{"RegionID":900,"Nodes":[{"Name":"900a","HostName":"203.0.113.7","IPv4":"203.0.113.7","CertName":"sha256-raw:` + strings.Repeat("ab", 32) + `"}]}}`,
		`{"pid":1,"https_addr":":443","region":{"RegionID":900,"Nodes":[` + node + `,` + node + `]}}`,
		`{"pid":0,"https_addr":":443","region":{"RegionID":900,"Nodes":[` + node + `]}}`,
		`{"pid":-1,"https_addr":":443","region":{"Nodes":[` + node + `]}}`,
		`{"pid":1,"https_addr":"","region":{"Nodes":[` + node + `]}}`,
		`{"pid":1,"https_addr":":443","region":{"Nodes":[]}}`,
		`{"pid":1,"https_addr":":443","region":null}`,
		`{"pid":1,"https_addr":":443"`,
		``,
		`null`,
		`[]`,
	} {
		f.Add([]byte(s))
	}
	dir := f.TempDir() // one worker runs one input at a time
	path := filepath.Join(dir, config.ServingFile)
	f.Fuzz(func(t *testing.T, b []byte) {
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := serving.Read(path)
		if err != nil {
			if s != nil {
				t.Fatalf("readServing returned a result and an error: %v", err)
			}
			testutil.CheckMessage(t, "readServing", err.Error(), false)
			return
		}
		if s.Region == nil || len(s.Region.Nodes) == 0 || s.HTTPSAddr == "" || s.PID <= 0 {
			t.Fatalf("readServing accepted an incomplete file: %+v", s)
		}

		// tailderp derpmap, alone and with a fleet.
		for _, extra := range [][]string{nil, {"-mesh-with", "derp2.example.com"}} {
			var stdout, stderr testutil.Buffer
			args := append([]string{"-state-dir", dir}, extra...)
			if code := DERPMap(args, nil, &stdout, &stderr); code != 0 {
				t.Fatalf("derpmap %q of an accepted serving.json: exit %d: %s", args, code, stderr.String())
			}
			if !json.Valid([]byte(stdout.String())) {
				t.Fatalf("derpmap printed no JSON: %q", stdout.String())
			}
		}

		// tailderp check, without a URL: this server, as it serves.
		hostname := s.ServerName
		if hostname == "" {
			hostname = "derp.example.com" // not the file's: checked from the settings instead
		}
		fs, o := newCheckFlags()
		cfg, err := config.Load(config.Check, fs, []string{"-state-dir", dir, "-hostname", hostname}, nil)
		if err != nil {
			t.Fatalf("parseConfig: %v", err)
		}
		if strings.EqualFold(hostname, s.ServerName) {
			tgt, err := checkTarget(o, cfg, "", &testutil.Buffer{})
			if err != nil {
				t.Fatalf("checkTarget of an accepted serving.json: %v", err)
			}
			if tgt.Node.HostName != s.Region.Nodes[0].HostName {
				t.Fatalf("check targets %q, the file's first node is %q", tgt.Node.HostName, s.Region.Nodes[0].HostName)
			}
		}
		if lt, _, err := localTarget(cfg); err != nil || lt.HTTPSAddr != s.HTTPSAddr {
			t.Fatalf("check -local targets %q (%v), the file says %q", lt.HTTPSAddr, err, s.HTTPSAddr)
		}

		serving.Remove(path)
		if _, err := os.Stat(path); (err == nil) != (s.PID != os.Getpid()) {
			t.Fatalf("removeServing of pid %d's file (this is %d): stat %v", s.PID, os.Getpid(), err)
		}
	})
}
