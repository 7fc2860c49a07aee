//go:build unix

package relay

import (
	"fmt"
	"syscall"
)

// openFilesLimit is the process's limit on open files, for the warning
// when it is reached. (Go raises the soft limit to the hard one at start,
// so this is the hard limit: systemd's LimitNOFILE, docker's --ulimit.)
func openFilesLimit() string {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return "unknown"
	}
	return fmt.Sprint(rl.Cur)
}
