//go:build linux

package base

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/rootfs"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

// diskRunner stands in for the build VM (the VM engine is not part of
// this package): it edits the root on the disk (mounted) with a Go
// function, so the disk handling is real.
type diskRunner struct {
	fn    func(root string, step image.RunStep) error
	calls int
}

func (d *diskRunner) Run(ctx context.Context, disk string, step image.RunStep, log io.Writer) (string, error) {
	d.calls++
	return disk, rootfs.Edit(ctx, disk, func(dir string) error { return d.fn(dir, step) })
}

// TestBuildOnDebian12 runs a Dockerfile on the managed base with a stand-in
// runner and reports how long the host-side work takes on a real root.
func TestBuildOnDebian12(t *testing.T) {
	testenv.NeedRoot(t, "namespaces, mounts or other users")
	if _, err := exec.LookPath("debootstrap"); err != nil {
		t.Skip("debootstrap not installed (make setup)")
	}
	if testing.Short() {
		t.Skip("slow")
	}
	ctx := context.Background()
	bctx := t.TempDir()
	os.WriteFile(filepath.Join(bctx, "Dockerfile"), []byte(`FROM debian:bookworm-slim
RUN useradd app
WORKDIR /srv
COPY app.py .
USER app
CMD ["python3", "app.py"]
`), 0o644)
	os.WriteFile(filepath.Join(bctx, "app.py"), []byte("print('hi')\n"), 0o644)
	runner := &diskRunner{fn: func(root string, step image.RunStep) error {
		// What "useradd app" would do.
		f, err := os.OpenFile(filepath.Join(root, "etc/passwd"), os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = fmt.Fprintln(f, "app:x:1000:1000::/home/app:/bin/sh")
		return err
	}}
	b := &image.Builder{DataDir: t.TempDir(), Runner: runner, Bases: &Resolver{Managed: &Managed{DataDir: sharedDataDir()}}}
	out := filepath.Join(t.TempDir(), "root.ext4")
	start := time.Now()
	res, err := b.Build(ctx, image.Request{Account: "test", ContextDir: bctx, Output: out})
	if err != nil {
		t.Fatal(err)
	}
	first := time.Since(start)
	for _, s := range res.Steps {
		t.Logf("%-28s cached=%-5v %v", s.Instruction, s.Cached, s.Duration.Round(time.Millisecond))
	}
	fi, err := rootfs.Stat(ctx, out, "/usr/bin/su")
	if err != nil || fi.Mode&04000 == 0 {
		t.Fatalf("su lost setuid through the disk round trip: %+v %v", fi, err)
	}
	if got, _ := rootfs.ReadFile(ctx, out, "/srv/app.py", 1<<20); string(got) != "print('hi')\n" {
		t.Fatalf("app.py = %q", got)
	}
	start = time.Now()
	if _, err := b.Build(ctx, image.Request{Account: "test", ContextDir: bctx, Output: out}); err != nil {
		t.Fatal(err)
	}
	again := time.Since(start)
	t.Logf("first build %v, unchanged rebuild %v", first.Round(time.Millisecond), again.Round(time.Millisecond))
	if runner.calls != 1 {
		t.Fatalf("RUN executed %d times, want 1", runner.calls)
	}
}
