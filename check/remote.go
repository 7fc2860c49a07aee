package check

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go4.org/mem"
	"tailscale.com/derp"
	"tailscale.com/derp/derpconst"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/bakedroots"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/tailderp/tailderp/internal/relayrules"
)

// Expect is what the check expects the relay to do with a stranger: a
// client holding a fresh key that no tailnet knows.
type Expect int

const (
	// ExpectRefused, the zero value, fails the check when a stranger is
	// admitted: a relay is meant to verify its clients, and an open relay
	// (anyone who finds it can use its bandwidth) is a finding.
	ExpectRefused Expect = iota
	// ExpectOpen is for a relay that is meant to be open: a stranger
	// admitted passes, and a stranger refused fails (it is not open).
	ExpectOpen
)

// Target is a relay to check, described the way a derpMap describes it, so
// the check dials exactly as a Tailscale client would.
type Target struct {
	// Node is the relay: HostName (DNS name or IP address; the TLS server
	// name), optional IPv4 and IPv6 (dialled instead of resolving
	// HostName; "none" disables a family), DERPPort (0 means 443),
	// STUNPort (0 means 3478, -1 means the relay has no STUN) and CertName
	// (the "sha256-raw:<hex>" pin of a certificate no public CA signed, or
	// the DNS name the certificate carries when it is not HostName).
	Node tailcfg.DERPNode

	// RootCAs are trusted besides the system's roots and the Let's Encrypt
	// roots Tailscale clients carry (a private CA). Optional.
	RootCAs *x509.CertPool

	// TrustOnFirstUse accepts whatever certificate the relay presents,
	// reports its pin, and pins it for the rest of the check. For -dev,
	// whose certificate is made up at every start.
	TrustOnFirstUse bool

	// Expect says whether a stranger must be refused.
	Expect Expect

	// MeshKey, if set, is the relay fleet's mesh key. The relay test then
	// uses two mesh clients, which a relay admits without asking anyone,
	// so relaying is proven even on a relay that refuses strangers.
	MeshKey key.DERPMesh

	// MemberKey, if set, is the node key of a member of the relay's
	// tailnet (e.g. a node that joined for the check, see node.JoinEphemeral):
	// the member test connects with it and must be admitted. Zero: members
	// are not tested, and the report says so (Report.Member).
	MemberKey key.NodePrivate

	// MemberWait is how long a refused member is retried before it counts
	// as refused (DefaultMemberWait if zero): the relay's node learns of a
	// node that has just joined from its next network map.
	MemberWait time.Duration

	// Pings is the number of round trips the latency figures are taken
	// over (default 20).
	Pings int

	// Logf receives the DERP clients' logs; nil discards them.
	Logf logger.Logf
}

// ParseURL turns a relay URL, "https://host[:port]" (or just
// "host[:port]"), into a derpMap node. A host that is an IP address is
// also its IPv4 or IPv6, so nothing is resolved.
func ParseURL(s string) (tailcfg.DERPNode, error) {
	if !strings.Contains(s, "://") {
		s = "https://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		return tailcfg.DERPNode{}, fmt.Errorf("relay URL %q: %v", s, err)
	}
	if u.Scheme != "https" {
		return tailcfg.DERPNode{}, fmt.Errorf("relay URL %q: want https://host[:port] (Tailscale clients speak DERP over HTTPS only)", s)
	}
	if u.Path != "" && u.Path != "/" && u.Path != "/derp" {
		return tailcfg.DERPNode{}, fmt.Errorf("relay URL %q: want https://host[:port], without a path", s)
	}
	host := u.Hostname()
	if host == "" {
		return tailcfg.DERPNode{}, fmt.Errorf("relay URL %q: no host", s)
	}
	n := tailcfg.DERPNode{Name: "check", RegionID: 900, HostName: host}
	if p := u.Port(); p != "" {
		port, err := strconv.Atoi(p)
		if err != nil || port < 1 || port > 65535 {
			return tailcfg.DERPNode{}, fmt.Errorf("relay URL %q: bad port", s)
		}
		if port != 443 {
			n.DERPPort = port
		}
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Is4() {
			n.IPv4, n.IPv6 = host, "none"
		} else {
			n.IPv6, n.IPv4 = host, "none"
		}
	}
	return n, nil
}

// Names of the results Run returns, in order.
const (
	NameDNS         = "dns"
	NameTLS         = "tls"
	NameCertificate = "certificate"
	NameGenerate204 = "generate_204"
	NameAdmission   = "admission"
	NameMember      = "member"
	NameRelay       = "relay"
	NameLatency     = "latency"
	NameSTUN        = "stun"
)

// Run checks the relay from here, one result per property, in this
// order: dns, tls, certificate, generate_204, admission (a stranger),
// member (a node of the tailnet), relay, latency, stun. When a step fails, the steps that need it are reported as
// skipped, so the first ✗ is the one to fix. Every step is bounded; ctx
// bounds the whole.
func Run(ctx context.Context, t Target) Report {
	c := &checker{t: t}
	defer c.close()
	if c.t.Pings <= 0 {
		c.t.Pings = 20
	}
	if c.t.Logf == nil {
		c.t.Logf = logger.Discard
	}
	var r Report
	skipAll := func(why string, names ...string) {
		for _, n := range names {
			r = append(r, Result{Name: n, Skipped: true, Err: why})
		}
	}

	dnsRes := c.resolve(ctx)
	r = append(r, dnsRes)
	if !dnsRes.OK {
		skipAll("skipped: no address to reach the relay at", NameTLS, NameCertificate, NameGenerate204, NameAdmission, NameMember, NameRelay, NameLatency, NameSTUN)
		return r
	}

	tlsRes := c.handshake(ctx)
	r = append(r, tlsRes)
	if !tlsRes.OK {
		skipAll("skipped: no TLS connection", NameCertificate, NameGenerate204, NameAdmission, NameMember, NameRelay, NameLatency)
		r = append(r, c.stun(ctx))
		return r
	}
	certRes := c.certificate()
	r = append(r, certRes)
	r = append(r, c.generate204(ctx))
	if certRes.OK || certRes.Warn {
		adm, admitted := c.admission(ctx)
		r = append(r, adm)
		r = append(r, c.member(ctx, adm, admitted))
		switch {
		case admitted:
			// Strangers get in (wanted or not): relay with two of them.
			r = append(r, c.relay(ctx, false))
		case adm.OK && !c.t.MeshKey.IsZero():
			r = append(r, c.relay(ctx, true))
		case adm.OK:
			r = append(r, Result{Name: NameRelay, OK: true, Skipped: true,
				Value: "not tested: strangers are refused (give the relay's mesh key, -mesh-key-file, to test relaying with two mesh clients)"})
		default:
			skipAll("skipped: no DERP client could connect", NameRelay)
		}
	} else {
		skipAll("skipped: Tailscale clients refuse this certificate, so no client can connect", NameAdmission, NameMember, NameRelay)
	}
	r = append(r, c.latency(ctx))
	r = append(r, c.stun(ctx))
	return r
}

type checker struct {
	t     Target
	addrs []netip.Addr // where to dial, in order of preference

	// From the TLS handshake.
	dialed  netip.AddrPort
	state   tls.ConnectionState
	pin     string // CertName of the leaf the relay presented
	certOK  bool
	httpTr  *http.Transport
	lastRTT []time.Duration

	strangerRefused bool // the relay disconnected the stranger after its handshake
}

func (c *checker) host() string { return c.t.Node.HostName }

func (c *checker) port() int {
	if c.t.Node.DERPPort != 0 {
		return c.t.Node.DERPPort
	}
	return 443
}

func (c *checker) stunPort() int {
	if c.t.Node.STUNPort != 0 {
		return c.t.Node.STUNPort
	}
	return 3478
}

// fixedAddr returns the address set for a family in the derpMap node: ok
// is false when DNS decides, disabled when the family is "none".
func fixedAddr(s string, is func(netip.Addr) bool) (a netip.Addr, ok, disabled bool) {
	if s == "" {
		return netip.Addr{}, false, false
	}
	ip, err := netip.ParseAddr(s)
	if err != nil || !is(ip) {
		return netip.Addr{}, false, true // "none", or not of this family: derphttp skips it
	}
	return ip, true, false
}

func (c *checker) resolve(ctx context.Context) Result {
	res := Result{Name: NameDNS}
	n := c.t.Node
	v4, fixed4, off4 := fixedAddr(n.IPv4, netip.Addr.Is4)
	v6, fixed6, off6 := fixedAddr(n.IPv6, netip.Addr.Is6)
	if ip, err := netip.ParseAddr(n.HostName); err == nil {
		c.addrs = []netip.Addr{ip.Unmap()}
		res.OK = true
		res.Value = fmt.Sprintf("%s is an IP address (nothing to resolve)", n.HostName)
		return res
	}
	var looked []netip.Addr
	var lookErr error
	var took time.Duration
	if !(fixed4 || off4) || !(fixed6 || off6) {
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		t0 := time.Now()
		looked, lookErr = net.DefaultResolver.LookupNetIP(lctx, "ip", n.HostName)
		took = time.Since(t0)
		cancel()
		for i, a := range looked {
			looked[i] = a.Unmap()
		}
	}
	var use []netip.Addr
	if fixed4 {
		use = append(use, v4)
	} else if !off4 {
		for _, a := range looked {
			if a.Is4() {
				use = append(use, a)
			}
		}
	}
	if fixed6 {
		use = append(use, v6)
	} else if !off6 {
		for _, a := range looked {
			if a.Is6() {
				use = append(use, a)
			}
		}
	}
	c.addrs = use
	var parts []string
	if len(looked) > 0 {
		parts = append(parts, fmt.Sprintf("%s → %s in %v", n.HostName, joinAddrs(looked), roundDur(took)))
	}
	if fixed4 || fixed6 {
		parts = append(parts, "the derpMap's "+strings.Join(nonEmpty(ifStr(fixed4, "IPv4 "+n.IPv4), ifStr(fixed6, "IPv6 "+n.IPv6)), " and ")+" is what clients dial")
	}
	switch {
	case len(use) == 0 && lookErr != nil:
		res.Err = fmt.Sprintf("cannot resolve %s: %v", n.HostName, lookErr)
		return res
	case len(use) == 0:
		res.Err = fmt.Sprintf("%s has no address clients would dial (resolved: %s; IPv4 %q, IPv6 %q)", n.HostName, joinAddrs(looked), n.IPv4, n.IPv6)
		return res
	case lookErr != nil:
		parts = append(parts, fmt.Sprintf("%s does not resolve (%v), but clients do not need it to", n.HostName, lookErr))
	}
	res.OK = true
	res.Value = strings.Join(parts, "; ")
	return res
}

func joinAddrs(as []netip.Addr) string {
	s := make([]string, len(as))
	for i, a := range as {
		s[i] = a.String()
	}
	return strings.Join(s, ", ")
}

func ifStr(ok bool, s string) string {
	if ok {
		return s
	}
	return ""
}

func nonEmpty(ss ...string) []string {
	return slices.DeleteFunc(ss, func(s string) bool { return s == "" })
}

// inspectTLS is the client TLS configuration of the check's own
// connections: it accepts any certificate so that the certificate step
// can say exactly what is wrong with it, instead of a handshake error.
// The DERP clients do not use it; they verify as Tailscale clients do.
func (c *checker) inspectTLS() *tls.Config {
	return &tls.Config{
		ServerName:         c.host(),
		InsecureSkipVerify: true, // judged in certificate(), with the reason spelled out
		NextProtos:         []string{"http/1.1"},
		MinVersion:         tls.VersionTLS12,
	}
}

// dial connects over TCP to the first address that answers.
func (c *checker) dial(ctx context.Context) (net.Conn, netip.AddrPort, error) {
	var errs []error
	for _, a := range c.addrs {
		ap := netip.AddrPortFrom(a, uint16(c.port()))
		d := net.Dialer{Timeout: 3 * time.Second}
		conn, err := d.DialContext(ctx, "tcp", ap.String())
		if err == nil {
			return conn, ap, nil
		}
		errs = append(errs, err)
	}
	return nil, netip.AddrPort{}, errors.Join(errs...)
}

func (c *checker) handshake(ctx context.Context) Result {
	res := Result{Name: NameTLS}
	t0 := time.Now()
	conn, ap, err := c.dial(ctx)
	if err != nil {
		res.Err = "cannot connect: " + err.Error()
		if errors.Is(err, syscall.ECONNREFUSED) {
			res.Err += " (is the relay running, and listening on that port?)"
		}
		return res
	}
	defer conn.Close()
	connected := time.Since(t0)
	tc := tls.Client(conn, c.inspectTLS())
	hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	t1 := time.Now()
	if err := tc.HandshakeContext(hctx); err != nil {
		res.Err = fmt.Sprintf("handshake with %v: %v", ap, err)
		if strings.Contains(err.Error(), "internal error") {
			res.Err += fmt.Sprintf(" (the relay has no certificate for the name %q: check its -hostname)", c.host())
		}
		return res
	}
	hs := time.Since(t1)
	c.dialed = ap
	c.state = tc.ConnectionState()
	res.OK = true
	res.Value = fmt.Sprintf("%s with %v: connect %v, handshake %v", tlsVersion(c.state.Version), ap, roundDur(connected), roundDur(hs))
	if k, ok := derpKeyOf(c.state.PeerCertificates); ok {
		res.Value += ", DERP key " + k.ShortString()
	}
	return res
}

func tlsVersion(v uint16) string {
	switch v {
	case tls.VersionTLS13:
		return "TLS 1.3"
	case tls.VersionTLS12:
		return "TLS 1.2"
	}
	return fmt.Sprintf("TLS 0x%04x", v)
}

// isMetaCert reports whether cert is derpserver's "meta certificate",
// which carries the relay's DERP key after the real chain.
func isMetaCert(cert *x509.Certificate) bool {
	return strings.HasPrefix(cert.Subject.CommonName, derpconst.MetaCertCommonNamePrefix)
}

func derpKeyOf(certs []*x509.Certificate) (key.NodePublic, bool) {
	for _, c := range certs {
		if isMetaCert(c) {
			k, err := key.ParseNodePublicUntyped(mem.S(strings.TrimPrefix(c.Subject.CommonName, derpconst.MetaCertCommonNamePrefix)))
			return k, err == nil
		}
	}
	return key.NodePublic{}, false
}

// certificate judges the certificate the relay presented the way a
// Tailscale client's TLS dialer (tlsdial) does, and says why it fails.
func (c *checker) certificate() Result {
	res := Result{Name: NameCertificate}
	var chain []*x509.Certificate
	for _, cert := range c.state.PeerCertificates {
		if !isMetaCert(cert) {
			chain = append(chain, cert)
		}
	}
	if len(chain) == 0 {
		res.Err = "the relay presented no certificate"
		return res
	}
	leaf := chain[0]
	c.pin = relayrules.CertName(leaf.Raw)
	now := time.Now()
	host := c.host()
	certName := c.t.Node.CertName
	pinned := strings.HasPrefix(certName, "sha256-raw:")
	var how string
	switch {
	case pinned:
		want := strings.ToLower(strings.TrimPrefix(certName, "sha256-raw:"))
		if _, err := hex.DecodeString(want); err != nil || len(want) != 64 {
			res.Err = fmt.Sprintf("CertName %q is not a pin: want sha256-raw: and 64 hex digits", certName)
			return res
		}
		if "sha256-raw:"+want != c.pin {
			res.Err = fmt.Sprintf("pin mismatch: the relay presents %s, the derpMap pins %s; clients refuse it (was the certificate regenerated? put the new CertName in the derpMap)", c.pin, certName)
			return res
		}
		if err := leaf.VerifyHostname(host); err != nil {
			res.Err = fmt.Sprintf("the pinned certificate matches but is for %s, not %s; clients check the name too", certNames(leaf), host)
			return res
		}
		how = "matches the pin " + shortPin(c.pin)
	case c.t.TrustOnFirstUse:
		if err := leaf.VerifyHostname(host); err != nil {
			res.Err = fmt.Sprintf("the certificate is for %s, not %s", certNames(leaf), host)
			return res
		}
		how = "accepted unverified (-dev); pin it with CertName " + c.pin
	default:
		name := host
		if certName != "" {
			name = certName // derphttp: tlsdial.SetConfigExpectedCert
		}
		if err := verifyChain(chain, name, c.t.RootCAs, now); err != nil {
			res.Err = explainVerify(err, leaf, name, c.pin)
			return res
		}
		how = fmt.Sprintf("valid for %s, issued by %s", name, issuerName(leaf))
	}
	// The relay's own rule, so the check warns when the relay's log does.
	info := relayrules.CertInfoOf(leaf)
	problem := info.Problem(now)
	switch problem {
	case relayrules.CertExpired:
		res.Err = fmt.Sprintf("expired %s: Tailscale clients refuse it; %s", leaf.NotAfter.UTC().Format(time.DateOnly), renewFix(pinned))
		return res
	case relayrules.CertNotYetValid:
		res.Err = fmt.Sprintf("not valid until %s (is this machine's clock right?)", leaf.NotBefore.UTC().Format(time.RFC3339))
		return res
	}
	days := info.DaysLeft(now)
	res.Value = fmt.Sprintf("%s; expires %s (in %d days)", how, leaf.NotAfter.UTC().Format(time.DateOnly), days)
	c.certOK = true
	if problem == relayrules.CertExpiring {
		res.Warn = true
		res.Err = "then Tailscale clients refuse it; " + renewFix(pinned)
		return res
	}
	res.OK = true
	return res
}

// renewFix says how a relay's certificate is renewed: by the command that
// makes the next one for a pinned (self-signed, IP-only) certificate,
// else by what each certificate mode does.
func renewFix(pinned bool) string {
	if pinned {
		return "on the relay, `tailderp cert renew` writes the next certificate and prints its CertName; then `tailderp cert renew -activate`, and at once put the new CertName into the derpMap (docs/DEPLOY.md, \"Renewing the IP certificate\")"
	}
	return "renew it: with -certmode letsencrypt the relay renews by itself when a third of the lifetime (at most 30 days) is left, so its renewal is failing (can it reach the CA, and the CA reach it on port 443 or 80?); with -certmode manual put renewed files in place, they are reloaded without a restart"
}

func shortPin(p string) string {
	if len(p) > len("sha256-raw:")+16 {
		return p[:len("sha256-raw:")+16] + "…"
	}
	return p
}

func issuerName(c *x509.Certificate) string {
	if n := c.Issuer.CommonName; n != "" {
		if len(c.Issuer.Organization) > 0 {
			return c.Issuer.Organization[0] + " " + n
		}
		return n
	}
	return c.Issuer.String()
}

// certNames lists the names a certificate is valid for.
func certNames(c *x509.Certificate) string {
	var names []string
	names = append(names, c.DNSNames...)
	for _, ip := range c.IPAddresses {
		names = append(names, ip.String())
	}
	if len(names) == 0 && c.Subject.CommonName != "" {
		names = append(names, c.Subject.CommonName+" (common name only)")
	}
	if len(names) == 0 {
		return "no name"
	}
	return strings.Join(names, ", ")
}

// verifyChain verifies like tlsdial: system roots, then extra roots, then
// the Let's Encrypt roots baked into Tailscale clients.
func verifyChain(chain []*x509.Certificate, name string, extra *x509.CertPool, now time.Time) error {
	opts := x509.VerifyOptions{DNSName: name, Intermediates: x509.NewCertPool(), CurrentTime: now}
	for _, c := range chain[1:] {
		opts.Intermediates.AddCert(c)
	}
	_, errSys := chain[0].Verify(opts)
	if errSys == nil {
		return nil
	}
	if extra != nil {
		opts.Roots = extra
		if _, err := chain[0].Verify(opts); err == nil {
			return nil
		}
	}
	opts.Roots = bakedroots.Get()
	if _, err := chain[0].Verify(opts); err == nil {
		return nil
	}
	return errSys
}

func explainVerify(err error, leaf *x509.Certificate, name, pin string) string {
	var he x509.HostnameError
	var ua x509.UnknownAuthorityError
	var ci x509.CertificateInvalidError
	switch {
	case errors.As(err, &he):
		return fmt.Sprintf("the certificate is for %s, not %s (check the relay's -hostname and the derpMap's HostName)", certNames(leaf), name)
	case errors.As(err, &ua) && string(leaf.RawIssuer) == string(leaf.RawSubject):
		return fmt.Sprintf("self-signed: Tailscale clients accept it only pinned, with CertName %q in the derpMap node (pass the same to -cert-name)", pin)
	case errors.As(err, &ua):
		return fmt.Sprintf("not signed by a CA clients trust (issuer %s): %v", issuerName(leaf), err)
	case errors.As(err, &ci) && ci.Reason == x509.Expired:
		return fmt.Sprintf("expired or not yet valid (valid %s to %s)", leaf.NotBefore.UTC().Format(time.DateOnly), leaf.NotAfter.UTC().Format(time.DateOnly))
	}
	return err.Error()
}

// transport is an HTTP client transport to the address the handshake
// used, keeping its connection for the latency round trips.
func (c *checker) transport() *http.Transport {
	if c.httpTr == nil {
		ap := c.dialed
		c.httpTr = &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				d := net.Dialer{Timeout: 3 * time.Second}
				return d.DialContext(ctx, "tcp", ap.String())
			},
			TLSClientConfig:     c.inspectTLS(),
			ForceAttemptHTTP2:   false,
			MaxIdleConnsPerHost: 1,
			TLSHandshakeTimeout: 5 * time.Second,
		}
	}
	return c.httpTr
}

func (c *checker) url(path string) string {
	return "https://" + net.JoinHostPort(c.host(), strconv.Itoa(c.port())) + path
}

func (c *checker) generate204(ctx context.Context) Result {
	return get204(ctx, c.transport(), NameGenerate204, c.url("/generate_204"))
}

// region is the derpMap region the DERP clients dial: the target node,
// pinned to what the certificate step learned when trusting on first use.
func (c *checker) region() *tailcfg.DERPRegion {
	n := c.t.Node
	if n.Name == "" {
		n.Name = "check"
	}
	if n.RegionID == 0 {
		n.RegionID = 900
	}
	if c.t.TrustOnFirstUse && n.CertName == "" {
		n.CertName = c.pin
	}
	return &tailcfg.DERPRegion{RegionID: n.RegionID, RegionCode: "check", RegionName: "check", Nodes: []*tailcfg.DERPNode{&n}}
}

// newClient returns a DERP client for the target that dials the way a
// Tailscale client does (derphttp with the region, tlsdial's checks).
func (c *checker) newClient(k key.NodePrivate, mesh bool) *derphttp.Client {
	return NewDERPClient(c.region(), k, c.t.RootCAs, ifMesh(mesh, c.t.MeshKey), c.t.Logf)
}

func ifMesh(mesh bool, k key.DERPMesh) key.DERPMesh {
	if mesh {
		return k
	}
	return key.DERPMesh{}
}

// NewDERPClient returns a derphttp client for the relay in region that
// verifies the relay's certificate as Tailscale clients do, also trusting
// roots (optional), and presents meshKey if it is set.
func NewDERPClient(region *tailcfg.DERPRegion, k key.NodePrivate, roots *x509.CertPool, meshKey key.DERPMesh, logf logger.Logf) *derphttp.Client {
	if logf == nil {
		logf = logger.Discard
	}
	dc := derphttp.NewRegionClient(k, logf, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	if roots != nil {
		// tlsdial uses RootCAs as extra roots beside the system's.
		dc.TLSConfig = &tls.Config{RootCAs: roots}
	}
	dc.MeshKey = meshKey
	return dc
}

// ErrRefused is returned by ConnectDERP when the relay closes the
// connection right after the client sent its key: it does not admit it.
var ErrRefused = errors.New("the relay closed the connection right after the handshake: refused")

// ConnectDERP connects dc and waits for the relay's first frame, the
// ServerInfo a relay sends only to an admitted client. A client the relay
// refuses is disconnected instead: that returns an error wrapping
// ErrRefused.
func ConnectDERP(ctx context.Context, dc *derphttp.Client) error {
	if err := dc.Connect(ctx); err != nil {
		return err
	}
	type result struct {
		m   derp.ReceivedMessage
		err error
	}
	ch := make(chan result, 1)
	go func() {
		m, err := dc.Recv()
		ch <- result{m, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return fmt.Errorf("%w (%v)", ErrRefused, r.err)
		}
		if _, ok := r.m.(derp.ServerInfoMessage); !ok {
			return fmt.Errorf("first frame from the relay is %T, want ServerInfo", r.m)
		}
		return nil
	case <-ctx.Done():
		dc.Close() // ends the Recv
		return fmt.Errorf("no ServerInfo from the relay: %w", ctx.Err())
	}
}

// admission connects a stranger (a fresh key no tailnet knows) and tells
// whether it was admitted.
func (c *checker) admission(ctx context.Context) (res Result, admitted bool) {
	res = Result{Name: NameAdmission}
	dc := c.newClient(key.NewNode(), false)
	defer dc.Close()
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	t0 := time.Now()
	err := ConnectDERP(actx, dc)
	d := time.Since(t0)
	c.strangerRefused = errors.Is(err, ErrRefused)
	switch {
	case errors.Is(err, ErrRefused) && c.t.Expect == ExpectOpen:
		res.Err = fmt.Sprintf("refuses clients outside the tailnet (a fresh key was disconnected right after the handshake, in %v), but the relay was expected to be open (-expect-open)", roundDur(d))
		return res, false
	case errors.Is(err, ErrRefused):
		res.OK = true
		res.Value = fmt.Sprintf("refuses clients outside the tailnet (a fresh key was disconnected right after the handshake, in %v)", roundDur(d))
		return res, false
	case err != nil:
		res.Err = "a DERP client cannot connect as a Tailscale client would: " + err.Error()
		return res, false
	case c.t.Expect == ExpectRefused:
		res.Err = "a stranger (a fresh key no tailnet knows) was admitted: this relay is open to anyone who finds it (is -verify-clients off? If it is meant to be open, check with -expect-open)"
		return res, true
	}
	res.OK = true
	res.Value = fmt.Sprintf("admits any client: an open relay, as expected (a fresh key was admitted in %v)", roundDur(d))
	return res, true
}

// DefaultMemberWait is Target.MemberWait's default. A relay's node
// usually learns of a new node within 100 ms; 10 s leaves room for a slow
// control server's map, and is short of the time a client waits.
const DefaultMemberWait = 10 * time.Second

// memberRetryEvery is the pause between a member's refused connects.
const memberRetryEvery = 250 * time.Millisecond

// member connects with the member's key, retrying a refusal for
// MemberWait, and says whether the relay admits it. Without a key it says
// members were not tested, unless the relay admitted a stranger: then it
// admits any key, members included.
func (c *checker) member(ctx context.Context, adm Result, strangerAdmitted bool) Result {
	res := Result{Name: NameMember}
	switch {
	case !adm.OK && !strangerAdmitted && !c.strangerRefused:
		res.Skipped = true
		res.Err = "skipped: no DERP client could connect"
		return res
	case c.t.MemberKey.IsZero() && strangerAdmitted:
		res.OK = true
		res.Value = "admitted: the relay admits any key (a stranger was admitted), members of a tailnet too"
		return res
	case c.t.MemberKey.IsZero():
		res.OK, res.Skipped = true, true
		res.Value = "not tested: no member key (a node key of the relay's tailnet), so whether the relay admits its tailnet's members is unknown"
		return res
	}
	pub := c.t.MemberKey.Public()
	wait := c.t.MemberWait
	if wait <= 0 {
		wait = DefaultMemberWait
	}
	t0 := time.Now()
	deadline := t0.Add(wait)
	var err error
	for attempt := 1; ; attempt++ {
		dc := c.newClient(c.t.MemberKey, false)
		actx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err = ConnectDERP(actx, dc)
		cancel()
		dc.Close()
		if err == nil {
			res.OK = true
			res.Value = fmt.Sprintf("a member of the tailnet is admitted (node %s", pub.ShortString())
			if attempt > 1 {
				res.Value += fmt.Sprintf(", after %d refusals in %v: the relay's node learnt of it from its network map", attempt-1, roundDur(time.Since(t0)))
			}
			res.Value += ")"
			return res
		}
		if !errors.Is(err, ErrRefused) {
			res.Err = fmt.Sprintf("a DERP client with the member's key (node %s) cannot connect: %v", pub.ShortString(), err)
			return res
		}
		if !time.Now().Before(deadline) || ctx.Err() != nil {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(memberRetryEvery):
		}
	}
	res.Err = fmt.Sprintf("a member of the tailnet is refused (node %s, disconnected right after the handshake, retried for %v). "+
		"Likely causes: the relay's tailnet node is not logged in or cannot reach its control server (`tailderp check -local` on the relay says which); "+
		"the relay serves another tailnet than this member's (another control server, or another account); "+
		"or the tailnet policy hides this member from the relay's node (the least-privilege rule in the README: let clients reach the relay's tag)",
		pub.ShortString(), roundDur(time.Since(t0)))
	return res
}

// relay connects two clients (fresh keys, or mesh clients) and bounces
// Pings packets between them: a → relay → b → relay → a.
func (c *checker) relay(ctx context.Context, mesh bool) Result {
	res := Result{Name: NameRelay}
	who := "two fresh clients"
	if mesh {
		who = "two mesh-key clients"
	}
	rctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	a := c.newClient(key.NewNode(), mesh)
	defer a.Close()
	b := c.newClient(key.NewNode(), mesh)
	defer b.Close()
	for _, dc := range []*derphttp.Client{a, b} {
		if err := ConnectDERP(rctx, dc); err != nil {
			res.Err = who + ": " + err.Error()
			if mesh && errors.Is(err, ErrRefused) {
				res.Err += " (is the mesh key the relay's?)"
			}
			return res
		}
	}
	rtts, err := Bounce(rctx, a, b, c.t.Pings, 2*time.Second)
	if err != nil {
		res.Err = fmt.Sprintf("%s: %d of %d packets came back: %v", who, len(rtts), c.t.Pings, err)
		return res
	}
	c.lastRTT = rtts
	res.OK = true
	p := Percentiles(rtts)
	res.Value = fmt.Sprintf("%s exchanged %d packets through it: round trip p50 %v, p99 %v", who, len(rtts), roundDur(p.P50), roundDur(p.P99))
	return res
}

// Bounce sends n packets from a to b, which echoes each back through the
// relay, one at a time, and returns the round trip times. Both clients
// must be connected and admitted; Bounce reads from both until it
// returns.
func Bounce(ctx context.Context, a, b *derphttp.Client, n int, each time.Duration) ([]time.Duration, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	aKey, bKey := a.SelfPublicKey(), b.SelfPublicKey()
	errc := make(chan error, 2)
	// b echoes every packet from a.
	go func() {
		for ctx.Err() == nil {
			m, err := b.Recv()
			if err != nil {
				errc <- fmt.Errorf("receiver: %w", err)
				return
			}
			if p, ok := m.(derp.ReceivedPacket); ok && p.Source == aKey {
				if err := b.Send(aKey, slices.Clone(p.Data)); err != nil {
					errc <- fmt.Errorf("receiver echo: %w", err)
					return
				}
			}
		}
	}()
	echoes := make(chan uint64, n)
	go func() {
		for ctx.Err() == nil {
			m, err := a.Recv()
			if err != nil {
				errc <- fmt.Errorf("sender: %w", err)
				return
			}
			if p, ok := m.(derp.ReceivedPacket); ok && p.Source == bKey && len(p.Data) >= 8 {
				select {
				case echoes <- beUint64(p.Data):
				default:
				}
			}
		}
	}()
	var rtts []time.Duration
	timer := time.NewTimer(each)
	defer timer.Stop()
	buf := make([]byte, 64)
	for seq := range uint64(n) {
		putBEUint64(buf, seq)
		t0 := time.Now()
		if err := a.Send(bKey, buf); err != nil {
			return rtts, err
		}
		timer.Reset(each)
	wait:
		for {
			select {
			case got := <-echoes:
				if got == seq {
					rtts = append(rtts, time.Since(t0))
					break wait
				}
			case err := <-errc:
				return rtts, err
			case <-timer.C:
				return rtts, fmt.Errorf("packet %d not echoed within %v", seq, each)
			case <-ctx.Done():
				return rtts, ctx.Err()
			}
		}
	}
	return rtts, nil
}

func beUint64(b []byte) uint64 {
	var v uint64
	for _, x := range b[:8] {
		v = v<<8 | uint64(x)
	}
	return v
}

func putBEUint64(b []byte, v uint64) {
	for i := 7; i >= 0; i-- {
		b[i] = byte(v)
		v >>= 8
	}
}

// latency times Pings HTTPS round trips to /derp/latency-check on one
// kept-alive connection: what a client's netcheck measures over HTTPS.
func (c *checker) latency(ctx context.Context) Result {
	res := Result{Name: NameLatency}
	lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var rtts []time.Duration
	for i := 0; i <= c.t.Pings; i++ {
		req, err := http.NewRequestWithContext(lctx, "GET", c.url("/derp/latency-check"), nil)
		if err != nil {
			res.Err = err.Error()
			return res
		}
		t0 := time.Now()
		hres, err := c.transport().RoundTrip(req)
		if err != nil {
			res.Err = fmt.Sprintf("after %d round trips: %v", len(rtts), err)
			return res
		}
		io.Copy(io.Discard, io.LimitReader(hres.Body, 4<<10))
		hres.Body.Close()
		if hres.StatusCode != http.StatusOK {
			res.Err = fmt.Sprintf("/derp/latency-check answered %s, want 200", hres.Status)
			return res
		}
		if i > 0 { // the first one pays for the connection
			rtts = append(rtts, time.Since(t0))
		}
	}
	p := Percentiles(rtts)
	res.OK = true
	res.Value = fmt.Sprintf("p50 %v, p99 %v over %d HTTPS round trips (/derp/latency-check)", roundDur(p.P50), roundDur(p.P99), len(rtts))
	return res
}

func (c *checker) stun(ctx context.Context) Result {
	res := Result{Name: NameSTUN}
	if c.t.Node.STUNPort < 0 {
		res.OK, res.Skipped = true, true
		res.Value = "not checked: the relay has no STUN (STUNPort -1)"
		return res
	}
	if len(c.addrs) == 0 {
		res.Skipped = true
		res.Err = "skipped: no address"
		return res
	}
	var errs []string
	for _, a := range c.addrs {
		addr := netip.AddrPortFrom(a, uint16(c.stunPort())).String()
		mapped, rtt, err := stunQuery(ctx, addr, 2*time.Second)
		if err != nil {
			errs = append(errs, err.Error())
			continue
		}
		res.OK = true
		res.Value = fmt.Sprintf("UDP %s answers: you are %v, in %v", addr, mapped, roundDur(rtt))
		return res
	}
	res.Err = strings.Join(errs, "; ")
	return res
}

// Close releases the connections Run kept; Run calls it.
func (c *checker) close() {
	if c.httpTr != nil {
		c.httpTr.CloseIdleConnections()
	}
}

// LearnPin connects to the relay and returns the CertName pin of the
// certificate it presents, without judging it: for trusting a -dev
// relay's certificate on first use.
func LearnPin(ctx context.Context, n tailcfg.DERPNode) (string, error) {
	c := &checker{t: Target{Node: n}}
	if res := c.resolve(ctx); !res.OK {
		return "", errors.New(res.Err)
	}
	if res := c.handshake(ctx); !res.OK {
		return "", errors.New(res.Err)
	}
	for _, cert := range c.state.PeerCertificates {
		if !isMetaCert(cert) {
			return relayrules.CertName(cert.Raw), nil
		}
	}
	return "", errors.New("the relay presented no certificate")
}
