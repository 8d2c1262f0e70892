//go:build linux

package imagebuild

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/rootfs"
)

// mountContext writes a code package holding a static busybox (busybox in
// the root: FROM scratch has no shell), data/hello.txt, data/secret.txt
// (left out by .dockerignore) and the Dockerfile.
func mountContext(t *testing.T, dockerfile, hello string) string {
	t.Helper()
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(bb)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	files := map[string]string{
		"Dockerfile":      dockerfile,
		".dockerignore":   "data/secret.txt\n",
		"data/hello.txt":  hello,
		"data/secret.txt": "must not be seen\n",
	}
	for name, content := range files {
		os.MkdirAll(filepath.Join(dir, filepath.Dir(name)), 0o755)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "bb"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// mountDockerfile: one RUN with a cache, a bind of data/ and a tmpfs. It
// prints what the cache held before, appends word to it, and shows the
// bind (and that it is read-only) and the tmpfs.
func mountDockerfile(word string) string {
	return `FROM scratch
COPY bb /bin/busybox
RUN --mount=type=cache,target=/var/cache/c,mode=0700,uid=7,gid=8 \
    --mount=type=bind,source=data,target=/data \
    --mount=type=tmpfs,target=/scratch \
    ["/bin/busybox", "sh", "-c", "busybox echo \"cache-before:[$(busybox cat /var/cache/c/log 2>/dev/null | busybox tr '\\n' ' ')]\"; busybox echo ` + word + ` >> /var/cache/c/log; busybox stat -c 'cache-owner %u:%g %a' /var/cache/c; busybox cat /data/hello.txt; busybox ls /data | busybox sed 's/^/listed-/'; busybox touch /data/new 2>&1 | busybox grep -q Read-only && busybox echo bind-is-'read-only'; busybox echo t > /scratch/t && busybox grep -q tmpfs /proc/mounts && busybox echo tmpfs-'ok'"]
`
}

// TestRunMounts builds, in real build VMs, Dockerfiles whose RUN has a
// cache, a bind and a tmpfs mount: the cache keeps what the first build
// of an account wrote for the second, another account sees an empty one,
// the bind shows the context's files (after .dockerignore) read-only, and
// neither the cache's nor the bind's files end up in the image; an
// unchanged step is cached; a full cache says so. Before RUN --mount was
// supported, Parse refused all of these Dockerfiles. The steps run on
// warm starts (Runner.WarmDir), whose snapshot has none of an account's
// disks: each clone's guest probes its own.
func TestRunMounts(t *testing.T) {
	d := newDriver(t)
	dataDir := filepath.Join(t.TempDir(), "data")
	runner := &Runner{Driver: d, MemoryMiB: 512, Logger: testLogger(), WarmDir: filepath.Join(t.TempDir(), "warm")}
	t.Cleanup(func() {
		checkWarm(t, runner)
		runner.Close()
	})
	ib := &image.Builder{DataDir: dataDir, Runner: runner, Logger: testLogger()}
	build := func(account, dockerfile, hello string) (*image.Result, string, error) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		var log bytes.Buffer
		out := filepath.Join(t.TempDir(), "root.ext4")
		res, err := ib.Build(ctx, image.Request{Account: account, ContextDir: mountContext(t, dockerfile, hello), Output: out, Log: &log})
		return res, log.String(), err
	}
	mustBuild := func(account, dockerfile, hello string) (*image.Result, string) {
		t.Helper()
		res, log, err := build(account, dockerfile, hello)
		if err != nil {
			t.Fatalf("build as %s: %v\nlog:\n%s", account, err, log)
		}
		return res, log
	}
	const a, b = "111111111111", "222222222222"

	res, log := mustBuild(a, mountDockerfile("one"), "hello from the context\n")
	for _, want := range []string{"cache-before:[]", "cache-owner 7:8 700", "hello from the context", "listed-hello.txt", "bind-is-read-only", "tmpfs-ok"} {
		if !strings.Contains(log, want) {
			t.Errorf("first build's RUN output lacks %q:\n%s", want, log)
		}
	}
	if strings.Contains(log, "listed-secret.txt") || strings.Contains(log, "listed-lost+found") {
		t.Errorf("the bind showed a file .dockerignore leaves out, or mkfs's lost+found:\n%s", log)
	}
	checkImage(t, res.RootDisk)

	// A changed step of the same account: the cache holds what the first
	// build wrote.
	res, log = mustBuild(a, mountDockerfile("two"), "hello from the context\n")
	if !strings.Contains(log, "cache-before:[one ]") {
		t.Errorf("the second build of the account did not see the cache of the first:\n%s", log)
	}
	checkImage(t, res.RootDisk)

	// Another account, same Dockerfile: an empty cache of its own.
	_, log = mustBuild(b, mountDockerfile("two"), "hello from the context\n")
	if !strings.Contains(log, "cache-before:[]") {
		t.Errorf("account B saw account A's cache:\n%s", log)
	}
	disksA, _ := filepath.Glob(filepath.Join(dataDir, "image-cache", "mounts", image.ScopeName(a), "*.ext4"))
	disksB, _ := filepath.Glob(filepath.Join(dataDir, "image-cache", "mounts", image.ScopeName(b), "*.ext4"))
	if len(disksA) != 1 || len(disksB) != 1 {
		t.Errorf("cache disks: A %v, B %v; want one each", disksA, disksB)
	}

	// Unchanged, the step is cached (the cache's contents are not part of
	// its key; TestRunMountPlan checks that a bound file's are).
	_, log = mustBuild(a, mountDockerfile("two"), "hello from the context\n")
	if !strings.Contains(log, "  cached") || strings.Contains(log, "cache-owner 7:8") {
		t.Errorf("an unchanged step with mounts was not cached:\n%s", log)
	}

	// A full cache says so.
	ib.CacheMountBytes = 16 << 20
	_, log, err := build("333333333333", `FROM scratch
COPY bb /bin/busybox
RUN --mount=type=cache,target=/c ["/bin/busybox", "dd", "if=/dev/zero", "of=/c/big", "bs=1M", "count=64"]
`, "x")
	var full *image.MountFullError
	if !errors.As(err, &full) || !strings.Contains(err.Error(), "/c is full") {
		t.Errorf("filling the cache: %v, want a MountFullError naming /c\n%s", err, log)
	}
	checkNoNetns(t)
}

// checkImage checks that the mounts left only their mount points in the
// built root.
func checkImage(t *testing.T, disk string) {
	t.Helper()
	ctx := context.Background()
	for _, p := range []string{"/var/cache/c/log", "/data/hello.txt", "/scratch/t"} {
		if _, err := rootfs.Stat(ctx, disk, p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the image holds %s (stat: %v)", p, err)
		}
	}
	for _, p := range []string{"/var/cache/c", "/data", "/scratch"} {
		if _, err := rootfs.Stat(ctx, disk, p); err != nil {
			t.Errorf("mount point %s: %v", p, err)
		}
	}
}
