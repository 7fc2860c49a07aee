package relay

import (
	"strings"
	"testing"

	"tailscale.com/tailcfg"
)

// FuzzParseMeshPeer: a -mesh-with entry is refused with one line, or is a
// peer that can be dialed and put in a derpMap: a host that is an IP
// address or an ASCII DNS name, a port from 1 to 65535 (0 for 443), a pin
// derphttp can read; written back as an entry it parses to the same peer,
// and its fleet region renders.
func FuzzParseMeshPeer(f *testing.F) {
	pin := "sha256-raw:" + strings.Repeat("ab", 32)
	for _, s := range []string{
		"derp2.example.com", "derp2.example.com:8443", "DERP2.Example.COM.", "[2001:db8::2]:443", "[2001:db8::2]", "2001:db8::2",
		"203.0.113.7", "::ffff:203.0.113.7", "[fe80::1%eth0]:443", pin + "@203.0.113.7", "derp.example.com@derp2.example.com",
		"derp2.example.com/10.0.0.2", "derp2.example.com:8443/[::1]", "https://derp2.example.com", "derp2.example.com:0",
		"derp2.example.com:65536", "derp2.example.com:+443", "a_b.example.com", "-a.example.com", "@", "/", ":", "[", "",
		strings.Repeat("a", 63) + "." + strings.Repeat("b", 63) + ".com",
	} {
		f.Add(s)
	}
	self := &tailcfg.DERPRegion{RegionID: 900, Nodes: []*tailcfg.DERPNode{{Name: "900a", RegionID: 900, HostName: "derp1.example.com", STUNPort: 3478}}}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseMeshPeer(s)
		if err != nil {
			if strings.ContainsAny(err.Error(), "\n\r") {
				t.Fatalf("error is not one line: %q", err)
			}
			return
		}
		if p.Host == "" || !validHostName(p.Host) || !isASCII(p.Host) || p.Port < 0 || p.Port > 65535 || p.Port == 443 {
			t.Fatalf("ParseMeshPeer(%q) = %+v", s, p)
		}
		if p.CertName != "" && checkCertName(p.CertName) != nil {
			t.Fatalf("ParseMeshPeer(%q) took pin %q", s, p.CertName)
		}
		entry := p.String()
		if p.CertName != "" {
			entry = p.CertName + "@" + entry
		}
		if p.DialIP.IsValid() {
			entry += "/" + p.DialIP.String()
		}
		back, err := ParseMeshPeer(entry)
		if err != nil || back != p {
			t.Fatalf("ParseMeshPeer(%q) = %+v; written back as %q: %+v, %v", s, p, entry, back, err)
		}
		r := FleetRegion(self, []MeshPeer{p}, 0)
		if len(r.Nodes) != 1 {
			t.Fatalf("fleet of self and itself: %d nodes", len(r.Nodes))
		}
		r = FleetRegion(self, []MeshPeer{p}, -1)
		if len(r.Nodes) != 2 || r.Nodes[1].HostName != p.Host {
			t.Fatalf("fleet region %+v for %+v", r.Nodes, p)
		}
		if _, err := PolicySnippet(r); err != nil {
			t.Fatalf("snippet: %v", err)
		}
	})
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}
