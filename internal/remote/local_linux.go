//go:build linux

package remote

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/kiln-sandbox/kiln/internal/image/layer"
)

// maxTrailer bounds what may follow the end of a guest's tar stream (an
// honest one pads with at most a few KiB of zeros).
const maxTrailer = 1 << 20

// ReceiveTree writes a tar stream from a guest (CopyOut: every entry under
// one top entry) to the local path dst, as `docker cp` does: into dst when
// it is an existing directory, else as dst. The guest is not trusted: the
// stream is extracted, within layer.DefaultImageLimits, into a fresh
// folder beside the destination (so no link it holds can lead a write
// outside that folder), entries outside the top entry, devices and fifos
// are refused or skipped, set-id and sticky bits dropped, files owned by
// the caller; only then does the result move into place. warn reports
// skipped entries.
func ReceiveTree(ctx context.Context, r io.Reader, dst string, warn func(string)) error {
	tr := tar.NewReader(r)
	first, err := tr.Next()
	if err != nil {
		return fmt.Errorf("reading the copy: %w", err)
	}
	top := path.Clean(first.Name)
	if top == "." || top == ".." || strings.Contains(top, "/") {
		return fmt.Errorf("the copy's first entry %.64q is not one name", first.Name)
	}
	final := dst
	if fi, err := os.Stat(dst); err == nil && fi.IsDir() {
		final = filepath.Join(dst, top)
	}
	if fi, err := os.Lstat(final); err == nil && fi.IsDir() {
		if first.Typeflag != tar.TypeDir {
			return fmt.Errorf("%s is a directory; cannot replace it with a file", final)
		}
		if ents, _ := os.ReadDir(final); len(ents) > 0 {
			return fmt.Errorf("%s exists and is not empty: remove it or copy to another path", final)
		}
	}
	tmp, err := os.MkdirTemp(filepath.Dir(final), ".kiln-cp-")
	if err != nil {
		return fmt.Errorf("making a folder beside %s: %w", final, err)
	}
	defer os.RemoveAll(tmp)

	pr, pw := io.Pipe()
	rewritten := make(chan error, 1)
	go func() {
		err := rewrite(tr, first, top, pw, warn)
		pw.CloseWithError(err)
		rewritten <- err
	}()
	err = layer.ExtractTar(ctx, pr, tmp, layer.Options{Rootfs: true, Limits: layer.DefaultImageLimits})
	pr.CloseWithError(errors.New("extraction ended"))
	if rerr := <-rewritten; rerr != nil && err == nil {
		err = rerr
	}
	if err != nil {
		return fmt.Errorf("extracting the copy: %w", err)
	}
	if n, _ := io.CopyN(io.Discard, r, maxTrailer+1); n > maxTrailer {
		return errors.New("the guest sent more than its archive")
	}
	if err := os.Rename(filepath.Join(tmp, "x"), final); err != nil {
		return fmt.Errorf("moving the copy into place: %w", err)
	}
	return nil
}

// rewrite copies the guest's entries under the one name "x", keeping only
// files, directories and links whose names stay under top.
func rewrite(tr *tar.Reader, h *tar.Header, top string, w io.Writer, warn func(string)) error {
	tw := tar.NewWriter(w)
	under := func(name string) (string, bool) {
		name = path.Clean(name)
		if name == top {
			return "x", true
		}
		if rest, ok := strings.CutPrefix(name, top+"/"); ok {
			return "x/" + rest, true
		}
		return "", false
	}
	for {
		name, ok := under(h.Name)
		if !ok {
			return fmt.Errorf("entry %.64q is outside %q", h.Name, top)
		}
		keep := true
		switch h.Typeflag {
		case tar.TypeDir, tar.TypeReg, tar.TypeRegA, tar.TypeSymlink: //nolint:staticcheck // old archives use TypeRegA
		case tar.TypeLink:
			if h.Linkname, keep = under(h.Linkname); !keep && warn != nil {
				warn(fmt.Sprintf("skipped hard link %s: its target is outside the copy", h.Name))
			}
		default:
			keep = false
			if warn != nil && h.Typeflag != tar.TypeXGlobalHeader && h.Typeflag != tar.TypeXHeader {
				warn(fmt.Sprintf("skipped %s: not a file, directory or link", h.Name))
			}
		}
		if keep {
			out := &tar.Header{Typeflag: h.Typeflag, Name: name, Linkname: h.Linkname, Size: h.Size,
				Mode: h.Mode & int64(fs.ModePerm), ModTime: h.ModTime, Format: tar.FormatPAX}
			if out.Typeflag == tar.TypeRegA { //nolint:staticcheck
				out.Typeflag = tar.TypeReg
			}
			if out.Typeflag != tar.TypeReg {
				out.Size = 0
			}
			if err := tw.WriteHeader(out); err != nil {
				return err
			}
			if out.Typeflag == tar.TypeReg {
				if _, err := io.Copy(tw, tr); err != nil {
					return err
				}
			}
		}
		var err error
		if h, err = tr.Next(); errors.Is(err, io.EOF) {
			return tw.Close()
		} else if err != nil {
			return err
		}
	}
}
