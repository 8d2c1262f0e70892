//go:build linux

package qemu

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/kiln-sandbox/kiln/internal/diskcopy"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/hosttool"
	"github.com/kiln-sandbox/kiln/internal/qcow2"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// The driver owns its disk chains and template files: callers that need a
// build step's writes in the root disk, or a template backed by another
// root, ask the driver (CommitDisk, CopyTemplate) instead of reading these
// files and running qemu-img themselves.

// CommitDisk implements vmm.Driver.
func (d *Driver) CommitDisk(ctx context.Context, id string) error {
	v, err := d.get(id)
	if err != nil {
		return err
	}
	v.op.Lock()
	defer v.op.Unlock()
	v.mu.Lock()
	state, p, m := v.meta.State, v.proc, v.meta
	v.mu.Unlock()
	if state != vmm.StateStopped || (p != nil && p.alive()) {
		return fmt.Errorf("committing the disk of vm %s: it is %s, stop it first: %w", id, state, errdefs.ErrConflict)
	}
	if (m.Template != "" && !m.OwnDisk) || len(m.Chain) != 1 || m.Chain[0].Format != "raw" {
		return fmt.Errorf("committing the disk of vm %s: it was not booted from a root disk: %w", id, errdefs.ErrInvalid)
	}
	return commitOverlay(ctx, d.cfg.QEMUImg, v.path("disk.qcow2"), m.Chain[0].Path)
}

// commitOverlay writes a booted VM's overlay back into disk, the raw file
// it was made on. The VM (and a QEMU it may have taken over) wrote the
// overlay, header included: a header naming another backing file would
// make a plain `qemu-img commit` write into that file as root. So the
// chain is checked to be exactly overlay <- disk, and qemu-img runs
// confined (hosttool) with both files given as descriptors, never by a
// name from the header.
func commitOverlay(ctx context.Context, qemuImg, overlay, disk string) error {
	if err := qcow2.CheckChain([]string{overlay, disk}); err != nil {
		return fmt.Errorf("committing the vm's disk: %w", err)
	}
	ov, err := hosttool.Open(overlay, true)
	if err != nil {
		return err
	}
	defer ov.Close()
	base, err := hosttool.Open(disk, true)
	if err != nil {
		return err
	}
	defer base.Close()
	files := []*os.File{ov, base}
	// A build VM ignores flushes (a scratch disk), so only QEMU's own exit
	// wrote the overlay's metadata out: check it before trusting it.
	if err := runQEMUImg(ctx, qemuImg, files, "check", "-q", qcow2.OpenSpec([]string{hosttool.FD(0)}, "qcow2")); err != nil {
		return fmt.Errorf("the vm's disk overlay is inconsistent (its QEMU did not exit cleanly): %w", err)
	}
	// Committing writes only the clusters the guest changed back into the
	// raw disk: far less than converting the whole image.
	if err := runQEMUImg(ctx, qemuImg, files, "commit", "-q", "-d", qcow2.OpenSpec([]string{hosttool.FD(0), hosttool.FD(1)}, "raw")); err != nil {
		return fmt.Errorf("committing the vm's disk: %w", err)
	}
	return nil
}

// CopyTemplate implements vmm.Driver. Templates never change after the
// snapshot (clones map the memory file read-only and write to their own
// overlays), so big files are hard links (or copies across file
// systems). Files that name absolute paths are made anew: disk.qcow2's
// header (its backing root), chain.json and the clone overlay.
func (d *Driver) CopyTemplate(ctx context.Context, spec vmm.TemplateCopy) (vmm.Template, error) {
	fail := func(err error) (vmm.Template, error) {
		return vmm.Template{}, fmt.Errorf("copying template %s: %w", spec.Src, err)
	}
	// QEMU reads a relative backing name from the overlay's own folder.
	dst, err := filepath.Abs(spec.Dst)
	if err != nil {
		return fail(err)
	}
	if err := os.Mkdir(dst, 0o700); err != nil {
		if os.IsExist(err) {
			err = fmt.Errorf("%w: %w", err, errdefs.ErrConflict)
		}
		return fail(err)
	}
	spec.Dst = dst
	if err := copyTemplate(ctx, d.cfg.QEMUImg, spec); err != nil {
		os.RemoveAll(dst)
		return fail(err)
	}
	return LoadTemplate(dst)
}

// copyTemplate fills the absolute, existing spec.Dst. The template's disk.qcow2 was written by a VM's QEMU: its
// chain is checked to be exactly disk.qcow2 <- SrcRoot first, qemu-img
// touches it only confined and through a descriptor, and the clone
// overlay is made without opening it.
func copyTemplate(ctx context.Context, qemuImg string, spec vmm.TemplateCopy) error {
	src := spec.Src
	srcRoot, err := filepath.Abs(spec.SrcRoot)
	if err != nil {
		return err
	}
	rootDisk, err := filepath.Abs(spec.Root)
	if err != nil {
		return err
	}
	if err := qcow2.CheckChain([]string{filepath.Join(src, "disk.qcow2"), srcRoot}); err != nil {
		return err
	}
	dst := spec.Dst
	ents, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, e := range ents {
		switch f := e.Name(); {
		case f == "disk.qcow2" || f == "overlay.qcow2" || f == chainFile:
			// Made below: they name absolute paths.
		case !e.Type().IsRegular():
			return fmt.Errorf("template %s holds %s, which is not a file: %w", src, f, errdefs.ErrInvalid)
		default:
			if err := diskcopy.LinkOrCopy(ctx, filepath.Join(src, f), filepath.Join(dst, f)); err != nil {
				return err
			}
		}
	}
	disk := filepath.Join(dst, "disk.qcow2")
	if err := diskcopy.Copy(ctx, filepath.Join(src, "disk.qcow2"), disk); err != nil {
		return err
	}
	// -u: only the header changes; the backing file's content is the same.
	if err := rebaseHeader(ctx, qemuImg, disk, rootDisk); err != nil {
		return err
	}
	h, err := qcow2.ParseFile(disk)
	if err != nil {
		return err
	}
	if h.BackingFile != rootDisk || h.BackingFormat != "raw" {
		return fmt.Errorf("rebasing %s: header names %q (%s), expected %q (raw)", disk, h.BackingFile, h.BackingFormat, rootDisk)
	}
	// Clones get this chain from descriptors (readChain); the copy's is
	// its own disk on rootDisk.
	if err := writeChain(dst, []layer{{Path: rootDisk, Format: "raw"}}); err != nil {
		return err
	}
	if spec.NoClone {
		return nil
	}
	// -u and the size from the checked header: qemu-img opens neither the
	// disk nor its backing file.
	return runTool(ctx, qemuImg, "create", "-q", "-f", "qcow2", "-u", "-b", disk, "-F", "qcow2", filepath.Join(dst, "overlay.qcow2"), strconv.FormatUint(h.Size, 10))
}

// rebaseHeader points the qcow2 image's header at backing (raw) without
// reading either, with qemu-img confined and given the image as a
// descriptor, opened without its old backing file.
func rebaseHeader(ctx context.Context, qemuImg, image, backing string) error {
	return rebaseHeaderTo(ctx, qemuImg, image, backing, "raw")
}

// rebaseHeaderTo is rebaseHeader onto a backing file of format.
func rebaseHeaderTo(ctx context.Context, qemuImg, image, backing, format string) error {
	f, err := hosttool.Open(image, true)
	if err != nil {
		return err
	}
	defer f.Close()
	return runQEMUImg(ctx, qemuImg, []*os.File{f}, "rebase", "-q", "-u", "-F", format, "-b", backing, qcow2.OpenSpec([]string{hosttool.FD(0)}, "qcow2"))
}

// runQEMUImg runs qemu-img confined on files (given as descriptors, hosttool.FD).
func runQEMUImg(ctx context.Context, tool string, files []*os.File, args ...string) error {
	var out bytes.Buffer
	w := &limitedWriter{w: &out, n: 64 << 10}
	cmd, err := hosttool.Command(ctx, hosttool.Spec{Path: tool, Args: args, Files: files, Stdout: w, Stderr: w})
	if err != nil {
		return err
	}
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("qemu-img %s: %s: %w", args[0], strings.TrimSpace(out.String()), err)
	}
	return nil
}

// limitedWriter keeps the first n bytes and drops the rest.
type limitedWriter struct {
	w io.Writer
	n int
}

func (l *limitedWriter) Write(p []byte) (int, error) {
	if k := min(len(p), l.n); k > 0 {
		l.w.Write(p[:k])
		l.n -= k
	}
	return len(p), nil
}

func runTool(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %s: %w", name, strings.Join(args, " "), strings.TrimSpace(string(out)), err)
	}
	return nil
}
