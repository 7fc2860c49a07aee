package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"

	"github.com/tailderp/tailderp/relay"
)

// derpNode returns what the derpMap says about this relay.
func derpNode(cfg *config, httpsPort, stunPort int, certName string) relay.NodeInfo {
	n := relay.NodeInfo{HostName: cfg.Hostname, IPv4: cfg.IPv4, IPv6: cfg.IPv6, DERPPort: httpsPort, STUNPort: stunPort, CertName: certName}
	if ip := net.ParseIP(cfg.Hostname); ip != nil {
		if ip.To4() != nil && n.IPv4 == "" {
			n.IPv4 = cfg.Hostname
		} else if ip.To4() == nil && n.IPv6 == "" {
			n.IPv6 = cfg.Hostname
		}
	}
	return n
}

// printDERPMap writes the derpMap snippet for the running relay to w.
func printDERPMap(w io.Writer, cfg *config, rs *relay.Server, certs relay.Certificates, stunPort int) error {
	certName := ""
	if net.ParseIP(cfg.Hostname) != nil || cfg.Dev {
		info, _ := certs.Current()
		certName = info.CertName
	}
	port := rs.LocalAddr().(*net.TCPAddr).Port
	return writeSnippet(w, cfg, derpNode(cfg, port, stunPort, certName))
}

func writeSnippet(w io.Writer, cfg *config, n relay.NodeInfo) error {
	b, err := relay.PolicySnippet(relay.DERPRegion(relay.RegionConfig{RegionID: cfg.RegionID, RegionCode: cfg.RegionCode, RegionName: cfg.RegionName}, n))
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "--- derpMap for your tailnet policy file (merge into its \"derpMap\") ---\n%s\n---\n", b)
	return err
}

// runDERPMap is `tailderp derpmap`: print the snippet for the settings and
// exit, without serving.
func runDERPMap(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	// The node is not started, so no auth key is needed to print.
	cfg, err := loadConfig("tailderp derpmap", args, func(k string) string {
		if k == "VERIFY_CLIENTS" {
			return "false"
		}
		return getenv(k)
	}, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "tailderp derpmap: %v\n", err)
		return 2
	}
	_, portStr, _ := net.SplitHostPort(cfg.Addr)
	var port int
	fmt.Sscan(portStr, &port)
	stunPort := cfg.STUNPort
	if !cfg.STUN {
		stunPort = -1
	}
	certName := ""
	if net.ParseIP(cfg.Hostname) != nil && !cfg.Dev {
		crt, _ := relay.CertPaths(cfg.certDir(), cfg.Hostname)
		certs, err := relay.LoadManualCerts(cfg.certDir(), cfg.Hostname, nil)
		if err != nil {
			if _, statErr := os.Stat(crt); statErr != nil {
				fmt.Fprintf(stderr, "tailderp derpmap: no certificate at %s yet: start tailderp once to generate it, then run this again for its CertName\n", crt)
				return 1
			}
			fmt.Fprintf(stderr, "tailderp derpmap: %v\n", err)
			return 1
		}
		info, _ := certs.Current()
		certName = info.CertName
	}
	if err := writeSnippet(stdout, cfg, derpNode(cfg, port, stunPort, certName)); err != nil {
		fmt.Fprintf(stderr, "tailderp derpmap: %v\n", err)
		return 1
	}
	return 0
}
