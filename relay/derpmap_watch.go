package relay

import (
	"context"

	"tailscale.com/tailcfg"
)

// notifyLocked wakes the watchers of the region (WatchRegion).
func (d *derpMapDoc) notifyLocked() {
	if d.changed != nil {
		close(d.changed)
		d.changed = nil
	}
}

// current is the region as published and a channel closed at its next
// change.
func (d *derpMapDoc) current() (*tailcfg.DERPRegion, <-chan struct{}) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.changed == nil {
		d.changed = make(chan struct{})
	}
	return d.region, d.changed
}

// WatchRegion sends the region published at DERPMapPath — with MeshWith,
// the fleet's as this relay hears of it — now (once there is one) and at
// each change, until ctx ends; then the channel is closed. A slow reader
// misses no final state: it gets the latest region, not every one. The
// regions sent must not be modified.
func (s *Server) WatchRegion(ctx context.Context) <-chan *tailcfg.DERPRegion {
	out := make(chan *tailcfg.DERPRegion)
	go func() {
		defer close(out)
		var sent *tailcfg.DERPRegion
		for {
			r, changed := s.derpMap.current()
			if r != nil && r != sent {
				select {
				case out <- r:
					sent = r
					continue // it may have changed while we waited
				case <-changed:
					continue
				case <-ctx.Done():
					return
				}
			}
			select {
			case <-changed:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out
}
