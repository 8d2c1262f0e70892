//go:build linux

package imagebuild

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// inodes maps the inode of every regular file in dir to its name.
func inodes(t *testing.T, dir string) map[uint64]string {
	t.Helper()
	out := map[uint64]string{}
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || !fi.Mode().IsRegular() {
			return err
		}
		out[fi.Sys().(*syscall.Stat_t).Ino] = p
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func inodeOf(t *testing.T, p string) uint64 {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

// TestCachesPerAccount builds one code package as account A, then as
// account B, then as A again, in real build and image VMs. B reuses
// nothing of A's: no step or snapshot cache hit in its log, a RUN that
// runs again, and a template whose memory file (and every other file) is
// its own, not a hard link to A's. A's rebuild still reuses its own steps
// and snapshot.
func TestCachesPerAccount(t *testing.T) {
	d := newDriver(t)
	b := newBuilder(t, d)
	// A data dir and template cache of its own: other tests' entries must
	// not make or hide hits here.
	b.Images.DataDir = filepath.Join(t.TempDir(), "data")
	b.CacheDir = filepath.Join(t.TempDir(), "templates")
	src := testContext(t, "FROM scratch\nCOPY app /app\nRUN [\"/app\", \"write\", \"/marker\", \"made by RUN\"]\nCMD [\"/app\"]\n")
	build := func(account string) (Result, string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		var log bytes.Buffer
		res, err := b.Build(ctx, Request{Account: account, Source: src, MemoryMiB: 512, Log: &log, OutDir: filepath.Join(t.TempDir(), "version")})
		if err != nil {
			var be *Error
			errors.As(err, &be)
			t.Fatalf("build as %s: %v\nreason: %v\nlog:\n%s", account, err, be, log.String())
		}
		return res, log.String()
	}

	resA, logA := build("111111111111")
	if !strings.Contains(logA, "test app wrote /marker") {
		t.Fatalf("the RUN step did not run:\n%s", logA)
	}
	resB, logB := build("222222222222")
	for _, hit := range []string{"cached", "snapshot reused"} {
		if strings.Contains(logB, hit) {
			t.Errorf("B's build log shows %q: it reused A's work\n%s", hit, logB)
		}
	}
	if resB.CachedTemplate {
		t.Error("B's template came from the cache")
	}
	if !strings.Contains(logB, "test app wrote /marker") {
		t.Errorf("B's RUN step did not run:\n%s", logB)
	}
	memA, memB := filepath.Join(resA.TemplateDir, "mem"), filepath.Join(resB.TemplateDir, "mem")
	if inodeOf(t, memA) == inodeOf(t, memB) {
		t.Errorf("A's and B's template memory are one file (inode %d)", inodeOf(t, memA))
	}
	a := inodes(t, filepath.Dir(resA.TemplateDir))
	for ino, p := range inodes(t, filepath.Dir(resB.TemplateDir)) {
		if q, ok := a[ino]; ok {
			t.Errorf("B's %s is A's %s (inode %d)", p, q, ino)
		}
	}

	// A's own rebuild keeps the cache's benefit: steps and snapshot reused,
	// the memory file hard-linked from A's cache entry.
	resA2, logA2 := build("111111111111")
	if !resA2.CachedTemplate || !strings.Contains(logA2, "snapshot reused") || !strings.Contains(logA2, "cached") {
		t.Errorf("A's rebuild reused nothing (cached template %v):\n%s", resA2.CachedTemplate, logA2)
	}
	if strings.Contains(logA2, "test app wrote /marker") {
		t.Error("A's rebuild ran its RUN step again")
	}
	if inodeOf(t, filepath.Join(resA2.TemplateDir, "mem")) == inodeOf(t, memB) {
		t.Error("A's rebuild got B's template memory")
	}
	m, _ := cloneGet(t, d, resA2.TemplateDir)
	if m["startedAt"] == nil {
		t.Errorf("clone of A's reused snapshot answered %v", m)
	}
	checkClean(t, d, "")
}

// noDriver is a driver that is never called: the request is refused first.
type noDriver struct{ vmm.Driver }

func TestBuildNeedsAccount(t *testing.T) {
	b := &Builder{Images: &image.Builder{DataDir: t.TempDir()}, Driver: noDriver{}}
	_, err := b.Build(context.Background(), Request{Source: t.TempDir(), OutDir: filepath.Join(t.TempDir(), "v")})
	if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(err.Error(), "account") {
		t.Fatalf("build without an account: %v, want an invalid-request error naming the account", err)
	}
}
