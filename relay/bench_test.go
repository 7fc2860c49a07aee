package relay

import (
	"context"
	"fmt"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailderp/tailderp/verify"
)

// keyList is a verify.KeyChecker over an in-memory set, the same shape of
// lookup as the embedded node's key set (node.keySet: an RWMutex and a
// map), so the benchmark measures tailderp's admission path: derpserver's
// admission URL → the in-process hook → verify → a map lookup.
type keyList struct {
	mu   sync.RWMutex
	keys map[key.NodePublic]bool
}

func (k *keyList) KnowsNodeKey(nk key.NodePublic) (known, ready bool) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return k.keys[nk], true
}

func (k *keyList) add(nk key.NodePublic) {
	k.mu.Lock()
	k.keys[nk] = true
	k.mu.Unlock()
}

// benchRelay starts a relay with a self-signed certificate for 127.0.0.1
// and returns a function that connects one admitted client fully (TLS,
// DERP handshake, admission, ServerInfo) and closes it.
func benchRelay(b *testing.B, admission bool) (connect func(ctx context.Context, k key.NodePrivate) error, allow func(key.NodePublic)) {
	certs, err := NewSelfSigned("127.0.0.1")
	if err != nil {
		b.Fatal(err)
	}
	s := &Server{Addr: "127.0.0.1:0", HTTPPort: -1, Certs: certs, PrivateKey: key.NewNode()}
	kl := &keyList{keys: map[key.NodePublic]bool{}}
	if admission {
		s.Admitter = &verify.Verifier{Tailnets: []verify.Tailnet{{Name: "default", Keys: kl}}}
	}
	if err := s.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close(context.Background()) })
	port := s.LocalAddr().(*net.TCPAddr).Port
	info, _ := certs.Current()
	region := &tailcfg.DERPRegion{RegionID: 900, Nodes: []*tailcfg.DERPNode{{
		Name: "900a", RegionID: 900, HostName: "127.0.0.1", IPv4: "127.0.0.1", IPv6: "none", DERPPort: port, CertName: info.CertName,
	}}}
	connect = func(ctx context.Context, k key.NodePrivate) error {
		c := derphttp.NewRegionClient(k, func(string, ...any) {}, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
		defer c.Close()
		if err := c.Connect(ctx); err != nil {
			return err
		}
		m, err := c.Recv()
		if err != nil {
			return err
		}
		if _, ok := m.(derp.ServerInfoMessage); !ok {
			return fmt.Errorf("first message %T, want ServerInfoMessage", m)
		}
		return nil
	}
	return connect, kl.add
}

// BenchmarkConnect measures one client's full connect (TLS handshake,
// DERP upgrade and handshake, admission, first server frame) with
// admission off and on, side by side. Compare the p50-µs metrics; run
// with -count 5 for medians.
func BenchmarkConnect(b *testing.B) {
	for _, admission := range []bool{false, true} {
		b.Run(fmt.Sprintf("admission=%v", admission), func(b *testing.B) {
			connect, allow := benchRelay(b, admission)
			keys := make([]key.NodePrivate, b.N)
			for i := range keys {
				keys[i] = key.NewNode()
				allow(keys[i].Public())
			}
			lat := make([]time.Duration, 0, b.N)
			ctx := context.Background()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				t0 := time.Now()
				if err := connect(ctx, keys[i]); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(t0))
			}
			b.StopTimer()
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		})
	}
}

// BenchmarkConnectParallel is BenchmarkConnect with 32 clients connecting
// at once (16 goroutines per core on this 2-core machine): admission must
// not become the bottleneck under a burst of connects.
func BenchmarkConnectParallel(b *testing.B) {
	for _, admission := range []bool{false, true} {
		b.Run(fmt.Sprintf("admission=%v", admission), func(b *testing.B) {
			connect, allow := benchRelay(b, admission)
			ctx := context.Background()
			b.SetParallelism(16)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					k := key.NewNode()
					allow(k.Public())
					if err := connect(ctx, k); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// BenchmarkConnectAlternating connects to a relay without admission and
// to one with admission in turn, one client each per iteration, in
// alternating order, so both see the same machine noise: the side-by-side
// comparison the p50 metrics are for.
func BenchmarkConnectAlternating(b *testing.B) {
	connectOff, _ := benchRelay(b, false)
	connectOn, allow := benchRelay(b, true)
	keys := make([]key.NodePrivate, 2*b.N)
	for i := range keys {
		keys[i] = key.NewNode()
		allow(keys[i].Public())
	}
	off := make([]time.Duration, 0, b.N)
	on := make([]time.Duration, 0, b.N)
	ctx := context.Background()
	measure := func(connect func(context.Context, key.NodePrivate) error, k key.NodePrivate, into *[]time.Duration) {
		t0 := time.Now()
		if err := connect(ctx, k); err != nil {
			b.Fatal(err)
		}
		*into = append(*into, time.Since(t0))
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if i%2 == 0 {
			measure(connectOff, keys[2*i], &off)
			measure(connectOn, keys[2*i+1], &on)
		} else {
			measure(connectOn, keys[2*i+1], &on)
			measure(connectOff, keys[2*i], &off)
		}
	}
	b.StopTimer()
	slices.Sort(off)
	slices.Sort(on)
	p50off, p50on := off[len(off)/2], on[len(on)/2]
	b.ReportMetric(float64(p50off.Microseconds()), "p50-off-µs")
	b.ReportMetric(float64(p50on.Microseconds()), "p50-on-µs")
	b.ReportMetric(float64((p50on - p50off).Microseconds()), "p50-delta-µs")
}
