//go:build !linux

package packaging

import (
	"fmt"
	"os"
)

// launcherArg makes the test binary the launcher (see TestMain); the
// empty-root tests exist on Linux only.
const launcherArg = "packaging-launch-in-empty-root"

func launcherMain([]string) {
	fmt.Fprintln(os.Stderr, "packaging launcher: Linux only")
	os.Exit(126)
}
