// Package policy reads and writes the derpMap of a Tailscale tailnet
// policy file through Tailscale's API, so a relay can put its own region
// there: Client.Apply reads the file (HuJSON, with its ETag), applies an
// Edit (SetRegion or RemoveNode) that changes only the region in
// derpMap.Regions and keeps every other byte — comments, key order, other
// regions, acls — validates the result and writes it with If-Match, so a
// concurrent edit by someone else is never overwritten: on 412 it reads
// the new file and applies the edit again.
//
// The API as Tailscale documents it:
//
//	GET  {api}/api/v2/tailnet/{tailnet}/acl            Accept: application/hujson → the file, ETag
//	POST {api}/api/v2/tailnet/{tailnet}/acl/validate   200, {"message": …, "data": […]} when it is refused
//	POST {api}/api/v2/tailnet/{tailnet}/acl            Content-Type: application/hujson, If-Match: ETag → 412 when stale
//	POST {api}/api/v2/oauth/token                      OAuth client credentials → access_token
//
// Errors are {"message": "…"} with the status. An access token goes as the
// HTTP basic auth user; an OAuth client's token as a Bearer token.
//
// Why a small net/http client and not tailscale.com/client/tailscale/v2
// (v2.12.0, which has PolicyFile().Raw, Validate and Set(raw, etag)): its
// OAuth token is fetched with context.Background() through
// http.DefaultClient, not through the caller's HTTP client, so neither a
// caller's deadline nor its transport (a test's CA, a proxy) reaches the
// token request; an error answer that is not JSON (a proxy's HTML 502)
// becomes a JSON decoding error and loses its status; and it would add
// golang.org/x/oauth2 and its own dependencies to the binary for four
// requests. This package needs the status of every answer (401, 403, 404,
// 412, 5xx each mean a different thing to do) and one clear line for each.
//
// The package reads no environment and prints nothing: credentials come
// in as values (package main reads TAILSCALE_API_KEY or
// TAILSCALE_OAUTH_CLIENT_ID/_SECRET), and no error or Result ever holds a
// credential.
package policy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
	"unicode"
)

// DefaultBaseURL is Tailscale's API.
const DefaultBaseURL = "https://api.tailscale.com"

// maxBody bounds what is read from any answer; a policy file is far smaller.
const maxBody = 8 << 20

// Credentials authenticate to the API: an access token, or an OAuth client
// (whose tokens are fetched and renewed as needed). APIKey wins when both
// are set.
type Credentials struct {
	APIKey            string // an API access token (tskey-api-…)
	OAuthClientID     string // an OAuth client with the policy_file scope
	OAuthClientSecret string
}

// Client speaks the policy-file API for one tailnet. Its fields may be
// changed until the first method call; its methods may then be called
// from several goroutines.
type Client struct {
	// BaseURL is the API's URL; default DefaultBaseURL. Plain http is
	// refused unless the host is a loopback address: the credentials would
	// travel in clear.
	BaseURL string
	// Tailnet is the tailnet's name; default "-", the tailnet the
	// credentials belong to.
	Tailnet string
	// Credentials are required.
	Credentials Credentials
	// HTTPClient makes every request, the OAuth token's too; default a
	// client with a 30 s timeout.
	HTTPClient *http.Client
	// MaxAttempts bounds how often Apply reads the file again after a
	// write refused because someone else wrote first (412); default 5.
	MaxAttempts int

	fetchMu     sync.Mutex // held while an OAuth token is fetched
	mu          sync.Mutex
	token       string // the OAuth access token; never in an error
	tokenExpiry time.Time
}

// File is the policy file as read: its HuJSON text and the ETag that a
// write must match.
type File struct {
	HuJSON []byte
	ETag   string
}

// ErrConflict is the cause of a write refused because the file changed
// since it was read (HTTP 412); Apply reads again and reapplies its edit.
var ErrConflict = errors.New("the policy file changed since it was read (412 Precondition Failed)")

// APIError is an answer of the API other than success: the request, the
// status, the API's message (one line, credentials removed) and what to do.
type APIError struct {
	Op      string // what was asked: "read the policy file", "validate the policy file", …
	Status  int    // HTTP status
	Message string // the API's "message", one line; "" when it sent none
	Tailnet string
}

func (e *APIError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "policy: %s: %d %s", e.Op, e.Status, http.StatusText(e.Status))
	if e.Message != "" {
		fmt.Fprintf(&b, ": %q", e.Message)
	}
	if h := e.hint(); h != "" {
		b.WriteString(": ")
		b.WriteString(h)
	}
	return b.String()
}

// hint says what the status means for someone writing a derpMap.
func (e *APIError) hint() string {
	switch s := e.Status; {
	case s == http.StatusUnauthorized:
		return "the API did not accept the credentials: the access token (or the OAuth client's ID or secret) is wrong, expired or revoked; make a new one in the admin console (Settings → Keys, or Trust credentials)"
	case s == http.StatusForbidden:
		return "the credentials may not edit the policy file: use an OAuth client with the policy_file scope (write), or an access token of an Owner, Admin or Network admin"
	case s == http.StatusNotFound:
		return fmt.Sprintf("no tailnet %q for these credentials: use \"-\" (the credentials' own tailnet) or the tailnet ID shown in the admin console (Settings → General); or the API URL is not Tailscale's API", e.Tailnet)
	case s == http.StatusTooManyRequests:
		return "the API is rate limiting: try again in a minute"
	case s >= 500:
		return "the Tailscale API failed: try again later (status.tailscale.com)"
	case s == http.StatusBadRequest && e.Op == opWrite:
		return "the API refused the edited file; nothing was written"
	}
	return ""
}

const (
	opRead     = "read the policy file"
	opValidate = "validate the policy file"
	opWrite    = "write the policy file"
	opToken    = "get an OAuth access token"
)

// RequestError is a request that got no answer from the API: the URL is
// wrong, or the network on the way failed (DNS, TLS, a timeout).
type RequestError struct {
	Op  string // what was asked
	Msg string // the cause, one line, credentials removed
}

func (e *RequestError) Error() string { return "policy: " + e.Op + ": " + e.Msg }

// ValidationError is a file the API's validation refused; nothing was
// written.
type ValidationError struct {
	Message string   // e.g. "test(s) failed"
	Errors  []string // details, "user: error" each
}

func (e *ValidationError) Error() string {
	s := "policy: the edited policy file does not validate: " + e.Message
	if len(e.Errors) > 0 {
		s += ": " + strings.Join(e.Errors, "; ")
	}
	return s + "; nothing was written"
}

// Get reads the policy file as HuJSON, with its ETag.
func (c *Client) Get(ctx context.Context) (*File, error) {
	res, body, err := c.do(ctx, opRead, http.MethodGet, "acl", nil, map[string]string{"Accept": "application/hujson"})
	if err != nil {
		return nil, err
	}
	if err := checkHuJSON(body); err != nil {
		return nil, fmt.Errorf("policy: %s: the API's answer is not a HuJSON object (%v): is %s Tailscale's API?", opRead, err, c.base())
	}
	etag := res.Header.Get("ETag")
	if etag == "" {
		// Without it a write could overwrite someone else's edit.
		return nil, fmt.Errorf("policy: %s: the API sent no ETag, so a write could not be guarded against concurrent edits: is %s Tailscale's API?", opRead, c.base())
	}
	return &File{HuJSON: body, ETag: etag}, nil
}

// Validate asks the API whether file is a valid policy file (its syntax,
// and its tests against the tailnet). A refusal is a *ValidationError;
// warnings (the file is valid) are returned.
func (c *Client) Validate(ctx context.Context, file []byte) (warnings []string, err error) {
	_, body, err := c.do(ctx, opValidate, http.MethodPost, "acl/validate", file, map[string]string{"Content-Type": "application/hujson"})
	if err != nil {
		return nil, err
	}
	// 200 either way: an empty body or an object without "message" is
	// valid; a message is a refusal, or warnings when data holds only
	// warnings.
	if len(bytes.TrimSpace(body)) == 0 {
		return nil, nil
	}
	var v struct {
		Message string `json:"message"`
		Data    []struct {
			User     string   `json:"user"`
			Errors   []string `json:"errors"`
			Warnings []string `json:"warnings"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &v); err != nil {
		return nil, fmt.Errorf("policy: %s: the API's answer is not JSON (%v): is %s Tailscale's API?", opValidate, oneLine(err.Error(), c.secrets()), c.base())
	}
	if v.Message == "" {
		return nil, nil
	}
	var errs []string
	for _, d := range v.Data {
		for _, e := range d.Errors {
			errs = append(errs, c.clean(join(d.User, e)))
		}
		for _, w := range d.Warnings {
			warnings = append(warnings, c.clean(join(d.User, w)))
		}
	}
	if len(errs) == 0 && len(warnings) > 0 {
		return warnings, nil
	}
	return nil, &ValidationError{Message: c.clean(v.Message), Errors: errs}
}

func join(user, msg string) string {
	if user == "" {
		return msg
	}
	return user + ": " + msg
}

// Set writes file if the policy file still has etag; otherwise the error
// wraps ErrConflict. It returns the new ETag when the API sends one.
func (c *Client) Set(ctx context.Context, file []byte, etag string) (newETag string, err error) {
	if etag == "" {
		return "", fmt.Errorf("policy: %s: no ETag to match: read the file first", opWrite)
	}
	if !strings.HasPrefix(etag, `"`) && !strings.HasPrefix(etag, `W/"`) {
		etag = `"` + etag + `"` // the header's form (RFC 9110)
	}
	res, _, err := c.do(ctx, opWrite, http.MethodPost, "acl", file, map[string]string{
		"Content-Type": "application/hujson",
		"Accept":       "application/hujson",
		"If-Match":     etag,
	})
	if err != nil {
		return "", err
	}
	return res.Header.Get("ETag"), nil
}

// do makes one authenticated request to {base}/api/v2/tailnet/{tailnet}/{path}
// and returns a 2xx answer's body; any other answer is an *APIError (or
// ErrConflict for 412).
func (c *Client) do(ctx context.Context, op, method, path string, body []byte, hdr map[string]string) (*http.Response, []byte, error) {
	base, err := c.baseURL()
	if err != nil {
		return nil, nil, err
	}
	u := base + "/api/v2/tailnet/" + url.PathEscape(c.tailnet()) + "/" + path
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return nil, nil, fmt.Errorf("policy: %s: %w", op, err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	if err := c.authorize(ctx, req); err != nil {
		return nil, nil, err
	}
	res, b, err := c.roundTrip(req)
	if err != nil {
		return nil, nil, &RequestError{Op: op, Msg: oneLine(err.Error(), c.secrets())}
	}
	if res.StatusCode/100 == 2 {
		return res, b, nil
	}
	if res.StatusCode == http.StatusPreconditionFailed {
		return nil, nil, fmt.Errorf("policy: %s: %w", op, ErrConflict)
	}
	e := &APIError{Op: op, Status: res.StatusCode, Message: c.apiMessage(b), Tailnet: c.tailnet()}
	if res.StatusCode == http.StatusUnauthorized && c.Credentials.APIKey == "" {
		// The token may have been revoked: the next call fetches another
		// (after the message above was cleaned of it).
		c.forgetToken()
	}
	return nil, nil, e
}

func (c *Client) roundTrip(req *http.Request) (*http.Response, []byte, error) {
	hc := c.HTTPClient
	if hc == nil {
		hc = defaultHTTPClient
	}
	res, err := hc.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(io.LimitReader(res.Body, maxBody+1))
	if err != nil {
		return nil, nil, fmt.Errorf("reading the answer: %w", err)
	}
	if len(b) > maxBody {
		return nil, nil, fmt.Errorf("the answer is larger than %d bytes", maxBody)
	}
	return res, b, nil
}

var defaultHTTPClient = &http.Client{Timeout: 30 * time.Second}

// authorize adds the credentials: the access token as basic auth user (as
// the API documents it), or an OAuth access token as Bearer.
func (c *Client) authorize(ctx context.Context, req *http.Request) error {
	cr := c.Credentials
	switch {
	case cr.APIKey != "":
		req.SetBasicAuth(cr.APIKey, "")
		return nil
	case cr.OAuthClientID != "" && cr.OAuthClientSecret != "":
		tok, err := c.oauthToken(ctx)
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", "Bearer "+tok)
		return nil
	case cr.OAuthClientID != "" || cr.OAuthClientSecret != "":
		return errors.New("policy: an OAuth client needs both its ID and its secret")
	}
	return errors.New("policy: no credentials: an API access token or an OAuth client (ID and secret) is needed")
}

// oauthToken returns a cached access token, or fetches one with the client
// credentials grant.
func (c *Client) oauthToken(ctx context.Context) (string, error) {
	// fetchMu makes concurrent callers wait for one fetch; mu guards the
	// token alone, since building an error reads it (secrets).
	c.fetchMu.Lock()
	defer c.fetchMu.Unlock()
	c.mu.Lock()
	tok, exp := c.token, c.tokenExpiry
	c.mu.Unlock()
	if tok != "" && time.Now().Before(exp) {
		return tok, nil
	}
	base, err := c.baseURL()
	if err != nil {
		return "", err
	}
	form := url.Values{
		"grant_type":    {"client_credentials"},
		"client_id":     {c.Credentials.OAuthClientID},
		"client_secret": {c.Credentials.OAuthClientSecret},
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/api/v2/oauth/token", strings.NewReader(form.Encode()))
	if err != nil {
		return "", fmt.Errorf("policy: %s: %w", opToken, err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	res, b, err := c.roundTrip(req)
	if err != nil {
		return "", &RequestError{Op: opToken, Msg: oneLine(err.Error(), c.secrets())}
	}
	if res.StatusCode/100 != 2 {
		st := res.StatusCode
		if st == http.StatusBadRequest {
			// OAuth servers answer a wrong client with 400 invalid_client
			// as often as with 401: the same advice.
			var e struct{ Error string }
			if json.Unmarshal(b, &e) == nil && (e.Error == "invalid_client" || e.Error == "unauthorized_client") {
				st = http.StatusUnauthorized
			}
		}
		return "", &APIError{Op: opToken, Status: st, Message: c.apiMessage(b), Tailnet: c.tailnet()}
	}
	var t struct {
		AccessToken string `json:"access_token"`
		ExpiresIn   int64  `json:"expires_in"`
	}
	if err := json.Unmarshal(b, &t); err != nil || t.AccessToken == "" {
		return "", fmt.Errorf("policy: %s: the answer holds no access_token: is %s Tailscale's API?", opToken, c.base())
	}
	life := time.Duration(t.ExpiresIn) * time.Second
	if life <= 0 {
		life = time.Hour // Tailscale's tokens live an hour
	}
	c.mu.Lock()
	c.token = t.AccessToken
	c.tokenExpiry = time.Now().Add(life * 9 / 10) // renew before it runs out mid-request
	c.mu.Unlock()
	return t.AccessToken, nil
}

func (c *Client) forgetToken() {
	c.mu.Lock()
	c.token = ""
	c.mu.Unlock()
}

// secrets are the strings no error may contain.
func (c *Client) secrets() []string {
	c.mu.Lock()
	tok := c.token
	c.mu.Unlock()
	var s []string
	for _, v := range []string{c.Credentials.APIKey, c.Credentials.OAuthClientSecret, tok} {
		if v != "" {
			s = append(s, v)
		}
	}
	return s
}

// clean makes text from the API fit in one error line: one line, bounded,
// with any credential removed (a proxy or a hostile server may echo a
// request back).
func (c *Client) clean(s string) string { return oneLine(s, c.secrets()) }

// apiMessage is the "message" of an error answer ({"message": "…"}, or an
// OAuth error's error_description), or "" when the body has none.
func (c *Client) apiMessage(b []byte) string {
	var v struct {
		Message          string `json:"message"`
		Error            string `json:"error"`
		ErrorDescription string `json:"error_description"`
	}
	if json.Unmarshal(b, &v) != nil {
		return "" // an HTML page from a proxy says nothing useful on one line
	}
	return c.clean(cmpOr(v.Message, v.ErrorDescription, v.Error))
}

func cmpOr(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}

func oneLine(s string, secrets []string) string {
	for _, sec := range secrets {
		s = strings.ReplaceAll(s, sec, "[redacted]")
	}
	s = strings.Join(strings.FieldsFunc(s, func(r rune) bool { return r == '\n' || r == '\r' }), " ")
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return -1
		}
		return r
	}, s)
	if len(s) > 300 {
		s = s[:300] + "…"
	}
	return s
}

func (c *Client) tailnet() string { return cmpOr(c.Tailnet, "-") }

func (c *Client) base() string { return strings.TrimRight(cmpOr(c.BaseURL, DefaultBaseURL), "/") }

// CheckBaseURL says, without a request, whether BaseURL is a URL the
// credentials may be sent to: https (http only to a loopback address), a
// host, no user or password in it.
func (c *Client) CheckBaseURL() error {
	_, err := c.baseURL()
	return err
}

// baseURL is the API's URL after the checks that keep credentials safe.
func (c *Client) baseURL() (string, error) {
	b := c.base()
	u, err := url.Parse(b)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return "", fmt.Errorf("policy: API URL %q: want https://host[:port]", b)
	}
	if u.User != nil {
		return "", errors.New("policy: the API URL holds a user or password: give credentials as credentials, not in the URL")
	}
	if u.Scheme == "http" && !isLoopback(u.Hostname()) {
		return "", fmt.Errorf("policy: API URL %q is plain http: the credentials would travel in clear; use https (http is allowed for loopback only)", b)
	}
	return b, nil
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
