package relay

import (
	"fmt"
	"net/http"
	"os"
	"testing"
)

// TestToolDir is a directory for tools the tests build (upstream derper,
// see mesh_fleet_test.go), removed when the tests end. It lives in a
// _test.go file: the package itself has no such thing.
var TestToolDir string

// TestMain registers the admission scheme once, as a program does at
// start (see RegisterAdmissionScheme), before any test starts a relay with
// an Admitter.
func TestMain(m *testing.M) {
	if err := RegisterAdmissionScheme(http.DefaultTransport); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	dir, err := os.MkdirTemp("", "tailderp-relay-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	TestToolDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
