package relay

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"tailscale.com/derp/derpserver"
)

// FuzzParseRateConfig: a -rate-config file holding anything is refused or
// gives limits; tailderp is stricter than derper (unknown fields and
// trailing data are refused: a misspelled field would mean no limit), so
// what it accepts is one JSON document that derper's loader reads the
// same, and that reads back the same once written out.
func FuzzParseRateConfig(f *testing.F) {
	for _, s := range []string{
		`{"PerClientRateLimitBytesPerSec": 1000000, "PerClientRateBurstBytes": 2000000}`,
		`{"PerClientRateLimitBytesPerSec": 0}`,
		`{"perclientratelimitbytespersec": 5}`,
		`{"PerClientRateLimitBytesPerSecond": 1000000}`,
		`{"PerClientRateLimitBytesPerSec": -1}`,
		`{"PerClientRateLimitBytesPerSec": 1e6}`,
		`{"PerClientRateLimitBytesPerSec": 18446744073709551616}`,
		`{"PerClientRateLimitBytesPerSec": 1} {"PerClientRateBurstBytes": 2}`,
		`{"PerClientRateLimitBytesPerSec": 1}x`,
		`{} `, `null`, `[]`, ``, "\ufeff{}",
	} {
		f.Add([]byte(s))
	}
	path := filepath.Join(f.TempDir(), "rate.json") // one worker runs one input at a time
	f.Fuzz(func(t *testing.T, b []byte) {
		rc, err := parseRateConfig(b)
		if err != nil {
			if rc != (RateConfig{}) {
				t.Fatalf("refused, yet limits %+v: %v", rc, err)
			}
			return
		}
		if !json.Valid(b) {
			t.Fatalf("accepted %q, which is not one JSON document", b)
		}
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		theirs, err := derpserver.LoadRateConfig(path)
		if err != nil || theirs != rc {
			t.Fatalf("accepted %q as %+v; derper reads %+v, %v", b, rc, theirs, err)
		}
		out, err := json.Marshal(rc)
		if err != nil {
			t.Fatal(err)
		}
		if back, err := parseRateConfig(out); err != nil || back != rc {
			t.Fatalf("%+v written as %s reads back as %+v, %v", rc, out, back, err)
		}
	})
}
