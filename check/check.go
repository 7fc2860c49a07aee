// Package check tells whether a DERP relay works, from where the check
// runs: one line per property with ✓ or ✗ and what was measured. The
// Docker HEALTHCHECK uses its cheapest form, Local.
package check

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"tailscale.com/net/stun"
)

// Result is the outcome of one check.
type Result struct {
	Name  string `json:"name"`
	OK    bool   `json:"ok"`
	Value string `json:"value,omitempty"` // what was measured, e.g. "204 in 1.3ms"
	Err   string `json:"error,omitempty"`
}

// Report is a list of results; it passes when every result does.
type Report []Result

// OK reports whether every check passed.
func (r Report) OK() bool {
	for _, res := range r {
		if !res.OK {
			return false
		}
	}
	return len(r) > 0
}

// WriteText writes one line per result, failures marked ✗.
func (r Report) WriteText(w io.Writer) {
	for _, res := range r {
		mark := "✓"
		if !res.OK {
			mark = "✗"
		}
		line := fmt.Sprintf("%s %s", mark, res.Name)
		if res.Value != "" {
			line += ": " + res.Value
		}
		if res.Err != "" {
			line += ": " + res.Err
		}
		fmt.Fprintln(w, line)
	}
}

// WriteJSON writes the report as JSON.
func (r Report) WriteJSON(w io.Writer) error {
	return json.NewEncoder(w).Encode(struct {
		OK      bool     `json:"ok"`
		Results []Result `json:"results"`
	}{r.OK(), r})
}

// LocalTarget is where a relay on this machine listens.
type LocalTarget struct {
	HTTPSAddr  string // host:port of the HTTPS listener; an empty host means 127.0.0.1
	ServerName string // TLS server name to send (the relay's -hostname)
	STUNAddr   string // host:port of STUN, "" if STUN is off
}

// Local is the cheap liveness check of a relay on this machine: HTTPS
// answers /generate_204 with the challenge echoed, and STUN answers a
// binding request. It does not check the certificate's trust (the
// container has no business judging that); `tailderp check URL` does.
func Local(ctx context.Context, t LocalTarget) Report {
	var r Report
	r = append(r, probe204(ctx, loopbackIfUnspecified(t.HTTPSAddr), t.ServerName))
	if t.STUNAddr != "" {
		r = append(r, stunBinding(ctx, loopbackIfUnspecified(t.STUNAddr)))
	}
	return r
}

func loopbackIfUnspecified(hostport string) string {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return hostport
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

func probe204(ctx context.Context, addr, serverName string) Result {
	res := Result{Name: "https " + addr + " /generate_204"}
	tr := &http.Transport{
		// Liveness only: the certificate is checked by `tailderp check URL`.
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true, ServerName: serverName},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	const challenge = "tailderp-check"
	req, err := http.NewRequestWithContext(ctx, "GET", "https://"+addr+"/generate_204", nil)
	if err != nil {
		res.Err = err.Error()
		return res
	}
	req.Header.Set("X-Tailscale-Challenge", challenge)
	t0 := time.Now()
	hres, err := c.Do(req)
	if err != nil {
		res.Err = err.Error()
		return res
	}
	hres.Body.Close()
	d := time.Since(t0)
	if hres.StatusCode != http.StatusNoContent || hres.Header.Get("X-Tailscale-Response") != "response "+challenge {
		res.Err = fmt.Sprintf("got %s with response header %q, want 204 echoing the challenge", hres.Status, hres.Header.Get("X-Tailscale-Response"))
		return res
	}
	res.OK = true
	res.Value = fmt.Sprintf("204 in %v", d.Round(10*time.Microsecond))
	return res
}

func stunBinding(ctx context.Context, addr string) Result {
	res := Result{Name: "stun " + addr}
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		res.Err = err.Error()
		return res
	}
	c, err := net.ListenUDP("udp", nil)
	if err != nil {
		res.Err = err.Error()
		return res
	}
	defer c.Close()
	deadline := time.Now().Add(2 * time.Second)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	c.SetDeadline(deadline)
	tx := stun.NewTxID()
	t0 := time.Now()
	if _, err := c.WriteToUDP(stun.Request(tx), ua); err != nil {
		res.Err = err.Error()
		return res
	}
	buf := make([]byte, 1500)
	for {
		n, err := c.Read(buf)
		if err != nil {
			res.Err = "no answer: " + err.Error()
			return res
		}
		gotTx, mapped, err := stun.ParseResponse(buf[:n])
		if err != nil || gotTx != tx {
			continue
		}
		res.OK = true
		res.Value = fmt.Sprintf("mapped %v in %v", mapped, time.Since(t0).Round(10*time.Microsecond))
		return res
	}
}
