//go:build linux

package image

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestHugePasswdFailsUser: `RUN truncate -s 4T /etc/passwd` then `USER
// 1000` made kiln read the sparse file until it was killed. Now the build
// fails at once with a clear error, the next RUN never starts, and kiln's
// heap stays small while it fails.
func TestHugePasswdFailsUser(t *testing.T) {
	needRootAndFUSE(t)
	data := t.TempDir()
	bctx := t.TempDir()
	writeFiles(t, bctx, map[string]string{
		"Dockerfile": "FROM scratch\nCOPY etc/ /etc/\nRUN truncate -s 4T /etc/passwd\nUSER 1000\nRUN id\n",
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
		"etc/group":  "root:x:0:\n",
	})
	runner := &fakeRunner{diskFn: func(disk string) error {
		// What the step does in the VM: only the inode's size changes.
		return debugfsW(disk, "sif /etc/passwd size 4398046511104")
	}}
	b := &Builder{DataDir: data, Runner: runner, RunHeadroom: 8 << 20}

	// Watch the heap while the build runs; on the old code it grew until
	// the process died, so stop the build past a bound instead.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapInuse
	var peak atomic.Uint64
	done := make(chan struct{})
	go func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
			}
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peak.Load() {
				peak.Store(ms.HeapInuse)
			}
			if ms.HeapInuse > base+256<<20 {
				cancel()
			}
		}
	}()
	start := time.Now()
	_, err := b.Build(ctx, Request{Account: "test", ContextDir: bctx, Output: filepath.Join(t.TempDir(), "r.ext4")})
	close(done)
	took := time.Since(start)
	grew := int64(peak.Load()) - int64(base)
	t.Logf("failed in %s, heap grew by at most %d KiB: %v", took.Round(time.Millisecond), grew>>10, err)
	if err == nil {
		t.Fatal("the build succeeded")
	}
	if !strings.Contains(err.Error(), "/etc/passwd in the image is 4398046511104 bytes; kiln reads at most 1 MiB") {
		t.Fatalf("err = %v", err)
	}
	if grew > 64<<20 {
		t.Fatalf("heap grew by %d MiB", grew>>20)
	}
	if len(runner.calls) != 1 {
		t.Fatalf("runner called %d times, want 1 (the RUN after USER must not start)", len(runner.calls))
	}
	checkNoWork(t, data)
}

// TestHugePasswdInFolder: the same bound holds for a root that is a
// folder (before any RUN made it a disk).
func TestHugePasswdInFolder(t *testing.T) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "etc/passwd")
	if err := os.WriteFile(p, []byte("app:x:1000:1000::/:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if uid, gid, err := resolveIDs(folderReader(dir), "app"); err != nil || uid != 1000 || gid != 1000 {
		t.Fatalf("small passwd: %d:%d %v", uid, gid, err)
	}
	if err := os.Truncate(p, 4<<40); err != nil {
		t.Fatal(err)
	}
	_, _, err := resolveIDs(folderReader(dir), "1000")
	if err == nil || !strings.Contains(err.Error(), "/etc/passwd in the image is 4398046511104 bytes; kiln reads at most 1 MiB") {
		t.Fatalf("err = %v", err)
	}
}
