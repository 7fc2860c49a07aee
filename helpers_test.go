package main

import (
	"io"

	"github.com/tailderp/tailderp/internal/config"
	"github.com/tailderp/tailderp/internal/testutil"
)

// The helpers of package main's tests that take the place of what moved
// to internal/config: the environment as a list, Load for the server.

// envFrom turns a map into an environment ("NAME=value" entries), sorted
// so that every run sees the same one.
var envFrom = testutil.EnvFrom

// loadConfig is the server's Load.
func loadConfig(_ string, args []string, env []string, _ io.Writer) (*config.Config, error) {
	return config.Load(config.Run, nil, args, env)
}
