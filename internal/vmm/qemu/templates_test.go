//go:build linux

package qemu

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/qcow2"
	"github.com/kiln-sandbox/kiln/internal/testenv"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// overlayWithWrite makes a raw disk and a qcow2 overlay on it (as the
// driver makes a build VM's), and writes 0xab at offset 0 of the
// overlay, as the VM's writes land.
func overlayWithWrite(t *testing.T, dir string) (overlay, disk string) {
	t.Helper()
	if _, err := exec.LookPath("qemu-io"); err != nil {
		t.Skip("qemu-io not installed")
	}
	disk = filepath.Join(dir, "root.ext4")
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	overlay = filepath.Join(dir, "vm", "disk.qcow2")
	os.Mkdir(filepath.Dir(overlay), 0o700)
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", disk, "-F", "raw", overlay)
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k", overlay)
	return overlay, disk
}

// renameBacking rewrites the backing-file name in a qcow2 header, as a
// QEMU the guest took over could do to its own overlay.
func renameBacking(t *testing.T, path, name string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	off := binary.BigEndian.Uint64(b[8:])
	binary.BigEndian.PutUint32(b[16:], uint32(len(name)))
	copy(b[off:], name)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestCommitOverlay(t *testing.T) {
	testenv.NeedRoot(t, "confined qemu-img")
	ctx := context.Background()
	overlay, disk := overlayWithWrite(t, t.TempDir())
	if err := commitOverlay(ctx, "qemu-img", overlay, disk); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(disk)
	if !bytes.Equal(b[:64<<10], bytes.Repeat([]byte{0xab}, 64<<10)) || b[64<<10] != 0 {
		t.Fatal("the overlay's write did not reach the disk")
	}
}

// TestCommitRefusesRenamedBacking: a build VM's overlay whose header was
// rewritten to name a host file is refused, and that file is untouched.
// Today's plain `qemu-img commit` writes into the named file.
func TestCommitRefusesRenamedBacking(t *testing.T) {
	testenv.NeedRoot(t, "confined qemu-img")
	ctx := context.Background()
	dir := t.TempDir()
	overlay, disk := overlayWithWrite(t, dir)
	victim := filepath.Join(dir, "host-secret")
	orig := append([]byte("precious host data\n"), make([]byte, 1<<20)...)
	if err := os.WriteFile(victim, orig, 0o600); err != nil {
		t.Fatal(err)
	}
	renameBacking(t, overlay, victim)

	// What the old code path did, on a copy: the attack is real.
	old := filepath.Join(dir, "old")
	os.Mkdir(old, 0o700)
	oldOverlay, oldVictim := filepath.Join(old, "disk.qcow2"), filepath.Join(old, "victim")
	b, _ := os.ReadFile(overlay)
	os.WriteFile(oldOverlay, b, 0o600)
	os.WriteFile(oldVictim, orig, 0o600)
	renameBacking(t, oldOverlay, oldVictim)
	run(t, "qemu-img", "commit", "-q", "-d", "-f", "qcow2", oldOverlay)
	if got, _ := os.ReadFile(oldVictim); bytes.Equal(got, orig) {
		t.Fatal("plain qemu-img commit left the named file alone: the test proves nothing")
	}

	err := commitOverlay(ctx, "qemu-img", overlay, disk)
	if !errors.Is(err, qcow2.ErrChain) || !strings.Contains(err.Error(), `names backing file "`+victim+`", expected "`+disk+`": refusing`) {
		t.Fatalf("err = %v", err)
	}
	if got, _ := os.ReadFile(victim); !bytes.Equal(got, orig) {
		t.Fatal("the host file named in the header was written")
	}
	if got, _ := os.ReadFile(disk); !bytes.Equal(got, make([]byte, 1<<20)) {
		t.Fatal("the disk changed")
	}
}

// TestCopyTemplateChecksChain: a cached template's disk.qcow2 (written by
// a VM's QEMU) is copied with its header pointed at the new root and a
// chain.json naming its own files; one whose header names another file
// than the template's root is refused, and that file is untouched.
func TestCopyTemplateChecksChain(t *testing.T) {
	testenv.NeedRoot(t, "confined qemu-img")
	ctx := context.Background()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	os.Mkdir(src, 0o700)
	srcRoot := filepath.Join(dir, "src-root.ext4")
	os.WriteFile(srcRoot, make([]byte, 1<<20), 0o600)
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", srcRoot, "-F", "raw", filepath.Join(src, "disk.qcow2"))
	os.WriteFile(filepath.Join(src, "state"), []byte("state"), 0o600)
	os.WriteFile(filepath.Join(src, chainFile), []byte(`[{"path":"/stale","format":"qcow2"}]`), 0o600)
	newRoot := filepath.Join(dir, "new-root.ext4")
	os.WriteFile(newRoot, make([]byte, 1<<20), 0o600)

	d := &Driver{cfg: Config{QEMUImg: "qemu-img"}, log: slog.Default()}
	os.WriteFile(filepath.Join(src, "template.json"), []byte(`{"memory_mib":128}`), 0o600)
	dst := filepath.Join(dir, "dst")
	tm, err := d.CopyTemplate(ctx, vmm.TemplateCopy{Src: src, SrcRoot: srcRoot, Dst: dst, Root: newRoot})
	if err != nil {
		t.Fatal(err)
	}
	if tm.Dir != dst || tm.MemoryMiB != 128 {
		t.Fatalf("copy = %+v", tm)
	}
	if _, err := d.CopyTemplate(ctx, vmm.TemplateCopy{Src: src, SrcRoot: srcRoot, Dst: dst, Root: newRoot}); !errors.Is(err, errdefs.ErrConflict) {
		t.Fatalf("copy onto an existing directory: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dst, "template.json")); err != nil {
		t.Fatalf("a refused copy removed the existing directory: %v", err)
	}
	if err := qcow2.CheckChain([]string{filepath.Join(dst, "overlay.qcow2"), filepath.Join(dst, "disk.qcow2"), newRoot}); err != nil {
		t.Fatalf("copied chain: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(dst, chainFile)); !strings.Contains(string(b), filepath.Join(dst, "disk.qcow2")) || !strings.Contains(string(b), newRoot) {
		t.Fatalf("chain.json: %s", b)
	}

	victim := filepath.Join(dir, "host-file")
	orig := []byte("host data")
	os.WriteFile(victim, orig, 0o600)
	renameBacking(t, filepath.Join(src, "disk.qcow2"), victim)
	_, err = d.CopyTemplate(ctx, vmm.TemplateCopy{Src: src, SrcRoot: srcRoot, Dst: filepath.Join(dir, "dst2"), Root: newRoot})
	if !errors.Is(err, qcow2.ErrChain) || !strings.Contains(err.Error(), "refusing") {
		t.Fatalf("err = %v", err)
	}
	if b, _ := os.ReadFile(victim); !bytes.Equal(b, orig) {
		t.Fatal("host file changed")
	}
	if _, err := os.Stat(filepath.Join(dir, "dst2")); err == nil {
		t.Fatal("a template was made from a refused chain")
	}
}

// TestCommitDisk: the driver commits a stopped booted VM's overlay into
// the root disk it recorded, and refuses a running VM, a clone and an
// unknown id without writing anything.
func TestCommitDisk(t *testing.T) {
	testenv.NeedRoot(t, "confined qemu-img")
	ctx := context.Background()
	dir := t.TempDir()
	overlay, disk := overlayWithWrite(t, dir)
	d := &Driver{cfg: Config{QEMUImg: "qemu-img"}, log: slog.Default(), vms: map[string]*vm{}}
	add := func(id string, m meta) {
		m.ID = id
		d.vms[id] = &vm{d: d, id: id, dir: filepath.Dir(overlay), log: d.log, meta: m}
	}
	booted := []layer{{Path: disk, Format: "raw"}}
	add("running", meta{State: vmm.StateRunning, Chain: booted})
	add("clone", meta{State: vmm.StateStopped, Template: dir, Chain: []layer{{Path: overlay, Format: "qcow2"}, {Path: disk, Format: "raw"}}})
	add("stopped", meta{State: vmm.StateStopped, Chain: booted})
	for _, c := range []struct {
		id   string
		want error
	}{{"running", errdefs.ErrConflict}, {"clone", errdefs.ErrInvalid}, {"nope", errdefs.ErrNotFound}} {
		if err := d.CommitDisk(ctx, c.id); !errors.Is(err, c.want) {
			t.Errorf("CommitDisk(%s) = %v, want %v", c.id, err, c.want)
		}
	}
	if b, _ := os.ReadFile(disk); !bytes.Equal(b, make([]byte, 1<<20)) {
		t.Fatal("a refused commit wrote the disk")
	}
	if err := d.CommitDisk(ctx, "stopped"); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(disk); !bytes.Equal(b[:64<<10], bytes.Repeat([]byte{0xab}, 64<<10)) {
		t.Fatal("the overlay's write did not reach the disk")
	}
}
