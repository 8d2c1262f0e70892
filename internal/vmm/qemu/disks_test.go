//go:build linux

package qemu

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// TestExtraDisks checks BootSpec.Disks: refused when malformed, and
// handed to QEMU as descriptors after the TAP's, opened as raw, never
// by path.
func TestExtraDisks(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "cache.ext4")
	os.WriteFile(f, []byte("x"), 0o600)
	bad := []struct {
		name  string
		disks []vmm.Disk
	}{
		{"not a file", []vmm.Disk{{Path: dir, Serial: "a"}}},
		{"missing", []vmm.Disk{{Path: filepath.Join(dir, "nope"), Serial: "a"}}},
		{"bad serial", []vmm.Disk{{Path: f, Serial: "A,b=c"}}},
		{"empty serial", []vmm.Disk{{Path: f}}},
		{"duplicate serial", []vmm.Disk{{Path: f, Serial: "a"}, {Path: f, Serial: "a"}}},
		{"too many", make([]vmm.Disk, maxExtraDisks+1)},
	}
	for _, tt := range bad {
		if _, err := checkExtraDisks(tt.disks); !errors.Is(err, errdefs.ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", tt.name, err)
		}
	}
	disks, err := checkExtraDisks([]vmm.Disk{{Path: f, Serial: "kiln-mount-0"}, {Path: f, Serial: "kiln-mount-1", ReadOnly: true}})
	if err != nil {
		t.Fatal(err)
	}
	v := &vm{meta: meta{Chain: []layer{{Path: "/r/root.ext4", Format: "raw"}}, Net: &vmm.NetAttachment{}, Disks: disks}}
	// Chain: overlay rw+ro (3, 4), root (5); TAP 6; disk 0 rw+ro (7, 8); disk 1 ro (9).
	got := strings.Join(v.extraDiskArgs("pci"), " ")
	for _, want := range []string{
		"-add-fd fd=7,set=64", "-add-fd fd=8,set=64", "-add-fd fd=9,set=65",
		`"driver":"raw","file":"xdisk0-file"`, `"filename":"/dev/fdset/65","node-name":"xdisk1-file","read-only":true`,
		"virtio-blk-pci,drive=xdisk0,serial=kiln-mount-0", "virtio-blk-pci,drive=xdisk1,serial=kiln-mount-1",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("args lack %s:\n%s", want, got)
		}
	}
	if strings.Contains(got, dir) {
		t.Errorf("args name a path:\n%s", got)
	}
	files, err := v.openExtraDisks()
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 3 {
		t.Errorf("%d descriptors, want 3", len(files))
	}
	for _, f := range files {
		f.Close()
	}
}
