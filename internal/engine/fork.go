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
func (e *Engine) SnapshotMicrovm(ctx context.Context, m store.Microvm, image, version string) error {
	f, ok := e.cfg.Driver.(vmm.Forker)
	if !ok {
		return fmt.Errorf("this VM driver cannot copy a suspended microvm: %w", errdefs.ErrUnavailable)
	}
	v := e.lookup(m.ID)
	if v == nil {
		return fmt.Errorf("microvm %s is not on this host: %w", m.ID, errdefs.ErrNotFound)
	}
	// The engine's lock too: a resume or terminate waits for the copy.
	v.op.Lock()
	defer v.op.Unlock()
	if v.ctx.Err() != nil {
		return fmt.Errorf("microvm %s is terminating: %w", m.ID, errdefs.ErrConflict)
	}
	cur, err := e.cfg.Control.Microvm(ctx, m.Account, m.ID)
	if err != nil {
		return err
	}
	if cur.State != store.StateSuspended || cur.PendingOp != "" {
		return fmt.Errorf("microvm %s is %s, not suspended: %w", m.ID, cur.State, errdefs.ErrConflict)
	}
	vdir := e.imageDir(m.Account, image, version)
	if err := os.MkdirAll(vdir, 0o700); err != nil {
		return err
	}
	dir := filepath.Join(vdir, "snapshot") // beside the "template" pointer to it
	if _, err := f.TemplateFromSuspended(ctx, m.ID, dir); err != nil {
		return err
	}
	return e.SetTemplate(m.Account, image, version, dir)
}
