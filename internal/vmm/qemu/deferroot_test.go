//go:build linux

package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// TestDeferredRootClonesOnOwnDisks checks the warm start of build steps:
// a VM booted with DeferRoot on placeholder disks is snapshotted, and each
// clone runs on a root and an extra disk of its own, seeing their real
// sizes and contents (never the placeholders'), and commits like a booted
// VM.
func TestDeferredRootClonesOnOwnDisks(t *testing.T) {
	dir := shortDir(t)
	d := newDriver(t, dir)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	placeholder := func(name string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	if _, err := d.Boot(ctx, vmm.BootSpec{ID: "warm", RootDisk: placeholder("root0"), MemoryMiB: 256, DeferRoot: true,
		Disks: []vmm.Disk{{Path: placeholder("disk0"), Serial: "kiln-warm-0"}}}); err != nil {
		t.Fatal(err)
	}
	tmpl := filepath.Join(dir, "tmpl")
	tp, err := d.Snapshot(ctx, "warm", tmpl)
	if err != nil {
		t.Fatal(err)
	}
	if !tp.DeferredRoot || tp.ExtraDisks != 1 {
		t.Fatalf("template %+v: want a deferred root with 1 extra disk", tp)
	}

	start := func(id, content string) (root string) {
		t.Helper()
		root = filepath.Join(dir, id+".ext4")
		if out, err := exec.Command("cp", "--sparse=always", env.RootDisk, root).CombinedOutput(); err != nil {
			t.Fatalf("copying the root: %v: %s", err, out)
		}
		disk := filepath.Join(dir, id+".disk")
		if err := os.WriteFile(disk, append([]byte(content), make([]byte, 3<<20)...), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Clone(ctx, vmm.CloneSpec{ID: id, Template: tmpl, RootDisk: root, ScratchDisk: true,
			Disks: []vmm.Disk{{Path: disk, Serial: "kiln-mount-0", ReadOnly: true}}}); err != nil {
			t.Fatal(err)
		}
		return root
	}
	rootA := start("own-a", "disk-a")
	st, _ := os.Stat(rootA)
	got := mustSh(t, d, "own-a", "hostname; cat /sys/block/vda/size /sys/block/vdb/size /sys/block/vdb/serial; echo; head -c 6 /dev/vdb; echo; echo a > /marker")
	want := fmt.Sprintf("own-a\n%d\n%d\nkiln-mount-0\ndisk-a", st.Size()/512, (3<<20+6+511)/512)
	if got != want {
		t.Errorf("clone a sees\n%s\nwant\n%s", got, want)
	}
	if err := d.Stop(ctx, "own-a"); err != nil {
		t.Fatal(err)
	}
	if err := d.CommitDisk(ctx, "own-a"); err != nil {
		t.Fatalf("committing a clone on its own disk: %v", err)
	}

	start("own-b", "disk-b")
	if got := mustSh(t, d, "own-b", "head -c 6 /dev/vdb; test -e /marker && echo leaked; true"); got != "disk-b" {
		t.Errorf("clone b sees %q, want disk-b and no marker of a", got)
	}

	for name, spec := range map[string]vmm.CloneSpec{
		"without a root disk": {ID: "bad-1", Template: tmpl},
		"other disk count":    {ID: "bad-2", Template: tmpl, RootDisk: rootA},
	} {
		if _, err := d.Clone(ctx, spec); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
}
