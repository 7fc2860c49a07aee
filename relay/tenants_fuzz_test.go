package relay

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"net"
	"testing"
	"time"

	"go4.org/mem"
	"tailscale.com/derp"
	"tailscale.com/types/key"
)

// FuzzTenantClientInfo: whatever a client sends first, reading its key and
// mesh key for routing neither panics nor consumes anything (derpserver
// reads the same bytes next), and a mesh key is found only in a frame
// sealed to the relay's key.
func FuzzTenantClientInfo(f *testing.F) {
	relayKey := key.NewNode()
	s := &Server{PrivateKey: relayKey}
	client := key.NewNode()
	mesh := key.DERPMeshFromRaw32(mem.B(bytes.Repeat([]byte{7}, 32)))
	info, _ := json.Marshal(derp.ClientInfo{MeshKey: mesh, Version: derp.ProtocolVersion})
	sealed := client.SealTo(relayKey.Public(), info)
	var frame bytes.Buffer
	bw := bufio.NewWriter(&frame)
	derp.WriteFrame(bw, derp.FrameClientInfo, append(client.Public().AppendTo(nil), sealed...))
	bw.Flush()
	f.Add(frame.Bytes())
	f.Add([]byte{byte(derp.FrameClientInfo), 0, 0, 0, 10, 1, 2, 3})
	f.Add([]byte{byte(derp.FrameClientInfo), 0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		br := bufio.NewReaderSize(bytes.NewReader(in), 4096)
		k, err := peekClientKey(br)
		if err == nil {
			mk := s.peekMeshKey(br, k)
			if !mk.IsZero() {
				// Only a frame sealed to the relay's key opens.
				fl := int(in[1])<<24 | int(in[2])<<16 | int(in[3])<<8 | int(in[4])
				if _, ok := relayKey.OpenFrom(k, in[derp.FrameHeaderLen+derp.KeyLen:derp.FrameHeaderLen+fl]); !ok {
					t.Fatalf("mesh key %v from a frame that does not open", mk)
				}
			}
		}
		s.peekMeshKey(br, key.NewNode().Public()) // must not panic either
		if rest, _ := io.ReadAll(br); !bytes.Equal(rest, in) {
			t.Fatalf("peeking consumed input: %d of %d bytes left", len(rest), len(in))
		}
	})
}

// TestMinMeshClientInfo: the ClientInfo derp's own client sends is shorter
// than minMeshClientInfo without a mesh key (so routing a client costs no
// opening of it) and at least as long with one (so a mesh peer is never
// missed).
func TestMinMeshClientInfo(t *testing.T) {
	server := key.NewNode()
	mesh := key.DERPMeshFromRaw32(mem.B(bytes.Repeat([]byte{9}, 32)))
	for _, withMesh := range []bool{false, true} {
		c1, c2 := net.Pipe()
		go func() {
			opts := []derp.ClientOpt{derp.ServerPublicKey(server.Public()), derp.CanAckPings(true)}
			if withMesh {
				opts = append(opts, derp.MeshKey(mesh))
			}
			derp.NewClient(key.NewNode(), c1, bufio.NewReadWriter(bufio.NewReader(c1), bufio.NewWriter(c1)), t.Logf, opts...)
			c1.Close()
		}()
		c2.SetDeadline(time.Now().Add(10 * time.Second))
		hdr := make([]byte, derp.FrameHeaderLen)
		if _, err := io.ReadFull(c2, hdr); err != nil {
			t.Fatal(err)
		}
		c2.Close()
		fl := int(hdr[1])<<24 | int(hdr[2])<<16 | int(hdr[3])<<8 | int(hdr[4])
		if derp.FrameType(hdr[0]) != derp.FrameClientInfo || (fl >= minMeshClientInfo) != withMesh {
			t.Errorf("mesh key %v: ClientInfo frame type %v of %d bytes; the shortest with a mesh key is %d", withMesh, hdr[0], fl, minMeshClientInfo)
		}
	}
}
