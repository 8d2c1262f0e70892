//go:build linux

package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/qcow2"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

var _ vmm.TemplatePorter = (*Driver)(nil)

// ExportTemplate implements vmm.TemplatePorter. Zero stretches are not
// sent: guest memory and raw disks are mostly zeros, and the importer's
// files start sparse.
func (d *Driver) ExportTemplate(ctx context.Context, dir string, emit func(vmm.TemplatePart) error) error {
	t, err := LoadTemplate(dir)
	if err != nil {
		return err
	}
	chain, err := d.readChain(ctx, t.Dir)
	if err != nil {
		return err
	}
	paths := []string{filepath.Join(t.Dir, "mem"), filepath.Join(t.Dir, "state"), chain[0].Path}
	m := &vmm.TemplateManifest{Template: t, Files: []vmm.TemplateFile{{Name: "mem"}, {Name: "state"}, {Name: "disk.qcow2"}}}
	for i, l := range chain[1:] {
		paths = append(paths, l.Path)
		m.Files = append(m.Files, vmm.TemplateFile{Name: "layer" + strconv.Itoa(i+1) + "." + l.Format})
	}
	files := make([]*os.File, len(paths))
	defer func() {
		for _, f := range files {
			if f != nil {
				f.Close()
			}
		}
	}()
	for i, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return fmt.Errorf("exporting template %s: %w", t.Dir, err)
		}
		files[i] = f
		st, err := f.Stat()
		if err != nil {
			return err
		}
		m.Files[i].Size = st.Size()
	}
	m.Template.Dir = ""
	if err := vmm.CheckManifest(m); err != nil {
		return fmt.Errorf("exporting template %s: %w", t.Dir, err)
	}
	if err := emit(vmm.TemplatePart{Manifest: m}); err != nil {
		return err
	}
	buf := make([]byte, vmm.MaxTemplatePartData)
	for i, f := range files {
		for off := int64(0); off < m.Files[i].Size; {
			if err := ctx.Err(); err != nil {
				return err
			}
			n, err := f.ReadAt(buf, off)
			if n > 0 && !allZero(buf[:n]) {
				if err := emit(vmm.TemplatePart{File: i, Offset: off, Data: buf[:n]}); err != nil {
					return err
				}
			}
			off += int64(n)
			if err == io.EOF {
				break
			}
			if err != nil {
				return err
			}
		}
	}
	return nil
}

func allZero(b []byte) bool {
	return len(b) == 0 || (b[0] == 0 && bytes.Equal(b[1:], b[:len(b)-1]))
}

// ImportTemplate implements vmm.TemplatePorter.
func (d *Driver) ImportTemplate(ctx context.Context, dir string, next func() (vmm.TemplatePart, error)) (vmm.Template, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return vmm.Template{}, err
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		if os.IsExist(err) {
			err = fmt.Errorf("%w: %w", err, errdefs.ErrConflict)
		}
		return vmm.Template{}, fmt.Errorf("creating template directory: %w", err)
	}
	t, err := d.importInto(ctx, dir, next)
	if err != nil {
		os.RemoveAll(dir)
		return vmm.Template{}, fmt.Errorf("importing a template: %w", err)
	}
	return t, nil
}

func (d *Driver) importInto(ctx context.Context, dir string, next func() (vmm.TemplatePart, error)) (vmm.Template, error) {
	marker := filepath.Join(dir, ".incomplete")
	if err := os.WriteFile(marker, nil, 0o600); err != nil {
		return vmm.Template{}, err
	}
	first, err := next()
	if err != nil {
		return vmm.Template{}, err
	}
	m := first.Manifest
	if m == nil {
		return vmm.Template{}, fmt.Errorf("the first part holds no manifest: %w", errdefs.ErrInvalid)
	}
	if err := vmm.CheckManifest(m); err != nil {
		return vmm.Template{}, err
	}
	if err := d.checkPlatform("the template sent", m.Template.Platform); err != nil {
		return vmm.Template{}, err
	}
	files := make([]*os.File, len(m.Files))
	defer func() {
		for _, f := range files {
			if f != nil {
				f.Close()
			}
		}
	}()
	for i, mf := range m.Files {
		f, err := os.OpenFile(filepath.Join(dir, mf.Name), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return vmm.Template{}, err
		}
		files[i] = f
		if err := f.Truncate(mf.Size); err != nil {
			return vmm.Template{}, err
		}
	}
	for {
		if err := ctx.Err(); err != nil {
			return vmm.Template{}, err
		}
		p, err := next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return vmm.Template{}, err
		}
		if err := vmm.CheckPart(m, p); err != nil {
			return vmm.Template{}, err
		}
		if _, err := files[p.File].WriteAt(p.Data, p.Offset); err != nil {
			return vmm.Template{}, err
		}
	}
	for _, f := range files {
		if err := f.Sync(); err != nil {
			return vmm.Template{}, err
		}
	}
	// The disk chain: layers as sent, checked as kiln checks its own
	// (qcow2 headers parsed by kiln, never followed), and disk.qcow2's
	// header pointed at the first layer here.
	var below []layer
	for _, mf := range m.Files[3:] {
		p := filepath.Join(dir, mf.Name)
		format := strings.TrimPrefix(filepath.Ext(mf.Name), ".")
		if format == "qcow2" {
			if _, err := qcow2.ParseFile(p); err != nil {
				return vmm.Template{}, fmt.Errorf("layer %s: %w", mf.Name, err)
			}
		}
		below = append(below, layer{Path: p, Format: format})
	}
	disk := filepath.Join(dir, "disk.qcow2")
	if _, err := qcow2.ParseFile(disk); err != nil {
		return vmm.Template{}, fmt.Errorf("disk.qcow2: %w", err)
	}
	if err := rebaseHeaderTo(ctx, d.cfg.QEMUImg, disk, below[0].Path, below[0].Format); err != nil {
		return vmm.Template{}, err
	}
	h, err := qcow2.ParseFile(disk)
	if err != nil {
		return vmm.Template{}, err
	}
	if h.Size == 0 || h.Size > vmm.MaxTemplateDisk {
		return vmm.Template{}, fmt.Errorf("disk.qcow2 claims %d bytes: %w", h.Size, errdefs.ErrInvalid)
	}
	if h.BackingFile != below[0].Path || h.BackingFormat != below[0].Format {
		return vmm.Template{}, fmt.Errorf("rebasing %s: header names %q (%s), expected %q (%s)", disk, h.BackingFile, h.BackingFormat, below[0].Path, below[0].Format)
	}
	if err := writeChain(dir, below); err != nil {
		return vmm.Template{}, err
	}
	// -u and the size from the checked header: qemu-img opens neither.
	if err := d.qemuImg(ctx, "create", "-q", "-f", "qcow2", "-u", "-b", disk, "-F", "qcow2", filepath.Join(dir, "overlay.qcow2"), strconv.FormatUint(h.Size, 10)); err != nil {
		return vmm.Template{}, err
	}
	if err := shareTemplateMem(filepath.Join(dir, "mem")); err != nil {
		return vmm.Template{}, err
	}
	t := m.Template
	t.Dir, t.CreatedAt = dir, time.Now().UTC()
	b, _ := json.MarshalIndent(t, "", "  ")
	if err := writeFileAtomic(filepath.Join(dir, "template.json"), b); err != nil {
		return vmm.Template{}, err
	}
	if err := syncFiles(filepath.Join(dir, "overlay.qcow2")); err != nil {
		return vmm.Template{}, err
	}
	if err := os.Remove(marker); err != nil {
		return vmm.Template{}, err
	}
	return t, syncFiles(dir)
}
