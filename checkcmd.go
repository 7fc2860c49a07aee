package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"

	"github.com/tailderp/tailderp/check"
)

// runCheck is `tailderp check`.
func runCheck(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("tailderp check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	local := fs.Bool("local", false, "cheap liveness check of the relay on this machine, configured by the same flags and environment as the server (the Docker HEALTHCHECK)")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	timeout := fs.Duration("timeout", 10*time.Second, "give up after this long")
	// The server's settings tell the local check where to look.
	cfg := &config{}
	settings := settingsFor(cfg)
	if err := parseSettings(fs, settings, args, getenv); err != nil {
		if err == flag.ErrHelp {
			return 0
		}
		fmt.Fprintf(stderr, "tailderp check: %v\n", err)
		return 2
	}
	if !*local {
		fmt.Fprintln(stderr, "tailderp check: only -local is available in this version")
		return 2
	}
	if cfg.Dev && getenv("ADDR") == "" && !flagGiven(fs, "a") {
		cfg.Addr = "127.0.0.1:3340"
	}
	host, _, err := net.SplitHostPort(cfg.Addr)
	if err != nil {
		fmt.Fprintf(stderr, "tailderp check: -a (ADDR) %q: %v\n", cfg.Addr, err)
		return 2
	}
	target := check.LocalTarget{HTTPSAddr: cfg.Addr, ServerName: cfg.Hostname}
	if cfg.STUN {
		target.STUNAddr = net.JoinHostPort(host, strconv.Itoa(cfg.STUNPort))
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	report := check.Local(ctx, target)
	if *asJSON {
		report.WriteJSON(stdout)
	} else {
		report.WriteText(stdout)
	}
	if !report.OK() {
		return 1
	}
	return 0
}

func flagGiven(fs *flag.FlagSet, name string) bool {
	given := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == name {
			given = true
		}
	})
	return given
}
