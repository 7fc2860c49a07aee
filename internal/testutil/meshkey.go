package testutil

import (
	"crypto/rand"
	"encoding/hex"
	"testing"

	"tailscale.com/types/key"
)

// NewMeshKey returns a random mesh key, both as a relay's -mesh-psk-file
// holds it (64 hex digits) and parsed.
func NewMeshKey(t testing.TB) (string, key.DERPMesh) {
	t.Helper()
	var raw [32]byte
	rand.Read(raw[:])
	hexKey := hex.EncodeToString(raw[:])
	k, err := key.ParseDERPMesh(hexKey)
	if err != nil {
		t.Fatal(err)
	}
	return hexKey, k
}
