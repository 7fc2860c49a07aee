package relay

import (
	"context"
	"testing"
	"time"

	"tailscale.com/tailcfg"
)

func TestWatchRegionSendsEachChangeAndClosesAtTheEnd(t *testing.T) {
	s := &Server{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch := s.WatchRegion(ctx)
	next := func() *tailcfg.DERPRegion {
		t.Helper()
		select {
		case r, ok := <-ch:
			if !ok {
				t.Fatal("the channel closed early")
			}
			return r
		case <-time.After(10 * time.Second):
			t.Fatal("no region within 10 s")
		}
		return nil
	}
	one := DERPRegion(RegionConfig{RegionID: 900, RegionCode: "t", RegionName: "t"}, NodeInfo{HostName: "a.example", DERPPort: 443, STUNPort: 3478})
	if err := s.PublishRegion(one); err != nil {
		t.Fatal(err)
	}
	if r := next(); r.Nodes[0].HostName != "a.example" {
		t.Errorf("first region: %+v", r.Nodes[0])
	}
	// The same region again changes nothing; a new pin does.
	s.PublishRegion(one)
	two := DERPRegion(RegionConfig{RegionID: 900, RegionCode: "t", RegionName: "t"}, NodeInfo{HostName: "a.example", DERPPort: 443, STUNPort: 3478, CertName: "sha256-raw:00"})
	s.PublishRegion(two)
	if r := next(); r.Nodes[0].CertName != "sha256-raw:00" {
		t.Errorf("after the change: %+v, want the new pin", r.Nodes[0])
	}
	cancel()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-deadline:
			t.Fatal("the channel was not closed after the context ended")
		}
	}
}

func TestWatchRegionGivesALateReaderTheLatest(t *testing.T) {
	s := &Server{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for _, h := range []string{"a.example", "b.example", "c.example"} {
		s.PublishRegion(DERPRegion(RegionConfig{RegionID: 900}, NodeInfo{HostName: h, DERPPort: 443, STUNPort: 3478}))
	}
	ch := s.WatchRegion(ctx)
	select {
	case r := <-ch:
		if r.Nodes[0].HostName != "c.example" {
			t.Errorf("a watcher started late got %s, want the latest, c.example", r.Nodes[0].HostName)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no region within 10 s")
	}
}
