package relay

// Tenant routing (prototype, issue 20 item 1): one listener, one
// derpserver.Server per tailnet, all with the same DERP private key; the
// tailnet is chosen per connection from the client's node key, which the
// client sends in the clear as the first 32 bytes of its ClientInfo frame.
//
// How it fits derpserver v1.102.5 without a fork (see the file:line notes in
// the spike report):
//
//   - derpserver.Handler writes the 101 into the hijacked bufio.Writer
//     without flushing (handler.go:54-63), then Server.accept writes the
//     server-key frame through that same bufio.Writer and flushes it
//     (derpserver.go:1017-1018, 1644-1650) and only then reads ClientInfo
//     (derpserver.go:1022). Nothing else is written before ClientInfo.
//   - A client only sends ClientInfo after it has the server key (from that
//     frame, or from the TLS meta certificate with Derp-Fast-Start), so we
//     must send the 101 and the server-key frame first: we write exactly
//     those bytes ourselves (identical for every tenant: same key).
//   - We then Peek the ClientInfo header and key without consuming them,
//     and hand derpserver.Accept the same bufio.Reader (nothing to replay)
//     and a bufio.Writer over serverKeyEater, which accepts exactly the
//     server-key frame derpserver writes first and fails anything else, so
//     a derpserver that changed its greeting fails the connection closed
//     rather than corrupting the stream. derpserver's lazyBufioWriter drops
//     that writer after its first flush (derpserver.go:2659-2669) and writes
//     everything after it to nc, the untouched hijacked conn (so its
//     TCP_INFO stats, derpserver_linux.go:57-69, keep working).

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"go4.org/mem"
	"tailscale.com/derp"
	"tailscale.com/derp/derpserver"
	"tailscale.com/types/key"
)

// TenantSelector picks the DERP server of the tailnet a connection belongs
// to. name is the request's "tenant" query parameter (mesh links, whose
// client key is the relay's own key, name their tailnet this way) or "";
// clientKey is the key the client announced (not yet proven: derpserver
// checks the proof and runs that tenant's admission). Returning nil closes
// the connection, as a refused admission does.
type TenantSelector func(name string, clientKey key.NodePublic) *derpserver.Server

// tenantHandshakeTimeout bounds the wait for ClientInfo, as derpserver
// bounds its own handshake (derpserver.go:1016, 1021).
const tenantHandshakeTimeout = 10 * time.Second

// TenantHandler returns the /derp handler of a relay serving several
// tailnets whose derpservers all hold the private key whose public half is
// pub. It speaks plain DERP-over-HTTP upgrades (with and without
// Derp-Fast-Start); WebSocket DERP is not routed yet.
func TenantHandler(pub key.NodePublic, sel TenantSelector) http.Handler {
	greeting := serverKeyFrame(pub)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/derp/probe", "/derp/latency-check":
			derpserver.ProbeHandler(w, r)
			return
		}
		up := strings.ToLower(r.Header.Get("Upgrade"))
		if up != "websocket" && up != "derp" {
			http.Error(w, "DERP requires connection upgrade", http.StatusUpgradeRequired)
			return
		}
		fastStart := r.Header.Get(derp.FastStartHeader) == "1"
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
		if !fastStart {
			// Byte for byte what derpserver.Handler writes (handler.go:56-62).
			fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\n"+
				"Upgrade: DERP\r\n"+
				"Connection: Upgrade\r\n"+
				"Derp-Version: %v\r\n"+
				"Derp-Public-Key: %s\r\n\r\n",
				derp.ProtocolVersion,
				pub.UntypedHexString())
		}
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
		s := sel(r.URL.Query().Get("tenant"), clientKey)
		if s == nil {
			nc.Close()
			return
		}
		ctx := r.Context()
		if v := r.Header.Get(derp.IdealNodeHeader); v != "" {
			ctx = derpserver.IdealNodeContextKey.WithValue(ctx, v)
		}
		eat := bufio.NewReadWriter(brw.Reader, bufio.NewWriterSize(&serverKeyEater{want: greeting}, 2<<10))
		s.Accept(ctx, nc, eat, nc.RemoteAddr().String())
	})
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
