// Package testutil holds the helpers tailderp's tests share, so that each
// is written once: a [Buffer] that collects output from other goroutines
// and waits for a line in it, the lines of an output ([Lines]), a poll
// loop ([Poll]), a slog handler that records ([LogRecorder]), test
// certificates and certificate authorities ([NewCert]), a free loopback
// port ([FreePort]), a child process whose output is collected and which
// is stopped when the test ends ([StartProcess]), a STUN binding request
// as Tailscale clients send it ([STUNBinding]), a DNS server on loopback
// ([StartDNS]), a random mesh key ([NewMeshKey]), the derpMap snippet
// tailderp prints ([DERPMapRegion]), and command-line inputs as tests and
// fuzz targets write them ([EnvFrom], [FuzzEnv], [CheckMessage]).
//
// It is test code only: the tailderp binary must never link it (the
// TestDeps rule in the module's root says so and checks it). It imports
// none of tailderp's own packages, so that the tests of any package
// (relay's internal tests too) can import it, and so that tests never make
// their fixtures with the code they test: the certificates here are made
// with crypto/x509 directly, not with relay's self-signed generator.
package testutil
