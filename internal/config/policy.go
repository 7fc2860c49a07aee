package config

import (
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/tailderp/tailderp/policy"
)

// credentialVars names the variables of the policy file's credentials, as
// a message tells the operator to set them.
const credentialVars = "TAILSCALE_API_KEY (an access token), or TAILSCALE_OAUTH_CLIENT_ID and TAILSCALE_OAUTH_CLIENT_SECRET (an OAuth client with the policy_file scope)"

// PolicyClient is the client of the Tailscale policy file that -register
// and `tailderp register` write with: -api-url, -tailnet and the
// credentials of the environment. An error names the setting to fix and
// never holds a credential.
func (c *Config) PolicyClient() (*policy.Client, error) {
	cr := policy.Credentials{APIKey: c.APIKey, OAuthClientID: c.OAuthClientID, OAuthClientSecret: c.OAuthClientSecret}
	switch {
	case cr.APIKey != "":
		// A key of the wrong kind would be refused with a 401 that does
		// not say why: say it here.
		switch {
		case strings.HasPrefix(cr.APIKey, "tskey-client-"):
			return nil, errors.New("TAILSCALE_API_KEY holds an OAuth client secret (tskey-client-…): put it in TAILSCALE_OAUTH_CLIENT_SECRET, and the client's ID in TAILSCALE_OAUTH_CLIENT_ID")
		case strings.HasPrefix(cr.APIKey, "tskey-auth-"):
			return nil, errors.New("TAILSCALE_API_KEY holds an auth key (tskey-auth-…), which logs devices in and cannot use the API: make an access token (Settings → Keys → Generate access token) or an OAuth client with the policy_file scope")
		}
		if cr.OAuthClientID != "" || cr.OAuthClientSecret != "" {
			c.Notes = append(c.Notes, "TAILSCALE_API_KEY and an OAuth client (TAILSCALE_OAUTH_CLIENT_ID/_SECRET) are both set: the access token is used")
		}
	case cr.OAuthClientID != "" && cr.OAuthClientSecret == "":
		return nil, errors.New("TAILSCALE_OAUTH_CLIENT_ID is set but TAILSCALE_OAUTH_CLIENT_SECRET is not: set the client's secret (tskey-client-…) too")
	case cr.OAuthClientID == "" && cr.OAuthClientSecret != "":
		return nil, errors.New("TAILSCALE_OAUTH_CLIENT_SECRET is set but TAILSCALE_OAUTH_CLIENT_ID is not: set the client's ID too (shown beside the secret in Settings → Trust credentials)")
	case cr.OAuthClientID == "":
		return nil, fmt.Errorf("no credentials for Tailscale's API: set %s", credentialVars)
	}
	pc := &policy.Client{BaseURL: c.APIURL, Tailnet: c.Tailnet, Credentials: cr}
	if err := checkHTTPURL(c.APIURL); err != nil {
		return nil, fmt.Errorf("%s %q: %v", SettingName("api-url"), c.APIURL, err)
	}
	if err := pc.CheckBaseURL(); err != nil {
		return nil, fmt.Errorf("%s: %v", SettingName("api-url"), err)
	}
	if strings.TrimSpace(c.Tailnet) == "" {
		return nil, fmt.Errorf("%s is empty: give \"-\" (the credentials' own tailnet) or the tailnet ID", SettingName("tailnet"))
	}
	return pc, nil
}

// PolicyAdvice is the fix, in settings, for an error of the policy file's
// API (policy.Client.Apply): which setting or variable to change. "" when
// there is nothing to change here (the API is down: try again).
func PolicyAdvice(err error) string {
	if e, ok := errors.AsType[*policy.APIError](err); ok {
		switch s := e.Status; {
		case s == http.StatusUnauthorized:
			return "check " + credentialVars
		case s == http.StatusForbidden:
			return "TAILSCALE_API_KEY must be an access token of an Owner, Admin or Network admin, or use an OAuth client with the policy_file scope (TAILSCALE_OAUTH_CLIENT_ID, TAILSCALE_OAUTH_CLIENT_SECRET)"
		case s == http.StatusNotFound:
			return "check " + SettingName("tailnet") + " and " + SettingName("api-url")
		}
		return ""
	}
	if _, ok := errors.AsType[*policy.ValidationError](err); ok {
		return "fix the policy file in the admin console (Access controls), or this relay's region settings (" + SettingName("region-id") + ", " + SettingName("hostname") + ")"
	}
	if _, ok := errors.AsType[*policy.RequestError](err); ok {
		return "check " + SettingName("api-url") + " and that this host reaches it"
	}
	return "" // e.g. someone else keeps editing the file: running again is the fix
}
