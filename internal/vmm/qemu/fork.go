//go:build linux

package qemu

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/kiln-sandbox/kiln/internal/diskcopy"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/qcow2"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// TemplateFromSuspended implements vmm.Forker.
func (d *Driver) TemplateFromSuspended(ctx context.Context, id, dir string) (vmm.Template, error) {
	v, err := d.get(id)
	if err != nil {
		return vmm.Template{}, err
	}
	// Held throughout: a resume would write the memory file and the disk
	// while they are copied.
	v.op.Lock()
	defer v.op.Unlock()
	v.mu.Lock()
	m := v.meta
	v.mu.Unlock()
	if m.State != vmm.StateSuspended || m.Phase != "" {
		return vmm.Template{}, fmt.Errorf("cannot make a template of vm %s: it is %s, suspend it first: %w", id, m.State, errdefs.ErrConflict)
	}
	if len(m.Disks) > 0 {
		return vmm.Template{}, fmt.Errorf("cannot make a template of vm %s: it has extra disks: %w", id, errdefs.ErrInvalid)
	}
	dir, err = filepath.Abs(dir)
	if err != nil {
		return vmm.Template{}, err
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		if os.IsExist(err) {
			err = fmt.Errorf("%w: %w", err, errdefs.ErrConflict)
		}
		return vmm.Template{}, fmt.Errorf("creating template directory: %w", err)
	}
	start := time.Now()
	t, err := v.templateInto(ctx, m, dir)
	if err != nil {
		os.RemoveAll(dir)
		return vmm.Template{}, fmt.Errorf("making a template of suspended vm %s: %w", id, err)
	}
	v.log.Info("template made of suspended vm", "template", dir, "ms", time.Since(start).Milliseconds())
	return t, nil
}

// templateInto fills dir from the suspended VM's files. The VM's overlay
// is copied (it will change when the VM resumes), the layers below it
// linked: nothing writes them, and the template must keep them when the
// VM's own template goes (its image deleted).
func (v *vm) templateInto(ctx context.Context, m meta, dir string) (vmm.Template, error) {
	marker := filepath.Join(dir, ".incomplete")
	if err := os.WriteFile(marker, nil, 0o600); err != nil {
		return vmm.Template{}, err
	}
	if len(m.Chain) == 0 {
		return vmm.Template{}, fmt.Errorf("vm %s has no recorded disk chain: %w", v.id, errdefs.ErrInvalid)
	}
	// The files are the VM's; no process of it runs while it is suspended
	// (and the lock is held), but one that ran could have left links.
	for _, f := range []string{"disk.qcow2", "mem", "state"} {
		st, err := os.Lstat(v.path(f))
		if err != nil {
			return vmm.Template{}, fmt.Errorf("its saved %s: %w", f, err)
		}
		if !st.Mode().IsRegular() {
			return vmm.Template{}, fmt.Errorf("its saved %s is not a regular file: %w", f, errdefs.ErrInvalid)
		}
	}
	// The overlay's header was written by the guest's QEMU: it must still
	// name what kiln made it on (as Resume checks) before kiln rewrites it.
	want, format := m.Chain[0].Path, m.Chain[0].Format
	if m.Backing != "" {
		want, format = m.Backing, m.BackingFormat
	}
	if err := qcow2.CheckLink(v.path("disk.qcow2"), want, format); err != nil {
		return vmm.Template{}, err
	}
	below := make([]layer, len(m.Chain))
	for i, l := range m.Chain {
		p := filepath.Join(dir, "layer"+strconv.Itoa(i+1)+"."+l.Format)
		if err := diskcopy.LinkOrCopy(ctx, l.Path, p); err != nil {
			return vmm.Template{}, fmt.Errorf("disk layer %s: %w", l.Path, err)
		}
		below[i] = layer{Path: p, Format: l.Format}
	}
	disk := filepath.Join(dir, "disk.qcow2")
	if err := diskcopy.Copy(ctx, v.path("disk.qcow2"), disk); err != nil {
		return vmm.Template{}, err
	}
	if err := rebaseHeaderTo(ctx, v.d.cfg.QEMUImg, disk, below[0].Path, below[0].Format); err != nil {
		return vmm.Template{}, err
	}
	h, err := qcow2.ParseFile(disk)
	if err != nil {
		return vmm.Template{}, err
	}
	if h.BackingFile != below[0].Path || h.BackingFormat != below[0].Format {
		return vmm.Template{}, fmt.Errorf("rebasing %s: header names %q (%s), expected %q (%s)", disk, h.BackingFile, h.BackingFormat, below[0].Path, below[0].Format)
	}
	if err := writeChain(dir, below); err != nil {
		return vmm.Template{}, err
	}
	size, err := v.diskSize()
	if err != nil {
		return vmm.Template{}, err
	}
	if err := v.d.qemuImg(ctx, "create", "-q", "-f", "qcow2", "-u", "-b", disk, "-F", "qcow2", filepath.Join(dir, "overlay.qcow2"), strconv.FormatInt(size, 10)); err != nil {
		return vmm.Template{}, err
	}
	if err := diskcopy.Copy(ctx, v.path("mem"), filepath.Join(dir, "mem")); err != nil {
		return vmm.Template{}, err
	}
	if err := shareTemplateMem(filepath.Join(dir, "mem")); err != nil {
		return vmm.Template{}, err
	}
	if err := copyFile(v.path("state"), filepath.Join(dir, "state")); err != nil {
		return vmm.Template{}, err
	}
	if err := syncFiles(filepath.Join(dir, "mem"), disk, filepath.Join(dir, "state"), filepath.Join(dir, "overlay.qcow2")); err != nil {
		return vmm.Template{}, err
	}
	t := vmm.Template{Dir: dir, Platform: m.Platform, MemoryMiB: m.MemoryMiB, VCPUs: m.VCPUs,
		HasNet: m.Net != nil, CreatedAt: time.Now().UTC()}
	b, _ := json.MarshalIndent(t, "", "  ")
	if err := writeFileAtomic(filepath.Join(dir, "template.json"), b); err != nil {
		return vmm.Template{}, err
	}
	if err := os.Remove(marker); err != nil {
		return vmm.Template{}, err
	}
	return t, syncFiles(dir)
}
