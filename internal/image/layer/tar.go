package layer

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"strings"
	"time"
)

// ExtractTar writes the tar stream r into the folder dst, which must exist.
// It stops at the first refused entry; what was written before stays (the
// caller owns dst and removes it on failure).
func ExtractTar(ctx context.Context, r io.Reader, dst string, o Options) error {
	root, err := os.OpenRoot(dst)
	if err != nil {
		return fmt.Errorf("opening extraction folder: %w", err)
	}
	defer root.Close()
	return ExtractTarRoot(ctx, r, root, o)
}

type dirMode struct {
	name  string
	mode  fs.FileMode
	mtime time.Time
}

// ExtractTarRoot is ExtractTar into an already opened root.
func ExtractTarRoot(ctx context.Context, r io.Reader, root *os.Root, o Options) error {
	tr := tar.NewReader(r)
	c := counter{l: o.Limits}
	var dirs []dirMode
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("reading tar: %w", err)
		}
		if err := c.entry(); err != nil {
			return err
		}
		if sparse(hdr) {
			// archive/tar writes a sparse file's holes out as zeros: a few
			// bytes of map become gigabytes on disk.
			return fmt.Errorf("%w: %q is a sparse file entry, which kiln does not unpack; make the archive without --sparse", ErrUnsafe, hdr.Name)
		}
		name, err := CleanName(hdr.Name, o.Rootfs)
		if err != nil {
			return err
		}
		mode := hdr.FileInfo().Mode()
		switch hdr.Typeflag {
		case tar.TypeDir:
			if name != "." {
				if err := prepare(root, name, true); err != nil {
					return err
				}
				if err := root.Mkdir(name, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
					return fmt.Errorf("creating %q: %w", name, err)
				}
			}
			if err := o.chown(root, name, hdr.Uid, hdr.Gid); err != nil {
				return err
			}
			dirs = append(dirs, dirMode{name, mode, hdr.ModTime})
		case tar.TypeReg, tar.TypeRegA: //nolint:staticcheck // old archives still use TypeRegA
			if name == "." {
				return fmt.Errorf("%w: file entry %q names the root", ErrUnsafe, hdr.Name)
			}
			if err := c.size(name, hdr.Size); err != nil {
				return err
			}
			if err := prepare(root, name, false); err != nil {
				return err
			}
			n, err := writeFile(root, name, tr, hdr.Size, c.l.MaxEntryBytes)
			c.total += n
			if err != nil {
				return err
			}
			if err := o.chown(root, name, hdr.Uid, hdr.Gid); err != nil {
				return err
			}
			// After chown, which clears setuid bits.
			if err := root.Chmod(name, mode); err != nil {
				return fmt.Errorf("chmod %q: %w", name, err)
			}
			_ = root.Chtimes(name, hdr.ModTime, hdr.ModTime)
		case tar.TypeSymlink:
			if name == "." {
				return fmt.Errorf("%w: symlink entry %q names the root", ErrUnsafe, hdr.Name)
			}
			if o.NoSymlinks {
				return fmt.Errorf("%w: symlink entry %q: this archive may not hold symbolic links", ErrUnsafe, hdr.Name)
			}
			if err := checkLinkTarget(name, hdr.Linkname, o.Rootfs); err != nil {
				return err
			}
			if err := prepare(root, name, false); err != nil {
				return err
			}
			if err := root.Symlink(hdr.Linkname, name); err != nil {
				return fmt.Errorf("creating symlink %q: %w", name, err)
			}
			if err := o.chown(root, name, hdr.Uid, hdr.Gid); err != nil {
				return err
			}
		case tar.TypeLink:
			target, err := CleanName(hdr.Linkname, o.Rootfs)
			if err != nil {
				return fmt.Errorf("hard link %q: %w", hdr.Name, err)
			}
			if err := prepare(root, name, false); err != nil {
				return err
			}
			if err := root.Link(target, name); err != nil {
				return fmt.Errorf("creating hard link %q to %q: %w", name, target, err)
			}
		case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
			if !o.Rootfs {
				return fmt.Errorf("%w: %q is a device or fifo; code packages may hold only files, folders and symlinks", ErrUnsafe, hdr.Name)
			}
			if o.Skipped != nil {
				o.Skipped(name, "device nodes come from the guest's devtmpfs")
			}
		case tar.TypeXGlobalHeader:
			// Metadata only.
		default:
			if o.Skipped != nil {
				o.Skipped(name, fmt.Sprintf("unsupported tar entry type %q", hdr.Typeflag))
			}
		}
	}
	// Directory modes last, so a read-only directory does not block the
	// entries written into it.
	for i := len(dirs) - 1; i >= 0; i-- {
		d := dirs[i]
		if err := root.Chmod(d.name, d.mode); err != nil {
			return fmt.Errorf("chmod %q: %w", d.name, err)
		}
		_ = root.Chtimes(d.name, d.mtime, d.mtime)
	}
	return nil
}

// writeFile creates name exclusively (so it never follows a link) and
// copies exactly size bytes, refusing more than max.
func writeFile(root *os.Root, name string, r io.Reader, size, max int64) (int64, error) {
	f, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, fmt.Errorf("creating %q: %w", name, err)
	}
	limit := size
	if size < 0 {
		limit = max
	}
	n, err := io.Copy(f, io.LimitReader(r, limit))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return n, fmt.Errorf("writing %q: %w", name, err)
	}
	if size >= 0 && n != size {
		return n, fmt.Errorf("writing %q: archive is truncated (%d of %d bytes)", name, n, size)
	}
	// A zip's directory may understate an entry (a zip bomb's trick):
	// refuse it rather than silently cut it.
	var one [1]byte
	if m, err := r.Read(one[:]); m > 0 || (err != nil && !errors.Is(err, io.EOF)) {
		return n, fmt.Errorf("%w: entry %q holds more data than its declared %d bytes", ErrUnsafe, name, size)
	}
	return n, nil
}

// Decompress returns a reader of the plain tar in r, recognising gzip,
// bzip2, xz and zstd by their magic bytes (as ADD does). xz and zstd go
// through the host's xz/zstd tools; close the result to reap them.
func Decompress(ctx context.Context, r io.Reader) (io.ReadCloser, error) {
	br := bufio.NewReader(r)
	magic, _ := br.Peek(6)
	switch {
	case bytes.HasPrefix(magic, []byte{0x1f, 0x8b}):
		z, err := gzip.NewReader(br)
		if err != nil {
			return nil, fmt.Errorf("reading gzip: %w", err)
		}
		return z, nil
	case bytes.HasPrefix(magic, []byte("BZh")):
		return io.NopCloser(bzip2.NewReader(br)), nil
	case bytes.HasPrefix(magic, []byte{0xfd, '7', 'z', 'X', 'Z', 0}):
		return pipeTool(ctx, br, "xz")
	case bytes.HasPrefix(magic, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		return pipeTool(ctx, br, "zstd")
	}
	return io.NopCloser(br), nil
}

// IsArchive reports whether the start of a file looks like a tar archive,
// plain or compressed, which is when ADD unpacks a local file.
func IsArchive(head []byte) bool {
	switch {
	case bytes.HasPrefix(head, []byte{0x1f, 0x8b}),
		bytes.HasPrefix(head, []byte("BZh")),
		bytes.HasPrefix(head, []byte{0xfd, '7', 'z', 'X', 'Z', 0}),
		bytes.HasPrefix(head, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		return true
	case len(head) >= 262 && string(head[257:262]) == "ustar":
		return true
	}
	return false
}

type toolReader struct {
	io.ReadCloser
	cmd *exec.Cmd
}

func (t *toolReader) Close() error {
	t.ReadCloser.Close()
	_ = t.cmd.Wait()
	return nil
}

func pipeTool(ctx context.Context, r io.Reader, tool string) (io.ReadCloser, error) {
	cmd := exec.CommandContext(ctx, tool, "-dc")
	cmd.Stdin = r
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s to decompress (install it with `make setup`): %w", tool, err)
	}
	return &toolReader{ReadCloser: out, cmd: cmd}, nil
}

// sparse reports a GNU or PAX sparse file entry.
func sparse(hdr *tar.Header) bool {
	if hdr.Typeflag == tar.TypeGNUSparse {
		return true
	}
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return true
		}
	}
	return false
}
