//go:build linux

package rootfs

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// EnsureFree grows the ext4 image, in place, so that it has at least
// freeBytes and freeInodes free. The file stays sparse: unused room costs
// no host disk.
func EnsureFree(ctx context.Context, image string, freeBytes, freeInodes int64) error {
	h, err := readHeader(ctx, image)
	if err != nil {
		return err
	}
	bs, bpg, ipg := h.num("Block size"), h.num("Blocks per group"), h.num("Inodes per group")
	if bs <= 0 || bs > 64<<10 || bpg <= 0 || ipg <= 0 {
		return fmt.Errorf("%s: unexpected ext4 header (block size %d)", image, bs)
	}
	// A guest wrote the superblock: its sizes are claims. The disk file's
	// real size bounds them, so a forged block count cannot make kiln
	// grow the file to match it.
	fi, err := os.Stat(image)
	if err != nil {
		return err
	}
	if bc := h.num("Block count"); bc <= 0 || bc > fi.Size()/bs {
		return fmt.Errorf("%s: the file system claims %d blocks of %d bytes but the disk is %d bytes: %w", image, bc, bs, fi.Size(), errdefs.ErrInvalid)
	}
	needBlocks := max(0, (freeBytes+bs-1)/bs-h.num("Free blocks"))
	if missing := freeInodes - h.num("Free inodes"); missing > 0 {
		needBlocks = max(needBlocks, (missing+ipg-1)/ipg*bpg)
	}
	if needBlocks == 0 {
		return nil
	}
	// Whole groups, so the new room is not eaten by a partial group's
	// metadata.
	needBlocks = (needBlocks/bpg + 2) * bpg
	newBlocks := h.num("Block count") + needBlocks
	if size := newBlocks * bs; size > fi.Size() {
		if err := os.Truncate(image, size); err != nil {
			return err
		}
	}
	// A guest wrote this file system: resize2fs must only see one that a
	// full check found sound (and it asks for one after every mount).
	if err := Repair(ctx, image); err != nil {
		return fmt.Errorf("checking %s before growing it: %w", image, err)
	}
	o, e, err := toolRun{name: "resize2fs", image: image, write: true, args: []string{"IMAGE", strconv.FormatInt(newBlocks, 10)}}.run(ctx)
	if err != nil {
		return fmt.Errorf("resize2fs %s: %s: %w", image, strings.TrimSpace(string(o)+e), err)
	}
	return nil
}

// header is dumpe2fs -h's "Field: value" lines.
type header map[string]string

func readHeader(ctx context.Context, image string) (header, error) {
	out, e, err := toolRun{name: "dumpe2fs", image: image, args: []string{"-h", "IMAGE"}, maxOut: maxHeader}.run(ctx)
	if err != nil {
		return nil, fmt.Errorf("dumpe2fs -h %s: %s: %w", image, strings.TrimSpace(e), err)
	}
	h := header{}
	for _, line := range strings.Split(string(out), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			h[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return h, nil
}

// num is a numeric field; 0 if absent.
func (h header) num(field string) int64 {
	n, _ := strconv.ParseInt(h[field], 10, 64)
	return n
}
