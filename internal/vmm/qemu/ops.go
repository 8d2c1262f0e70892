//go:build linux

package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/qcow2"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

const (
	freezeTimeout  = 10 * time.Second
	restoreTimeout = 30 * time.Second
	stateTimeout   = 60 * time.Second
)

// Boot implements vmm.Driver.
func (d *Driver) Boot(ctx context.Context, spec vmm.BootSpec) (vmm.Info, error) {
	if spec.MemoryMiB == 0 {
		spec.MemoryMiB = 512
	}
	if spec.VCPUs == 0 {
		spec.VCPUs = 1
	}
	if spec.MemoryMiB < 128 || spec.MemoryMiB > 64<<10 {
		return vmm.Info{}, fmt.Errorf("memory %d MiB: use 128 to 65536: %w", spec.MemoryMiB, errdefs.ErrInvalid)
	}
	if spec.VCPUs < 1 || spec.VCPUs > 64 {
		return vmm.Info{}, fmt.Errorf("vcpus %d: use 1 to 64: %w", spec.VCPUs, errdefs.ErrInvalid)
	}
	root, disks, err := checkDisks(spec.RootDisk, spec.Disks)
	if err != nil {
		return vmm.Info{}, err
	}
	v, err := d.reserve(spec.ID)
	if err != nil {
		return vmm.Info{}, err
	}
	defer v.op.Unlock()
	v.meta = meta{Disks: disks, DeferRoot: spec.DeferRoot, ID: spec.ID, State: vmm.StateRunning, Phase: phaseBooting, MemoryMiB: spec.MemoryMiB, VCPUs: spec.VCPUs,
		Platform: d.platform, Kernel: d.cfg.kernelPath(), Initrd: d.initrd, Net: spec.Net,
		Hostname: hostnameOr(spec.Hostname, spec.ID), StartedAt: time.Now(), ScratchDisk: spec.ScratchDisk, UID: v.uid,
		Chain: []layer{{Path: root, Format: "raw"}}}
	fail := func(err error) (vmm.Info, error) {
		v.destroy()
		return vmm.Info{}, fmt.Errorf("booting %s: %w", spec.ID, err)
	}
	if err := os.MkdirAll(v.dir, 0o700); err != nil {
		return fail(err)
	}
	overlay := func() error {
		return d.qemuImg(ctx, "create", "-q", "-f", "qcow2", "-b", root, "-F", "raw", v.path("disk.qcow2"))
	}
	if err := overlay(); err != nil {
		return fail(err)
	}
	if err := v.saveMeta(); err != nil {
		return fail(err)
	}
	if err := v.spawn(ctx, false); err != nil {
		return fail(err)
	}
	err = v.connectAgent(ctx, d.cfg.BootTimeout/2, true)
	v.mu.Lock()
	p := v.proc
	v.mu.Unlock()
	if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil && p.alive() {
		// Now and then a translated boot hangs before the kernel prints a
		// thing (the console stops at SeaBIOS's "Booting from ROM"; about
		// one boot in twenty on a busy TCG host), while a slow one answers
		// well within half the timeout. The hung one is booted once more,
		// on a fresh overlay, with the whole timeout.
		v.log.Warn("the guest agent did not answer: booting the vm again", "after", d.cfg.BootTimeout/2, "err", err)
		v.detach()
		v.endProcessHard(p)
		if p.alive() {
			return fail(err)
		}
		if err := os.Remove(v.path("disk.qcow2")); err != nil {
			return fail(err)
		}
		if err := overlay(); err != nil {
			return fail(err)
		}
		if err := v.spawn(ctx, false); err != nil {
			return fail(err)
		}
		err = v.connectAgent(ctx, d.cfg.BootTimeout, true)
	}
	if err != nil {
		return fail(err)
	}
	if err := v.setState(vmm.StateRunning, ""); err != nil {
		return fail(err)
	}
	v.log.Info("vm booted", "pid", v.proc.pid)
	return v.info(), nil
}

// checkDisks checks a VM's root disk (a file; its absolute path is
// returned) and extra disks.
func checkDisks(rootDisk string, extra []vmm.Disk) (string, []vmm.Disk, error) {
	root, err := filepath.Abs(rootDisk)
	if err != nil {
		return "", nil, err
	}
	if st, err := os.Stat(root); err != nil || !st.Mode().IsRegular() {
		return "", nil, fmt.Errorf("root disk %q is not a file: %w", rootDisk, errdefs.ErrInvalid)
	}
	disks, err := checkExtraDisks(extra)
	if err != nil {
		return "", nil, err
	}
	return root, disks, nil
}

func hostnameOr(h, id string) string {
	if h != "" {
		return h
	}
	return id
}

func (d *Driver) qemuImg(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, d.cfg.QEMUImg, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("qemu-img %s: %v: %s", args[0], err, strings.TrimSpace(string(out)))
	}
	return nil
}

// destroy kills the process and removes the VM entirely.
func (v *vm) destroy() {
	v.mu.Lock()
	p := v.proc
	v.gone = true
	v.mu.Unlock()
	if p != nil {
		v.endProcessHard(p)
	}
	v.detach()
	os.RemoveAll(v.dir)
	v.d.forget(v.id)
}

// endProcessHard kills at once: used when the VM is being thrown away.
func (v *vm) endProcessHard(p *proc) {
	v.mu.Lock()
	v.expectExit = true
	v.mu.Unlock()
	p.kill()
	p.waitExit(5 * time.Second)
}

// requireRunning checks the state under the op lock.
func (v *vm) requireRunning(what string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.meta.State != vmm.StateRunning || v.proc == nil || !v.proc.alive() || v.qmp == nil {
		return fmt.Errorf("cannot %s vm %s: it is %s: %w", what, v.id, v.meta.State, errdefs.ErrConflict)
	}
	return nil
}

// pauseAndSave freezes workloads, pauses the guest and saves its device
// state to statePath. A VM whose memory is a private mapping also has its
// memory written to memPath (see memsplit.go); otherwise its memory is
// already in its own shared file.
func (v *vm) pauseAndSave(ctx context.Context, statePath, memPath string) error {
	t := newStepTimer()
	defer func() { v.log.Debug("save steps", "ms", t.String()) }()
	if v.agent != nil {
		fctx, cancel := context.WithTimeout(ctx, freezeTimeout)
		err := v.agent.Freeze(fctx)
		cancel()
		if err != nil {
			// Saving still works; workloads simply run on briefly after
			// the restore, before the identity refresh.
			v.log.Warn("agent did not freeze workloads", "err", err)
		}
	}
	t.step("freeze")
	sctx, cancel := context.WithTimeout(ctx, stateTimeout)
	defer cancel()
	if err := v.qmp.Execute(sctx, "stop", nil, nil); err != nil {
		return err
	}
	t.step("stop")
	defer t.step("save")
	if v.meta.MemPrivate {
		if _, err := saveSplit(sctx, v, statePath, memPath); err != nil {
			return fmt.Errorf("saving memory and device state: %w", err)
		}
		return nil
	}
	if err := saveDeviceState(sctx, v.qmp, statePath); err != nil {
		return fmt.Errorf("saving device state: %w", err)
	}
	return nil
}

// unpause lets a VM whose save failed run on.
func (v *vm) unpause() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if v.qmp != nil {
		v.qmp.Execute(ctx, "cont", nil, nil)
	}
	if v.agent != nil {
		v.refreshIdentity(ctx)
	}
}

// Snapshot implements vmm.Driver.
func (d *Driver) Snapshot(ctx context.Context, id, dir string) (vmm.Template, error) {
	v, err := d.get(id)
	if err != nil {
		return vmm.Template{}, err
	}
	v.op.Lock()
	defer v.op.Unlock()
	if err := v.requireRunning("snapshot"); err != nil {
		return vmm.Template{}, err
	}
	if len(v.meta.Disks) > 0 && !v.meta.DeferRoot {
		// A template must not carry disks of a build step (an account's
		// cache, say) into every clone. A deferred root's guest never
		// read its disks, and its clones get their own.
		return vmm.Template{}, fmt.Errorf("cannot snapshot vm %s: it has extra disks: %w", id, errdefs.ErrInvalid)
	}
	dir, err = filepath.Abs(dir)
	if err != nil {
		return vmm.Template{}, err
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return vmm.Template{}, fmt.Errorf("creating template directory: %w", err)
	}
	t, err := v.snapshotInto(ctx, dir)
	v.destroy()
	if err != nil {
		os.RemoveAll(dir)
		return vmm.Template{}, fmt.Errorf("snapshotting %s: %w", id, err)
	}
	v.log.Info("snapshot taken", "template", dir)
	return t, nil
}

func (v *vm) snapshotInto(ctx context.Context, dir string) (vmm.Template, error) {
	// The marker says "incomplete" until the last file is in place, so a
	// crash mid-way leaves a template nobody will use.
	marker := filepath.Join(dir, ".incomplete")
	if err := os.WriteFile(marker, nil, 0o600); err != nil {
		return vmm.Template{}, err
	}
	if err := v.pauseAndSave(ctx, filepath.Join(dir, "state"), filepath.Join(dir, "mem")); err != nil {
		return vmm.Template{}, err
	}
	v.endProcess(v.proc)
	if !v.meta.MemPrivate {
		if err := os.Rename(v.path("mem"), filepath.Join(dir, "mem")); err != nil {
			return vmm.Template{}, err
		}
	}
	if err := shareTemplateMem(filepath.Join(dir, "mem")); err != nil {
		return vmm.Template{}, err
	}
	if err := os.Rename(v.path("disk.qcow2"), filepath.Join(dir, "disk.qcow2")); err != nil {
		return vmm.Template{}, err
	}
	if err := writeChain(dir, v.meta.Chain); err != nil {
		return vmm.Template{}, err
	}
	// Every clone copies this empty overlay instead of running qemu-img.
	// -u: qemu-img must not open the template's disk, whose header the
	// VM's QEMU wrote; the size is the base disk's, which kiln made.
	size, err := v.diskSize()
	if err != nil {
		return vmm.Template{}, err
	}
	if err := v.d.qemuImg(ctx, "create", "-q", "-f", "qcow2", "-u", "-b", filepath.Join(dir, "disk.qcow2"), "-F", "qcow2", filepath.Join(dir, "overlay.qcow2"), strconv.FormatInt(size, 10)); err != nil {
		return vmm.Template{}, err
	}
	if err := syncFiles(filepath.Join(dir, "mem"), filepath.Join(dir, "disk.qcow2"), filepath.Join(dir, "state")); err != nil {
		return vmm.Template{}, err
	}
	t := vmm.Template{Dir: dir, Platform: v.meta.Platform, MemoryMiB: v.meta.MemoryMiB, VCPUs: v.meta.VCPUs,
		HasNet: v.meta.Net != nil, CreatedAt: time.Now().UTC(), DeferredRoot: v.meta.DeferRoot}
	if v.meta.DeferRoot {
		t.ExtraDisks = len(v.meta.Disks)
	}
	b, _ := json.MarshalIndent(t, "", "  ")
	if err := writeFileAtomic(filepath.Join(dir, "template.json"), b); err != nil {
		return vmm.Template{}, err
	}
	if err := os.Remove(marker); err != nil {
		return t, err
	}
	// The renames and the marker's removal reach the disk with the
	// directory: a host crash must not bring back an "incomplete" template
	// or lose one a version was recorded with.
	if err := syncFiles(filepath.Join(dir, "overlay.qcow2"), dir); err != nil {
		return t, err
	}
	return t, nil
}

// shareTemplateMem makes a template's memory file root's and readable to
// all: every clone's QEMU maps it read-only under its own uid, through a
// read-only bind into its jail; the template directory (0700) keeps it
// from everyone else.
func shareTemplateMem(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Uid == 0 && sys.Gid == 0 && st.Mode().Perm() == 0o644 {
		return nil
	}
	if err := os.Chown(path, 0, 0); err != nil && os.Geteuid() == 0 {
		return err
	}
	return os.Chmod(path, 0o644)
}

// diskSize is the guest's disk size: the base layer's, a raw file kiln
// made (never a header a guest could have written).
func (v *vm) diskSize() (int64, error) {
	if len(v.meta.Chain) == 0 {
		return 0, fmt.Errorf("vm %s has no recorded disk chain: %w", v.id, errdefs.ErrInvalid)
	}
	b := v.meta.Chain[len(v.meta.Chain)-1]
	if b.Format != "raw" {
		return 0, fmt.Errorf("vm %s: base disk %s is %s, not raw: %w", v.id, b.Path, b.Format, errdefs.ErrInvalid)
	}
	st, err := os.Stat(b.Path)
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

func syncFiles(paths ...string) error {
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return fmt.Errorf("syncing %s: %w", p, err)
		}
	}
	return nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// LoadTemplate reads a template directory and checks that it is complete.
func LoadTemplate(dir string) (vmm.Template, error) {
	var t vmm.Template
	dir, err := filepath.Abs(dir)
	if err != nil {
		return t, err
	}
	if _, err := os.Stat(filepath.Join(dir, ".incomplete")); err == nil {
		return t, fmt.Errorf("template %s is incomplete (its snapshot was interrupted): %w", dir, errdefs.ErrInvalid)
	}
	b, err := os.ReadFile(filepath.Join(dir, "template.json"))
	if err != nil {
		return t, fmt.Errorf("template %s: %w", dir, errors.Join(err, errdefs.ErrNotFound))
	}
	if err := json.Unmarshal(b, &t); err != nil {
		return t, fmt.Errorf("template %s: malformed template.json: %v: %w", dir, err, errdefs.ErrInvalid)
	}
	t.Dir = dir
	return t, nil
}

// checkPlatform refuses to restore a snapshot on a platform it was not
// made on: QEMU would fail late or corrupt the guest.
func (d *Driver) checkPlatform(what string, p vmm.Platform) error {
	return comparePlatform(what, p, d.platform)
}

func comparePlatform(what string, made, here vmm.Platform) error {
	if made == here {
		return nil
	}
	if made.CPUFeatures != here.CPUFeatures && made.QEMUVersion == here.QEMUVersion && made.Accel == here.Accel &&
		made.Machine == here.Machine && made.CPU == here.CPU {
		return fmt.Errorf("%s was made on a CPU with other features (fingerprint %q, this host's %q); rebuild the image on this host: %w",
			what, made.CPUFeatures, here.CPUFeatures, errdefs.ErrInvalid)
	}
	return fmt.Errorf("%s was made with QEMU %s (%s, machine %s, cpu %s) but this host runs QEMU %s (%s, machine %s, cpu %s); rebuild the image on this host: %w",
		what, made.QEMUVersion, made.Accel, made.Machine, made.CPU, here.QEMUVersion, here.Accel, here.Machine, here.CPU, errdefs.ErrInvalid)
}

// Clone implements vmm.Driver.
func (d *Driver) Clone(ctx context.Context, spec vmm.CloneSpec) (vmm.Info, error) {
	t, err := LoadTemplate(spec.Template)
	if err != nil {
		return vmm.Info{}, err
	}
	if err := d.checkPlatform("template "+t.Dir, t.Platform); err != nil {
		return vmm.Info{}, err
	}
	if t.HasNet != (spec.Net != nil) {
		return vmm.Info{}, fmt.Errorf("template %s was made %s a NIC; clones must match: %w", t.Dir, map[bool]string{true: "with", false: "without"}[t.HasNet], errdefs.ErrInvalid)
	}
	if spec.RootDisk != "" || t.DeferredRoot {
		return d.cloneOnOwnDisks(ctx, spec, t)
	}
	if d.pool != nil {
		// Refill once this clone is done, not while it runs.
		defer d.pool.poke()
		mac := ""
		if spec.Net != nil {
			mac = spec.Net.MAC
		}
		if r := d.pool.claim(spec.ID); r != nil {
			if k, err := templateKey(t, mac); err == nil && k == r.key && r.v.proc.alive() {
				return d.cloneFromPool(ctx, spec, r.v)
			}
			go r.v.discardPooled()
		}
		if pv := d.pool.take(t, mac); pv != nil {
			return d.cloneFromPool(ctx, spec, pv)
		}
	}
	t0 := time.Now()
	v, err := d.reserve(spec.ID)
	if err != nil {
		return vmm.Info{}, err
	}
	defer v.op.Unlock()
	v.meta = meta{ID: spec.ID, State: vmm.StateRunning, Phase: phaseBooting, MemoryMiB: t.MemoryMiB, VCPUs: t.VCPUs,
		Platform: t.Platform, Template: t.Dir, MemPrivate: true, Net: spec.Net, Hostname: hostnameOr(spec.Hostname, spec.ID), StartedAt: time.Now(),
		UID: v.uid}
	fail := func(err error) (vmm.Info, error) {
		v.destroy()
		return vmm.Info{}, fmt.Errorf("cloning %s: %w", spec.ID, err)
	}
	if err := os.MkdirAll(v.dir, 0o700); err != nil {
		return fail(err)
	}
	if err := v.prepareClone(ctx, t); err != nil {
		return fail(err)
	}
	if err := v.saveMeta(); err != nil {
		return fail(err)
	}
	v.mu.Lock()
	v.phases = StartPhases{Prepare: time.Since(t0)}
	v.mu.Unlock()
	if err := v.start(ctx, filepath.Join(t.Dir, "state")); err != nil {
		return fail(err)
	}
	return v.info(), nil
}

// cloneOnOwnDisks starts a clone of a deferred-root template on the
// spec's disks, then has its agent probe them and switch root: a cold
// boot's result without the kernel's boot.
func (d *Driver) cloneOnOwnDisks(ctx context.Context, spec vmm.CloneSpec, t vmm.Template) (vmm.Info, error) {
	if !t.DeferredRoot || spec.RootDisk == "" {
		return vmm.Info{}, fmt.Errorf("template %s: a clone on its own disks needs a template booted with DeferRoot, and such a template needs a clone's RootDisk: %w", t.Dir, errdefs.ErrInvalid)
	}
	if len(spec.Disks) != t.ExtraDisks {
		return vmm.Info{}, fmt.Errorf("template %s has %d extra disks, the clone %d; they must match: %w", t.Dir, t.ExtraDisks, len(spec.Disks), errdefs.ErrInvalid)
	}
	root, disks, err := checkDisks(spec.RootDisk, spec.Disks)
	if err != nil {
		return vmm.Info{}, err
	}
	v, err := d.reserve(spec.ID)
	if err != nil {
		return vmm.Info{}, err
	}
	defer v.op.Unlock()
	v.meta = meta{ID: spec.ID, State: vmm.StateRunning, Phase: phaseBooting, MemoryMiB: t.MemoryMiB, VCPUs: t.VCPUs,
		Platform: t.Platform, Template: t.Dir, MemPrivate: true, OwnDisk: true, Net: spec.Net, Hostname: hostnameOr(spec.Hostname, spec.ID),
		StartedAt: time.Now(), UID: v.uid, ScratchDisk: spec.ScratchDisk, Disks: disks, Chain: []layer{{Path: root, Format: "raw"}}}
	fail := func(err error) (vmm.Info, error) {
		v.destroy()
		return vmm.Info{}, fmt.Errorf("cloning %s on its own disks: %w", spec.ID, err)
	}
	if err := os.MkdirAll(v.dir, 0o700); err != nil {
		return fail(err)
	}
	if err := shareTemplateMem(filepath.Join(t.Dir, "mem")); err != nil {
		return fail(err)
	}
	if err := d.qemuImg(ctx, "create", "-q", "-f", "qcow2", "-b", root, "-F", "raw", v.path("disk.qcow2")); err != nil {
		return fail(err)
	}
	if err := v.saveMeta(); err != nil {
		return fail(err)
	}
	if err := v.start(ctx, filepath.Join(t.Dir, "state")); err != nil {
		return fail(err)
	}
	rctx, cancel := context.WithTimeout(ctx, d.cfg.BootTimeout)
	err = v.agent.RootDisk(rctx)
	cancel()
	if err != nil {
		return fail(fmt.Errorf("mounting the root disk in the guest: %w", err))
	}
	v.log.Info("vm started on its own disks", "template", t.Dir, "pid", v.proc.pid)
	return v.info(), nil
}

// prepareClone gives a new VM of template t its disk: the recorded chain
// below and a copy of the template's empty overlay on top.
func (v *vm) prepareClone(ctx context.Context, t vmm.Template) error {
	var err error
	if v.meta.Chain, err = v.d.readChain(ctx, t.Dir); err != nil {
		return err
	}
	if err := shareTemplateMem(filepath.Join(t.Dir, "mem")); err != nil {
		return err
	}
	if err := copyFile(filepath.Join(t.Dir, "overlay.qcow2"), v.path("disk.qcow2")); err != nil {
		return err
	}
	h, err := qcow2.ParseFile(v.path("disk.qcow2"))
	if err != nil {
		return fmt.Errorf("template %s: its clone overlay: %w", t.Dir, err)
	}
	v.meta.Backing, v.meta.BackingFormat = h.BackingFile, h.BackingFormat
	if h.BackingFile != "" && !filepath.IsAbs(h.BackingFile) {
		v.meta.Backing = filepath.Join(v.dir, h.BackingFile) // as qcow2.CheckLink reads it
	}
	return nil
}

// start runs QEMU on saved device state (a clone's or a suspended VM's),
// starts the guest and refreshes its identity.
func (v *vm) start(ctx context.Context, statePath string) error {
	c := newPhaseClock()
	v.mu.Lock()
	ph := v.phases // a clone's Prepare
	v.phases, v.phasesSet = StartPhases{}, false
	v.mu.Unlock()
	if err := v.spawn(ctx, true); err != nil {
		return err
	}
	c.lap(&ph.Process)
	conn, err := v.dialAgent(ctx, restoreTimeout)
	if err != nil {
		return err
	}
	lctx, cancel := context.WithTimeout(ctx, stateTimeout)
	defer cancel()
	if err := loadDeviceState(lctx, v.qmp, statePath); err != nil {
		conn.Close()
		return v.exitError("loading device state", err, v.proc)
	}
	c.lap(&ph.Load)
	return v.resumeLoaded(ctx, conn, c, &ph)
}

// Suspend implements vmm.Driver.
func (d *Driver) Suspend(ctx context.Context, id string) error {
	v, err := d.get(id)
	if err != nil {
		return err
	}
	v.op.Lock()
	defer v.op.Unlock()
	v.mu.Lock()
	state := v.meta.State
	v.mu.Unlock()
	if state == vmm.StateSuspended {
		return nil
	}
	if err := v.requireRunning("suspend"); err != nil {
		return err
	}
	if err := v.setState(vmm.StateRunning, phaseSuspending); err != nil {
		return err
	}
	start := time.Now()
	if err := v.suspend(ctx); err != nil {
		for _, f := range []string{"state", "state.tmp", "mem.tmp"} {
			os.Remove(v.path(f))
		}
		if v.proc.alive() {
			v.unpause()
			v.setState(vmm.StateRunning, "")
		}
		return fmt.Errorf("suspending %s: %w", id, err)
	}
	v.log.Info("vm suspended", "ms", time.Since(start).Milliseconds())
	return nil
}

func (v *vm) suspend(ctx context.Context) error {
	if err := v.pauseAndSave(ctx, v.path("state.tmp"), v.path("mem.tmp")); err != nil {
		return err
	}
	t := newStepTimer()
	defer func() { v.log.Debug("suspend steps", "ms", t.String()) }()
	if v.meta.MemPrivate {
		if err := os.Rename(v.path("mem.tmp"), v.path("mem")); err != nil {
			return err
		}
	}
	if err := os.Rename(v.path("state.tmp"), v.path("state")); err != nil {
		return err
	}
	t.step("rename")
	v.endProcess(v.proc)
	t.step("quit")
	v.mu.Lock()
	v.meta.MemPrivate = false // from now on the VM owns its memory file
	v.meta.PID, v.meta.PIDStart = 0, 0
	v.meta.SuspendGen++
	v.meta.HostBootID = v.d.hostBootID()
	gen := v.meta.SuspendGen
	v.mu.Unlock()
	if err := v.setState(vmm.StateSuspended, ""); err != nil {
		return err
	}
	go v.persistMemory(gen)
	return nil
}

// persistMemory flushes a suspended VM's memory file to disk. Suspend does
// not wait for it (it would double the suspend time); until it is done the
// memory lives in the page cache, which survives QEMU and kiln but not a
// host crash, and Recover knows the difference by the host's boot id.
func (v *vm) persistMemory(gen uint64) {
	// The memory, the device state and the disk, then the directory that
	// holds their names: all of it must survive a host reboot for the VM
	// to resume after one.
	err := syncFiles(v.path("mem"), v.path("state"), v.path("disk.qcow2"), v.dir)
	if err != nil {
		v.log.Warn("flushing suspended memory", "err", err)
		return
	}
	v.op.Lock()
	defer v.op.Unlock()
	v.mu.Lock()
	if v.gone || v.meta.SuspendGen != gen {
		v.mu.Unlock()
		return
	}
	v.meta.DurableGen = gen
	v.mu.Unlock()
	v.saveMeta()
}

// hostBootID identifies the host's current boot.
func (d *Driver) hostBootID() string {
	p := d.cfg.BootIDPath
	if p == "" {
		p = "/proc/sys/kernel/random/boot_id"
	}
	b, _ := os.ReadFile(p)
	return strings.TrimSpace(string(b))
}

// Resume implements vmm.Driver.
func (d *Driver) Resume(ctx context.Context, id string) (vmm.Info, error) {
	v, err := d.get(id)
	if err != nil {
		return vmm.Info{}, err
	}
	v.op.Lock()
	defer v.op.Unlock()
	v.mu.Lock()
	state := v.meta.State
	v.mu.Unlock()
	switch state {
	case vmm.StateRunning:
		return v.info(), nil
	case vmm.StateSuspended:
	default:
		return vmm.Info{}, fmt.Errorf("cannot resume vm %s: it is %s: %w", id, state, errdefs.ErrConflict)
	}
	if err := d.checkPlatform("suspended vm "+id, v.meta.Platform); err != nil {
		return vmm.Info{}, err
	}
	// QEMU gets the chain from descriptors and ignores the header's name,
	// but a header the guest's QEMU rewrote to name another file means
	// that QEMU was compromised: refuse to run the disk again.
	if c := v.meta.Chain; len(c) > 0 {
		want, format := c[0].Path, c[0].Format
		if v.meta.Backing != "" {
			want, format = v.meta.Backing, v.meta.BackingFormat
		}
		if err := qcow2.CheckLink(v.path("disk.qcow2"), want, format); err != nil {
			return vmm.Info{}, fmt.Errorf("resuming %s: %w", id, err)
		}
	}
	if err := v.setState(vmm.StateSuspended, phaseResuming); err != nil {
		return vmm.Info{}, err
	}
	start := time.Now()
	if err := v.start(ctx, v.path("state")); err != nil {
		v.mu.Lock()
		p, running := v.proc, v.meta.State == vmm.StateRunning
		v.mu.Unlock()
		if p != nil {
			v.endProcessHard(p)
		}
		if running {
			// The guest ran and changed its memory file: the saved state
			// no longer matches it, so the VM cannot be kept.
			v.meta.Reason = "resume failed after the guest started: " + err.Error()
			v.cleanupDead()
		} else {
			v.setState(vmm.StateSuspended, "")
		}
		return vmm.Info{}, fmt.Errorf("resuming %s: %w", id, err)
	}
	os.Remove(v.path("state"))
	v.log.Info("vm resumed", "ms", time.Since(start).Milliseconds())
	return v.info(), nil
}

// Stop implements vmm.Driver.
func (d *Driver) Stop(ctx context.Context, id string) error {
	v, err := d.get(id)
	if err != nil {
		return err
	}
	v.op.Lock()
	defer v.op.Unlock()
	v.mu.Lock()
	p, a, state := v.proc, v.agent, v.meta.State
	v.mu.Unlock()
	if state == vmm.StateStopped {
		return nil
	}
	if state == vmm.StateRunning && p != nil {
		v.mu.Lock()
		v.expectExit = true
		v.mu.Unlock()
		if a != nil {
			sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := a.Shutdown(sctx)
			cancel()
			if err != nil {
				v.log.Warn("clean shutdown failed; killing", "err", err)
			}
		}
		select {
		case <-p.done:
		case <-ctx.Done():
		case <-time.After(10 * time.Second):
		}
		v.endProcess(p)
	}
	v.mu.Lock()
	v.meta.State, v.meta.Phase, v.meta.PID, v.meta.Reason = vmm.StateStopped, "", 0, "stopped on request"
	v.mu.Unlock()
	for _, f := range []string{"qmp.sock", "agent.sock", "console.sock"} {
		os.Remove(v.sockPath(f))
	}
	for _, f := range []string{"state", "mem"} {
		os.Remove(v.path(f))
	}
	return v.saveMeta()
}

// Terminate implements vmm.Driver.
func (d *Driver) Terminate(ctx context.Context, id string) error {
	d.ReleasePooled(id)
	v, err := d.get(id)
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil
	}
	// Kill first: an operation stuck on QEMU or the guest then fails at
	// once and lets go of the VM, instead of holding Terminate up.
	v.mu.Lock()
	v.expectExit = true
	p := v.proc
	v.mu.Unlock()
	if p != nil {
		p.kill()
	}
	v.op.Lock()
	defer v.op.Unlock()
	v.destroy()
	v.log.Info("vm terminated")
	return nil
}
