package vmm

import (
	"context"
	"fmt"
	"regexp"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// TemplatePorter is implemented by drivers whose templates can move to
// another host (a cluster's node that lacks an image version's template
// fetches it from one that has it). The driver owns the files: callers
// move only the parts it emits.
type TemplatePorter interface {
	// ExportTemplate emits the template in dir: first a part holding the
	// manifest, then every non-zero stretch of each file in order.
	ExportTemplate(ctx context.Context, dir string, emit func(TemplatePart) error) error
	// ImportTemplate makes dir (which must not exist) a template of this
	// driver from parts read with next, which returns io.EOF after the
	// last. The parts are untrusted: names, sizes and offsets are checked
	// against the manifest and its limits, the platform must be this
	// driver's, and the disk headers are checked and rewritten before
	// anything is used. On failure nothing is left.
	ImportTemplate(ctx context.Context, dir string, next func() (TemplatePart, error)) (Template, error)
}

// TemplatePart is one message of a moving template.
type TemplatePart struct {
	// Manifest is set in the first part only.
	Manifest *TemplateManifest `json:"manifest,omitempty"`
	// File indexes Manifest.Files; Data is written at Offset.
	File   int    `json:"file"`
	Offset int64  `json:"offset"`
	Data   []byte `json:"data,omitempty"`
}

// TemplateManifest says what a template is made of.
type TemplateManifest struct {
	Template Template       `json:"template"`
	Files    []TemplateFile `json:"files"`
}

// TemplateFile is one file of a template: mem, state, disk.qcow2 and the
// disk layers below it (layerN.raw or layerN.qcow2, top first).
type TemplateFile struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
}

// Limits of an imported template.
const (
	MaxTemplateLayers    = 16
	MaxTemplateState     = 1 << 30
	MaxTemplateDisk      = 1 << 40
	MaxTemplateMemoryMiB = 256 << 10
	MaxTemplatePartData  = 1 << 20
)

var layerName = regexp.MustCompile(`^layer([1-9][0-9]?)\.(raw|qcow2)$`)

// CheckManifest validates an untrusted manifest: the fixed file names in
// order (mem, state, disk.qcow2, then layer1.. of at most
// MaxTemplateLayers), sizes within the limits, and memory matching the
// template's size.
func CheckManifest(m *TemplateManifest) error {
	bad := func(f string, a ...any) error {
		return fmt.Errorf("template manifest: "+f+": %w", append(a, errdefs.ErrInvalid)...)
	}
	t := m.Template
	if t.MemoryMiB <= 0 || t.MemoryMiB > MaxTemplateMemoryMiB || t.VCPUs <= 0 || t.VCPUs > 256 {
		return bad("memory %d MiB, %d vCPUs out of range", t.MemoryMiB, t.VCPUs)
	}
	if len(m.Files) < 4 || len(m.Files) > 3+MaxTemplateLayers {
		return bad("%d files: want mem, state, disk.qcow2 and 1 to %d layers", len(m.Files), MaxTemplateLayers)
	}
	for i, f := range m.Files {
		var want string
		var most int64
		switch i {
		case 0:
			want, most = "mem", int64(t.MemoryMiB)<<20
			if f.Size != most {
				return bad("mem is %d bytes, the template has %d MiB", f.Size, t.MemoryMiB)
			}
		case 1:
			want, most = "state", MaxTemplateState
		case 2:
			want, most = "disk.qcow2", MaxTemplateDisk
		default:
			sm := layerName.FindStringSubmatch(f.Name)
			if sm == nil || sm[1] != fmt.Sprint(i-2) {
				return bad("file %d is %q: want layer%d.raw or layer%d.qcow2", i, f.Name, i-2, i-2)
			}
			want, most = f.Name, MaxTemplateDisk
		}
		if f.Name != want {
			return bad("file %d is %q: want %s", i, f.Name, want)
		}
		if f.Size < 0 || f.Size > most {
			return bad("%s is %d bytes: want 0 to %d", f.Name, f.Size, most)
		}
	}
	return nil
}

// CheckPart validates an untrusted data part against its manifest.
func CheckPart(m *TemplateManifest, p TemplatePart) error {
	if p.Manifest != nil {
		return fmt.Errorf("template part: a second manifest: %w", errdefs.ErrInvalid)
	}
	if p.File < 0 || p.File >= len(m.Files) {
		return fmt.Errorf("template part: file %d of %d: %w", p.File, len(m.Files), errdefs.ErrInvalid)
	}
	size := m.Files[p.File].Size
	if len(p.Data) == 0 || len(p.Data) > MaxTemplatePartData || p.Offset < 0 || p.Offset > size-int64(len(p.Data)) {
		return fmt.Errorf("template part: %d bytes at %d of %s (%d bytes): %w", len(p.Data), p.Offset, m.Files[p.File].Name, size, errdefs.ErrInvalid)
	}
	return nil
}
