//go:build !unix

package relay

// openFilesLimit is the process's limit on open files, unknown here.
func openFilesLimit() string { return "unknown" }
