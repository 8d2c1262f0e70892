//go:build linux

package imagebuild

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// Warm starts. Booting a build VM's kernel is most of a RUN step's fixed
// cost (9-15 s under TCG on a busy host; a clone of a snapshot starts in
// well under a second). A RUN step cannot simply clone a snapshot of a
// booted build VM, since each step needs its own root disk and mounts,
// and a guest that had probed other disks would keep their sizes and
// cached blocks. So the runner boots, once per VM shape, a build VM whose
// guest stops short of its disks (vmm.BootSpec.DeferRoot: the block driver
// stays unloaded), snapshots it, and starts each step as a clone of that
// snapshot on the step's own disks; the guest probes them after the
// restore. Clones get the identity refresh every clone gets (RNG reseed,
// clock, hostname), and nothing of an account is in the snapshot: it is
// taken before any step's disk exists in the guest.

// warmShape is what a warm template fixes: the clone's memory, vCPUs and
// number of extra disks (devices cannot change across a restore).
type warmShape struct{ memoryMiB, vcpus, disks int }

type warmTemplates struct {
	mu   sync.Mutex
	dir  string // this runner's folder under Runner.WarmDir
	made map[warmShape]*warmTemplate
	// Steps started warm, and steps that fell back to a cold boot (a
	// template's boot can hang like any boot; the step then still runs).
	warmed, cold atomic.Int64
}

type warmTemplate struct {
	once sync.Once
	dir  string
	err  error
}

// warmTemplate returns the template for VMs of shape s, making it on first
// use (concurrent callers wait for the one making it). A failed template
// is forgotten, so the next step tries again.
func (r *Runner) warmTemplate(ctx context.Context, s warmShape, spec vmSpec) (string, error) {
	w := &r.warm
	w.mu.Lock()
	if w.dir == "" {
		if err := os.MkdirAll(r.WarmDir, 0o700); err != nil {
			w.mu.Unlock()
			return "", err
		}
		// Left by an earlier runner (a kiln that died): its snapshots hold
		// that kiln's agent, which a newer kiln must not restore.
		if old, err := filepath.Glob(filepath.Join(r.WarmDir, "runner-*")); err == nil {
			for _, o := range old {
				os.RemoveAll(o)
			}
		}
		dir, err := os.MkdirTemp(r.WarmDir, "runner-")
		if err != nil {
			w.mu.Unlock()
			return "", err
		}
		w.dir, w.made = dir, map[warmShape]*warmTemplate{}
	}
	t := w.made[s]
	if t == nil {
		t = &warmTemplate{dir: filepath.Join(w.dir, fmt.Sprintf("%dm-%dc-%dd", s.memoryMiB, s.vcpus, s.disks))}
		w.made[s] = t
	}
	base := w.dir
	w.mu.Unlock()
	t.once.Do(func() { t.err = r.makeWarm(ctx, base, t.dir, s, spec) })
	if t.err != nil {
		r.forgetWarm(s, t)
		return "", t.err
	}
	return t.dir, nil
}

// forgetWarm drops template t of shape s (it failed, or a clone of it did).
func (r *Runner) forgetWarm(s warmShape, t *warmTemplate) {
	r.warm.mu.Lock()
	if r.warm.made[s] == t {
		delete(r.warm.made, s)
	}
	r.warm.mu.Unlock()
	os.RemoveAll(t.dir)
}

// warmBootTimeout bounds the boot of a warm template's VM (10-15 s on a
// busy TCG host). It ends no later than the driver's first try (half its
// 3-minute TCG boot timeout), so a hung template boot is not booted again
// there: the step boots cold instead, which does get that second try.
const warmBootTimeout = 90 * time.Second

// makeWarm boots a build VM of shape s on placeholder disks, its root
// deferred, and snapshots it into dir. The VM has a NIC, as the steps'
// VMs do, but no egress: its guest runs nothing.
func (r *Runner) makeWarm(ctx context.Context, base, dir string, s warmShape, spec vmSpec) error {
	placeholder := filepath.Join(base, "placeholder.raw")
	if _, err := os.Stat(placeholder); err != nil {
		if err := os.WriteFile(placeholder, make([]byte, 1<<20), 0o600); err != nil {
			return err
		}
	}
	var disks []vmm.Disk
	for i := 0; i < s.disks; i++ {
		disks = append(disks, vmm.Disk{Path: placeholder, ReadOnly: true, Serial: fmt.Sprintf("kiln-warm-%d", i)})
	}
	// A boot that hangs (seen about once in twenty under TCG) must not hold
	// the step for the driver's whole boot timeout: past this the step
	// boots cold instead, as if there were no warm start.
	ctx, cancel := context.WithTimeout(ctx, warmBootTimeout)
	defer cancel()
	g, err := bootVM(ctx, r.Driver, r.logger(), vmSpec{prefix: PrefixBuild, rootDisk: placeholder, memoryMiB: s.memoryMiB, vcpus: s.vcpus,
		extraDeny: spec.extraDeny, scratch: true, disks: disks, deferRoot: true})
	if err != nil {
		return fmt.Errorf("booting the warm build vm: %w", err)
	}
	defer g.close()
	if _, err := r.Driver.Snapshot(ctx, g.id, dir); err != nil {
		return fmt.Errorf("snapshotting the warm build vm: %w", err)
	}
	g.VMEnded()
	return nil
}

// startStepVM starts a RUN step's VM: a clone of the warm template of its
// shape when the runner has a WarmDir, else (or if that fails) a cold boot.
func (r *Runner) startStepVM(ctx context.Context, s vmSpec) (*guestVM, error) {
	if r.WarmDir == "" {
		return bootVM(ctx, r.Driver, r.logger(), s)
	}
	shape := warmShape{s.memoryMiB, s.vcpus, len(s.disks)}
	tmpl, err := r.warmTemplate(ctx, shape, s)
	if err == nil {
		var g *guestVM
		if g, err = cloneVM(ctx, r.Driver, r.logger(), s, tmpl); err == nil {
			r.warm.warmed.Add(1)
			return g, nil
		}
		r.warm.mu.Lock()
		t := r.warm.made[shape]
		r.warm.mu.Unlock()
		if t != nil && t.dir == tmpl {
			r.forgetWarm(shape, t)
		}
	}
	if cerr := ctx.Err(); cerr != nil {
		return nil, cerr
	}
	r.warm.cold.Add(1)
	r.logger().Warn("warm start of the build vm failed; booting it", "err", err)
	return bootVM(ctx, r.Driver, r.logger(), s)
}

// Close removes the runner's warm templates. The runner stays usable (a
// later step makes them again).
func (r *Runner) Close() error {
	r.warm.mu.Lock()
	defer r.warm.mu.Unlock()
	if r.warm.dir == "" {
		return nil
	}
	err := os.RemoveAll(r.warm.dir)
	r.warm.dir, r.warm.made = "", nil
	return err
}
