package node

import (
	"sync"

	"tailscale.com/ipn"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/netmap"
)

// keySet is the set of node keys the tailnet shows the embedded node:
// its peers and itself. It is kept in memory from the node's IPN bus, so
// an admission costs a map lookup; the same updates tell us when a node
// leaves the tailnet.
type keySet struct {
	mu     sync.RWMutex
	loaded bool // a netmap has been seen
	byKey  map[key.NodePublic]tailcfg.NodeID
	byID   map[tailcfg.NodeID]nodeEntry
	self   key.NodePublic
}

type nodeEntry struct {
	key      key.NodePublic
	name     string
	excluded bool // expired: known, but not admitted
}

// contains reports whether k is an admissible node of the tailnet, and
// whether the set has been loaded at all.
func (s *keySet) contains(k key.NodePublic) (found, loaded bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if !s.loaded {
		return false, false
	}
	if k == s.self && !k.IsZero() {
		return true, true
	}
	id, ok := s.byKey[k]
	if !ok {
		return false, true
	}
	return !s.byID[id].excluded, true
}

// name returns the tailnet name of the node holding k, or "".
func (s *keySet) name(k key.NodePublic) string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if id, ok := s.byKey[k]; ok {
		return s.byID[id].name
	}
	return ""
}

// size returns the number of peers known (not counting self).
func (s *keySet) size() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.byID)
}

// reset forgets everything, e.g. when the node is logged out.
func (s *keySet) reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.loaded = false
	s.byKey, s.byID, s.self = nil, nil, key.NodePublic{}
}

// apply folds one bus notification into the set. A notification carries
// the whole netmap (initial NetMap), or a new full netmap (SelfChange with
// every peer in PeersChanged), or a delta (PeersChanged upserts,
// PeersRemoved deletes).
func (s *keySet) apply(n *ipn.Notify) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case n.NetMap != nil:
		s.replaceLocked(n.NetMap.NodeKey, netmapPeers(n.NetMap))
		return
	case n.SelfChange != nil:
		s.replaceLocked(n.SelfChange.Key, n.PeersChanged)
		return
	}
	if !s.loaded {
		return
	}
	for _, p := range n.PeersChanged {
		s.upsertLocked(p)
	}
	for _, id := range n.PeersRemoved {
		if e, ok := s.byID[id]; ok {
			delete(s.byKey, e.key)
			delete(s.byID, id)
		}
	}
}

func netmapPeers(nm *netmap.NetworkMap) []*tailcfg.Node {
	peers := make([]*tailcfg.Node, 0, len(nm.Peers))
	for _, p := range nm.Peers {
		peers = append(peers, p.AsStruct())
	}
	return peers
}

func (s *keySet) replaceLocked(self key.NodePublic, peers []*tailcfg.Node) {
	s.loaded = true
	s.self = self
	s.byKey = make(map[key.NodePublic]tailcfg.NodeID, len(peers))
	s.byID = make(map[tailcfg.NodeID]nodeEntry, len(peers))
	for _, p := range peers {
		s.upsertLocked(p)
	}
}

func (s *keySet) upsertLocked(p *tailcfg.Node) {
	if old, ok := s.byID[p.ID]; ok && old.key != p.Key {
		delete(s.byKey, old.key) // the node rotated its key
	}
	s.byKey[p.Key] = p.ID
	s.byID[p.ID] = nodeEntry{key: p.Key, name: p.Name, excluded: p.Expired}
}
