package testacme

import (
	"encoding/binary"
	"io"
	"net"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// dnsServer is the DNS server Pebble's VA resolves names with. It speaks
// DNS over TCP only, which is all Pebble uses with a custom resolver, and
// answers every A question with one address and every other question with
// an empty answer.
//
// (pebble-challtestsrv's DNS server is not used: as a library it registers
// its handler on miekg/dns's process-wide mux, so two instances in one test
// process would answer for each other, and it cannot report the port it
// bound when asked for port 0.)
type dnsServer struct {
	ln    net.Listener
	ip    [4]byte
	conns connSet
}

func startDNS(ip [4]byte) (*dnsServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	d := &dnsServer{ln: ln, ip: ip}
	d.conns.serve(ln, d.handle)
	return d, nil
}

func (d *dnsServer) addr() string { return d.ln.Addr().String() }

func (d *dnsServer) close() { d.conns.close(d.ln) }

// handle answers the length-prefixed messages on one TCP connection.
func (d *dnsServer) handle(c net.Conn) {
	for {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		var n [2]byte
		if _, err := io.ReadFull(c, n[:]); err != nil {
			return
		}
		req := make([]byte, binary.BigEndian.Uint16(n[:]))
		if _, err := io.ReadFull(c, req); err != nil {
			return
		}
		resp, err := d.answer(req)
		if err != nil {
			return
		}
		out := binary.BigEndian.AppendUint16(nil, uint16(len(resp)))
		if _, err := c.Write(append(out, resp...)); err != nil {
			return
		}
	}
}

// answer builds the reply to the DNS query req.
func (d *dnsServer) answer(req []byte) ([]byte, error) {
	var p dnsmessage.Parser
	h, err := p.Start(req)
	if err != nil {
		return nil, err
	}
	qs, err := p.AllQuestions()
	if err != nil {
		return nil, err
	}
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{
		ID:                 h.ID,
		Response:           true,
		OpCode:             h.OpCode,
		Authoritative:      true,
		RecursionDesired:   h.RecursionDesired,
		RecursionAvailable: true,
		RCode:              dnsmessage.RCodeSuccess,
	})
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	for _, q := range qs {
		if err := b.Question(q); err != nil {
			return nil, err
		}
	}
	if err := b.StartAnswers(); err != nil {
		return nil, err
	}
	for _, q := range qs {
		if q.Type == dnsmessage.TypeA && q.Class == dnsmessage.ClassINET {
			hdr := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 60}
			if err := b.AResource(hdr, dnsmessage.AResource{A: d.ip}); err != nil {
				return nil, err
			}
		}
	}
	return b.Finish()
}

// connSet runs an accept loop and tracks the connections it accepted, so
// that close can end them all and wait for their handlers.
type connSet struct {
	mu     sync.Mutex
	conns  map[net.Conn]bool
	closed bool
	wg     sync.WaitGroup
}

// serve accepts connections on ln in the background and runs handle for
// each, closing the connection when handle returns.
func (s *connSet) serve(ln net.Listener, handle func(net.Conn)) {
	s.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if !s.add(c) {
				c.Close()
				return
			}
			s.wg.Go(func() {
				defer s.remove(c)
				handle(c)
			})
		}
	})
}

func (s *connSet) add(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if s.conns == nil {
		s.conns = make(map[net.Conn]bool)
	}
	s.conns[c] = true
	return true
}

func (s *connSet) remove(c net.Conn) {
	c.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
}

// close closes ln and every tracked connection, and waits for the
// handlers to return.
func (s *connSet) close(ln net.Listener) {
	ln.Close()
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}
