//go:build linux

package engine

import (
	"os"
	"path/filepath"
	"testing"
)

// TestDiskBytes: a snapshot's disk is every file it keeps, the layers
// linked from its source image included (they outlive the source); the
// memory file is counted as memory.
func TestDiskBytes(t *testing.T) {
	src, dir := t.TempDir(), t.TempDir()
	write := func(p string, n int) {
		if err := os.WriteFile(p, make([]byte, n), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(src, "root.qcow2"), 1000)
	if err := os.Link(filepath.Join(src, "root.qcow2"), filepath.Join(dir, "layer1.qcow2")); err != nil {
		t.Fatal(err)
	}
	write(filepath.Join(dir, "disk.qcow2"), 300)
	write(filepath.Join(dir, "state"), 20)
	write(filepath.Join(dir, "mem"), 4096)
	if err := os.Symlink("disk.qcow2", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	n, err := diskBytes(dir)
	if err != nil || n != 1320 {
		t.Fatalf("diskBytes = %d, %v; want 1320", n, err)
	}
	// The source goes; the layer still counts once, with the snapshot.
	if err := os.Remove(filepath.Join(src, "root.qcow2")); err != nil {
		t.Fatal(err)
	}
	if n, err := diskBytes(dir); err != nil || n != 1320 {
		t.Fatalf("diskBytes after the source went = %d, %v; want 1320", n, err)
	}
}
