//go:build linux

package engine

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// SnapshotMicrovm implements lifecycle.Snapshotter: it copies suspended m's
// memory, device state and disk into the template of image version
// (account's image, version), whose record the caller made. m stays
// suspended; microVMs run from the version start where m was suspended,
// with fresh identity like every clone.
func (e *Engine) SnapshotMicrovm(ctx context.Context, m store.Microvm, image, version string) (store.SnapshotBuild, error) {
	f, ok := e.cfg.Driver.(vmm.Forker)
	if !ok {
		return store.SnapshotBuild{}, fmt.Errorf("this VM driver cannot copy a suspended microvm: %w", errdefs.ErrUnavailable)
	}
	v := e.lookup(m.ID)
	if v == nil {
		return store.SnapshotBuild{}, fmt.Errorf("microvm %s is not on this host: %w", m.ID, errdefs.ErrNotFound)
	}
	// The engine's lock too: a resume or terminate waits for the copy.
	v.op.Lock()
	defer v.op.Unlock()
	if v.ctx.Err() != nil {
		return store.SnapshotBuild{}, fmt.Errorf("microvm %s is terminating: %w", m.ID, errdefs.ErrConflict)
	}
	cur, err := e.cfg.Control.Microvm(ctx, m.Account, m.ID)
	if err != nil {
		return store.SnapshotBuild{}, err
	}
	if cur.State != store.StateSuspended || cur.PendingOp != "" {
		return store.SnapshotBuild{}, fmt.Errorf("microvm %s is %s, not suspended: %w", m.ID, cur.State, errdefs.ErrConflict)
	}
	vdir := e.imageDir(m.Account, image, version)
	if err := os.MkdirAll(vdir, 0o700); err != nil {
		return store.SnapshotBuild{}, err
	}
	dir := filepath.Join(vdir, "snapshot") // beside the "template" pointer to it
	t, err := f.TemplateFromSuspended(ctx, m.ID, dir)
	if err != nil {
		return store.SnapshotBuild{}, err
	}
	disk, err := diskBytes(dir)
	if err != nil {
		os.RemoveAll(dir)
		return store.SnapshotBuild{}, fmt.Errorf("measuring snapshot of microvm %s: %w", m.ID, err)
	}
	mem := int64(t.MemoryMiB) << 20
	if err := e.SetTemplate(m.Account, image, version, dir); err != nil {
		return store.SnapshotBuild{}, err
	}
	// Memory as builds record it (the guest's size, which is what the
	// microVMs of the version run with); disk is every layer it keeps.
	return store.SnapshotBuild{MemorySnapshotSizeInBytes: &mem, DiskSnapshotSizeInBytes: &disk}, nil
}

// diskBytes adds up the apparent sizes of the regular files in dir but
// the memory file, which is counted as memory. The layers a snapshot
// links from its source image count here too, although the source counts
// them while it lives (as two versions that share a cached root disk
// each count it): counted only with the source, they would stop counting
// when it is deleted while the snapshot keeps them, and building,
// snapshotting and deleting images would store disks no quota sees.
func diskBytes(dir string) (int64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var n int64
	for _, de := range ents {
		if de.Name() == "mem" || !de.Type().IsRegular() {
			continue
		}
		fi, err := de.Info()
		if err != nil {
			return 0, err
		}
		n += fi.Size()
	}
	return n, nil
}
