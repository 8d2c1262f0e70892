//go:build linux

package engine

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/store"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// The engine's part of garbage collection (internal/gc.Engine).

// ImageDir is where an image version's build output and template live.
func (e *Engine) ImageDir(account, image, version string) string {
	return e.imageDir(account, image, version)
}

// SweepVMs removes microVM VMs and VM networks of this data directory that
// neither a live record nor the engine's memory claims. A microVM's record
// is written before its network and VM exist, and the engine's entry
// (made by StartMicrovm or Recover) outlives both, so a claimed VM is
// never taken. Build VMs (ids without VMPrefix) belong to their builds.
func (e *Engine) SweepVMs(ctx context.Context) ([]string, error) {
	infos, err := e.cfg.Driver.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("listing vms: %w", err)
	}
	// Records are read after the VMs are listed: a VM seen above had its
	// record written earlier, so it is in this list unless it ended.
	// A record placed on another node does not claim this host's VM of
	// that id: the microVM moved, and what is left here is stale.
	ms, err := e.cfg.Control.HostMicrovms(ctx, e.cfg.Node)
	if err != nil {
		return nil, fmt.Errorf("listing microvms: %w", err)
	}
	live := make(map[string]bool, len(ms))
	for _, m := range ms {
		live[m.ID] = true
	}
	claimed := func(id string) bool { return live[id] || e.lookup(id) != nil }
	var removed []string
	var errs []error
	for _, i := range infos {
		if !strings.HasPrefix(i.ID, VMPrefix) || claimed(i.ID) || !e.ownsVM(i.ID) {
			continue
		}
		e.log.Info("gc: removing vm with no live record", "vm", i.ID)
		if err := e.cfg.Driver.Terminate(ctx, i.ID); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, "vm "+i.ID)
	}
	ids, err := netns.Reconcile(ctx, func(id string) bool {
		return claimed(id) || !strings.HasPrefix(id, VMPrefix) || !e.ownsNet(id)
	})
	for _, id := range ids {
		e.markNet(id, false)
		removed = append(removed, "network "+id)
	}
	if err != nil {
		errs = append(errs, err)
	}
	return removed, errors.Join(errs...)
}

// filesChecker is implemented by drivers that can tell whether a
// suspended VM's saved files are all there (qemu.Driver).
type filesChecker interface {
	CheckSuspended(ctx context.Context, id string) error
}

// SweepSuspended ends SUSPENDED microVMs whose saved memory or disk is
// gone: they can never resume, and an idle record would hold quota and
// promise a resume it cannot keep. The check runs under the microVM's
// operation lock and with no resume pending, so it never races a resume.
func (e *Engine) SweepSuspended(ctx context.Context) ([]string, error) {
	ms, err := e.cfg.Control.HostMicrovms(ctx, e.cfg.Node)
	if err != nil {
		return nil, fmt.Errorf("listing suspended microvms: %w", err)
	}
	var ended []string
	for _, m := range ms {
		if m.State != store.StateSuspended {
			continue
		}
		v := e.lookup(m.ID)
		if v == nil || !v.op.TryLock() {
			continue // not this engine's, or an operation is in flight
		}
		func() {
			defer v.op.Unlock()
			cur, err := e.cfg.Control.Microvm(ctx, m.Account, m.ID)
			if err != nil || cur.State != store.StateSuspended || cur.PendingOp != "" || v.ctx.Err() != nil {
				return
			}
			why := e.suspendedFilesMissing(ctx, m.ID)
			if why == "" {
				return
			}
			reason := "SnapshotLost: " + why
			// Only a record still SUSPENDED with nothing pending ends.
			_, err = e.cfg.Control.ReportMicrovmState(context.WithoutCancel(ctx), v.account, v.id, v.placement(), []store.MicrovmState{store.StateSuspended}, store.StateTerminated, reason)
			if err != nil {
				return
			}
			e.log.Warn("gc: suspended microvm lost its saved state: terminated", "microvm", m.ID, "why", why)
			e.removeVM(v)
			v.notify()
			e.forget(v)
			ended = append(ended, m.ID)
		}()
	}
	return ended, nil
}

// suspendedFilesMissing says what of a suspended VM is gone ("" if
// nothing).
func (e *Engine) suspendedFilesMissing(ctx context.Context, id string) string {
	info, err := e.cfg.Driver.Inspect(ctx, id)
	if err != nil {
		return "the VM's saved state is gone from this host"
	}
	if info.State != vmm.StateSuspended {
		return ""
	}
	if c, ok := e.cfg.Driver.(filesChecker); ok {
		if err := c.CheckSuspended(ctx, id); err != nil {
			return err.Error()
		}
		return ""
	}
	if info.Dir != "" {
		if _, err := os.Stat(filepath.Join(info.Dir, "mem")); err != nil {
			return "its memory file is gone"
		}
	}
	return ""
}

// Templates lists the image versions whose templates this host holds, as
// "ACCOUNT/IMAGE/VERSION" (a cluster's placement prefers these nodes).
// Names are read back from the directory tree, which holds them as
// written for valid account, image and version names.
func (e *Engine) Templates() ([]string, error) {
	ptrs, err := filepath.Glob(filepath.Join(e.cfg.DataDir, "images", "*", "*", "*", templatePointer))
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(ptrs))
	for _, p := range ptrs {
		rel, err := filepath.Rel(filepath.Join(e.cfg.DataDir, "images"), filepath.Dir(p))
		if err == nil {
			out = append(out, filepath.ToSlash(rel))
		}
	}
	return out, nil
}

// Owned lists the microVMs this engine holds state for (running,
// suspended here, or in a transition), for a node's reconciliation.
func (e *Engine) Owned() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	ids := make([]string, 0, len(e.vms))
	for id := range e.vms {
		ids = append(ids, id)
	}
	return ids
}
