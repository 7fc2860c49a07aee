package policy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
)

// Result is what Apply did.
type Result struct {
	// Changed is false when the file already said what the edit would
	// write: nothing was validated or written.
	Changed bool
	// Written is true when the API accepted the new file (never in a dry
	// run).
	Written bool
	// Diff is the change as a unified diff of the file (as last read →
	// as written, or as it would be written in a dry run); "" when
	// unchanged.
	Diff string
	// Attempts counts the reads of the file: 1, plus one for each write
	// refused because someone else had written first (412).
	Attempts int
	// Warnings are the validation's warnings; the file was valid.
	Warnings []string
	// ETag is the file's ETag after the write, or as read when nothing
	// was written ("" when the API sent none after the write).
	ETag string
	// File is the file as written, or as it would be written in a dry
	// run, or as read when unchanged.
	File []byte
}

// Apply reads the policy file, applies edit and, when that changes the
// file, validates the new file and writes it if the file is still the one
// read (If-Match). When someone else wrote in between (412), it reads the
// file again and applies edit to that, up to MaxAttempts reads, so their
// edit is kept. With dryRun it validates but writes nothing; the Result's
// Diff shows what a write would change.
//
// An unchanged file is not an error (Result.Changed is false). Errors are
// one line each: an *APIError, a *ValidationError, ErrConflict (wrapped)
// when the file kept changing, or a file that is not a policy file.
func (c *Client) Apply(ctx context.Context, edit Edit, dryRun bool) (*Result, error) {
	max := c.MaxAttempts
	if max <= 0 {
		max = 5
	}
	res := &Result{}
	for res.Attempts < max {
		res.Attempts++
		f, err := c.Get(ctx)
		if err != nil {
			return res, err
		}
		out, err := edit(f.HuJSON)
		if err != nil {
			return res, err
		}
		res.ETag, res.File = f.ETag, out
		if bytes.Equal(out, f.HuJSON) {
			res.Changed, res.Diff, res.Warnings = false, "", nil
			return res, nil
		}
		res.Changed = true
		res.Diff = Diff("policy file (as read)", "policy file (edited)", f.HuJSON, out)
		res.Warnings, err = c.Validate(ctx, out)
		if err != nil || dryRun {
			return res, err
		}
		etag, err := c.Set(ctx, out, f.ETag)
		if errors.Is(err, ErrConflict) {
			continue // someone else wrote: apply the edit to their file
		}
		if err != nil {
			return res, err
		}
		res.Written, res.ETag = true, etag
		return res, nil
	}
	return res, fmt.Errorf("policy: the policy file changed %d times between reading and writing (someone else is editing it); nothing was written, run again: %w", max, ErrConflict)
}
