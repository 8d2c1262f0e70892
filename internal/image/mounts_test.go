//go:build linux

package image

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/image/dockerfile"
	"github.com/kiln-sandbox/kiln/internal/rootfs"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

// TestRunMountPlan checks what the builder hands the runner for RUN
// --mount (targets against WORKDIR, a cache's default id, a bind's disk
// holding the context's files after .dockerignore) and what the step's
// key holds: a bound file's content, not a cache's. No VM: a fake runner
// records the steps and reads the bind disk with the confined tools.
func TestRunMountPlan(t *testing.T) {
	testenv.NeedRoot(t, "confined e2fsprogs tools read the bind disk")
	ctx := context.Background()
	bctx := t.TempDir()
	df := `FROM scratch
WORKDIR /w
RUN --mount=type=cache,target=cache --mount=type=bind,source=src,target=/src --mount=type=bind,source=one.txt,target=/one.txt,rw make
`
	writeFiles(t, bctx, map[string]string{
		"Dockerfile":     df,
		".dockerignore":  "src/secret.txt\n",
		"src/a.txt":      "a",
		"src/secret.txt": "no",
		"one.txt":        "1",
		"other.txt":      "o",
	})
	var seen []RunStep
	b := &Builder{DataDir: t.TempDir(), Runner: runnerFunc(func(ctx context.Context, disk string, step RunStep, log io.Writer) (string, error) {
		seen = append(seen, step)
		for _, m := range step.Mounts {
			if m.Type != dockerfile.MountBind {
				continue
			}
			if _, err := os.Stat(m.Disk); err != nil {
				t.Errorf("bind disk of %s: %v", m.Target, err)
				continue
			}
			switch m.Target {
			case "/src":
				if b, err := rootfs.ReadFile(ctx, m.Disk, "/"+m.Sub+"/a.txt", 10); err != nil || string(b) != "a" {
					t.Errorf("bind of src: a.txt = %q, %v", b, err)
				}
				if _, err := rootfs.Stat(ctx, m.Disk, "/"+m.Sub+"/secret.txt"); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("bind of src holds the .dockerignore'd secret.txt (%v)", err)
				}
				if !m.ReadOnly {
					t.Error("bind without rw is not read-only")
				}
			case "/one.txt":
				want, _ := os.ReadFile(filepath.Join(bctx, "one.txt"))
				if b, err := rootfs.ReadFile(ctx, m.Disk, "/"+m.Sub, 10); err != nil || string(b) != string(want) {
					t.Errorf("bind of one.txt = %q, %v", b, err)
				}
				if m.ReadOnly {
					t.Error("bind with rw is read-only")
				}
			}
		}
		return disk, nil
	})}
	build := func() *Result {
		t.Helper()
		res, err := b.Build(ctx, Request{Account: "a", ContextDir: bctx, Output: filepath.Join(t.TempDir(), "root.ext4")})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	build()
	if len(seen) != 1 {
		t.Fatalf("runs = %d", len(seen))
	}
	ms := seen[0].Mounts
	if len(ms) != 3 || ms[0].Type != dockerfile.MountCache || ms[0].Target != "/w/cache" || ms[0].Name != "cache /w/cache" || !ms[0].Fresh {
		t.Fatalf("mounts = %+v", ms)
	}
	for _, m := range ms {
		if m.Type == dockerfile.MountBind {
			if _, err := os.Stat(m.Disk); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("bind disk %s left after the step", m.Disk)
			}
		}
	}

	// Unrelated context change: cached. A cache's content is not part of
	// the key: writing to it changes nothing.
	os.WriteFile(filepath.Join(bctx, "other.txt"), []byte("changed"), 0o644)
	os.WriteFile(filepath.Join(bctx, "src/secret.txt"), []byte("changed"), 0o644)
	os.WriteFile(ms[0].Disk, []byte("not even ext4"), 0o600)
	build()
	if len(seen) != 1 {
		t.Fatalf("an unrelated change ran the step again")
	}
	// A bound file changes: the step runs again, with the account's
	// existing cache disk.
	os.WriteFile(filepath.Join(bctx, "one.txt"), []byte("2"), 0o644)
	os.WriteFile(filepath.Join(bctx, "Dockerfile"), []byte(df), 0o644)
	build()
	if len(seen) != 2 {
		t.Fatalf("a changed bound file did not run the step again")
	}
	if m := seen[1].Mounts[0]; m.Fresh || m.Disk != ms[0].Disk {
		t.Errorf("second run's cache = %+v, want the first's disk, not fresh", m)
	}
}

type runnerFunc func(ctx context.Context, disk string, step RunStep, log io.Writer) (string, error)

func (f runnerFunc) Run(ctx context.Context, disk string, step RunStep, log io.Writer) (string, error) {
	return f(ctx, disk, step, log)
}

// TestCacheMountSharing checks the locking of an account's cache disks:
// private takes a throw-away disk while another build holds the cache,
// shared and locked wait, another account gets its own, the least
// recently used go past MaxCacheMounts, and pruning spares a held one.
func TestCacheMountSharing(t *testing.T) {
	ctx := context.Background()
	data := t.TempDir()
	newBuild := func(account string) *build {
		work := t.TempDir()
		return &build{b: &Builder{DataDir: data, CacheMountBytes: 16 << 20, MaxCacheMounts: 3}, req: Request{Account: account, Log: io.Discard}, work: work}
	}
	bd := newBuild("a")
	m := func(id, sharing string) dockerfile.Mount {
		return dockerfile.Mount{Type: dockerfile.MountCache, ID: id, Sharing: sharing}
	}
	c1, err := bd.openCacheMount(ctx, m("x", dockerfile.SharingShared))
	if err != nil || !c1.fresh {
		t.Fatalf("first open: %+v, %v", c1, err)
	}
	other := newBuild("a")
	p, err := other.openCacheMount(ctx, m("x", dockerfile.SharingPrivate))
	if err != nil || p.disk == c1.disk || !p.fresh || !strings.HasPrefix(p.disk, other.work) {
		t.Fatalf("private while held: %+v, %v", p, err)
	}
	p.release()
	wctx, cancel := context.WithTimeout(ctx, 600*time.Millisecond)
	_, err = other.openCacheMount(wctx, m("x", dockerfile.SharingLocked))
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("locked while held: %v, want to wait until the deadline", err)
	}
	cb, err := newBuild("b").openCacheMount(ctx, m("x", dockerfile.SharingShared))
	if err != nil || cb.disk == c1.disk || !cb.fresh {
		t.Fatalf("another account's cache x: %+v, %v", cb, err)
	}
	cb.release()
	c1.release()
	c2, err := other.openCacheMount(ctx, m("x", dockerfile.SharingShared))
	if err != nil || c2.disk != c1.disk || c2.fresh {
		t.Fatalf("after release: %+v, %v", c2, err)
	}
	// Held x stays; y, z, w push the account past 3.
	for _, id := range []string{"y", "z", "w"} {
		time.Sleep(20 * time.Millisecond)
		c, err := bd.openCacheMount(ctx, m(id, dockerfile.SharingShared))
		if err != nil {
			t.Fatal(err)
		}
		c.release()
	}
	disks, _ := filepath.Glob(filepath.Join(mountsDir(data, "a"), "*.ext4"))
	if len(disks) != 3 {
		t.Errorf("account a keeps %d cache disks, want 3", len(disks))
	}
	if _, err := os.Stat(c2.disk); err != nil {
		t.Errorf("the held cache was evicted: %v", err)
	}
	if _, err := PruneCache(data, 0); err != nil {
		t.Fatal(err)
	}
	disks, _ = filepath.Glob(filepath.Join(mountsDir(data, "a"), "*.ext4"))
	if len(disks) != 1 || disks[0] != c2.disk {
		t.Errorf("after pruning: %v, want only the held %s", disks, c2.disk)
	}
	if _, err := os.Stat(filepath.Join(mountsDir(data, "b"))); err != nil {
		t.Errorf("account b's folder: %v", err)
	}
	c2.release()
}
