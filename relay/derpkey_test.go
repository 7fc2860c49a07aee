package relay_test

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/relay"
)

// derperKeyFile is cmd/derper's derper.key layout.
type derperKeyFile struct {
	PrivateKey key.NodePrivate
}

func TestLoadOrCreateKeyCreatesDerperCompatibleFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "derp.key") // dir created on demand
	k, err := relay.LoadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if k.IsZero() {
		t.Fatal("zero key")
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
	b, _ := os.ReadFile(path)
	var raw map[string]string
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatalf("not a JSON object of strings: %v\n%s", err, b)
	}
	if !strings.HasPrefix(raw["PrivateKey"], "privkey:") || len(raw) != 1 {
		t.Errorf(`want exactly {"PrivateKey": "privkey:…"}, got %s`, b)
	}
	// derper reads it as its own.
	var df derperKeyFile
	if err := json.Unmarshal(b, &df); err != nil || !df.PrivateKey.Equal(k) {
		t.Errorf("derper would read key %v (err %v), want %v", df.PrivateKey.Public().ShortString(), err, k.Public().ShortString())
	}
	if names := dirNames(t, filepath.Dir(path)); len(names) != 1 {
		t.Errorf("state dir holds %q, want only derp.key", names)
	}

	// Reused on the next start, file untouched.
	k2, err := relay.LoadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if !k2.Equal(k) {
		t.Error("second load returned a different key: the relay's identity changed")
	}
	if b2, _ := os.ReadFile(path); !bytes.Equal(b, b2) {
		t.Error("second load rewrote the file")
	}
}

func TestLoadOrCreateKeyReadsDerperFile(t *testing.T) {
	// A derper.key copied over keeps the server's identity.
	want := key.NewNode()
	b, err := json.MarshalIndent(derperKeyFile{PrivateKey: want}, "", "\t")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "derp.key")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := relay.LoadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Equal(want) {
		t.Errorf("loaded %v, want derper's %v", got.Public().ShortString(), want.Public().ShortString())
	}
}

func TestLoadOrCreateKeyRefusesCorruptFile(t *testing.T) {
	tests := map[string]string{
		"garbage":         "not json at all",
		"empty":           "",
		"truncated":       `{"PrivateKey": "privkey:0123`,
		"no PrivateKey":   `{}`,
		"bad key":         `{"PrivateKey": "privkey:zz"}`,
		"wrong key type":  `{"PrivateKey": "nodekey:` + strings.Repeat("00", 32) + `"}`,
		"zero key":        `{"PrivateKey": "privkey:` + strings.Repeat("00", 32) + `"}`,
		"JSON of another": `["privkey"]`,
	}
	for name, content := range tests {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "derp.key")
			if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			k, err := relay.LoadOrCreateKey(path)
			if err == nil {
				t.Fatalf("loaded key %v from a corrupt file, want an error", k.Public().ShortString())
			}
			if !strings.Contains(err.Error(), path) {
				t.Errorf("error does not name %s: %v", path, err)
			}
			after, _ := os.ReadFile(path)
			if string(after) != content {
				t.Errorf("file changed to %q; a corrupt key must be left for the operator", after)
			}
			if names := dirNames(t, dir); len(names) != 1 {
				t.Errorf("dir holds %q, want only the original file", names)
			}
		})
	}
}

func TestLoadOrCreateKeyUnwritableDir(t *testing.T) {
	// A regular file where the directory should be: refused even as root.
	parent := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(parent, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := relay.LoadOrCreateKey(filepath.Join(parent, "state", "derp.key")); err == nil {
		t.Fatal("created a key under a regular file")
	}
}
