package relay

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// fuzzAdmitKey is the one key the fuzz Admitter admits.
const fuzzAdmitKey = "nodekey:" + "0707070707070707070707070707070707070707070707070707070707070707"

// recordingAdmitter admits only one key and records what it was asked.
type recordingAdmitter struct {
	allow key.NodePublic
	mu    sync.Mutex
	calls []tailcfg.DERPAdmitClientRequest
}

func (a *recordingAdmitter) Admit(ctx context.Context, k key.NodePublic, src netip.Addr) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.calls = append(a.calls, tailcfg.DERPAdmitClientRequest{NodePublic: k, Source: src})
	return k == a.allow
}

// FuzzAdmissionRequest: the in-process admission hook, asked the way
// derpserver asks it (a POST to its URL through http.DefaultClient from
// inside a /derp request), with any body: a body that does not decode is
// an error (derpserver, fail-open off, refuses) with the Admitter not
// asked and nothing tracked; one that does is one question to the
// Admitter, answered {"Allow":true} or {"Allow":false} as it decided, with
// the connection tracked under the key only when admitted. Allow:true
// comes only from a body that names the admitted key.
func FuzzAdmissionRequest(f *testing.F) {
	for _, s := range []string{
		`{"NodePublic":"` + fuzzAdmitKey + `","Source":"203.0.113.7"}`,
		`{"NodePublic":"` + strings.ToUpper(fuzzAdmitKey[:8]) + fuzzAdmitKey[8:] + `","Source":"2001:db8::1"}`,
		`{"NodePublic":"nodekey:` + strings.Repeat("ab", 32) + `","Source":"203.0.113.7"}`,
		`{"NodePublic":"` + fuzzAdmitKey + `"}`,
		`{"nodepublic":"` + fuzzAdmitKey + `","source":""}`,
		`{"NodePublic":"` + fuzzAdmitKey + `","Source":"203.0.113.7"} trailing`,
		`{"NodePublic":"` + fuzzAdmitKey + `","NodePublic":"nodekey:` + strings.Repeat("00", 32) + `"}`,
		`{"NodePublic":"mkey:` + strings.Repeat("07", 32) + `"}`,
		`{"NodePublic":"` + fuzzAdmitKey[:40] + `"}`,
		`{"NodePublic":null,"Source":null}`,
		`{}`, `null`, `[]`, `"x"`, ``, `{`,
		`{"NodePublic":"` + fuzzAdmitKey + `","Source":"203.0.113.7","Pad":"` + strings.Repeat("x", 5000) + `"}`,
	} {
		f.Add([]byte(s))
	}
	var allow key.NodePublic
	if err := allow.UnmarshalText([]byte(fuzzAdmitKey)); err != nil {
		f.Fatal(err)
	}
	allowHex := strings.TrimPrefix(fuzzAdmitKey, "nodekey:")

	f.Fuzz(func(t *testing.T, body []byte) {
		a := &recordingAdmitter{allow: allow}
		var conns connTracker
		var (
			status   int
			answer   []byte
			askErr   error
			tracked  []Client
			finished bool
		)
		h := withAdmission(a, &conns, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			// What derpserver does with its admission URL.
			req, err := http.NewRequestWithContext(r.Context(), http.MethodPost, admissionURL, bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			res, err := http.DefaultClient.Do(req)
			askErr = err
			if err == nil {
				status = res.StatusCode
				answer, err = io.ReadAll(res.Body)
				res.Body.Close()
				if err != nil {
					t.Fatal(err)
				}
			}
			tracked = conns.clients()
			finished = true
		}))
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/derp", nil))
		if !finished {
			t.Fatal("handler did not run")
		}
		if left := conns.clients(); len(left) != 0 {
			t.Fatalf("still tracked after the request ended: %v", left)
		}

		var whole tailcfg.DERPAdmitClientRequest
		valid := len(body) <= 4<<10 && json.Unmarshal(body, &whole) == nil
		if askErr != nil {
			if len(a.calls) != 0 || len(tracked) != 0 {
				t.Fatalf("undecodable body: Admitter asked %v, tracked %v", a.calls, tracked)
			}
			if valid {
				t.Fatalf("a valid request %q was an error: %v", body, askErr)
			}
			return
		}
		if status != http.StatusOK || len(a.calls) != 1 {
			t.Fatalf("status %d, Admitter asked %d times", status, len(a.calls))
		}
		asked := a.calls[0]
		if valid && (asked.NodePublic != whole.NodePublic || asked.Source != whole.Source) {
			t.Fatalf("body %q: Admitter asked about %v from %v", body, asked.NodePublic, asked.Source)
		}
		var resp tailcfg.DERPAdmitClientResponse
		if err := json.Unmarshal(answer, &resp); err != nil {
			t.Fatalf("answer %q is not JSON: %v", answer, err)
		}
		if want := `{"Allow":false}`; resp.Allow {
			want = `{"Allow":true}`
			if string(answer) != want {
				t.Fatalf("answer %q, want %s", answer, want)
			}
		} else if string(answer) != want {
			t.Fatalf("answer %q, want %s", answer, want)
		}
		if resp.Allow != (asked.NodePublic == allow) {
			t.Fatalf("Allow %v for %v", resp.Allow, asked.NodePublic)
		}
		if resp.Allow && !strings.Contains(strings.ToLower(string(body)), allowHex) {
			t.Fatalf("admitted on a body that does not name the key: %q", body)
		}
		switch {
		case resp.Allow && (len(tracked) != 1 || tracked[0].Key != allow || tracked[0].From != asked.Source):
			t.Fatalf("admitted, tracked %v", tracked)
		case !resp.Allow && len(tracked) != 0:
			t.Fatalf("refused, still tracked %v", tracked)
		}
	})
}
