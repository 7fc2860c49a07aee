package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzTailnetsFile: a -tailnets file holding anything, beside a key file
// holding anything, gives extra tailnets that can run side by side (names
// valid and unique, each state directory its own under
// <state-dir>/tailnets, hostnames one DNS label, the key the file's
// trimmed text) or an error of whole lines that names the setting and the
// file and never shows the key. Reading it writes nothing.
func FuzzTailnetsFile(f *testing.F) {
	for _, s := range []struct{ file, key string }{
		{`{"tailnets": [{"name": "foreign", "control_url": "https://hs.example.net", "auth_key_file": "KEYFILE", "hostname": "relay-foreign", "advertise_tags": ["tag:derp"]}]}`, "tskey-auth-abc\n"},
		{"// HuJSON\n{\"tailnets\": [{\"name\": \"b\", \"auth_key_file\": \"KEYFILE\",},],}", "hskey-auth-1"},
		{`{"tailnets": [{"name": "a", "auth_key_file": "KEYFILE"}, {"name": "a", "auth_key_file": "KEYFILE"}]}`, "tskey-auth-x"},
		{`{"tailnets": [{"name": "default", "auth_key_file": "KEYFILE"}]}`, "tskey-auth-x"},
		{`{"tailnets": [{"name": "x", "auth_key_file": "KEYFILE", "tailnet_port": 41641}, {"name": "y", "auth_key_file": "KEYFILE", "tailnet_port": 41641}]}`, "tskey-auth-x"},
		{`{"tailnets": [{"name": "x", "auth_key_file": "KEYFILE", "extra": 1}]}`, "tskey-auth-x"},
		{`{"tailnets": [{"name": "x", "auth_key_file": "KEYFILE"}]}`, "tskey-client-x"},
		{`{"tailnets": [{"name": "x", "auth_key_file": "KEYFILE"}]}`, "ENTER YOUR KEY HERE"},
		{`{"tailnets": [{"name": "x"}]}`, ""},
		{`{"tailnets": []}`, ""},
		{`{"tailnets": [{"name": "x", "auth_key_file": "KEYFILE"}]} {}`, "tskey-auth-x"},
	} {
		f.Add(s.file, s.key)
	}
	f.Fuzz(func(t *testing.T, file, keyText string) {
		dir := t.TempDir()
		stateDir := filepath.Join(dir, "state")
		if err := os.Mkdir(stateDir, 0o700); err != nil {
			t.Fatal(err)
		}
		keyPath := filepath.Join(dir, "key")
		keyText += secretMark
		if err := os.WriteFile(keyPath, []byte(keyText), 0o600); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "tailnets.json")
		if err := os.WriteFile(path, []byte(strings.ReplaceAll(file, "KEYFILE", keyPath)), 0o600); err != nil {
			t.Fatal(err)
		}
		c := &Config{Hostname: "derp.example.com", VerifyClients: true, StateDir: stateDir, TailnetsFile: path}
		err := c.readTailnetsFile()
		if entries, _ := os.ReadDir(stateDir); len(entries) != 0 {
			t.Fatalf("reading the file wrote %v", entries)
		}
		if err != nil {
			checkMessage(t, "readTailnetsFile", err.Error(), !strings.Contains(file, secretMark))
			if !strings.Contains(err.Error(), SettingName("tailnets")) {
				t.Fatalf("error does not name the setting: %v", err)
			}
			return
		}
		if len(c.extraTailnets) == 0 {
			t.Fatal("a file that lists no tailnet was accepted")
		}
		names, dirs := map[string]bool{DefaultTailnet: true}, map[string]bool{c.NodeDir(): true}
		for _, tn := range c.Tailnets()[1:] {
			if !tailnetNameRE.MatchString(tn.Name) || names[tn.Name] {
				t.Fatalf("name %q: invalid or taken", tn.Name)
			}
			if filepath.Dir(tn.Dir) != filepath.Join(stateDir, "tailnets") || dirs[tn.Dir] {
				t.Fatalf("tailnet %q: state %s is not its own directory under %s/tailnets", tn.Name, tn.Dir, stateDir)
			}
			if err := checkHostname(tn.Hostname); err != nil || strings.ContainsAny(tn.Hostname, ".:") {
				t.Fatalf("tailnet %q: hostname %q is not one DNS label", tn.Name, tn.Hostname)
			}
			if tn.AuthKey != strings.TrimSpace(keyText) {
				t.Fatalf("tailnet %q: auth key %q, the file holds %q", tn.Name, tn.AuthKey, keyText)
			}
			names[tn.Name], dirs[tn.Dir] = true, true
		}
	})
}
