package relay

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/internal/relayrules"
)

// How a fleet's region assembles itself (Server.MeshWith): every relay
// publishes its region at DERPMapPath, and each one, every FleetPollEvery,
// fetches each mesh peer's DERPMapPath the way the mesh dials it (the
// same TLS checks: pin, mesh root CAs, the peer's name), sending its own
// derpMap node signed with the mesh key in the FleetNodeHeader. A peer
// holding the same mesh key adds the node to the region it publishes and
// answers with its own node, signed the same way. So every relay's
// DERPMapPath lists every relay it has heard from, or that has heard from
// it, within FleetPeerTTL (a relay added later with the others in its
// -mesh-with appears at theirs too), and a relay that stopped leaves the
// region FleetPeerTTL after it was last heard from. Only holders of the
// mesh key can add a node: the region is what clients dial.
//
// A peer that answers 404 is not a tailderp (an upstream derper): it is
// listed as -mesh-with describes it, for as long as the relay runs.

// FleetNodeHeader carries a relay's own derpMap node, signed with the
// fleet's mesh key, in a fetch of DERPMapPath and in the answer.
const FleetNodeHeader = "Tailderp-Fleet-Node"

// Fleet timing defaults (Server.FleetPollEvery, Server.FleetPeerTTL): a
// new or changed relay is in every peer's region within one poll, and
// one that stopped leaves after a few polls missed.
const (
	DefaultFleetPollEvery = 20 * time.Second
	DefaultFleetPeerTTL   = 2 * time.Minute
)

// fleetMaxSkew bounds how far a signed node's time may be from ours: an
// old announcement replayed later is refused.
const fleetMaxSkew = 5 * time.Minute

// fleetAnnouncement is what FleetNodeHeader carries, before signing.
type fleetAnnouncement struct {
	Node *tailcfg.DERPNode `json:"node"`
	At   time.Time         `json:"at"`
}

// signNode makes a FleetNodeHeader value: base64url(JSON).hex(HMAC).
func signNode(mk key.DERPMesh, n *tailcfg.DERPNode, now time.Time) (string, error) {
	b, err := json.Marshal(fleetAnnouncement{Node: n, At: now.UTC()})
	if err != nil {
		return "", err
	}
	payload := base64.RawURLEncoding.EncodeToString(b)
	return payload + "." + hex.EncodeToString(fleetMAC(mk, payload)), nil
}

func fleetMAC(mk key.DERPMesh, payload string) []byte {
	h := hmac.New(sha256.New, []byte("tailderp fleet node\x00"+mk.String()))
	h.Write([]byte(payload))
	return h.Sum(nil)
}

// maxFleetHeader bounds a FleetNodeHeader value (a node is ~300 bytes).
const maxFleetHeader = 4 << 10

// verifyNode checks a FleetNodeHeader value and returns the node it
// signs, for region regionID.
func verifyNode(mk key.DERPMesh, v string, regionID int, now time.Time) (*tailcfg.DERPNode, error) {
	if len(v) > maxFleetHeader {
		return nil, errors.New("too long")
	}
	payload, mac, ok := strings.Cut(v, ".")
	if !ok {
		return nil, errors.New("malformed")
	}
	got, err := hex.DecodeString(mac)
	if err != nil || !hmac.Equal(got, fleetMAC(mk, payload)) {
		return nil, errors.New("not signed with this fleet's mesh key")
	}
	b, err := base64.RawURLEncoding.DecodeString(payload)
	if err != nil {
		return nil, errors.New("malformed")
	}
	var a fleetAnnouncement
	if err := json.Unmarshal(b, &a); err != nil || a.Node == nil {
		return nil, errors.New("malformed")
	}
	if d := now.Sub(a.At); d > fleetMaxSkew || d < -fleetMaxSkew {
		return nil, fmt.Errorf("signed at %v: more than %v from this relay's clock", a.At.Format(time.RFC3339), fleetMaxSkew)
	}
	n := a.Node
	if n.RegionID != regionID {
		return nil, fmt.Errorf("for region %d, this relay's is %d", n.RegionID, regionID)
	}
	if !validHostName(n.HostName) {
		return nil, errors.New("no valid host name")
	}
	if n.CertName != "" && checkCertName(n.CertName) != nil {
		return nil, errors.New("no valid CertName")
	}
	// Only what a relay says of itself in the derpMap: a peer cannot set
	// InsecureForTests, STUNOnly, STUNTestIP or CanPort80 for the
	// clients that fetch the region.
	return &tailcfg.DERPNode{RegionID: n.RegionID, HostName: n.HostName, IPv4: n.IPv4, IPv6: n.IPv6,
		DERPPort: n.DERPPort, STUNPort: n.STUNPort, CertName: n.CertName}, nil
}

// nodeID identifies a node within a region: its host and HTTPS port.
func nodeID(n *tailcfg.DERPNode) string {
	port := n.DERPPort
	if port == 0 {
		port = 443
	}
	return net.JoinHostPort(strings.ToLower(strings.TrimSuffix(n.HostName, ".")), strconv.Itoa(port))
}

// heardNode is a peer's node and when it was last heard of.
type heardNode struct {
	node *tailcfg.DERPNode
	at   time.Time
}

// fleetRegion composes the region to publish: own's nodes (this relay's,
// as the operator configured it) and every peer node heard of within ttl
// or listed statically, in the order of order (node IDs: the fleet as
// -mesh-with lists it, so the region equals the one `tailderp derpmap`
// prints once every relay is heard of), the others after it sorted by
// host and port, so every relay of the fleet publishes the same region;
// named by position.
func fleetRegion(own *tailcfg.DERPRegion, heard map[string]heardNode, order []string, now time.Time, ttl time.Duration) *tailcfg.DERPRegion {
	byID := map[string]*tailcfg.DERPNode{}
	for _, h := range heard {
		if h.at.IsZero() || now.Sub(h.at) < ttl {
			n := *h.node
			byID[nodeID(&n)] = &n
		}
	}
	for _, n := range own.Nodes {
		c := *n
		byID[nodeID(&c)] = &c // this relay's own word wins
	}
	rank := map[string]int{}
	for i, id := range order {
		if _, dup := rank[id]; !dup {
			rank[id] = i
		}
	}
	ids := make([]string, 0, len(byID))
	for id := range byID {
		ids = append(ids, id)
	}
	slices.SortFunc(ids, func(a, b string) int {
		ra, oka := rank[a]
		rb, okb := rank[b]
		switch {
		case oka && okb:
			return ra - rb
		case oka:
			return -1
		case okb:
			return 1
		}
		return strings.Compare(a, b)
	})
	out := *own
	out.Nodes = nil
	for i, id := range ids {
		n := byID[id]
		n.RegionID = own.RegionID
		n.Name = nodeName(own.RegionID, i)
		out.Nodes = append(out.Nodes, n)
	}
	return &out
}

// FleetOrder is the order of a region's nodes as fleet.go identifies
// them, for Server.FleetOrder: give it the region `tailderp derpmap`
// prints (FleetRegion).
func FleetOrder(r *tailcfg.DERPRegion) []string {
	var out []string
	for _, n := range r.Nodes {
		out = append(out, nodeID(n))
	}
	return out
}

// fleetClient is an HTTP client that reaches peer p as the mesh does:
// DialIP instead of DNS when set, and the peer's certificate checked as
// meshTLSConfig and derphttp check it (a sha256-raw pin, a DNS-name
// CertName, or the system roots plus roots for p.Host).
func fleetClient(p MeshPeer, roots *x509.CertPool) *http.Client {
	// Verified here, not by crypto/tls: the system roots and then roots
	// (as tlsdial does), or exactly the pinned certificate.
	conf := &tls.Config{InsecureSkipVerify: true, ServerName: p.Host}
	name := p.Host
	if p.CertName != "" && !strings.HasPrefix(p.CertName, "sha256-raw:") {
		name = p.CertName
	}
	conf.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return errors.New("no certificate")
		}
		certs := make([]*x509.Certificate, len(raw))
		for i, b := range raw {
			c, err := x509.ParseCertificate(b)
			if err != nil {
				return err
			}
			certs[i] = c
		}
		leaf := certs[0]
		if strings.HasPrefix(p.CertName, "sha256-raw:") {
			if got := relayrules.CertName(raw[0]); got != p.CertName {
				return fmt.Errorf("certificate %s does not match the pin %s", got, p.CertName)
			}
			if !relayrules.CertInfoOf(leaf).ValidAt(time.Now()) {
				return errors.New("the pinned certificate is outside its validity period")
			}
			return nil
		}
		inter := x509.NewCertPool()
		for _, c := range certs[1:] {
			inter.AddCert(c)
		}
		opts := x509.VerifyOptions{DNSName: name, Intermediates: inter}
		_, err := leaf.Verify(opts) // the system roots
		if err != nil && roots != nil {
			opts.Roots = roots
			_, err = leaf.Verify(opts)
		}
		return err
	}
	port := p.Port
	if port == 0 {
		port = 443
	}
	dialHost := p.Host
	if p.DialIP.IsValid() {
		dialHost = p.DialIP.String()
	}
	addr := net.JoinHostPort(dialHost, strconv.Itoa(port))
	d := &net.Dialer{Timeout: 10 * time.Second}
	return &http.Client{
		Timeout: 15 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig:   conf,
			Proxy:             nil, // peers are dialed directly, like the mesh
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return d.DialContext(ctx, network, addr)
			},
		},
	}
}

// fleetURL is where peer p publishes its region.
func fleetURL(p MeshPeer) string {
	host := p.Host
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	if p.Port != 0 && p.Port != 443 {
		host += ":" + strconv.Itoa(p.Port)
	}
	return "https://" + host + DERPMapPath
}

// errNotTailderp means a peer has no DERPMapPath: an upstream derper.
var errNotTailderp = errors.New("the peer publishes no region (not a tailderp: an upstream derper?)")

// exchangeNodes sends own to peer p and returns the node p answers with.
func (s *Server) exchangeNodes(ctx context.Context, c *http.Client, p MeshPeer, own *tailcfg.DERPNode) (*tailcfg.DERPNode, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fleetURL(p), nil)
	if err != nil {
		return nil, err
	}
	signed, err := signNode(s.MeshKey, own, time.Now())
	if err != nil {
		return nil, err
	}
	req.Header.Set(FleetNodeHeader, signed)
	res, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer res.Body.Close()
	io.Copy(io.Discard, io.LimitReader(res.Body, 64<<10))
	switch {
	case res.StatusCode == http.StatusNotFound:
		return nil, errNotTailderp
	case res.StatusCode != http.StatusOK:
		return nil, fmt.Errorf("%s: %s", DERPMapPath, res.Status)
	}
	v := res.Header.Get(FleetNodeHeader)
	if v == "" {
		return nil, errors.New("the peer did not take this relay's node: does it hold the same mesh key, and has it started?")
	}
	return verifyNode(s.MeshKey, v, own.RegionID, time.Now())
}

// runFleet exchanges nodes with peer p every FleetPollEvery (sooner after
// a failure) until ctx ends.
func (s *Server) runFleet(ctx context.Context, p MeshPeer) {
	c := fleetClient(p, s.MeshRootCAs)
	every := orDefault(s.FleetPollEvery, DefaultFleetPollEvery)
	logger := s.Logger.With("mesh_peer", p.String())
	failures := 0
	for {
		wait := every
		if own := s.derpMap.ownNode(); own != nil {
			n, err := s.exchangeNodes(ctx, c, p, own)
			switch {
			case ctx.Err() != nil:
				return
			case errors.Is(err, errNotTailderp):
				s.derpMap.heard(staticNode(p, own), time.Time{})
				logger.Info("relay: mesh peer publishes no region; listed as -mesh-with describes it", "err", err)
				return
			case err != nil:
				failures++
				wait = min(every, retryDelay(failures, time.Second, every))
				logger.Debug("relay: fleet: no node from mesh peer", "err", err, "failures", failures)
			default:
				failures = 0
				s.derpMap.heard(n, time.Now())
			}
		} else {
			wait = time.Second // not published yet
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		s.derpMap.expire(time.Now())
	}
}

// staticNode is peer p's node as -mesh-with describes it (FleetRegion's
// rule), for a peer that publishes none.
func staticNode(p MeshPeer, own *tailcfg.DERPNode) *tailcfg.DERPNode {
	r := FleetRegion(&tailcfg.DERPRegion{RegionID: own.RegionID, Nodes: []*tailcfg.DERPNode{own}}, []MeshPeer{p}, -1)
	return r.Nodes[1]
}
