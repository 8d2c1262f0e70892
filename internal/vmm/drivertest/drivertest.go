//go:build linux

// Package drivertest is the conformance suite of vmm.Driver: what the
// contract in internal/vmm promises, checked against real VMs. Every
// driver's tests call Run with a constructor for that driver. The suite
// boots two VMs and clones one, sharing them across its cases, because
// CI runs them under TCG where each boot costs seconds.
package drivertest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/client"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/rootfs"
	"github.com/kiln-sandbox/kiln/internal/vmm"
	"github.com/kiln-sandbox/kiln/internal/vmm/vmmtest"
)

// Config says how to make the driver under test.
type Config struct {
	// New returns a fresh driver with a data dir of its own. The suite
	// terminates the VMs it made; New's caller closes the driver.
	New func(t *testing.T) vmm.Driver
	// RootDisk is an ext4 root disk with /bin/sh (busybox.Root).
	// The suite boots copies of it and never changes it.
	RootDisk string
	// MemoryMiB of the suite's VMs; 512 if zero (the initramfs lives in guest RAM).
	MemoryMiB int
	// Timeout bounds each boot, snapshot, clone, suspend or resume; 4 min
	// if zero (TCG on a loaded machine).
	Timeout time.Duration
}

// Run runs the suite. The cases run in order on shared VMs; a case
// whose VM another case failed to make is skipped.
func Run(t *testing.T, cfg Config) {
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = 512
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 4 * time.Minute
	}
	s := &suite{cfg: cfg, d: cfg.New(t), work: vmmtest.ShortDir(t)}
	t.Cleanup(func() {
		for _, id := range []string{"dt-src", "dt-clone", "dt-fork", "dt-commit"} {
			s.d.Terminate(context.Background(), id)
		}
	})
	s.run(t)
}

type suite struct {
	cfg  Config
	d    vmm.Driver
	work string
	tmpl vmm.Template
}

func (s *suite) ctx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.Timeout)
	t.Cleanup(cancel)
	return ctx
}

func (s *suite) run(t *testing.T) {
	t.Run("UnknownIDs", s.unknownIDs)
	t.Run("BadSpecs", s.badSpecs)
	if !t.Run("Boot", s.boot) {
		return
	}
	t.Run("AgentHello", s.agentHello)
	t.Run("SuspendResumeKeepsMemory", s.suspendResume)
	if t.Run("Snapshot", s.snapshot) {
		if t.Run("CloneFromTemplate", s.clone) {
			if _, ok := s.d.(vmm.Forker); ok {
				t.Run("TemplateFromSuspended", s.fork)
			}
			t.Run("EventOnVMDeath", s.death)
		}
		t.Run("CopyTemplate", s.copyTemplate)
	}
	t.Run("StopCommitDiskTerminate", s.commit)
}

// unknownIDs: every call naming a VM the driver does not have is
// ErrNotFound, except Terminate, which is idempotent.
func (s *suite) unknownIDs(t *testing.T) {
	ctx := s.ctx(t)
	const id = "dt-unknown"
	calls := map[string]func() error{
		"Inspect":    func() error { _, err := s.d.Inspect(ctx, id); return err },
		"Agent":      func() error { _, err := s.d.Agent(ctx, id); return err },
		"Suspend":    func() error { return s.d.Suspend(ctx, id) },
		"Resume":     func() error { _, err := s.d.Resume(ctx, id); return err },
		"Stop":       func() error { return s.d.Stop(ctx, id) },
		"CommitDisk": func() error { return s.d.CommitDisk(ctx, id) },
		"Snapshot":   func() error { _, err := s.d.Snapshot(ctx, id, filepath.Join(s.work, "never")); return err },
	}
	for name, call := range calls {
		if err := call(); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("%s(unknown) = %v, want ErrNotFound", name, err)
		}
	}
	if err := s.d.Terminate(ctx, id); err != nil {
		t.Errorf("Terminate(unknown) = %v, want nil", err)
	}
	if _, err := os.Stat(filepath.Join(s.work, "never")); err == nil {
		t.Error("Snapshot of an unknown VM made its directory")
	}
}

// badSpecs: a request the driver cannot serve fails without leaving a VM.
func (s *suite) badSpecs(t *testing.T) {
	ctx := s.ctx(t)
	if _, err := s.d.Boot(ctx, vmm.BootSpec{ID: "dt-bad", RootDisk: filepath.Join(s.work, "missing.ext4")}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("Boot with a missing root disk = %v, want ErrInvalid", err)
	}
	if _, err := s.d.Boot(ctx, vmm.BootSpec{ID: "Bad/ID", RootDisk: s.cfg.RootDisk}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("Boot with a bad id = %v, want ErrInvalid", err)
	}
	if _, err := s.d.Clone(ctx, vmm.CloneSpec{ID: "dt-bad", Template: filepath.Join(s.work, "no-template")}); err == nil {
		t.Error("Clone of a missing template succeeded")
	}
	if _, err := s.d.CopyTemplate(ctx, vmm.TemplateCopy{Src: filepath.Join(s.work, "no-template"), SrcRoot: s.cfg.RootDisk,
		Dst: filepath.Join(s.work, "no-copy"), Root: s.cfg.RootDisk}); err == nil {
		t.Error("CopyTemplate of a missing template succeeded")
	}
	if _, err := os.Stat(filepath.Join(s.work, "no-copy")); err == nil {
		t.Error("a failed CopyTemplate left its destination")
	}
	vms, err := s.d.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vms {
		if v.ID == "dt-bad" {
			t.Errorf("a failed call left VM %+v", v)
		}
	}
}

// copyRoot gives a VM a root disk of its own, so the suite never changes
// the caller's.
func (s *suite) copyRoot(t *testing.T, name string) string {
	t.Helper()
	p := filepath.Join(s.work, name)
	if out, err := exec.Command("cp", "--sparse=always", s.cfg.RootDisk, p).CombinedOutput(); err != nil {
		t.Fatalf("copying the root disk: %v: %s", err, out)
	}
	return p
}

func (s *suite) boot(t *testing.T) {
	ctx := s.ctx(t)
	spec := vmm.BootSpec{ID: "dt-src", RootDisk: s.copyRoot(t, "src.ext4"), MemoryMiB: s.cfg.MemoryMiB}
	info, err := s.d.Boot(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if info.ID != spec.ID || info.State != vmm.StateRunning || info.MemoryMiB != spec.MemoryMiB {
		t.Errorf("Boot returned %+v, want %s running with %d MiB", info, spec.ID, spec.MemoryMiB)
	}
	if _, err := s.d.Boot(ctx, spec); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("a second Boot of %s = %v, want ErrConflict", spec.ID, err)
	}
	got, err := s.d.Inspect(ctx, spec.ID)
	if err != nil || got.State != vmm.StateRunning {
		t.Errorf("Inspect = %+v, %v; want running (the failed second Boot must not touch the first VM)", got, err)
	}
	vms, err := s.d.List(ctx)
	if err != nil || !slices.ContainsFunc(vms, func(i vmm.Info) bool { return i.ID == spec.ID }) {
		t.Errorf("List = %v, %v; want it to hold %s", vms, err, spec.ID)
	}
}

// sh runs a shell script in a VM through its agent.
func (s *suite) sh(t *testing.T, id, script string) string {
	t.Helper()
	ctx := s.ctx(t)
	a, err := s.d.Agent(ctx, id)
	if err != nil {
		t.Fatalf("agent of %s: %v", id, err)
	}
	out, errOut, code, err := a.Run(ctx, client.ExecRequest{Argv: []string{"/bin/sh", "-c", script}})
	if err != nil || code != 0 {
		t.Fatalf("%q in %s: code %d, %v: %s", script, id, code, err, errOut)
	}
	return strings.TrimSpace(out)
}

func (s *suite) agentHello(t *testing.T) {
	ctx := s.ctx(t)
	a, err := s.d.Agent(ctx, "dt-src")
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Ping(ctx); err != nil {
		t.Fatalf("ping: %v", err)
	}
	if a.BootID() == "" {
		t.Error("the agent's hello carried no boot id")
	}
	if got := s.sh(t, "dt-src", "hostname"); got != "dt-src" {
		t.Errorf("hostname %q, want the VM id", got)
	}
}

// suspendResume: a value only in guest memory (tmpfs) survives Suspend
// and Resume; both are no-ops when repeated.
func (s *suite) suspendResume(t *testing.T) {
	ctx := s.ctx(t)
	const id = "dt-src"
	s.sh(t, id, "mkdir -p /mem && mount -t tmpfs tmpfs /mem && echo kept-in-memory > /mem/v")
	before, _ := s.d.Agent(ctx, id)
	if err := s.d.Suspend(ctx, id); err != nil {
		t.Fatal(err)
	}
	if info, err := s.d.Inspect(ctx, id); err != nil || info.State != vmm.StateSuspended || info.PID != 0 {
		t.Errorf("after Suspend: %+v, %v; want suspended with no process", info, err)
	}
	if err := s.d.Suspend(ctx, id); err != nil {
		t.Errorf("Suspend of a suspended VM = %v, want a no-op", err)
	}
	if _, err := s.d.Agent(ctx, id); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("Agent of a suspended VM = %v, want ErrConflict", err)
	}
	info, err := s.d.Resume(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if info.State != vmm.StateRunning {
		t.Errorf("Resume returned %+v, want running", info)
	}
	if _, err := s.d.Resume(ctx, id); err != nil {
		t.Errorf("Resume of a running VM = %v, want a no-op", err)
	}
	if got := s.sh(t, id, "cat /mem/v"); got != "kept-in-memory" {
		t.Errorf("after resume /mem/v = %q", got)
	}
	if after, _ := s.d.Agent(ctx, id); after != nil && before != nil && after.BootID() != before.BootID() {
		t.Error("the guest rebooted across suspend and resume")
	}
	if err := s.d.CommitDisk(ctx, id); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("CommitDisk of a running VM = %v, want ErrConflict", err)
	}
}

// snapshot ends the source VM and makes a template holding its memory
// and disk.
func (s *suite) snapshot(t *testing.T) {
	ctx := s.ctx(t)
	s.sh(t, "dt-src", "echo on-disk > /root/v && echo in-memory > /mem/snap && sync")
	dir := filepath.Join(s.work, "tmpl")
	tm, err := s.d.Snapshot(ctx, "dt-src", dir)
	if err != nil {
		t.Fatal(err)
	}
	s.tmpl = tm
	if tm.Dir != dir || tm.MemoryMiB != s.cfg.MemoryMiB {
		t.Errorf("template %+v, want dir %s and %d MiB", tm, dir, s.cfg.MemoryMiB)
	}
	if _, err := s.d.Inspect(ctx, "dt-src"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("the snapshotted VM: Inspect = %v, want ErrNotFound (Snapshot ends it)", err)
	}
}

// clone starts a VM from the template: it has the source's memory and
// disk at the snapshot point and its own identity.
func (s *suite) clone(t *testing.T) {
	ctx := s.ctx(t)
	info, err := s.d.Clone(ctx, vmm.CloneSpec{ID: "dt-clone", Template: s.tmpl.Dir})
	if err != nil {
		t.Fatal(err)
	}
	if info.State != vmm.StateRunning || info.Template != s.tmpl.Dir {
		t.Errorf("Clone returned %+v, want running from %s", info, s.tmpl.Dir)
	}
	if _, err := s.d.Clone(ctx, vmm.CloneSpec{ID: "dt-clone", Template: s.tmpl.Dir}); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("a second Clone of dt-clone = %v, want ErrConflict", err)
	}
	if got := s.sh(t, "dt-clone", "cat /mem/snap /mem/v /root/v; hostname"); got != "in-memory\nkept-in-memory\non-disk\ndt-clone" {
		t.Errorf("clone sees %q, want the snapshot's memory and disk and its own hostname", got)
	}
	if err := s.d.CommitDisk(ctx, "dt-clone"); err == nil {
		t.Error("CommitDisk of a running clone succeeded")
	}
}

// fork: a template of a suspended clone (vmm.Forker) holds its memory
// and disk at the suspension; the VM stays suspended and resumes as it
// was; a clone of the template is apart from it. Only running VMs are
// refused.
func (s *suite) fork(t *testing.T) {
	ctx := s.ctx(t)
	f := s.d.(vmm.Forker)
	const id = "dt-clone"
	dir := filepath.Join(s.work, "fork-tmpl")
	if _, err := f.TemplateFromSuspended(ctx, id, dir); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("TemplateFromSuspended of a running VM = %v, want ErrConflict", err)
	}
	if _, err := f.TemplateFromSuspended(ctx, "dt-unknown", dir); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("TemplateFromSuspended of an unknown VM = %v, want ErrNotFound", err)
	}
	s.sh(t, id, "echo fork-mem > /mem/fork && echo fork-disk > /root/fork && sync")
	if err := s.d.Suspend(ctx, id); err != nil {
		t.Fatal(err)
	}
	tm, err := f.TemplateFromSuspended(ctx, id, dir)
	if err != nil {
		t.Fatal(err)
	}
	if tm.Dir != dir || tm.MemoryMiB != s.tmpl.MemoryMiB || tm.Platform != s.tmpl.Platform {
		t.Errorf("template %+v, want %s like %+v", tm, dir, s.tmpl)
	}
	if info, err := s.d.Inspect(ctx, id); err != nil || info.State != vmm.StateSuspended {
		t.Errorf("the source after TemplateFromSuspended: %+v, %v; want suspended", info, err)
	}
	if _, err := f.TemplateFromSuspended(ctx, id, dir); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("a template onto an existing directory = %v, want ErrConflict", err)
	}
	if _, err := s.d.Clone(ctx, vmm.CloneSpec{ID: "dt-fork", Template: dir}); err != nil {
		t.Fatal(err)
	}
	if got := s.sh(t, "dt-fork", "cat /mem/fork /root/fork /mem/snap; hostname"); got != "fork-mem\nfork-disk\nin-memory\ndt-fork" {
		t.Errorf("the template's clone sees %q, want the source's memory and disk and its own hostname", got)
	}
	s.sh(t, "dt-fork", "echo changed > /mem/fork && echo changed > /root/fork && sync")
	if _, err := s.d.Resume(ctx, id); err != nil {
		t.Fatal(err)
	}
	if got := s.sh(t, id, "cat /mem/fork /root/fork"); got != "fork-mem\nfork-disk" {
		t.Errorf("the source after its clone wrote: %q", got)
	}
	if err := s.d.Terminate(ctx, "dt-fork"); err != nil {
		t.Fatal(err)
	}
}

// death: a VM whose process dies is reported on Events and shows as
// stopped; Terminate then removes it.
func (s *suite) death(t *testing.T) {
	ctx := s.ctx(t)
	info, err := s.d.Inspect(ctx, "dt-clone")
	if err != nil || info.PID <= 0 {
		t.Fatalf("Inspect = %+v, %v; want a process id", info, err)
	}
	// Events from earlier cases are not this one's.
	for drained := false; !drained; {
		select {
		case <-s.d.Events():
		default:
			drained = true
		}
	}
	if err := syscall.Kill(info.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.After(10 * time.Second)
	for got := false; !got; {
		select {
		case e := <-s.d.Events():
			if e.ID != "dt-clone" {
				continue
			}
			got = true
			if e.State != vmm.StateStopped || e.Reason == "" || e.Time.IsZero() {
				t.Errorf("event %+v, want dt-clone stopped with a reason and a time", e)
			}
		case <-deadline:
			t.Fatal("no event within 10 s of the VM's process being killed")
		}
	}
	if got, err := s.d.Inspect(ctx, "dt-clone"); err != nil || got.State != vmm.StateStopped || got.Reason == "" {
		t.Errorf("Inspect after death = %+v, %v; want stopped with a reason", got, err)
	}
	if err := s.d.Terminate(ctx, "dt-clone"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.d.Inspect(ctx, "dt-clone"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Inspect after Terminate = %v, want ErrNotFound", err)
	}
	if err := s.d.Terminate(ctx, "dt-clone"); err != nil {
		t.Errorf("a second Terminate = %v, want nil", err)
	}
}

// copyTemplate: a copy backed by another root disk of the same content
// is a template like the original (here its metadata; the clone case
// covers cloning).
func (s *suite) copyTemplate(t *testing.T) {
	ctx := s.ctx(t)
	root := s.copyRoot(t, "copy-root.ext4")
	dst := filepath.Join(s.work, "tmpl-copy")
	c, err := s.d.CopyTemplate(ctx, vmm.TemplateCopy{Src: s.tmpl.Dir, SrcRoot: filepath.Join(s.work, "src.ext4"), Dst: dst, Root: root})
	if err != nil {
		t.Fatal(err)
	}
	if c.Dir != dst || c.MemoryMiB != s.tmpl.MemoryMiB || c.Platform != s.tmpl.Platform {
		t.Errorf("copy %+v, want %+v in %s", c, s.tmpl, dst)
	}
	if _, err := s.d.CopyTemplate(ctx, vmm.TemplateCopy{Src: s.tmpl.Dir, SrcRoot: filepath.Join(s.work, "src.ext4"), Dst: dst, Root: root}); !errors.Is(err, errdefs.ErrConflict) {
		t.Errorf("a copy onto an existing directory = %v, want ErrConflict", err)
	}
	// The source's disk stands on src.ext4, not on this file.
	if _, err := s.d.CopyTemplate(ctx, vmm.TemplateCopy{Src: s.tmpl.Dir, SrcRoot: root, Dst: filepath.Join(s.work, "tmpl-wrong"), Root: root}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("a copy naming the wrong source root = %v, want ErrInvalid", err)
	}
}

// commit: a booted VM's writes reach its root disk through Stop and
// CommitDisk, and not before.
func (s *suite) commit(t *testing.T) {
	ctx := s.ctx(t)
	const id = "dt-commit"
	root := s.copyRoot(t, "commit.ext4")
	if _, err := s.d.Boot(ctx, vmm.BootSpec{ID: id, RootDisk: root, MemoryMiB: s.cfg.MemoryMiB}); err != nil {
		t.Fatal(err)
	}
	marker := fmt.Sprintf("committed %d", time.Now().UnixNano())
	s.sh(t, id, "echo '"+marker+"' > /root/committed && sync")
	if _, err := rootfs.Stat(ctx, root, "/root/committed"); err == nil {
		t.Error("the guest's write reached the root disk before CommitDisk: the driver writes to the root disk it was given")
	}
	if err := s.d.Stop(ctx, id); err != nil {
		t.Fatal(err)
	}
	if info, err := s.d.Inspect(ctx, id); err != nil || info.State != vmm.StateStopped {
		t.Errorf("after Stop: %+v, %v; want stopped", info, err)
	}
	if err := s.d.Stop(ctx, id); err != nil {
		t.Errorf("Stop of a stopped VM = %v, want a no-op", err)
	}
	if err := s.d.CommitDisk(ctx, id); err != nil {
		t.Fatal(err)
	}
	if err := s.d.Terminate(ctx, id); err != nil {
		t.Fatal(err)
	}
	got, err := rootfs.ReadFile(ctx, root, "/root/committed", 1<<10)
	if err != nil {
		t.Fatalf("reading the committed file from the root disk: %v", err)
	}
	if !bytes.Equal(bytes.TrimSpace(got), []byte(marker)) {
		t.Errorf("committed file holds %q, want %q", got, marker)
	}
}
