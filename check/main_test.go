package check_test

import (
	"fmt"
	"net/http"
	"os"
	"testing"

	"github.com/tailderp/tailderp/relay"
)

// TestMain registers the relay's admission scheme once, as tailderp does
// at start, before any test starts a relay with an Admitter.
func TestMain(m *testing.M) {
	if err := relay.RegisterAdmissionScheme(http.DefaultTransport); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}
