package testutil

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

// DNS is a DNS server on 127.0.0.1 (UDP) answering A and AAAA questions
// from a table the test changes; its [DNS.Resolver] resolves through it
// alone, so no test resolves a real name. Start one with [StartDNS].
type DNS struct {
	pc      net.PacketConn
	mu      sync.Mutex
	table   map[string][]netip.Addr // name without the final dot
	def     []netip.Addr            // answer for names not in table; nil: NXDOMAIN
	fail    bool                    // answer SERVFAIL
	queries atomic.Int64
}

// StartDNS starts a DNS server answering from table (lower-case names
// without the final dot; nil: an empty table, which the server then
// owns), until the test ends. A name not in the table does not exist
// (NXDOMAIN), unless [DNS.SetDefault] gives an answer for such names.
func StartDNS(t testing.TB, table map[string][]netip.Addr) *DNS {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if table == nil {
		table = map[string][]netip.Addr{}
	}
	d := &DNS{pc: pc, table: table}
	go d.serve()
	t.Cleanup(func() { pc.Close() })
	return d
}

// Set makes name answer addrs, or, with fail, makes every question answer
// SERVFAIL.
func (d *DNS) Set(name string, addrs []netip.Addr, fail bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.table[name] = addrs
	d.fail = fail
}

// SetDefault makes every name not in the table answer addrs instead of
// not existing.
func (d *DNS) SetDefault(addrs ...netip.Addr) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.def = addrs
}

// Queries returns how many queries the server has received.
func (d *DNS) Queries() int64 { return d.queries.Load() }

// Resolver returns a resolver that resolves through d only.
func (d *DNS) Resolver() *net.Resolver {
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var dl net.Dialer
		return dl.DialContext(ctx, "udp", d.pc.LocalAddr().String())
	}}
}

func (d *DNS) serve() {
	buf := make([]byte, 1500)
	for {
		n, from, err := d.pc.ReadFrom(buf)
		if err != nil {
			return
		}
		if resp, err := d.answer(buf[:n]); err == nil {
			d.pc.WriteTo(resp, from)
		}
	}
}

func (d *DNS) answer(req []byte) ([]byte, error) {
	d.queries.Add(1)
	var p dnsmessage.Parser
	h, err := p.Start(req)
	if err != nil {
		return nil, err
	}
	q, err := p.Question()
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	addrs, known := d.table[strings.TrimSuffix(strings.ToLower(q.Name.String()), ".")]
	if !known && d.def != nil {
		addrs, known = d.def, true
	}
	fail := d.fail
	d.mu.Unlock()
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired, RecursionAvailable: true}
	switch {
	case fail:
		rh.RCode = dnsmessage.RCodeServerFailure
	case !known:
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	b.EnableCompression()
	b.StartQuestions()
	b.Question(q)
	b.StartAnswers()
	if !fail {
		rr := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 60}
		for _, a := range addrs {
			switch {
			case q.Type == dnsmessage.TypeA && a.Is4():
				b.AResource(rr, dnsmessage.AResource{A: a.As4()})
			case q.Type == dnsmessage.TypeAAAA && a.Is6():
				b.AAAAResource(rr, dnsmessage.AAAAResource{AAAA: a.As16()})
			}
		}
	}
	return b.Finish()
}
