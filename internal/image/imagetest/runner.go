//go:build linux

// Package imagetest holds the conformance suite for image.Runner: every
// implementation (the QEMU build VM now, Firecracker later) must pass it.
// Call it from the implementation's own test:
//
//	func TestRunnerConformance(t *testing.T) {
//		imagetest.RunnerConformance(t, myRunner, os.Getenv("KILN_DATA_DIR"))
//	}
package imagetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/image/base"
	"github.com/kiln-sandbox/kiln/internal/rootfs"
)

// RunnerConformance runs RUN steps through r on disks made from the
// managed debian-12 base (built once into dataDir/base if missing; ""
// means /var/lib/kiln) and checks the contract written on image.Runner.
func RunnerConformance(t *testing.T, r image.Runner, dataDir string) {
	t.Helper()
	if dataDir == "" {
		dataDir = "/var/lib/kiln"
	}
	ctx := context.Background()
	v, err := (&base.Managed{DataDir: dataDir}).Ensure(ctx, base.Debian12)
	if err != nil {
		t.Fatalf("managed base: %v", err)
	}
	// One pristine disk; each case works on its own copy.
	work := t.TempDir()
	pristine := filepath.Join(work, "pristine.ext4")
	used, inodes, err := rootfs.DiskUsage(v.Dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := rootfs.BuildExt4(ctx, v.Dir, pristine, rootfs.AutoSize(used, inodes)+256<<20, "kiln-build"); err != nil {
		t.Fatal(err)
	}
	sh := func(script string) []string { return []string{"/bin/sh", "-c", script} }
	path := "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	tests := []struct {
		name    string
		step    image.RunStep
		setup   func(t *testing.T, disk string) // edits the case's disk first
		timeout time.Duration
		// check inspects the resulting disk and the log.
		check    func(t *testing.T, disk, log string)
		wantExit int // non-zero: want *image.ExitError with this code
		wantCtx  bool
	}{
		{
			name: "output streams and files persist",
			step: image.RunStep{Args: sh("echo to-stdout; echo to-stderr >&2; echo persisted > /made-by-run"), Env: []string{path}, WorkDir: "/"},
			check: func(t *testing.T, disk, log string) {
				if !strings.Contains(log, "to-stdout") || !strings.Contains(log, "to-stderr") {
					t.Errorf("log lacks output: %q", log)
				}
				if b, err := rootfs.ReadFile(ctx, disk, "/made-by-run", 1<<20); err != nil || string(b) != "persisted\n" {
					t.Errorf("/made-by-run = %q, %v", b, err)
				}
			},
		},
		{
			name: "env, missing workdir created, numeric user",
			step: image.RunStep{Args: sh(`echo "$GREETING $(pwd) $(id -u):$(id -g)" > /tmp/out`), Env: []string{path, "GREETING=hi"}, WorkDir: "/srv/new/dir", User: "65534:65534"},
			check: func(t *testing.T, disk, log string) {
				b, err := rootfs.ReadFile(ctx, disk, "/tmp/out", 1<<20)
				if err != nil || string(b) != "hi /srv/new/dir 65534:65534\n" {
					t.Errorf("/tmp/out = %q, %v", b, err)
				}
			},
		},
		{
			name: "user by name gets its supplementary groups",
			setup: func(t *testing.T, disk string) {
				appendTo(t, disk, "/etc/passwd", "app:x:1000:1000::/home/app:/bin/sh\n")
				appendTo(t, disk, "/etc/group", "app:x:1000:\nextra:x:2000:app\n")
			},
			step: image.RunStep{Args: sh(`id -u > /tmp/ids; id -G >> /tmp/ids`), Env: []string{path}, WorkDir: "/", User: "app"},
			check: func(t *testing.T, disk, log string) {
				b, err := rootfs.ReadFile(ctx, disk, "/tmp/ids", 1<<20)
				if err != nil || string(b) != "1000\n1000 2000\n" {
					t.Errorf("/tmp/ids = %q, %v", b, err)
				}
			},
		},
		{
			name:     "non-zero exit",
			step:     image.RunStep{Args: sh("exit 3"), Env: []string{path}, WorkDir: "/"},
			wantExit: 3,
		},
		{
			name:    "cancellation stops the VM",
			step:    image.RunStep{Args: sh("sleep 600"), Env: []string{path}, WorkDir: "/"},
			timeout: 12 * time.Second,
			wantCtx: true,
		},
		{
			name:     "step timeout",
			step:     image.RunStep{Args: sh("sleep 600"), Env: []string{path}, WorkDir: "/", Timeout: 10 * time.Second},
			wantExit: -1, // any error: the step ran past its timeout
		},
	}
	// The cases run side by side (each on its own disk and VM), as many as
	// -test.parallel allows: two of them mostly wait for a timeout. The
	// group returns when all have ended, so the caller's checks come after.
	t.Run("cases", func(t *testing.T) {
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				t.Parallel()
				disk := filepath.Join(t.TempDir(), "root.ext4")
				if err := copyFile(pristine, disk); err != nil {
					t.Fatal(err)
				}
				if tt.setup != nil {
					tt.setup(t, disk)
				}
				rctx := ctx
				if tt.timeout > 0 {
					var cancel context.CancelFunc
					rctx, cancel = context.WithTimeout(ctx, tt.timeout)
					defer cancel()
				}
				var log bytes.Buffer
				start := time.Now()
				out, err := r.Run(rctx, disk, tt.step, &log)
				switch {
				case tt.wantCtx:
					if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
						t.Fatalf("err = %v, want the context's error", err)
					}
					if time.Since(start) > tt.timeout+30*time.Second {
						t.Fatalf("Run took %v to notice cancellation", time.Since(start))
					}
					return
				case tt.wantExit > 0:
					var ee *image.ExitError
					if !errors.As(err, &ee) || ee.Code != tt.wantExit {
						t.Fatalf("err = %v, want ExitError %d", err, tt.wantExit)
					}
					return
				case tt.wantExit < 0:
					if err == nil {
						t.Fatal("want an error")
					}
					return
				}
				if err != nil {
					t.Fatalf("Run: %v\nlog:\n%s", err, log.String())
				}
				if out == "" {
					t.Fatal("Run returned no disk")
				}
				// The disk must be consistent (cleanly unmounted): e2fsck -n.
				if err := fsck(ctx, out); err != nil {
					t.Fatal(err)
				}
				tt.check(t, out, log.String())
			})
		}
	})
}

// appendTo appends text to a file of the disk.
func appendTo(t *testing.T, disk, path, text string) {
	t.Helper()
	ctx := context.Background()
	b, err := rootfs.ReadFile(ctx, disk, path, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := rootfs.Stat(ctx, disk, path)
	if err != nil {
		t.Fatal(err)
	}
	if err := rootfs.WriteFile(ctx, disk, path, append(b, text...), fi.Mode&0o7777, fi.UID, fi.GID); err != nil {
		t.Fatal(err)
	}
}

// copyFile copies a sparse disk image without filling its holes.
func copyFile(src, dst string) error {
	out, err := exec.Command("cp", "--sparse=always", src, dst).CombinedOutput()
	if err != nil {
		return fmt.Errorf("cp %s: %v: %s", src, err, out)
	}
	return nil
}
