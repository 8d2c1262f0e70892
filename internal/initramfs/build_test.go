package initramfs

import (
	"bytes"
	"compress/gzip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestBuild(t *testing.T) {
	dir := t.TempDir()
	agent := filepath.Join(dir, "agent")
	if err := os.WriteFile(agent, []byte("#!agent binary"), 0o755); err != nil {
		t.Fatal(err)
	}
	mods := filepath.Join(dir, "mods")
	os.Mkdir(mods, 0o755)
	for _, m := range []string{"virtio_blk.ko", "failover.ko", "odd-size.ko"} {
		os.WriteFile(filepath.Join(mods, m), bytes.Repeat([]byte(m), 3), 0o644)
	}
	tests := []struct {
		name     string
		modules  []string
		wantErr  bool
		wantList string
	}{
		{name: "modules in order", modules: []string{"virtio_blk.ko", "failover", "odd-size.ko"}, wantList: "virtio_blk.ko\nfailover.ko\nodd-size.ko\n"},
		{name: "no modules", modules: nil, wantList: "\n"},
		{name: "comments and blanks skipped", modules: []string{"# c", "", "failover.ko"}, wantList: "failover.ko\n"},
		{name: "missing module", modules: []string{"nope.ko"}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			err := Build(&buf, agent, mods, tt.modules)
			if (err != nil) != tt.wantErr {
				t.Fatalf("Build: %v, wantErr %v", err, tt.wantErr)
			}
			if err != nil {
				return
			}
			zr, err := gzip.NewReader(&buf)
			if err != nil {
				t.Fatal(err)
			}
			var raw bytes.Buffer
			if _, err := raw.ReadFrom(zr); err != nil {
				t.Fatal(err)
			}
			var plain bytes.Buffer
			if err := BuildUncompressed(&plain, agent, mods, tt.modules); err != nil {
				t.Fatalf("BuildUncompressed: %v", err)
			}
			if !bytes.Equal(plain.Bytes(), raw.Bytes()) {
				t.Fatal("BuildUncompressed differs from Build's archive")
			}
			if raw.Len()%4 != 0 {
				t.Errorf("archive length %d is not 4-byte aligned", raw.Len())
			}
			// Read it back with the real cpio tool, as the kernel would.
			list := exec.Command("cpio", "-itv", "--quiet")
			list.Stdin = bytes.NewReader(raw.Bytes())
			out, err := list.CombinedOutput()
			if err != nil {
				t.Fatalf("cpio -itv: %v\n%s", err, out)
			}
			for _, want := range []string{" init", " dev/console", "lib/modules/kiln/modules.list", "newroot"} {
				if !strings.Contains(string(out), want) {
					t.Errorf("archive lacks %q:\n%s", want, out)
				}
			}
			if !strings.Contains(string(out), "crw-------") {
				t.Errorf("dev/console is not a char device:\n%s", out)
			}
			ex := t.TempDir()
			extract := exec.Command("cpio", "-id", "--quiet", "--no-absolute-filenames", "init", "lib/modules/kiln/*")
			extract.Dir = ex
			extract.Stdin = bytes.NewReader(raw.Bytes())
			if out, err := extract.CombinedOutput(); err != nil {
				t.Fatalf("cpio -id: %v\n%s", err, out)
			}
			if b, err := os.ReadFile(filepath.Join(ex, "init")); err != nil || string(b) != "#!agent binary" {
				t.Errorf("init: %q %v", b, err)
			}
			if fi, err := os.Stat(filepath.Join(ex, "init")); err != nil || fi.Mode().Perm() != 0o755 {
				t.Errorf("init mode: %v", fi.Mode())
			}
			if b, err := os.ReadFile(filepath.Join(ex, "lib/modules/kiln/modules.list")); err != nil || string(b) != tt.wantList {
				t.Errorf("modules.list %q, want %q (%v)", b, tt.wantList, err)
			}
			for _, m := range strings.Fields(tt.wantList) {
				b, err := os.ReadFile(filepath.Join(ex, "lib/modules/kiln", m))
				if err != nil || !bytes.Equal(b, bytes.Repeat([]byte(m), 3)) {
					t.Errorf("module %s: %q %v", m, b, err)
				}
			}
		})
	}
}
