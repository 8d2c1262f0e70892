package layer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"syscall"
)

// CopyOptions say how CopyTree copies.
type CopyOptions struct {
	Options
	// Exclude, if set, skips source entries (relative to the source root,
	// slash-separated) for which it returns true: .dockerignore.
	Exclude func(rel string, isDir bool) bool
	// Mode, if set, is the mode of every file and folder copied, in place
	// of the source's (COPY --chmod); the folder copied into keeps its own.
	Mode *fs.FileMode
}

// CopyTree copies srcName from the src root to dstName in the dst root.
// A directory's contents land in dstName (created as needed); a file or
// symlink lands at dstName itself. Symlinks are copied as links, never
// followed, except that srcName itself is resolved inside src if it is a
// link. Reads go through src and writes through dst, so neither side can
// be escaped by a planted link.
func CopyTree(ctx context.Context, src *os.Root, srcName string, dst *os.Root, dstName string, o CopyOptions) error {
	c := counter{l: o.Limits}
	fi, err := src.Stat(srcName)
	if err != nil {
		return fmt.Errorf("copy source %q: %w", srcName, err)
	}
	if !fi.IsDir() {
		if err := c.entry(); err != nil {
			return err
		}
		return copyOne(src, srcName, fi, dst, dstName, o, &c)
	}
	if dstName != "." {
		if err := prepare(dst, dstName, true); err != nil {
			return err
		}
		if err := dst.Mkdir(dstName, fi.Mode().Perm()); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("creating %q: %w", dstName, err)
		}
	}
	var dirs []dirMode
	walkErr := fs.WalkDir(src.FS(), srcName, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel := relTo(srcName, p)
		if rel != "." && o.Exclude != nil && o.Exclude(rel, d.IsDir()) {
			if d.IsDir() {
				return fs.SkipDir
			}
			return nil
		}
		if err := c.entry(); err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		target := path.Join(dstName, rel)
		if d.IsDir() {
			if rel != "." {
				if err := prepare(dst, target, true); err != nil {
					return err
				}
				if err := dst.Mkdir(target, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
					return fmt.Errorf("creating %q: %w", target, err)
				}
			}
			uid, gid := owner(info)
			if err := o.chown(dst, target, uid, gid); err != nil {
				return err
			}
			mode := info.Mode() & (fs.ModePerm | fs.ModeSetgid | fs.ModeSticky)
			if o.Mode != nil && rel != "." {
				mode = *o.Mode
			}
			dirs = append(dirs, dirMode{name: target, mode: mode, mtime: info.ModTime()})
			return nil
		}
		return copyOne(src, p, info, dst, target, o, &c)
	})
	if walkErr != nil {
		return walkErr
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := dst.Chmod(dirs[i].name, dirs[i].mode); err != nil {
			return fmt.Errorf("chmod %q: %w", dirs[i].name, err)
		}
		_ = dst.Chtimes(dirs[i].name, dirs[i].mtime, dirs[i].mtime)
	}
	return nil
}

func relTo(base, p string) string {
	if base == "." {
		return p
	}
	if p == base {
		return "."
	}
	return p[len(base)+1:]
}

func owner(fi fs.FileInfo) (int, int) {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return int(st.Uid), int(st.Gid)
	}
	return 0, 0
}

func copyOne(src *os.Root, name string, fi fs.FileInfo, dst *os.Root, target string, o CopyOptions, c *counter) error {
	if target == "." {
		return fmt.Errorf("%w: cannot write file %q over the root", ErrUnsafe, name)
	}
	uid, gid := owner(fi)
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		link, err := src.Readlink(name)
		if err != nil {
			return fmt.Errorf("reading symlink %q: %w", name, err)
		}
		if err := checkLinkTarget(target, link, o.Rootfs); err != nil {
			return err
		}
		if err := prepare(dst, target, false); err != nil {
			return err
		}
		if err := dst.Symlink(link, target); err != nil {
			return fmt.Errorf("creating symlink %q: %w", target, err)
		}
		return o.chown(dst, target, uid, gid)
	case fi.Mode().IsRegular():
		if err := c.size(name, fi.Size()); err != nil {
			return err
		}
		in, err := src.Open(name)
		if err != nil {
			return fmt.Errorf("opening %q: %w", name, err)
		}
		defer in.Close()
		if err := prepare(dst, target, false); err != nil {
			return err
		}
		n, err := writeFile(dst, target, io.Reader(in), fi.Size(), c.l.MaxEntryBytes)
		c.total += n
		if err != nil {
			return err
		}
		if err := o.chown(dst, target, uid, gid); err != nil {
			return err
		}
		mode := fi.Mode() & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
		if o.Mode != nil {
			mode = *o.Mode
		}
		if err := dst.Chmod(target, mode); err != nil {
			return fmt.Errorf("chmod %q: %w", target, err)
		}
		if o.Rootfs {
			if err := copyXattrs(in, dst, target); err != nil {
				return fmt.Errorf("copying %q: %w", name, err)
			}
		}
		_ = dst.Chtimes(target, fi.ModTime(), fi.ModTime())
		return nil
	default:
		if !o.Rootfs {
			return fmt.Errorf("%w: %q is a %s; code packages may hold only files, folders and symlinks", ErrUnsafe, name, kind(fi.Mode()))
		}
		if o.Skipped != nil {
			o.Skipped(name, "special files are not copied")
		}
		return nil
	}
}
