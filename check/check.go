// Package check tells whether a DERP relay works, from where the check
// runs: one line per property with ✓ or ✗ and what was measured.
//
//   - Local is the cheap liveness form the Docker HEALTHCHECK uses.
//   - Run is the full check of a relay by its derpMap node: DNS, TLS and
//     certificate (CA-signed name or CertName pin, days to expiry),
//     /generate_204, admission (a stranger is refused, or two fresh clients
//     exchange packets through it), member (given the node key of a member
//     of the relay's tailnet, that member is admitted), latency, STUN.
//   - Load puts bounded load on a relay you own and measures it:
//     throughput, connects, idle memory, STUN (see load.go).
package check

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/pires/go-proxyproto"
	"tailscale.com/net/stun"

	"github.com/tailderp/tailderp/internal/readiness"
)

// Result is the outcome of one check.
//
// OK is false for a failure. A warning (Warn: works now, but needs
// attention) fails too when it is a check's verdict (a certificate about
// to expire), and passes when the relay judged it so itself (Local: a
// tailnet admitting from its known-peers cache). Skipped marks a
// check that was not run: with OK true because it does not apply (STUN
// turned off), with OK false because an earlier check failed and this one
// could not run without it.
type Result struct {
	Name    string `json:"name"`
	OK      bool   `json:"ok"`
	Warn    bool   `json:"warn,omitempty"`
	Skipped bool   `json:"skipped,omitempty"`
	Value   string `json:"value,omitempty"` // what was measured, e.g. "204 in 1.3ms"
	Err     string `json:"error,omitempty"`
}

// Mark is the result's symbol: ✓ passed, ✗ failed, ⚠ warning, – skipped.
func (r Result) Mark() string {
	switch {
	case r.Skipped:
		return "–"
	case r.Warn:
		return "⚠"
	case r.OK:
		return "✓"
	default:
		return "✗"
	}
}

// Report is a list of results; it passes when every result does.
type Report []Result

// OK reports whether every check passed (a warning does not).
func (r Report) OK() bool {
	for _, res := range r {
		if !res.OK {
			return false
		}
	}
	return len(r) > 0
}

// Failed returns the results that failed or warned, skipped ones left
// out: the lines to look at.
func (r Report) Failed() []Result {
	var out []Result
	for _, res := range r {
		if !res.OK && !res.Skipped {
			out = append(out, res)
		}
	}
	return out
}

// WriteText writes one line per result, failures marked ✗.
func (r Report) WriteText(w io.Writer) {
	for _, res := range r {
		line := fmt.Sprintf("%s %s", res.Mark(), res.Name)
		if res.Value != "" {
			line += ": " + res.Value
		}
		if res.Err != "" {
			line += ": " + res.Err
		}
		fmt.Fprintln(w, line)
	}
}

// MemberOutcome is what a report learnt about the members of the relay's
// tailnet: whether the relay admits them.
type MemberOutcome string

// The outcomes of the member test.
const (
	// MemberAdmitted: a member's key was admitted, or the relay admits
	// any key (it admitted a stranger).
	MemberAdmitted MemberOutcome = "admitted"
	// MemberRefused: a member's key was refused (or could not connect).
	MemberRefused MemberOutcome = "refused"
	// MemberNotTested: no member key was given, or an earlier step
	// failed so no client could connect.
	MemberNotTested MemberOutcome = "not-tested"
)

// Member returns the outcome of the report's member test; "" for a report
// that has none (Local).
func (r Report) Member() MemberOutcome {
	for _, res := range r {
		if res.Name != NameMember {
			continue
		}
		switch {
		case res.Skipped:
			return MemberNotTested
		case res.OK:
			return MemberAdmitted
		}
		return MemberRefused
	}
	return ""
}

// AllGood reports whether the report proves the relay does its whole job:
// every check passed (so a stranger was refused, or admitted by a relay
// meant to be open) and a member of the tailnet was admitted. A report
// can be OK without being AllGood: when members were not tested.
func (r Report) AllGood() bool {
	return r.OK() && r.Member() == MemberAdmitted
}

// WriteJSON writes the report as JSON: "ok" (every check passed: the exit
// status), "member" (Member, omitted when the report has no member test),
// "all_good" (AllGood) and "results".
func (r Report) WriteJSON(w io.Writer) error {
	return json.NewEncoder(w).Encode(struct {
		OK      bool          `json:"ok"`
		Member  MemberOutcome `json:"member,omitempty"`
		AllGood bool          `json:"all_good"`
		Results []Result      `json:"results"`
	}{r.OK(), r.Member(), r.AllGood(), r})
}

// LocalTarget is where a relay on this machine listens, and what it says
// of itself.
type LocalTarget struct {
	HTTPSAddr  string // host:port of the HTTPS listener; an empty host means 127.0.0.1
	ServerName string // TLS server name to send (the relay's -hostname)
	STUNAddr   string // host:port of STUN, "" if STUN is off

	// Readiness is what the running relay publishes about itself
	// (serving.json); nil when it published none. Local judges it
	// (readiness.Judge) unless Liveness.
	Readiness *readiness.Readiness
	// Liveness asks only whether the relay serves (HTTPS and STUN
	// answer): what a restart could fix. Readiness problems — a control
	// server down, a login refused — are not, and are left out.
	Liveness bool
	// ProxyProtocolFrom are the relay's PROXY protocol sources
	// (-proxy-protocol-from): a connection from one of them must start
	// with a header, so the check sends a v2 LOCAL one (a proxy's own
	// health check) when it connects from one.
	ProxyProtocolFrom []netip.Prefix
	// ReadinessRequired makes a relay that published no readiness a
	// failure (the server was found, but says nothing of itself: it is
	// older, or cannot write its state directory).
	ReadinessRequired bool
}

// Local checks a relay on this machine: HTTPS answers /generate_204 with
// the challenge echoed, STUN answers a binding request, and (unless
// Liveness) each part of the readiness the relay publishes: a tailnet
// whose members would all be refused, an admission URL that is down with
// admission failing closed, a certificate clients refuse, or a relay that
// is stopping, fail; a tailnet admitting from its known-peers cache
// passes with a warning. It does not check the certificate's trust (the
// container has no business judging that); `tailderp check URL` does.
func Local(ctx context.Context, t LocalTarget) Report {
	var r Report
	r = append(r, probe204(ctx, loopbackIfUnspecified(t.HTTPSAddr), t.ServerName, t.ProxyProtocolFrom))
	if t.STUNAddr != "" {
		r = append(r, stunBinding(ctx, loopbackIfUnspecified(t.STUNAddr)))
	}
	if t.Liveness {
		return r
	}
	if t.Readiness == nil {
		if t.ReadinessRequired {
			r = append(r, Result{Name: "readiness", Err: "the relay publishes no readiness (serving.json has none: an older tailderp?); use -liveness for a liveness check only"})
		}
		return r
	}
	for _, f := range t.Readiness.Judge(time.Now()) {
		res := Result{Name: f.Name, OK: f.Severity != readiness.Fail, Warn: f.Severity == readiness.Warn}
		if res.OK {
			res.Value = f.Text
		} else {
			res.Err = f.Text
		}
		r = append(r, res)
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

func probe204(ctx context.Context, addr, serverName string, proxyFrom []netip.Prefix) Result {
	tr := &http.Transport{
		// Liveness only: the certificate is checked by `tailderp check URL`.
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true, ServerName: serverName},
		DisableKeepAlives: true,
		DialContext:       dialAsProxy(proxyFrom),
	}
	defer tr.CloseIdleConnections()
	return get204(ctx, tr, "https "+addr+" /generate_204", "https://"+addr+"/generate_204")
}

// get204 GETs url (a relay's /generate_204) through rt with a captive-
// portal challenge and checks that the relay answers 204 echoing it, as
// derpserver does.
func get204(ctx context.Context, rt http.RoundTripper, name, url string) Result {
	res := Result{Name: name}
	const challenge = "tailderp-check"
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, "GET", url, nil)
	if err != nil {
		res.Err = err.Error()
		return res
	}
	req.Header.Set("X-Tailscale-Challenge", challenge)
	t0 := time.Now()
	hres, err := rt.RoundTrip(req)
	if err != nil {
		res.Err = err.Error()
		return res
	}
	io.Copy(io.Discard, io.LimitReader(hres.Body, 4<<10))
	hres.Body.Close()
	d := time.Since(t0)
	if hres.StatusCode != http.StatusNoContent || hres.Header.Get("X-Tailscale-Response") != "response "+challenge {
		res.Err = fmt.Sprintf("got %s with X-Tailscale-Response %q, want 204 echoing the challenge (is something other than a DERP relay answering, like a proxy?)", hres.Status, hres.Header.Get("X-Tailscale-Response"))
		return res
	}
	res.OK = true
	res.Value = fmt.Sprintf("204 with the challenge echoed in %v", roundDur(d))
	return res
}

func stunBinding(ctx context.Context, addr string) Result {
	res := Result{Name: "stun " + addr}
	mapped, rtt, err := stunQuery(ctx, addr, 2*time.Second)
	if err != nil {
		res.Err = err.Error()
		return res
	}
	res.OK = true
	res.Value = fmt.Sprintf("mapped %v in %v", mapped, roundDur(rtt))
	return res
}

// stunQuery sends Tailscale's STUN binding request to addr and returns the
// mapped address and the round trip time of the answer. It retries twice
// (UDP may lose a packet) within wait. The socket is connected, so an ICMP
// "port unreachable" fails it at once instead of after wait.
func stunQuery(ctx context.Context, addr string, wait time.Duration) (netip.AddrPort, time.Duration, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "udp", addr)
	if err != nil {
		return netip.AddrPort{}, 0, err
	}
	defer c.Close()
	deadline := time.Now().Add(wait)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	buf := make([]byte, 1500)
	const tries = 3
	for try := range tries {
		tx := stun.NewTxID()
		t0 := time.Now()
		if _, err := c.Write(stun.Request(tx)); err != nil {
			return netip.AddrPort{}, 0, stunErr(addr, err)
		}
		// Each try waits its share of what is left.
		tryDeadline := t0.Add(time.Until(deadline) / time.Duration(tries-try))
		c.SetReadDeadline(tryDeadline)
		for {
			n, err := c.Read(buf)
			if err != nil {
				if ne, ok := err.(net.Error); ok && ne.Timeout() && try < tries-1 {
					break // next try
				}
				return netip.AddrPort{}, 0, stunErr(addr, err)
			}
			gotTx, mapped, err := stun.ParseResponse(buf[:n])
			if err != nil || gotTx != tx {
				continue // not ours (a late answer to an earlier try)
			}
			return mapped, time.Since(t0), nil
		}
	}
	return netip.AddrPort{}, 0, stunErr(addr, os.ErrDeadlineExceeded)
}

func stunErr(addr string, err error) error {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("no answer: nothing listens on UDP %s (connection refused; is STUN on, and -stun-port right?)", addr)
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("no answer from UDP %s (a firewall dropping UDP, STUN off, or a wrong -stun-port)", addr)
	}
	return fmt.Errorf("no answer from UDP %s: %v", addr, err)
}

// roundDur rounds d for display: 3 significant digits or so.
func roundDur(d time.Duration) time.Duration {
	switch {
	case d >= 100*time.Millisecond:
		return d.Round(time.Millisecond)
	case d >= 10*time.Millisecond:
		return d.Round(100 * time.Microsecond)
	case d >= time.Millisecond:
		return d.Round(10 * time.Microsecond)
	default:
		return d.Round(time.Microsecond)
	}
}

// dialAsProxy dials TCP, and when the connection's own address is one of
// from, writes a PROXY protocol v2 LOCAL header first, as a proxy's
// health check does: the relay then serves it as itself.
func dialAsProxy(from []netip.Prefix) func(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, addr)
		if err != nil || len(from) == 0 {
			return c, err
		}
		la, ok := c.LocalAddr().(*net.TCPAddr)
		if !ok {
			return c, nil
		}
		ip, _ := netip.AddrFromSlice(la.IP)
		for _, p := range from {
			if p.Contains(ip.Unmap()) {
				h := &proxyproto.Header{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}
				if _, err := h.WriteTo(c); err != nil {
					c.Close()
					return nil, fmt.Errorf("PROXY header: %w", err)
				}
				break
			}
		}
		return c, nil
	}
}
