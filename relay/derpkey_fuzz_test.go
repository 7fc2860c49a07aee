package relay

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"tailscale.com/types/key"
)

// FuzzKeyFiles: a key file tailderp finds in its state directory, holding
// anything (a torn write, a hand edit, a file from another tool), is
// loaded or refused, and never replaced: a new DERP key would be a new
// server identity, a new ACME account key a new account. What loads is a
// real key, the same on every load; a refusal is one line and quotes none
// of the key's digits.
func FuzzKeyFiles(f *testing.F) {
	good, _ := json.MarshalIndent(keyFile{PrivateKey: key.NewNode()}, "", "\t")
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ecDER, _ := x509.MarshalECPrivateKey(ec)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	edDER, _ := x509.MarshalPKCS8PrivateKey(ed)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 1024)
	for _, s := range [][]byte{
		good,
		[]byte(`{"PrivateKey":"privkey:` + strings.Repeat("00", 32) + `"}`),
		[]byte(`{"PrivateKey":"privkey:` + strings.Repeat("0a", 31) + `"}`),
		[]byte(`{"PrivateKey":"nodekey:` + strings.Repeat("0a", 32) + `"}`),
		[]byte(`{"privatekey":"privkey:` + strings.Repeat("0A", 32) + `"} trailing`),
		[]byte(`{}`), []byte(`null`), []byte(``), []byte("\x00\x00\x00"),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: ecDER}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: edDER}),
		pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey)}),
		pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: ecDER}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{0x30, 0x00}}),
	} {
		f.Add(s)
	}
	hexRun := regexp.MustCompile(`[0-9a-fA-F]{16,}`)
	dir := f.TempDir() // one worker runs one input at a time
	derpKey, acctKey := filepath.Join(dir, "derp.key"), filepath.Join(dir, "acme_account.key")
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, p := range []string{derpKey, acctKey} {
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		checkErr := func(what string, err error) {
			t.Helper()
			msg := err.Error()
			if strings.ContainsAny(msg, "\n\r") {
				t.Fatalf("%s: error is not one line: %q", what, msg)
			}
			for _, run := range hexRun.FindAllString(string(b), -1) {
				if strings.Contains(msg, run) {
					t.Fatalf("%s: error quotes the key's digits: %v", what, err)
				}
			}
		}
		checkKept := func(what, path string) {
			t.Helper()
			got, err := os.ReadFile(path)
			if err != nil || !bytes.Equal(got, b) {
				t.Fatalf("%s: the file was replaced or removed (%v)", what, err)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 2 {
				t.Fatalf("%s: %d files in the directory, want the 2 key files", what, len(ents))
			}
		}

		k1, err1 := LoadOrCreateKey(derpKey)
		checkKept("LoadOrCreateKey", derpKey)
		k2, err2 := LoadOrCreateKey(derpKey)
		switch {
		case (err1 == nil) != (err2 == nil) || !k1.Equal(k2):
			t.Fatalf("LoadOrCreateKey twice: %v, then %v", err1, err2)
		case err1 != nil:
			checkErr("LoadOrCreateKey", err1)
		case k1.IsZero():
			t.Fatalf("LoadOrCreateKey loaded a zero key")
		}

		s1, err1 := loadOrCreateAccountKey(acctKey)
		checkKept("loadOrCreateAccountKey", acctKey)
		s2, err2 := loadOrCreateAccountKey(acctKey)
		switch {
		case (err1 == nil) != (err2 == nil):
			t.Fatalf("loadOrCreateAccountKey twice: %v, then %v", err1, err2)
		case err1 != nil:
			checkErr("loadOrCreateAccountKey", err1)
		default:
			p1, _ := x509.MarshalPKIXPublicKey(s1.Public())
			p2, _ := x509.MarshalPKIXPublicKey(s2.Public())
			if len(p1) == 0 || !bytes.Equal(p1, p2) {
				t.Fatalf("loadOrCreateAccountKey loaded different keys from one file")
			}
		}
	})
}
