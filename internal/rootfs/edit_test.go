//go:build linux

package rootfs

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/testenv"
)

func TestEdit(t *testing.T) {
	testenv.NeedRoot(t, "confined host tools switch uids")
	ctx := context.Background()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	os.MkdirAll(filepath.Join(src, "etc"), 0o755)
	os.MkdirAll(filepath.Join(src, "full"), 0o755)
	os.WriteFile(filepath.Join(src, "full", "f"), []byte("x"), 0o644)
	long := "/" + strings.Repeat("t", 80)
	os.Symlink(long, filepath.Join(src, "etc", "long"))
	img := filepath.Join(dir, "img.ext4")
	if err := BuildExt4(ctx, src, img, 0, "edit"); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		do    func() error
		check func(t *testing.T)
	}{
		{
			name: "write file with mode and owner",
			do:   func() error { return WriteFile(ctx, img, "/etc/f", []byte("hello\n"), 0o640, 12, 34) },
			check: func(t *testing.T) {
				fi, err := Stat(ctx, img, "/etc/f")
				if err != nil || fi.Mode != syscall.S_IFREG|0o640 || fi.UID != 12 || fi.GID != 34 || fi.Size != 6 {
					t.Errorf("stat = %+v, %v", fi, err)
				}
				if b, _ := ReadFile(ctx, img, "/etc/f", 1<<20); string(b) != "hello\n" {
					t.Errorf("content %q", b)
				}
			},
		},
		{
			name: "replace file",
			do:   func() error { return WriteFile(ctx, img, "/etc/f", []byte("bye\n"), 0o644, 0, 0) },
			check: func(t *testing.T) {
				if b, _ := ReadFile(ctx, img, "/etc/f", 1<<20); string(b) != "bye\n" {
					t.Errorf("content %q", b)
				}
			},
		},
		{
			name: "symlink and readlink",
			do:   func() error { return Symlink(ctx, img, "/etc/l", "../run/x") },
			check: func(t *testing.T) {
				if l, err := Readlink(ctx, img, "/etc/l"); err != nil || l != "../run/x" {
					t.Errorf("readlink = %q, %v", l, err)
				}
				if l, err := Readlink(ctx, img, "/etc/long"); err != nil || l != long {
					t.Errorf("readlink of a long link = %q, %v", l, err)
				}
			},
		},
		{
			name: "remove file and missing path",
			do: func() error {
				if err := Remove(ctx, img, "/etc/f"); err != nil {
					return err
				}
				return Remove(ctx, img, "/no/such")
			},
			check: func(t *testing.T) {
				if _, err := Stat(ctx, img, "/etc/f"); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("/etc/f still there: %v", err)
				}
			},
		},
		{
			name: "non-empty directory is refused",
			do: func() error {
				if err := Remove(ctx, img, "/full"); err == nil {
					return errors.New("removed a non-empty directory")
				}
				return nil
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.do(); err != nil {
				t.Fatal(err)
			}
			if tt.check != nil {
				tt.check(t)
			}
		})
	}
	if ok, err := Clean(ctx, img); err != nil || !ok {
		t.Errorf("Clean = %v, %v after edits", ok, err)
	}
}
