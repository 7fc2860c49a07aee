package relay

// Tenants: one relay serving several tailnets apart from each other.
//
// Each tenant (tailnet) gets its own derpserver.Server, all holding the
// relay's one DERP key, behind the one listener and the one /derp path; a
// connection is handed to the server of its tenant before its DERP
// handshake ends. A client can only reach keys connected to the same
// server, so a client of tailnet A sending to a connected key of tailnet B
// gets exactly the answer it gets for an absent key (derpserver's
// lookupDest: PeerGone "not here"), and it cannot watch B's connections
// (that needs B's server's mesh key). The derpMap, the certificate and the
// port are the same for every tenant: nothing changes for the tailnets.
//
// The tenant is chosen by what the client sends first, its ClientInfo
// frame:
//
//   - a mesh peer (another relay of the fleet) presents a mesh key: each
//     tenant has its own, derived from the relay's MeshKey and the
//     tenant's name (TenantMeshKey), so a fleet's relays join tenant to
//     tenant, and a mesh link of tenant A can only ever watch and forward
//     within A. The first tenant uses MeshKey itself, so a derper peer
//     meshes with it as before;
//   - anyone else is routed by the node key it announces (in the clear,
//     the frame's first 32 bytes): Server.TenantOf names the tailnet that
//     has that key. derpserver then checks the client holds the key, and
//     runs that tenant's Admitter.
//
// How it fits derpserver v1.102.5 without a fork (file:line in
// tailscale.com/derp/derpserver):
//
//   - derpserver.Handler writes the 101 into the hijacked bufio.Writer
//     without flushing (handler.go:54-63), then Server.accept writes the
//     server-key frame through that same bufio.Writer and flushes it
//     (derpserver.go:1017-1018, 1644-1650) and only then reads ClientInfo
//     (derpserver.go:1022). Nothing else is written before ClientInfo.
//   - A client only sends ClientInfo after it has the server key (from that
//     frame, or from the TLS meta certificate with Derp-Fast-Start), so we
//     send the 101 and the server-key frame first: we write exactly those
//     bytes ourselves (identical for every tenant: same key).
//   - We then Peek ClientInfo without consuming it, and hand
//     derpserver.Accept the same bufio.Reader (nothing to replay) and a
//     bufio.Writer over serverKeyEater, which accepts exactly the
//     server-key frame derpserver writes first and fails anything else, so
//     a derpserver that changed its greeting fails the connection closed
//     rather than corrupting the stream. derpserver's lazyBufioWriter drops
//     that writer after its first flush (derpserver.go:2659-2669) and
//     writes everything after it to nc, the untouched hijacked conn (so its
//     TCP_INFO stats, derpserver_linux.go:57-69, keep working).
//
// Both rely on derpserver internals: TestTenantIsolation and the tests
// beside it fail loudly if a tailscale.com upgrade changes them.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"expvar"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/coder/websocket"
	"go4.org/mem"
	"tailscale.com/derp"
	"tailscale.com/derp/derpserver"
	"tailscale.com/metrics"
	"tailscale.com/net/wsconn"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/logs"
)

// Tenant is one of the tailnets a relay serves apart from the others (see
// Server.Tenants).
type Tenant struct {
	// Name names the tenant: in TenantOf's answers, metrics and logs, and
	// in its mesh key, so it must be the same on every relay of a fleet.
	Name string
	// Admitter decides which of the clients routed to this tenant may
	// relay. Required.
	Admitter Admitter
}

// tenant is a Tenant running: its own DERP server and mesh links.
type tenant struct {
	Tenant
	derp    *derpserver.Server
	meshKey key.DERPMesh // zero without a MeshKey
	mesh    []*meshLink

	refusedFull expvar.Int    // refused: MaxConnsPerTenant reached
	fullLog     *logs.Limiter // the warning that it was
}

// TenantMeshKey is the mesh key of tenant name on a fleet whose mesh key
// is base: base itself for the first tenant (first), so a derper peer
// meshes with it, and otherwise a key derived from base and the name
// (HMAC-SHA256), so knowing one tenant's mesh link tells nothing of
// another's and a link joins the same tenant on every relay.
func TenantMeshKey(base key.DERPMesh, name string, first bool) key.DERPMesh {
	if base.IsZero() || first {
		return base
	}
	raw, err := hex.DecodeString(base.String())
	if err != nil {
		panic(err) // a DERPMesh always prints as hex
	}
	mac := hmac.New(sha256.New, raw)
	mac.Write([]byte("tailderp tenant mesh key\x00" + name))
	return key.DERPMeshFromRaw32(mem.B(mac.Sum(nil)))
}

// startTenants makes the DERP server of every tenant (one, unnamed, for a
// relay of one tailnet), each with the relay's key.
func (s *Server) startTenants() error {
	specs := s.Tenants
	if len(specs) == 0 {
		specs = []Tenant{{Admitter: s.Admitter}}
	} else if s.TenantOf == nil {
		return errors.New("relay: tenants need a TenantOf")
	}
	seen := map[string]bool{}
	for i, spec := range specs {
		if len(s.Tenants) > 0 {
			if spec.Name == "" || seen[spec.Name] {
				return fmt.Errorf("relay: tenant %d: name %q is empty or used twice", i+1, spec.Name)
			}
			if spec.Admitter == nil {
				return fmt.Errorf("relay: tenant %q: no admitter", spec.Name)
			}
		}
		seen[spec.Name] = true
		t := &tenant{Tenant: spec, meshKey: TenantMeshKey(s.MeshKey, spec.Name, i == 0), fullLog: logs.NewLimiter(1, time.Minute)}
		t.derp = derpserver.New(s.PrivateKey, derpLogf(s.tenantLogger(spec.Name), s.logs.conn))
		s.tenants = append(s.tenants, t)
		switch {
		case s.TCPWriteTimeout > 0:
			t.derp.SetTCPWriteTimeout(s.TCPWriteTimeout)
		case s.TCPWriteTimeout < 0:
			t.derp.SetTCPWriteTimeout(0)
		}
		if !t.meshKey.IsZero() {
			if err := t.derp.SetMeshKey(t.meshKey.String()); err != nil {
				return fmt.Errorf("relay: mesh key: %w", err)
			}
		}
		if spec.Admitter != nil {
			if err := useAdmission(t.derp); err != nil {
				return err
			}
		}
	}
	s.derp = s.tenants[0].derp
	return nil
}

// tenantLogger tags a tenant's lines with its name (none for a relay of
// one tailnet).
func (s *Server) tenantLogger(name string) *slog.Logger {
	if name == "" {
		return s.Logger
	}
	return s.Logger.With("tailnet", name)
}

// tenantNamed is the running tenant called name, or nil.
func (s *Server) tenantNamed(name string) *tenant {
	for _, t := range s.tenants {
		if t.Name == name {
			return t
		}
	}
	return nil
}

// tenantHandshakeTimeout bounds the wait for ClientInfo, as derpserver
// bounds its own handshake (derpserver.go:1016, 1021).
const tenantHandshakeTimeout = 10 * time.Second

// tenantHandler is /derp of a relay with Tenants: plain DERP upgrades
// (with and without Derp-Fast-Start) and WebSocket DERP, each connection
// handed to its tenant's server. It runs inside withAdmission, whose
// record of the connection it completes with the tenant and its Admitter.
func (s *Server) tenantHandler() http.Handler {
	pub := s.PrivateKey.Public()
	greeting := serverKeyFrame(pub)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/derp/probe", "/derp/latency-check":
			derpserver.ProbeHandler(w, r)
			return
		}
		up := strings.ToLower(r.Header.Get("Upgrade"))
		if up == "websocket" && strings.Contains(r.Header.Get("Sec-Websocket-Protocol"), "derp") {
			s.serveTenantWebSocket(w, r, greeting)
			return
		}
		if up != "websocket" && up != "derp" {
			http.Error(w, "DERP requires connection upgrade", http.StatusUpgradeRequired)
			return
		}
		h, ok := w.(http.Hijacker)
		if !ok {
			http.Error(w, "HTTP does not support general TCP support", http.StatusInternalServerError)
			return
		}
		nc, brw, err := h.Hijack()
		if err != nil {
			http.Error(w, "HTTP does not support general TCP support", http.StatusInternalServerError)
			return
		}
		if r.Header.Get(derp.FastStartHeader) != "1" {
			// Byte for byte what derpserver.Handler writes (handler.go:56-62).
			fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\n"+
				"Upgrade: DERP\r\n"+
				"Connection: Upgrade\r\n"+
				"Derp-Version: %v\r\n"+
				"Derp-Public-Key: %s\r\n\r\n",
				derp.ProtocolVersion,
				pub.UntypedHexString())
		}
		ctx := r.Context()
		if v := r.Header.Get(derp.IdealNodeHeader); v != "" {
			ctx = derpserver.IdealNodeContextKey.WithValue(ctx, v)
		}
		s.acceptTenant(ctx, nc, brw, greeting, nc.RemoteAddr().String())
	})
}

// serveTenantWebSocket is derpserver.AddWebSocketSupport's upgrade
// (websocket.go:39-61), with the connection routed like any other.
func (s *Server) serveTenantWebSocket(w http.ResponseWriter, r *http.Request, greeting []byte) {
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{
		Subprotocols:    []string{"derp"},
		OriginPatterns:  []string{"*"},
		CompressionMode: websocket.CompressionDisabled, // WireGuard packets do not compress
	})
	if err != nil {
		return
	}
	defer c.Close(websocket.StatusInternalError, "closing")
	if c.Subprotocol() != "derp" {
		c.Close(websocket.StatusPolicyViolation, "client must speak the derp subprotocol")
		return
	}
	wc := wsconn.NetConn(r.Context(), c, websocket.MessageBinary, r.RemoteAddr)
	brw := bufio.NewReadWriter(bufio.NewReader(wc), bufio.NewWriter(wc))
	s.acceptTenant(r.Context(), wc, brw, greeting, r.RemoteAddr)
}

// acceptTenant greets the client as derpserver would, reads which tenant
// it belongs to from its ClientInfo, and gives the connection to that
// tenant's server. A client no tenant takes is closed, as a refused
// admission is.
func (s *Server) acceptTenant(ctx context.Context, nc net.Conn, brw *bufio.ReadWriter, greeting []byte, remoteAddr string) {
	nc.SetDeadline(time.Now().Add(tenantHandshakeTimeout))
	if _, err := brw.Write(greeting); err != nil {
		nc.Close()
		return
	}
	if err := brw.Flush(); err != nil {
		nc.Close()
		return
	}
	clientKey, err := peekClientKey(brw.Reader)
	if err != nil {
		nc.Close()
		return
	}
	src, _ := netip.ParseAddrPort(remoteAddr) // as derpserver reads it for admission
	t := s.routeTenant(ctx, brw.Reader, clientKey, src.Addr())
	if t == nil {
		nc.Close()
		return
	}
	nc.SetDeadline(time.Time{}) // derpserver sets its own
	eat := bufio.NewReadWriter(brw.Reader, bufio.NewWriterSize(&serverKeyEater{want: greeting}, 2<<10))
	t.derp.Accept(ctx, nc, eat, remoteAddr)
}

// routeTenant picks the tenant of a connection whose ClientInfo is
// waiting in br: a mesh peer by its mesh key, anyone else by TenantOf,
// and then only if the tenant has room (MaxConnsPerTenant). It records the
// choice on the connection's admission record, so the tenant's Admitter
// decides. nil: no tenant takes it.
func (s *Server) routeTenant(ctx context.Context, br *bufio.Reader, clientKey key.NodePublic, src netip.Addr) *tenant {
	ac, _ := ctx.Value(admissionCtxKey{}).(*admissionCtx)
	if ac == nil {
		return nil // not served through withAdmission: refuse
	}
	if mk := s.peekMeshKey(br, clientKey); !mk.IsZero() {
		for _, t := range s.tenants {
			// derpserver compares again, in constant time, before it
			// treats the client as a mesh peer.
			if !t.meshKey.IsZero() && t.meshKey.Equal(mk) {
				return t
			}
		}
	}
	name := s.TenantOf(ctx, clientKey, src)
	t := s.tenantNamed(name) // nil for "": every tenant has a name
	if t == nil {
		return nil
	}
	if !s.conns.joinTenant(ac.conn, t.Name, s.MaxConnsPerTenant) {
		t.refusedFull.Add(1)
		s.tenantFull(t)
		return nil
	}
	ac.admitter = t.Admitter
	return t
}

// tenantFull says, at most once a minute per tenant, that a tenant's
// share of the relay is used up.
func (s *Server) tenantFull(t *tenant) {
	if ok, _ := t.fullLog.Allow(time.Now()); ok {
		s.Logger.Warn("relay: a tailnet's share of the relay is used up: its new clients are refused until some disconnect; raise -max-conns-per-tailnet if the relay has room",
			"tailnet", t.Name, "connections", s.conns.tenantCount(t.Name), "max", s.MaxConnsPerTenant)
	}
}

// minMeshClientInfo is the shortest ClientInfo frame that can hold a mesh
// key: the client's key, the box's nonce and tag, and the shortest JSON
// with one, {"meshKey":"<64 hex digits>"} (78 bytes).
const minMeshClientInfo = derp.KeyLen + derp.NonceLen + 16 + len(`{"meshKey":""}`) + 64

// peekMeshKey is the mesh key in the ClientInfo waiting in br, if the
// client sent one: the frame is opened with the relay's key, as
// derpserver opens it (recvClientKey, derpserver.go:1731-1760), without
// consuming it. Zero if there is none or the frame cannot be read.
func (s *Server) peekMeshKey(br *bufio.Reader, clientKey key.NodePublic) key.DERPMesh {
	hdr, err := br.Peek(derp.FrameHeaderLen)
	if err != nil {
		return key.DERPMesh{}
	}
	fl := int(uint32(hdr[1])<<24 | uint32(hdr[2])<<16 | uint32(hdr[3])<<8 | uint32(hdr[4]))
	if derp.FrameType(hdr[0]) != derp.FrameClientInfo || fl < derp.KeyLen+derp.NonceLen {
		return key.DERPMesh{}
	}
	if fl < minMeshClientInfo {
		// Too short to hold a mesh key: a client's usual ClientInfo
		// ({"version":2,"CanAckPings":true}) is, so it costs no opening.
		return key.DERPMesh{}
	}
	if fl > br.Size()-derp.FrameHeaderLen {
		return key.DERPMesh{} // larger than any mesh peer's ClientInfo
	}
	b, err := br.Peek(derp.FrameHeaderLen + fl)
	if err != nil {
		return key.DERPMesh{}
	}
	msg, ok := s.PrivateKey.OpenFrom(clientKey, b[derp.FrameHeaderLen+derp.KeyLen:])
	if !ok {
		return key.DERPMesh{}
	}
	var info derp.ClientInfo
	if json.Unmarshal(msg, &info) != nil {
		return key.DERPMesh{}
	}
	return info.MeshKey
}

// serverKeyFrame is the FrameServerKey frame derpserver sends first
// (derpserver.go:1644-1650): magic then the public key.
func serverKeyFrame(pub key.NodePublic) []byte {
	payload := append([]byte(derp.Magic), pub.AppendTo(nil)...)
	var buf bytes.Buffer
	bw := bufio.NewWriter(&buf)
	if err := derp.WriteFrame(bw, derp.FrameServerKey, payload); err != nil {
		panic(err) // a bytes.Buffer does not fail
	}
	return buf.Bytes()
}

// peekClientKey returns the key at the start of the ClientInfo frame
// without consuming anything, checking the frame as derpserver's
// recvClientKey does (derpserver.go:1731-1746) so that what we route on is
// what derpserver then authenticates.
func peekClientKey(br *bufio.Reader) (key.NodePublic, error) {
	b, err := br.Peek(derp.FrameHeaderLen + derp.KeyLen)
	if err != nil {
		return key.NodePublic{}, fmt.Errorf("relay: tenant: read client info: %w", err)
	}
	if derp.FrameType(b[0]) != derp.FrameClientInfo {
		return key.NodePublic{}, fmt.Errorf("relay: tenant: first frame is 0x%x, not client info", b[0])
	}
	fl := uint32(b[1])<<24 | uint32(b[2])<<16 | uint32(b[3])<<8 | uint32(b[4])
	if fl < derp.KeyLen+derp.NonceLen || fl > 256<<10 {
		return key.NodePublic{}, fmt.Errorf("relay: tenant: client info of %d bytes", fl)
	}
	return key.NodePublicFromRaw32(mem.B(b[derp.FrameHeaderLen:])), nil
}

// errUnexpectedWrite is what serverKeyEater answers a write that is not
// the server-key frame we already sent.
var errUnexpectedWrite = errors.New("relay: tenant: derpserver wrote something other than its server key before client info")

// serverKeyEater swallows derpserver's own copy of the server-key frame,
// which the tenant handler has already sent, and fails any other write.
type serverKeyEater struct {
	want []byte // what is still expected
}

func (e *serverKeyEater) Write(p []byte) (int, error) {
	if len(p) > len(e.want) || !bytes.Equal(p, e.want[:len(p)]) {
		return 0, errUnexpectedWrite
	}
	e.want = e.want[len(p):]
	return len(p), nil
}

// Tenants and their pages.

// TenantDERP is the DERP server of tenant name (the only one, for "" on a
// relay of one tailnet), for its debug pages: they list only its clients.
// nil if there is no such tenant.
func (s *Server) TenantDERP(name string) *derpserver.Server {
	if t := s.tenantNamed(name); t != nil {
		return t.derp
	}
	return nil
}

// TenantExpVar is tenant name's metrics: its DERP server's, its clients,
// its mesh links, and the clients refused because its share was used up.
// nil if there is no such tenant.
func (s *Server) TenantExpVar(name string) expvar.Var {
	t := s.tenantNamed(name)
	if t == nil {
		return nil
	}
	m := new(metrics.Set)
	m.Set("derp", t.derp.ExpVar(true))
	m.Set("gauge_clients", expvar.Func(func() any { return s.conns.tenantCount(name) }))
	m.Set("counter_refused_tailnet_full", &t.refusedFull)
	m.Set("gauge_mesh_peers", expvar.Func(func() any {
		peers, _ := meshCounts(t.mesh)
		return peers
	}))
	m.Set("gauge_mesh_peers_connected", expvar.Func(func() any {
		_, connected := meshCounts(t.mesh)
		return connected
	}))
	return m
}
