package node

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// KnownPeersFile is the file in Dir where the node keeps the keys its
// last network map admitted, so that a restart while the control server is
// unreachable still admits the tailnet's clients (see Node.CacheMaxAge).
const KnownPeersFile = "known-peers.json"

// cacheVersion is the layout of KnownPeersFile.
const cacheVersion = 1

// cacheFile is KnownPeersFile: the admissible keys of the last network
// map, with names and node IDs, and when that map arrived.
type cacheFile struct {
	Version  int         `json:"version"`
	Received time.Time   `json:"netmap_received"`
	Self     cacheNode   `json:"self"`
	Nodes    []cacheNode `json:"nodes"`
}

type cacheNode struct {
	Key       key.NodePublic `json:"key"`
	Name      string         `json:"name,omitempty"`
	ID        tailcfg.NodeID `json:"id"`
	KeyExpiry time.Time      `json:"key_expiry,omitzero"`
}

// maxCacheSize bounds what readCache reads: a tailnet of 100,000 nodes
// takes about 15 MB.
const maxCacheSize = 64 << 20

// errCacheSymlink: KnownPeersFile is a symbolic link. The node writes a
// plain file there; a link was put there by someone else.
var errCacheSymlink = errors.New("is a symbolic link, not the file this node writes; not followed")

// readCache reads and checks a cache file. Anything but a complete file of
// this layout is an error: a corrupt cache must not admit anyone. A
// symbolic link is not followed (an error); a file that group or others
// may read or write is read, and reported in loose, for a warning: the
// node writes it 0600, so someone changed it.
func readCache(path string) (c *cacheFile, loose os.FileMode, err error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return nil, 0, fmt.Errorf("%s %w", path, errCacheSymlink)
		}
		return nil, 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, 0, err
	}
	if !fi.Mode().IsRegular() {
		return nil, 0, fmt.Errorf("%s: not a regular file (%v)", path, fi.Mode().Type())
	}
	loose = fi.Mode().Perm() & 0o077
	b, err := io.ReadAll(io.LimitReader(f, maxCacheSize+1))
	if err != nil {
		return nil, loose, err
	}
	if len(b) > maxCacheSize {
		return nil, loose, fmt.Errorf("%s: larger than %d bytes", path, maxCacheSize)
	}
	c, err = parseCache(path, b)
	return c, loose, err
}

// parseCache checks the contents of a cache file.
func parseCache(path string, b []byte) (*cacheFile, error) {
	var c cacheFile
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if c.Version != cacheVersion {
		return nil, fmt.Errorf("%s: layout version %d, want %d", path, c.Version, cacheVersion)
	}
	if c.Received.IsZero() {
		return nil, fmt.Errorf("%s: no netmap_received time", path)
	}
	keys := make(map[key.NodePublic]bool, len(c.Nodes))
	ids := make(map[tailcfg.NodeID]bool, len(c.Nodes))
	for i, n := range c.Nodes {
		switch {
		case n.Key.IsZero():
			return nil, fmt.Errorf("%s: node %d has no key", path, i)
		case keys[n.Key]:
			return nil, fmt.Errorf("%s: node %d: key listed twice", path, i)
		case ids[n.ID]:
			// Each key is found through its node's ID: a second entry
			// with the ID would leave the first key pointing at it.
			return nil, fmt.Errorf("%s: node %d: ID %d listed twice", path, i, n.ID)
		}
		keys[n.Key], ids[n.ID] = true, true
	}
	return &c, nil
}

// writeFileAtomic writes data to path so that a reader (or a restart after
// a crash at any point) sees either the old file or the whole new one:
// a temporary file in the same directory, synced, renamed over path, and
// the directory synced. rename is os.Rename; a test swaps it to stop
// where a crash would.
func writeFileAtomic(path string, data []byte, perm os.FileMode, rename func(oldpath, newpath string) error) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(perm); err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := rename(tmp, path); err != nil {
		return err
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync() // best effort: the rename itself is durable on most filesystems
		d.Close()
	}
	return nil
}

// removeStaleTemps removes temporary files a crash left beside path.
func removeStaleTemps(path string) {
	matches, _ := filepath.Glob(path + ".tmp*")
	for _, m := range matches {
		os.Remove(m)
	}
}

// cacheWriter persists the key set, debounced: a burst of map updates is
// one write, at most one per interval.
type cacheWriter struct {
	path     string
	keys     *keySet
	interval time.Duration
	rename   func(oldpath, newpath string) error
	written  uint64 // change count of the last write
}

// writeIfChanged writes the set if it is live and changed since the last
// write, or (force) even unchanged.
func (w *cacheWriter) writeIfChanged(force bool) error {
	if !force && w.keys.changeCount() == w.written {
		return nil // no snapshot of the whole set to find that out
	}
	c, changes, ok := w.keys.snapshot()
	if !ok || (!force && changes == w.written) {
		return nil
	}
	b, err := json.MarshalIndent(c, "", " ")
	if err != nil {
		return err
	}
	if err := writeFileAtomic(w.path, append(b, '\n'), 0o600, w.rename); err != nil {
		return err
	}
	w.written = changes
	return nil
}
