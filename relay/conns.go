package relay

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"time"

	"tailscale.com/types/key"
)

// Client is a DERP connection the Admitter admitted.
type Client struct {
	Key    key.NodePublic
	From   netip.Addr
	Since  time.Time // when it was admitted
	Tenant string    // its tenant (tailnet), with Server.Tenants
}

// connTracker knows the DERP connections that passed (or are passing)
// admission, by client key: Clients lists them, Revoke closes them.
//
// derpserver has no public way to close a client, so the /derp handler
// keeps what it takes: the hijacked net.Conn (closing it ends derpserver's
// read loop, and with it the connection) and a cancel func for the
// request context (which ends the send loop and a WebSocket connection).
// Mesh peers are admitted by derpserver without asking the Admitter, so
// they are never tracked and never revoked.
type connTracker struct {
	mu       sync.Mutex
	byKey    map[key.NodePublic]map[*trackedConn]struct{}
	byTenant map[string]int // connections routed to each tenant, until their request ends
}

// trackedConn is one /derp request, from the handler until it returns.
type trackedConn struct {
	cancel context.CancelFunc

	// Set when admission starts; guarded by connTracker.mu. Until the
	// Admitter admits it (which may take seconds: see verify's
	// NotReadyWait) it is tracked, so Revoke closes it, but not listed.
	key      key.NodePublic
	src      netip.Addr
	since    time.Time // when admitted
	admitted bool
	tenant   string // set when routed to a tenant (joinTenant)
	inTenant bool   // counted in byTenant

	mu     sync.Mutex
	nc     net.Conn // the hijacked connection
	closed bool
}

// start begins tracking a /derp request: it returns the record, a
// ResponseWriter that remembers the hijacked connection, and the context
// to serve the request with.
func (t *connTracker) start(w http.ResponseWriter, r *http.Request) (*trackedConn, http.ResponseWriter, context.Context) {
	ctx, cancel := context.WithCancel(r.Context())
	tc := &trackedConn{cancel: cancel}
	return tc, &hijackRecorder{ResponseWriter: w, tc: tc}, ctx
}

// admitting registers tc under k, as admission for it begins.
func (t *connTracker) admitting(tc *trackedConn, k key.NodePublic, src netip.Addr) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.byKey == nil {
		t.byKey = make(map[key.NodePublic]map[*trackedConn]struct{})
	}
	tc.key, tc.src = k, src
	set := t.byKey[k]
	if set == nil {
		set = make(map[*trackedConn]struct{})
		t.byKey[k] = set
	}
	set[tc] = struct{}{}
}

// admit marks tc admitted: from now on it is listed.
func (t *connTracker) admit(tc *trackedConn) {
	t.mu.Lock()
	defer t.mu.Unlock()
	tc.admitted, tc.since = true, time.Now()
}

// joinTenant routes tc to tenant unless max (> 0) of its connections are
// open already; it reports whether it did.
func (t *connTracker) joinTenant(tc *trackedConn, tenant string, max int) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if max > 0 && t.byTenant[tenant] >= max {
		return false
	}
	if t.byTenant == nil {
		t.byTenant = make(map[string]int)
	}
	t.byTenant[tenant]++
	tc.tenant, tc.inTenant = tenant, true
	return true
}

// tenantCount is how many connections are routed to tenant now.
func (t *connTracker) tenantCount(tenant string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.byTenant[tenant]
}

// remove stops tracking tc (refused, or its request ended) and releases
// its context.
func (t *connTracker) remove(tc *trackedConn) {
	t.mu.Lock()
	if tc.inTenant {
		tc.inTenant = false
		if t.byTenant[tc.tenant]--; t.byTenant[tc.tenant] <= 0 {
			delete(t.byTenant, tc.tenant)
		}
	}
	if set := t.byKey[tc.key]; set != nil {
		delete(set, tc)
		if len(set) == 0 {
			delete(t.byKey, tc.key)
		}
	}
	t.mu.Unlock()
	tc.cancel()
}

// revoke closes every tracked connection of k and reports how many.
func (t *connTracker) revoke(k key.NodePublic) int {
	t.mu.Lock()
	set := t.byKey[k]
	delete(t.byKey, k)
	t.mu.Unlock()
	for tc := range set {
		tc.close()
	}
	return len(set)
}

// cancelAll ends the request context of every tracked connection: an
// admission still deciding (an Admitter holding the client) returns, and
// admitted connections' send loops end. For Close.
func (t *connTracker) cancelAll() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, set := range t.byKey {
		for tc := range set {
			tc.cancel()
		}
	}
}

// clients lists the tracked connections, oldest first.
func (t *connTracker) clients() []Client {
	t.mu.Lock()
	out := make([]Client, 0, len(t.byKey))
	for _, set := range t.byKey {
		for tc := range set {
			if tc.admitted {
				out = append(out, Client{Key: tc.key, From: tc.src, Since: tc.since, Tenant: tc.tenant})
			}
		}
	}
	t.mu.Unlock()
	slices.SortFunc(out, func(a, b Client) int {
		return cmp.Or(a.Since.Compare(b.Since), cmp.Compare(a.Key.String(), b.Key.String()))
	})
	return out
}

// keys lists the keys with an admitted connection.
func (t *connTracker) keys() []key.NodePublic {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]key.NodePublic, 0, len(t.byKey))
	for k, set := range t.byKey {
		if anyAdmitted(set) {
			out = append(out, k)
		}
	}
	return out
}

// tenantOf is the tenant of k's admitted connections ("" if none, or
// without tenants).
func (t *connTracker) tenantOf(k key.NodePublic) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	for tc := range t.byKey[k] {
		if tc.admitted {
			return tc.tenant
		}
	}
	return ""
}

// connected reports whether k has an admitted connection.
func (t *connTracker) connected(k key.NodePublic) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return anyAdmitted(t.byKey[k])
}

func anyAdmitted(set map[*trackedConn]struct{}) bool {
	for tc := range set {
		if tc.admitted {
			return true
		}
	}
	return false
}

// close ends the connection: derpserver's read loop fails on the closed
// net.Conn, its send loop and a WebSocket see the context end.
func (tc *trackedConn) close() {
	tc.mu.Lock()
	tc.closed = true
	nc := tc.nc
	tc.mu.Unlock()
	if nc != nil {
		nc.Close()
	}
	tc.cancel()
}

// hijackRecorder is the /derp ResponseWriter: it hands the hijacked
// connection to the tracking record (closing it at once if the record was
// revoked before the hijack).
type hijackRecorder struct {
	http.ResponseWriter
	tc *trackedConn
}

func (h *hijackRecorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	hj, ok := h.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, errors.New("relay: connection cannot be hijacked")
	}
	nc, brw, err := hj.Hijack()
	if err != nil {
		return nil, nil, err
	}
	h.tc.mu.Lock()
	h.tc.nc = nc
	closed := h.tc.closed
	h.tc.mu.Unlock()
	if closed {
		nc.Close()
	}
	return nc, brw, nil
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (h *hijackRecorder) Unwrap() http.ResponseWriter { return h.ResponseWriter }
