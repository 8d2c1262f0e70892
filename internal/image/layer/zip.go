package layer

import (
	"archive/zip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
)

// maxLinkTarget bounds the size of a symlink target stored in a zip.
const maxLinkTarget = 4096

// ExtractZip writes the zip archive at zipPath into the folder dst, which
// must exist. Zip archives are always a user's code package, so absolute
// names, "..", links leaving dst and special files are refused (Options.Rootfs
// is ignored), and the limits are checked against the central directory
// before anything is written and again against the bytes actually
// inflated, since the directory's sizes may lie.
func ExtractZip(ctx context.Context, zipPath, dst string, o Options) error {
	zr, err := zip.OpenReader(zipPath)
	if err != nil {
		return fmt.Errorf("opening zip: %w", err)
	}
	defer zr.Close()
	root, err := os.OpenRoot(dst)
	if err != nil {
		return fmt.Errorf("opening extraction folder: %w", err)
	}
	defer root.Close()
	o.Rootfs = false

	if o.Limits.MaxEntries > 0 && len(zr.File) > o.Limits.MaxEntries {
		return limitError(fmt.Sprintf("number of entries (%d)", len(zr.File)), int64(o.Limits.MaxEntries), "MaxEntries")
	}
	var declared uint64
	for _, f := range zr.File {
		declared += f.UncompressedSize64
	}
	if o.Limits.MaxTotalBytes > 0 && declared > uint64(o.Limits.MaxTotalBytes) {
		return limitError(fmt.Sprintf("total uncompressed size (%d bytes)", declared), o.Limits.MaxTotalBytes, "MaxTotalBytes")
	}

	c := counter{l: o.Limits}
	var dirs []dirMode
	for _, f := range zr.File {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := c.entry(); err != nil {
			return err
		}
		name, err := CleanName(f.Name, false)
		if err != nil {
			return err
		}
		mode := f.Mode()
		switch {
		case mode.IsDir():
			if name != "." {
				if err := prepare(root, name, true); err != nil {
					return err
				}
				if err := root.Mkdir(name, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
					return fmt.Errorf("creating %q: %w", name, err)
				}
			}
			dirs = append(dirs, dirMode{name: name, mode: mode.Perm() | 0o700, mtime: f.Modified})
		case mode&fs.ModeSymlink != 0:
			target, err := readSmall(f, maxLinkTarget)
			if err != nil {
				return err
			}
			if err := checkLinkTarget(name, target, false); err != nil {
				return err
			}
			if err := prepare(root, name, false); err != nil {
				return err
			}
			if err := root.Symlink(target, name); err != nil {
				return fmt.Errorf("creating symlink %q: %w", name, err)
			}
		case mode.IsRegular():
			if name == "." {
				return fmt.Errorf("%w: file entry %q names the root", ErrUnsafe, f.Name)
			}
			size := int64(f.UncompressedSize64)
			if err := c.size(name, size); err != nil {
				return err
			}
			if err := prepare(root, name, false); err != nil {
				return err
			}
			rc, err := f.Open()
			if err != nil {
				return fmt.Errorf("reading zip entry %q: %w", f.Name, err)
			}
			n, err := writeFile(root, name, rc, size, c.l.MaxEntryBytes)
			rc.Close()
			c.total += n
			if err != nil {
				return err
			}
			// Regular permissions only: a code package has no business
			// carrying setuid bits.
			perm := mode.Perm()
			if perm == 0 {
				perm = 0o644 // zips made on Windows carry no Unix mode
			}
			if err := root.Chmod(name, perm|0o400); err != nil {
				return fmt.Errorf("chmod %q: %w", name, err)
			}
			_ = root.Chtimes(name, f.Modified, f.Modified)
		default:
			return fmt.Errorf("%w: %q is a %s; code packages may hold only files, folders and symlinks", ErrUnsafe, f.Name, kind(mode))
		}
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := root.Chmod(dirs[i].name, dirs[i].mode); err != nil {
			return fmt.Errorf("chmod %q: %w", dirs[i].name, err)
		}
	}
	return nil
}

func readSmall(f *zip.File, max int64) (string, error) {
	rc, err := f.Open()
	if err != nil {
		return "", fmt.Errorf("reading zip entry %q: %w", f.Name, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, max+1))
	if err != nil {
		return "", fmt.Errorf("reading zip entry %q: %w", f.Name, err)
	}
	if int64(len(b)) > max {
		return "", fmt.Errorf("%w: symlink %q has a target longer than %d bytes", ErrUnsafe, f.Name, max)
	}
	return string(b), nil
}

func kind(m fs.FileMode) string {
	switch {
	case m&fs.ModeDevice != 0 && m&fs.ModeCharDevice != 0:
		return "character device"
	case m&fs.ModeDevice != 0:
		return "block device"
	case m&fs.ModeNamedPipe != 0:
		return "named pipe"
	case m&fs.ModeSocket != 0:
		return "socket"
	}
	return "special file"
}
