package policy

import (
	"testing"

	"github.com/tailderp/tailderp/internal/testpolicy"
)

// The stand-in API lives in internal/testpolicy, shared with the tests of
// the commands that use this package.
type standIn = testpolicy.StandIn

const (
	testAPIKey       = testpolicy.APIKey
	testReadOnlyKey  = testpolicy.ReadOnlyKey
	testClientID     = testpolicy.ClientID
	testClientSecret = testpolicy.ClientSecret
	testTailnet      = testpolicy.Tailnet
)

func newStandIn(t *testing.T, file string) *standIn { return testpolicy.New(t, file) }

// clientOf is a Client of api's tailnet with credentials cr.
func clientOf(api *standIn, cr Credentials) *Client {
	return &Client{BaseURL: api.URL(), Tailnet: testTailnet, Credentials: cr, HTTPClient: api.HTTPClient()}
}

func etagOf(b []byte) string { return testpolicy.ETagOf(b) }
