//go:build linux

package rootfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/hosttool"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

func TestBuildExt4RoundTrip(t *testing.T) {
	testenv.NeedRoot(t, "confined host tools switch uids")
	ctx := context.Background()
	src := t.TempDir()
	must(t, os.MkdirAll(filepath.Join(src, "etc/app"), 0o755))
	must(t, os.WriteFile(filepath.Join(src, "etc/app/config"), []byte("hello ext4\n"), 0o640))
	must(t, os.Symlink("app/config", filepath.Join(src, "etc/link")))
	if os.Geteuid() == 0 {
		must(t, os.Lchown(filepath.Join(src, "etc/app/config"), 1000, 1001))
	}
	img := filepath.Join(t.TempDir(), "root.ext4")
	if err := BuildExt4(ctx, src, img, 0, "kiln-root"); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		path    string
		want    string
		wantErr error
	}{
		{name: "regular file", path: "/etc/app/config", want: "hello ext4\n"},
		{name: "missing file", path: "/etc/nope", wantErr: fs.ErrNotExist},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ReadFile(ctx, img, tt.path, 1<<20)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tt.want {
				t.Fatalf("got %q, want %q", got, tt.want)
			}
		})
	}
	fi, err := Stat(ctx, img, "/etc/app/config")
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode&0o777 != 0o640 || fi.Size != 11 {
		t.Fatalf("stat = %+v", fi)
	}
	if os.Geteuid() == 0 && (fi.UID != 1000 || fi.GID != 1001) {
		t.Fatalf("owner = %d:%d, want 1000:1001", fi.UID, fi.GID)
	}
	root, err := Stat(ctx, img, "/")
	if err != nil {
		t.Fatal(err)
	}
	if root.UID != 0 || root.GID != 0 {
		t.Fatalf("root owner = %d:%d", root.UID, root.GID)
	}
	if target, err := Readlink(ctx, img, "/etc/link"); err != nil || target != "app/config" {
		t.Fatalf("symlink = %q, %v", target, err)
	}
}

func TestBuildExt4Errors(t *testing.T) {
	ctx := context.Background()
	src := t.TempDir()
	must(t, os.WriteFile(filepath.Join(src, "big"), make([]byte, 8<<20), 0o644))
	tests := []struct {
		name  string
		src   string
		size  int64
		label string
	}{
		{name: "label too long", src: src, label: "this-label-is-far-too-long"},
		{name: "missing source", src: filepath.Join(src, "nope")},
		{name: "source is a file", src: filepath.Join(src, "big")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "x.ext4")
			if err := BuildExt4(ctx, tt.src, img, tt.size, tt.label); err == nil {
				t.Fatal("want error")
			}
			if _, err := os.Stat(img); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("image left behind: %v", err)
			}
			if _, err := os.Stat(img + ".tmp"); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("temp image left behind: %v", err)
			}
		})
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestMountShowsWhatTheImageHolds reads an image through fuse2fs: special
// mode bits, and a directory Mkdir made in place.
func TestMountShowsWhatTheImageHolds(t *testing.T) {
	testenv.NeedRoot(t, "own files as other users")
	ctx := context.Background()
	src := t.TempDir()
	must(t, os.MkdirAll(filepath.Join(src, "usr/bin"), 0o755))
	su := filepath.Join(src, "usr/bin/su")
	must(t, os.WriteFile(su, []byte("#!"), 0o755))
	must(t, os.Chown(su, 0, 0))
	must(t, os.Chmod(su, 0o755|os.ModeSetuid))
	must(t, os.Mkdir(filepath.Join(src, "tmp"), 0o777))
	must(t, os.Chmod(filepath.Join(src, "tmp"), 0o777|os.ModeSticky))
	wall := filepath.Join(src, "usr/bin/wall")
	must(t, os.WriteFile(wall, []byte("#!"), 0o755))
	must(t, os.Chown(wall, 0, 5))
	must(t, os.Chmod(wall, 0o755|os.ModeSetgid))
	img := filepath.Join(t.TempDir(), "r.ext4")
	must(t, BuildExt4(ctx, src, img, 0, ""))
	must(t, Mkdir(ctx, img, "/srv/app/data"))
	out := t.TempDir()
	m, err := Mount(ctx, img, out, true)
	must(t, err)
	defer func() { must(t, m.Close()) }()
	tests := []struct {
		path string
		want os.FileMode
	}{
		{"usr/bin/su", os.ModeSetuid},
		{"usr/bin/wall", os.ModeSetgid},
		{"tmp", os.ModeSticky},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			fi, err := os.Stat(filepath.Join(out, tt.path))
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode()&tt.want == 0 {
				t.Fatalf("mode = %v, want %v set", fi.Mode(), tt.want)
			}
		})
	}
	if fi, err := os.Stat(filepath.Join(out, "srv/app/data")); err != nil || !fi.IsDir() {
		t.Fatalf("Mkdir result: %v", err)
	}
}

// TestReadFileBounded: a build can leave a sparse 4 TiB file where kiln
// reads a small one; ReadFile refuses it from the inode's size, at once,
// without reading, and the tools that looked at it ran as the tools' uid.
func TestReadFileBounded(t *testing.T) {
	testenv.NeedRoot(t, "confined host tools switch uids")
	ctx := context.Background()
	src := t.TempDir()
	must(t, os.MkdirAll(filepath.Join(src, "etc"), 0o755))
	must(t, os.WriteFile(filepath.Join(src, "etc/passwd"), []byte("root:x:0:0::/root:/bin/sh\n"), 0o644))
	img := filepath.Join(t.TempDir(), "root.ext4")
	must(t, BuildExt4(ctx, src, img, 0, ""))
	if b, err := ReadFile(ctx, img, "/etc/passwd", 1<<20); err != nil || !strings.HasPrefix(string(b), "root:") {
		t.Fatalf("small passwd: %q %v", b, err)
	}
	// What `truncate -s 4T /etc/passwd` in a build VM leaves.
	must(t, edit(ctx, img, `sif "/etc/passwd" size 4398046511104`))
	start := time.Now()
	_, err := ReadFile(ctx, img, "/etc/passwd", 1<<20)
	if !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), "/etc/passwd in the image is 4398046511104 bytes; kiln reads at most 1 MiB") {
		t.Fatalf("err = %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("refusing took %s", d)
	}
	if _, err := ReadFile(ctx, img, "/etc", 1<<20); err == nil {
		t.Fatal("a directory read as a file")
	}
	// The image went to the tools' group, which is how the confined
	// debugfs opened it.
	var st syscall.Stat_t
	must(t, syscall.Stat(img, &st))
	if os.Geteuid() == 0 && st.Gid != hosttool.ID {
		t.Fatalf("image group %d, want %d", st.Gid, hosttool.ID)
	}
}

// TestEnsureFreeTrustsTheFile: a superblock rewritten to claim a huge
// block count must not make kiln grow the disk file to match; the file's
// own size bounds the claim.
func TestEnsureFreeTrustsTheFile(t *testing.T) {
	testenv.NeedRoot(t, "confined host tools switch uids")
	ctx := context.Background()
	src := t.TempDir()
	must(t, os.WriteFile(filepath.Join(src, "f"), []byte("x"), 0o644))
	img := filepath.Join(t.TempDir(), "root.ext4")
	// Not a whole number of groups: the last one is partial.
	must(t, BuildExt4(ctx, src, img, 36<<20, ""))
	must(t, EnsureFree(ctx, img, 40<<20, 100))
	before, err := os.Stat(img)
	must(t, err)
	if before.Size() <= 36<<20 {
		t.Fatalf("grown to %d bytes only", before.Size())
	}
	// What a guest can write and e2fsprogs still opens: a block count
	// that fills the last group, beyond the end of the disk file.
	h, err := readHeader(ctx, img)
	must(t, err)
	bs, bc, bpg := h.num("Block size"), h.num("Block count"), h.num("Blocks per group")
	forged := (bc + bpg - 1) / bpg * bpg
	if forged*bs <= before.Size() {
		t.Fatalf("the last group is full (%d blocks of %d): nothing to forge", bc, bpg)
	}
	must(t, edit(ctx, img, fmt.Sprintf("ssv blocks_count %d", forged)))
	err = EnsureFree(ctx, img, 200<<20, 100)
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("the file system claims %d blocks of %d bytes", forged, bs)) {
		t.Fatalf("err = %v", err)
	}
	after, err := os.Stat(img)
	must(t, err)
	if after.Size() != before.Size() {
		t.Fatalf("disk file went from %d to %d bytes", before.Size(), after.Size())
	}
}

// TestBuildExt4Cancelled: a build given up on while mkfs runs says so
// (context.Canceled), not that mkfs was killed, and leaves no image. A
// stand-in mkfs.ext4 that waits makes the moment certain: this is about
// BuildExt4's error, not mkfs.
func TestBuildExt4Cancelled(t *testing.T) {
	bin := t.TempDir()
	must(t, os.WriteFile(filepath.Join(bin, "mkfs.ext4"), []byte("#!/bin/sh\nexec sleep 30\n"), 0o755))
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	img := filepath.Join(t.TempDir(), "x.ext4")
	err := BuildExt4(ctx, t.TempDir(), img, 0, "")
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if _, serr := os.Stat(img); serr == nil {
		t.Error("a cancelled build left an image")
	}
}
