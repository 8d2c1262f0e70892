//go:build linux

package rootfs

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/testenv"
)

func needFUSE(t *testing.T) {
	t.Helper()
	testenv.NeedRoot(t, "mount")
	if _, err := lookTool("fuse2fs"); err != nil {
		t.Skip("fuse2fs not installed (make setup)")
	}
}

func testImage(t *testing.T) string {
	t.Helper()
	src := t.TempDir()
	must(t, os.MkdirAll(filepath.Join(src, "etc"), 0o755))
	must(t, os.WriteFile(filepath.Join(src, "etc/hostname"), []byte("kiln\n"), 0o644))
	img := filepath.Join(t.TempDir(), "r.ext4")
	must(t, BuildExt4(context.Background(), src, img, 32<<20, "t"))
	return img
}

// TestMountWritesBack: what is written through a writable mount is in the
// image after Close, and the image checks clean.
func TestMountWritesBack(t *testing.T) {
	needFUSE(t)
	ctx := context.Background()
	img := testImage(t)
	err := Edit(ctx, img, func(dir string) error {
		if err := os.MkdirAll(filepath.Join(dir, "srv/app"), 0o755); err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dir, "srv/app/data"), bytes.Repeat([]byte("x"), 3<<20), 0o600)
	})
	must(t, err)
	fi, err := Stat(ctx, img, "/srv/app/data")
	must(t, err)
	if fi.Size != 3<<20 || fi.Mode&0o777 != 0o600 {
		t.Fatalf("written file: %+v", fi)
	}
	if out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck after the mount: %v\n%s", err, out)
	}
}

func TestMountReadOnly(t *testing.T) {
	needFUSE(t)
	ctx := context.Background()
	img := testImage(t)
	before, _ := os.ReadFile(img)
	m, err := Mount(ctx, img, t.TempDir(), true)
	must(t, err)
	if b, err := os.ReadFile(filepath.Join(m.Dir, "etc/hostname")); err != nil || string(b) != "kiln\n" {
		t.Errorf("read through the mount: %q, %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(m.Dir, "etc/new"), nil, 0o644); err == nil {
		t.Error("wrote through a read-only mount")
	}
	must(t, m.Close())
	if after, _ := os.ReadFile(img); !bytes.Equal(before, after) {
		t.Error("a read-only mount changed the image")
	}
}

func TestMountErrors(t *testing.T) {
	needFUSE(t)
	ctx := context.Background()
	junk := filepath.Join(t.TempDir(), "junk")
	must(t, os.WriteFile(junk, bytes.Repeat([]byte{0xAA}, 1<<20), 0o644))
	_, err := Mount(ctx, junk, t.TempDir(), true)
	if err == nil || !strings.Contains(err.Error(), "fuse2fs") {
		t.Fatalf("mounting a file that is no ext4: %v", err)
	}

	// Cancelling the context kills fuse2fs; Close still tidies up.
	img := testImage(t)
	cctx, cancel := context.WithCancel(ctx)
	dir := t.TempDir()
	m, err := Mount(cctx, img, dir, false)
	must(t, err)
	cancel()
	select {
	case <-m.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("fuse2fs still running after the context ended")
	}
	m.Close()
	if d, _ := devOf(dir); d == devOfParent(t, dir) {
		return
	}
	t.Fatal("mount still there after Close")
}

func devOfParent(t *testing.T, dir string) uint64 {
	d, err := devOf(filepath.Dir(dir))
	must(t, err)
	return d
}

// TestUnmountUnder: a mount left inside a folder is detached, so removing
// the folder cannot delete files in the image.
func TestUnmountUnder(t *testing.T) {
	needFUSE(t)
	ctx := context.Background()
	img := testImage(t)
	work := t.TempDir()
	mnt := filepath.Join(work, "a", "mnt")
	must(t, os.MkdirAll(mnt, 0o700))
	m, err := Mount(ctx, img, mnt, false)
	must(t, err)
	defer m.Close()
	must(t, UnmountUnder(work))
	must(t, os.RemoveAll(work))
	if _, err := Stat(ctx, img, "/etc/hostname"); err != nil {
		t.Fatalf("file in the image gone after removing the folder: %v", err)
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	if got := unescapeMountinfo(`/tmp/a\040b\134c`); got != `/tmp/a b\c` {
		t.Fatalf("got %q", got)
	}
}
