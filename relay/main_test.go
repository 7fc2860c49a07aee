package relay

import (
	"fmt"
	"net/http"
	"os"
	"testing"
)

// TestMain registers the admission scheme once, as a program does at
// start (see RegisterAdmissionScheme), before any test starts a relay with
// an Admitter.
func TestMain(m *testing.M) {
	if err := RegisterAdmissionScheme(http.DefaultTransport); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}
