// Package commands holds the subcommands of tailderp: `check` (check.go),
// `derpmap` (derpmap.go), `cert renew` (cert.go) and `drain` (drain.go),
// each a file with one entry point that takes a command line and an
// environment and returns the exit code. Package main dispatches to them and wires the server;
// the server uses two things from here: the derpMap snippet it prints at
// start (WriteSnippet) and the renewal's running half, which prints the
// new pin when the served certificate changes (PinFollower).
//
// A command reads its settings through internal/config, as the server
// does, and reaches a tailnet only through node.
package commands

import "github.com/tailderp/tailderp/internal/config"

// settingName is how messages name a setting: "-a (ADDR)".
var settingName = config.SettingName
