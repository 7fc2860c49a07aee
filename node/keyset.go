package node

import (
	"errors"
	"sync"
	"time"

	"tailscale.com/ipn"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/netmap"
)

// Source says where the node's answers about node keys come from.
type Source string

// The sources of admission answers.
const (
	// SourceNone: no network map yet and no usable cache; every key is
	// "not ready" (refused unless admission fails open).
	SourceNone Source = "none"
	// SourceLive: the node's current network map.
	SourceLive Source = "live"
	// SourceCache: the last network map the node had, kept on disk across
	// a restart or kept in memory after the node was logged out, used
	// while it is younger than the cache's maximum age.
	SourceCache Source = "cache"
)

// DropReason says why a key stopped being admissible.
type DropReason string

// The reasons a key is dropped.
const (
	// DropRemoved: the control server removed the node (PeersRemoved).
	DropRemoved DropReason = "removed"
	// DropNotInNetmap: a full network map arrived without the node (also
	// when a fresh map replaces the cache).
	DropNotInNetmap DropReason = "not_in_netmap"
	// DropKeyRotated: the node now has another key; this is its old one.
	DropKeyRotated DropReason = "key_rotated"
	// DropKeyExpired: the node's key expired.
	DropKeyExpired DropReason = "key_expired"
	// DropNoAnswer: the node lost its answers (logged out with the cache
	// off, or the cache it answered from grew older than its maximum
	// age): nobody can be admitted now.
	DropNoAnswer DropReason = "no_answer"
)

// Drop is a key that stopped being admissible.
type Drop struct {
	Key    key.NodePublic
	Name   string // the node's tailnet name, "" if unknown
	ID     tailcfg.NodeID
	Reason DropReason
}

// keySet is the set of node keys the tailnet shows the embedded node: its
// peers and itself. It is kept in memory from the node's IPN bus, so an
// admission costs a map lookup, and every change that makes a key
// inadmissible is returned as a Drop so its connections can be closed.
//
// Its answers come from the live network map, or from the cache (the last
// map, persisted; see cache.go) while that is younger than maxAge.
type keySet struct {
	maxAge time.Duration    // how long the cache may answer; 0: never
	now    func() time.Time // time.Now; tests move it

	mu     sync.RWMutex
	source Source
	// received is, while the set is live, when its current full map
	// arrived; once it is not, when the map was last live: the cache's
	// age counts from then (see cacheUntil).
	received time.Time
	byKey    map[key.NodePublic]tailcfg.NodeID
	byID     map[tailcfg.NodeID]entry
	self     entry
	changes  uint64 // counts changes, for the cache writer

	// live is closed when the set becomes live; a new one is made when it
	// stops being live. notLiveSince is when it last stopped (or the set
	// was made). See pending.
	live         chan struct{}
	notLiveSince time.Time
}

// entry is one node of the set.
type entry struct {
	key     key.NodePublic
	name    string
	id      tailcfg.NodeID
	expiry  time.Time // KeyExpiry; zero: never
	expired bool      // the map says so, or expiry passed
}

func (e entry) admissible(now time.Time) bool {
	return !e.key.IsZero() && !e.expired && (e.expiry.IsZero() || now.Before(e.expiry))
}

func (e entry) drop(r DropReason) Drop { return Drop{Key: e.key, Name: e.name, ID: e.id, Reason: r} }

func newKeySet(maxAge time.Duration) *keySet {
	s := &keySet{maxAge: maxAge, now: time.Now, source: SourceNone}
	s.live, s.notLiveSince = make(chan struct{}), s.now()
	return s
}

// pending returns, while the set is not live, a channel closed when it
// becomes live and since when it has not been; nil when it is live.
func (s *keySet) pending() (live <-chan struct{}, since time.Time) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.source == SourceLive {
		return nil, time.Time{}
	}
	return s.live, s.notLiveSince
}

// setSourceLocked moves the set to src, keeping live and notLiveSince.
func (s *keySet) setSourceLocked(src Source) {
	switch {
	case src == SourceLive && s.source != SourceLive:
		close(s.live)
	case src != SourceLive && s.source == SourceLive:
		s.live, s.notLiveSince = make(chan struct{}), s.now()
	}
	s.source = src
}

// cacheUntil is the known-peers rule, the one place it is decided: the
// keys of a map that is no longer live (kept in memory, or read from
// KnownPeersFile after a restart) are admitted until maxAge after the map
// was last live, then nobody is; with maxAge 0, nobody at once.
func cacheUntil(lastLive time.Time, maxAge time.Duration) time.Time {
	if maxAge <= 0 {
		return lastLive
	}
	return lastLive.Add(maxAge)
}

// cacheAnswers applies cacheUntil: whether a map last live at lastLive
// may answer at now.
func cacheAnswers(lastLive time.Time, maxAge time.Duration, now time.Time) bool {
	return maxAge > 0 && now.Before(cacheUntil(lastLive, maxAge))
}

// answering reports whether the set can answer now.
func (s *keySet) answeringLocked(now time.Time) bool {
	switch s.source {
	case SourceLive:
		return true
	case SourceCache:
		return cacheAnswers(s.received, s.maxAge, now)
	}
	return false
}

// until returns when the answers from a map that is not live stop: zero
// while the set is live or has nothing to answer from.
func (s *keySet) until() time.Time {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.source != SourceCache {
		return time.Time{}
	}
	return cacheUntil(s.received, s.maxAge)
}

// contains reports whether k is an admissible node of the tailnet, and
// whether the set can answer at all.
//
// It is the admission hot path: it reads the clock only when the answer
// depends on it (a cache's age, a key with an expiry time).
func (s *keySet) contains(k key.NodePublic) (known, ready bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var now time.Time
	switch s.source {
	case SourceLive:
	case SourceCache:
		now = s.now()
		if !s.answeringLocked(now) {
			return false, false
		}
	default:
		return false, false
	}
	if k == s.self.key && !k.IsZero() {
		return true, true
	}
	id, ok := s.byKey[k]
	if !ok {
		return false, true
	}
	e := s.byID[id]
	if e.expiry.IsZero() {
		return !e.expired, true
	}
	if now.IsZero() {
		now = s.now()
	}
	return e.admissible(now), true
}

// name returns the tailnet name of the node holding k, or "".
func (s *keySet) name(k key.NodePublic) string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if k == s.self.key && !k.IsZero() {
		return s.self.name
	}
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

// status says where answers come from and since when.
func (s *keySet) status() (src Source, received time.Time) {
	now := s.now()
	s.mu.RLock()
	defer s.mu.RUnlock()
	if !s.answeringLocked(now) {
		return SourceNone, s.received
	}
	return s.source, s.received
}

// loggedOut is called when the node is logged out or stopped: the map
// stops being live now (see notLive).
func (s *keySet) loggedOut() []Drop { return s.notLive(s.now()) }

// notLive is called when the map stops being live (the node was logged
// out, or the control server stopped answering its map poll) at the
// moment it last was: the last map goes on answering as the cache until
// cacheUntil; with the cache off, every key is dropped.
func (s *keySet) notLive(lastLive time.Time) []Drop {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.source != SourceLive {
		return nil
	}
	if lastLive.After(now) {
		lastLive = now
	}
	if s.maxAge > 0 {
		s.setSourceLocked(SourceCache)
		s.received = lastLive
		return nil
	}
	drops := s.allLocked(now, DropNoAnswer)
	s.clearLocked()
	return drops
}

// Why a known-peers cache file is not used (see usableCache).
var (
	errCacheTooOld   = errors.New("older than its maximum age")
	errCacheFuture   = errors.New("written in the future (did the clock go back?)")
	errCacheNotOurs  = errors.New("written for another node (its self key is not this node's)")
	errCacheDisabled = errors.New("the cache is off")
)

// usableCache says whether a cache file may answer now: its map was live
// less than maxAge ago (cacheUntil, the rule the set also answers by), not
// in the future beyond clock corrections, and it is this node's (self,
// when known).
func usableCache(c *cacheFile, self key.NodePublic, maxAge time.Duration, now time.Time) error {
	switch {
	case maxAge <= 0:
		return errCacheDisabled
	case !self.IsZero() && c.Self.Key != self:
		return errCacheNotOurs
	case c.Received.Sub(now) > maxClockSkew:
		// Its age cannot be told, and a time in the future would keep
		// it answering past maxAge.
		return errCacheFuture
	case !cacheAnswers(c.Received, maxAge, now):
		return errCacheTooOld
	}
	return nil
}

// loadUsableCache starts the set from c if usableCache allows it now.
func (s *keySet) loadUsableCache(c *cacheFile, self key.NodePublic) error {
	if err := usableCache(c, self, s.maxAge, s.now()); err != nil {
		return err
	}
	s.loadCache(c)
	return nil
}

// loadCache starts the set from a persisted map, unless the node already
// has a live one.
func (s *keySet) loadCache(c *cacheFile) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.source == SourceLive {
		return
	}
	s.byKey = make(map[key.NodePublic]tailcfg.NodeID, len(c.Nodes))
	s.byID = make(map[tailcfg.NodeID]entry, len(c.Nodes))
	for _, n := range c.Nodes {
		s.byKey[n.Key] = n.ID
		s.byID[n.ID] = entry{key: n.Key, name: n.Name, id: n.ID, expiry: n.KeyExpiry}
	}
	s.self = entry{key: c.Self.Key, name: c.Self.Name, id: c.Self.ID}
	s.received = c.Received
	s.setSourceLocked(SourceCache)
}

// snapshot returns the live set for the cache file, and the change count
// it reflects; ok is false unless the set is live.
func (s *keySet) snapshot() (c *cacheFile, changes uint64, ok bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.source != SourceLive {
		return nil, s.changes, false
	}
	now := s.now()
	c = &cacheFile{
		Version: cacheVersion,
		// The map is live now: its age after a restart counts from here.
		Received: now,
		Self:     cacheNode{Key: s.self.key, Name: s.self.name, ID: s.self.id},
	}
	for _, e := range s.byID {
		if e.admissible(now) {
			c.Nodes = append(c.Nodes, cacheNode{Key: e.key, Name: e.name, ID: e.id, KeyExpiry: e.expiry})
		}
	}
	return c, s.changes, true
}

// changeCount counts the changes so far.
func (s *keySet) changeCount() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.changes
}

// expireDue drops keys whose expiry time has passed, and everything when
// the cache it answers from has aged out.
func (s *keySet) expireDue() []Drop {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.source == SourceCache && !s.answeringLocked(now) {
		drops := s.allLocked(now, DropNoAnswer)
		s.clearLocked()
		return drops
	}
	var drops []Drop
	for id, e := range s.byID {
		if !e.expired && !e.expiry.IsZero() && !now.Before(e.expiry) {
			e.expired = true
			s.byID[id] = e
			drops = append(drops, e.drop(DropKeyExpired))
		}
	}
	if len(drops) > 0 {
		s.changes++
	}
	return drops
}

// apply folds one bus notification into the set and returns the keys it
// made inadmissible. A notification carries the whole netmap (initial
// NetMap), or a new full netmap (SelfChange with every peer in
// PeersChanged), or a delta (PeersChanged upserts, PeersRemoved deletes).
func (s *keySet) apply(n *ipn.Notify) []Drop {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case n.NetMap != nil:
		var self *tailcfg.Node
		if n.NetMap.SelfNode.Valid() {
			self = n.NetMap.SelfNode.AsStruct()
		}
		return s.replaceLocked(selfEntry(self, n.NetMap.NodeKey), netmapPeers(n.NetMap))
	case n.SelfChange != nil:
		return s.replaceLocked(selfEntry(n.SelfChange, n.SelfChange.Key), n.PeersChanged)
	}
	if s.source != SourceLive {
		return nil // deltas only follow a live map
	}
	now := s.now()
	var drops []Drop
	changed := false
	for _, p := range n.PeersChanged {
		d, c := s.upsertLocked(p, now)
		drops, changed = append(drops, d...), changed || c
	}
	for _, id := range n.PeersRemoved {
		if e, ok := s.byID[id]; ok {
			delete(s.byKey, e.key)
			delete(s.byID, id)
			changed = true
			if e.admissible(now) {
				drops = append(drops, e.drop(DropRemoved))
			}
		}
	}
	// Most deltas are a peer's endpoints, home relay or online state: the
	// set (and so the cache file) changes only when an entry does.
	if changed {
		s.changes++
	}
	return drops
}

func selfEntry(self *tailcfg.Node, k key.NodePublic) entry {
	e := entry{key: k}
	if self != nil {
		e.name, e.id = self.Name, self.ID
	}
	return e
}

func netmapPeers(nm *netmap.NetworkMap) []*tailcfg.Node {
	peers := make([]*tailcfg.Node, 0, len(nm.Peers))
	for _, p := range nm.Peers {
		peers = append(peers, p.AsStruct())
	}
	return peers
}

// replaceLocked makes the set the given full map, live from now, and
// returns what the old set admitted that the new one does not.
func (s *keySet) replaceLocked(self entry, peers []*tailcfg.Node) []Drop {
	now := s.now()
	oldByID, oldSelf := s.byID, s.self
	s.setSourceLocked(SourceLive)
	s.received = now
	s.self = self
	s.byKey = make(map[key.NodePublic]tailcfg.NodeID, len(peers))
	s.byID = make(map[tailcfg.NodeID]entry, len(peers))
	for _, p := range peers {
		s.upsertLocked(p, now)
	}
	s.changes++
	var drops []Drop
	for id, old := range oldByID {
		if !old.admissible(now) {
			continue
		}
		cur, ok := s.byID[id]
		switch {
		case !ok:
			drops = append(drops, old.drop(DropNotInNetmap))
		case cur.key != old.key:
			drops = append(drops, old.drop(DropKeyRotated))
		case !cur.admissible(now):
			drops = append(drops, old.drop(DropKeyExpired))
		}
	}
	if !oldSelf.key.IsZero() && oldSelf.key != self.key {
		drops = append(drops, oldSelf.drop(DropKeyRotated))
	}
	return drops
}

// upsertLocked adds or updates p and returns the keys it made
// inadmissible (its old key after a rotation, or its key once expired),
// and whether the set changed.
func (s *keySet) upsertLocked(p *tailcfg.Node, now time.Time) (drops []Drop, changed bool) {
	old, had := s.byID[p.ID]
	if had && old.key != p.Key {
		delete(s.byKey, old.key)
		if old.admissible(now) {
			drops = append(drops, old.drop(DropKeyRotated))
		}
	}
	e := entry{key: p.Key, name: p.Name, id: p.ID, expiry: p.KeyExpiry, expired: p.Expired}
	if had && old.key == p.Key && old.admissible(now) && !e.admissible(now) {
		drops = append(drops, e.drop(DropKeyExpired))
	}
	s.byKey[p.Key] = p.ID
	s.byID[p.ID] = e
	changed = !had || old.key != e.key || old.name != e.name || !old.expiry.Equal(e.expiry) || old.expired != e.expired
	return drops, changed
}

// allLocked is every admissible key, as drops for reason.
func (s *keySet) allLocked(now time.Time, r DropReason) []Drop {
	var drops []Drop
	for _, e := range s.byID {
		if e.admissible(now) {
			drops = append(drops, e.drop(r))
		}
	}
	if !s.self.key.IsZero() {
		drops = append(drops, s.self.drop(r))
	}
	return drops
}

func (s *keySet) clearLocked() {
	s.setSourceLocked(SourceNone)
	s.byKey, s.byID, s.self = nil, nil, entry{}
	s.changes++
}
