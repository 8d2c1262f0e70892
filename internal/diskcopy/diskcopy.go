// Package diskcopy copies disk images and template files kiln owns: a hard
// link where the file system allows it, else a sparse (and, where the file
// system can, reflinked) copy, so a multi-GiB image with few written blocks
// costs little either way.
package diskcopy

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// LinkOrCopy makes dst the same content as src: a hard link, or a Copy
// when src and dst are on different file systems.
func LinkOrCopy(ctx context.Context, src, dst string) error {
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	return Copy(ctx, src, dst)
}

// Copy copies src to dst keeping holes, sharing blocks where the file
// system can (cp --reflink=auto).
func Copy(ctx context.Context, src, dst string) error {
	out, err := exec.CommandContext(ctx, "cp", "--sparse=always", "--reflink=auto", src, dst).CombinedOutput()
	if err != nil {
		return fmt.Errorf("copying %s to %s: %s: %w", src, dst, strings.TrimSpace(string(out)), err)
	}
	return nil
}
