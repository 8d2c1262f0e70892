// Package layer writes untrusted trees (zip and tar archives, OCI image
// layers, copied folders) into a root folder without ever touching
// anything outside it.
//
// Every write goes through an os.Root, so the kernel-level openat walk
// refuses a path that leaves the folder, whether by "..", an absolute name
// or a symbolic link planted by an earlier entry. On top of that, names are
// checked before any write so that a hostile archive fails with an error
// that names the entry, and limits bound what an archive may cost.
package layer

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"strings"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// ErrUnsafe marks an entry refused because it would escape the root or is
// of a kind the caller does not accept.
var ErrUnsafe = fmt.Errorf("unsafe archive entry: %w", errdefs.ErrInvalid)

// ErrLimit marks an archive refused because it exceeds a configured limit.
var ErrLimit = fmt.Errorf("archive limit exceeded: %w", errdefs.ErrInvalid)

// Limits bound what one archive may cost. Zero fields mean "no limit".
type Limits struct {
	MaxEntries    int   // entries of any kind
	MaxEntryBytes int64 // uncompressed bytes of one file
	MaxTotalBytes int64 // uncompressed bytes of all files
}

// DefaultSourceLimits apply to a user's code package: generous for an
// application, small enough that a zip bomb cannot fill the host's disk.
var DefaultSourceLimits = Limits{
	MaxEntries:    100_000,
	MaxEntryBytes: 1 << 30,
	MaxTotalBytes: 4 << 30,
}

// DefaultImageLimits apply to OCI base image layers.
var DefaultImageLimits = Limits{
	MaxEntries:    1_000_000,
	MaxEntryBytes: 4 << 30,
	MaxTotalBytes: 16 << 30,
}

// Options say how entries are written.
type Options struct {
	Limits Limits
	// Rootfs is set when extracting an operating system tree (OCI layers,
	// ADD of a tar into the root being built): absolute names are taken as
	// relative to the root, symbolic links may point anywhere (they are
	// resolved inside the guest, not on the host), and device nodes are
	// skipped because the guest's devtmpfs provides them. When unset
	// (a user's code package), absolute names, links that leave the tree
	// and special files are refused.
	Rootfs bool
	// KeepOwners applies the archive's numeric owners (needs root; ignored
	// otherwise). When false, files belong to Owner if set, else to the
	// process.
	KeepOwners bool
	// Owner, if set, owns every written entry (COPY --chown).
	Owner *Owner
	// NoSymlinks refuses symbolic links, for a tree that kiln itself reads
	// on the host by plain path (an OCI image layout, which has none):
	// checkLinkTarget judges a link's text, and a chain of links that each
	// stay inside on paper (x -> ., then x/x/x/y -> ../../../..) can still
	// resolve outside. Trees read through os.Root, or only by the guest,
	// do not need it.
	NoSymlinks bool
	// Skipped, if set, is called for entries deliberately not written
	// (device nodes in rootfs mode), so the caller can log them.
	Skipped func(name, why string)
}

// Owner is a numeric user and group.
type Owner struct{ UID, GID int }

// limitError builds the error for an exceeded limit, naming the limit and
// what to do about it.
func limitError(what string, limit int64, field string) error {
	return fmt.Errorf("%w: %s exceeds %s = %s; shrink the package or raise %s in kiln's image build limits", ErrLimit, what, field, humanBytes(field, limit), field)
}

func humanBytes(field string, n int64) string {
	if field == "MaxEntries" {
		return fmt.Sprintf("%d entries", n)
	}
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%d bytes", n)
}

// counter enforces Limits across the entries of one archive.
type counter struct {
	l       Limits
	entries int
	total   int64
}

func (c *counter) entry() error {
	c.entries++
	if c.l.MaxEntries > 0 && c.entries > c.l.MaxEntries {
		return limitError("number of entries", int64(c.l.MaxEntries), "MaxEntries")
	}
	return nil
}

func (c *counter) size(name string, n int64) error {
	if c.l.MaxEntryBytes > 0 && n > c.l.MaxEntryBytes {
		return limitError(fmt.Sprintf("entry %q (%d bytes uncompressed)", name, n), c.l.MaxEntryBytes, "MaxEntryBytes")
	}
	if c.l.MaxTotalBytes > 0 && c.total+n > c.l.MaxTotalBytes {
		return limitError("total uncompressed size", c.l.MaxTotalBytes, "MaxTotalBytes")
	}
	return nil
}

// CleanName turns an archive entry name into a path relative to the root,
// or refuses it. "./a/b/" → "a/b"; "/a" → "a" in rootfs mode, refused
// otherwise; any ".." component is refused even if it would stay inside,
// because no honest archive needs one.
func CleanName(name string, rootfs bool) (string, error) {
	n := strings.ReplaceAll(name, "\\", "/")
	if n == "" || strings.ContainsRune(n, 0) {
		return "", fmt.Errorf("%w: empty or NUL-containing name %q", ErrUnsafe, name)
	}
	if strings.HasPrefix(n, "/") {
		if !rootfs {
			return "", fmt.Errorf("%w: %q is an absolute path", ErrUnsafe, name)
		}
		n = strings.TrimLeft(n, "/")
	}
	for _, part := range strings.Split(n, "/") {
		if part == ".." {
			return "", fmt.Errorf("%w: %q contains \"..\"", ErrUnsafe, name)
		}
	}
	c := path.Clean(n)
	if c == "." || c == "" {
		return ".", nil
	}
	return c, nil
}

// checkLinkTarget refuses, outside rootfs mode, a symbolic link at name
// whose target is absolute or climbs out of the tree. It judges the
// link's text only: links through links can resolve elsewhere, so host
// code reads such trees through os.Root (or refuses links: NoSymlinks).
func checkLinkTarget(name, target string, rootfs bool) error {
	if rootfs {
		return nil
	}
	if target == "" || path.IsAbs(target) {
		return fmt.Errorf("%w: symlink %q points to %q, outside the build folder", ErrUnsafe, name, target)
	}
	joined := path.Join(path.Dir(name), target)
	if joined == ".." || strings.HasPrefix(joined, "../") {
		return fmt.Errorf("%w: symlink %q points to %q, outside the build folder", ErrUnsafe, name, target)
	}
	return nil
}

// prepare makes the parent of name and removes whatever sits at name unless
// both it and the new entry are directories, so that a new entry replaces
// an old one (tar semantics) and a write never follows a symlink left at
// the final component.
func prepare(root *os.Root, name string, isDir bool) error {
	if dir := path.Dir(name); dir != "." {
		if err := root.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("creating parent of %q: %w", name, err)
		}
	}
	fi, err := root.Lstat(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("inspecting %q: %w", name, err)
	}
	if isDir && fi.IsDir() {
		return nil
	}
	if err := root.RemoveAll(name); err != nil {
		return fmt.Errorf("replacing %q: %w", name, err)
	}
	return nil
}

func (o Options) chown(root *os.Root, name string, uid, gid int) error {
	switch {
	case o.Owner != nil:
		uid, gid = o.Owner.UID, o.Owner.GID
	case o.KeepOwners:
	default:
		return nil
	}
	if os.Geteuid() != 0 {
		return nil
	}
	if err := root.Lchown(name, uid, gid); err != nil {
		return fmt.Errorf("chown %q: %w", name, err)
	}
	return nil
}
