package relay

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"tailscale.com/atomicfile"
	"tailscale.com/types/key"
)

// keyFile is the JSON layout of the DERP key file; it is derper's
// derper.key layout, so a derper key can be copied over to keep the
// server's identity.
type keyFile struct {
	PrivateKey key.NodePrivate
}

// LoadOrCreateKey returns the relay's DERP private key stored at path,
// generating and writing one (atomically, mode 0600) the first time. A
// file that exists but does not parse is an error: it is never replaced,
// since a new key would be a new server identity.
func LoadOrCreateKey(path string) (key.NodePrivate, error) {
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		var kf keyFile
		if err := json.Unmarshal(b, &kf); err != nil || kf.PrivateKey.IsZero() {
			if err == nil {
				err = fmt.Errorf("no PrivateKey field")
			}
			return key.NodePrivate{}, fmt.Errorf("relay: DERP key %s is corrupt: %v (restore it from a backup, or move it away to generate a new key)", path, err)
		}
		return kf.PrivateKey, nil
	case !isNotExist(err):
		return key.NodePrivate{}, fmt.Errorf("relay: read DERP key: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return key.NodePrivate{}, fmt.Errorf("relay: DERP key: %w", err)
	}
	kf := keyFile{PrivateKey: key.NewNode()}
	b, err = json.MarshalIndent(kf, "", "\t")
	if err != nil {
		return key.NodePrivate{}, fmt.Errorf("relay: encode DERP key: %w", err)
	}
	if err := atomicfile.WriteFile(path, b, 0o600); err != nil {
		return key.NodePrivate{}, fmt.Errorf("relay: write DERP key: %w", err)
	}
	return kf.PrivateKey, nil
}
