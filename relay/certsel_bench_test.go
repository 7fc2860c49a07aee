package relay_test

import (
	"crypto/tls"
	"net"
	"testing"

	"github.com/tailderp/tailderp/relay"
)

// Certificate selection is on every TLS handshake of the relay: its
// tls.Config calls Certificates.GetCertificate. relay.ManualCerts (manual
// mode and IP mode) stats the certificate and key files each time to pick
// up a renewed pair without a restart; relay.StaticCert (-dev) returns a
// certificate held in memory, as derper's manual mode does. These
// benchmarks put a number on that stat, alone and next to a whole
// handshake.

type certSource struct {
	name  string
	certs relay.Certificates
}

func certSources(b *testing.B) []certSource {
	b.Helper()
	dir := b.TempDir()
	if _, err := relay.EnsureSelfSignedIPCert(dir, "127.0.0.1"); err != nil {
		b.Fatal(err)
	}
	manual, err := relay.LoadManualCerts(dir, "127.0.0.1", nil)
	if err != nil {
		b.Fatal(err)
	}
	static, err := relay.NewSelfSigned("127.0.0.1")
	if err != nil {
		b.Fatal(err)
	}
	return []certSource{{"manual", manual}, {"static", static}}
}

// BenchmarkGetCertificate is the certificate selection alone.
func BenchmarkGetCertificate(b *testing.B) {
	for _, cs := range certSources(b) {
		b.Run(cs.name, func(b *testing.B) {
			hello := &tls.ClientHelloInfo{} // an IP-mode client sends no SNI
			b.ReportAllocs()
			for b.Loop() {
				if c, err := cs.certs.GetCertificate(hello); err != nil || c == nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkGetCertificateParallel is the selection under concurrent
// handshakes (a burst of reconnecting clients).
func BenchmarkGetCertificateParallel(b *testing.B) {
	for _, cs := range certSources(b) {
		b.Run(cs.name, func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				hello := &tls.ClientHelloInfo{}
				for pb.Next() {
					if c, err := cs.certs.GetCertificate(hello); err != nil || c == nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// BenchmarkTLSHandshake is a whole TLS 1.3 handshake in memory, server
// side with each certificate source, so the selection's share of a
// handshake shows.
func BenchmarkTLSHandshake(b *testing.B) {
	for _, cs := range certSources(b) {
		b.Run(cs.name, func(b *testing.B) {
			srvConf := &tls.Config{GetCertificate: cs.certs.GetCertificate, NextProtos: []string{"http/1.1"}}
			cliConf := &tls.Config{InsecureSkipVerify: true, ServerName: "127.0.0.1", NextProtos: []string{"http/1.1"}}
			b.ReportAllocs()
			for b.Loop() {
				c, s := net.Pipe()
				errc := make(chan error, 1)
				go func() { errc <- tls.Server(s, srvConf).Handshake() }()
				err := tls.Client(c, cliConf).Handshake()
				// Close the pipe, not the TLS conns: a close_notify on
				// an unbuffered pipe waits for a reader.
				c.Close()
				s.Close()
				if err != nil {
					b.Fatal(err)
				}
				if err := <-errc; err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
