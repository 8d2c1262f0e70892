//go:build linux

package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"path/filepath"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// TestTemplateMovesToAnotherDriver: a template exported by one driver
// and imported by another (another data directory, as on another host)
// clones with the source's memory and disk, and names only its own
// files. The parts go through JSON, as they do between nodes.
func TestTemplateMovesToAnotherDriver(t *testing.T) {
	src := newDriver(t, shortDir(t))
	boot(t, src, "src")
	mustSh(t, src, "src", "mkdir -p /mem && mount -t tmpfs tmpfs /mem && echo moved > /mem/v && echo disk > /root/v && sync")
	tmpl := snapshot(t, src, "src")
	dst := newDriver(t, shortDir(t))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var parts []vmm.TemplatePart
	var sent int
	start := time.Now()
	if err := src.ExportTemplate(ctx, tmpl, func(p vmm.TemplatePart) error {
		b, err := json.Marshal(p)
		if err != nil {
			return err
		}
		sent += len(b)
		var q vmm.TemplatePart
		if err := json.Unmarshal(b, &q); err != nil {
			return err
		}
		parts = append(parts, q)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(shortDir(t), "imported")
	i := 0
	next := func() (vmm.TemplatePart, error) {
		if i == len(parts) {
			return vmm.TemplatePart{}, io.EOF
		}
		i++
		return parts[i-1], nil
	}
	if _, err := dst.ImportTemplate(ctx, dir, next); err != nil {
		t.Fatal(err)
	}
	t.Logf("template moved: %d parts, %d bytes of JSON, %v", len(parts), sent, time.Since(start).Round(time.Millisecond))
	chain, err := dst.readChain(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range chain {
		if filepath.Dir(l.Path) != dir {
			t.Errorf("the imported chain names %s, outside %s", l.Path, dir)
		}
	}
	clone(t, dst, dir, "c1")
	if got := mustSh(t, dst, "c1", "cat /mem/v /root/v"); got != "moved\ndisk" {
		t.Errorf("the imported template's clone sees %q", got)
	}

	// A stream that breaks its manifest leaves nothing behind.
	bad := append([]vmm.TemplatePart(nil), parts...)
	bad[1].Offset = bad[0].Manifest.Files[bad[1].File].Size
	i, parts = 0, bad
	dir2 := filepath.Join(shortDir(t), "bad")
	if _, err := dst.ImportTemplate(ctx, dir2, next); !errors.Is(err, errdefs.ErrInvalid) {
		t.Fatalf("a part past its file's end: %v", err)
	}
	if _, err := LoadTemplate(dir2); err == nil {
		t.Fatal("a refused import left a template")
	}
}
