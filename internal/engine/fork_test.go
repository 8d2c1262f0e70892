//go:build linux

package engine

import (
	"os"
	"path/filepath"
	"testing"
)

// TestOwnBytes: a snapshot's own storage is its copied files; the memory
// file is counted as memory and a layer linked from another template as
// that template's.
func TestOwnBytes(t *testing.T) {
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
	n, err := ownBytes(dir)
	if err != nil || n != 320 {
		t.Fatalf("ownBytes = %d, %v; want 320", n, err)
	}
}
