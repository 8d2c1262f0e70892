//go:build linux

package rootfs

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/hosttool"
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

// TestMountConfined: fuse2fs, the parser of a hostile image, runs as the
// tools' uid (all four ids), in a mount and network namespace other than
// kiln's, with an empty environment; the mount is closed to every uid but
// kiln's (the tools' too); kiln (root) still reads and writes through it,
// and Close writes the image back.
func TestMountConfined(t *testing.T) {
	needFUSE(t)
	t.Setenv("KILN_SECRET", "must-not-leak")
	ctx := context.Background()
	img := testImage(t)
	m, err := Mount(ctx, img, t.TempDir(), false)
	must(t, err)
	defer m.Close()
	pid := strconv.Itoa(m.cmd.Process.Pid)

	status, err := os.ReadFile("/proc/" + pid + "/status")
	must(t, err)
	if !strings.Contains(string(status), "Name:\tfuse2fs\n") {
		t.Fatalf("process %s is not fuse2fs:\n%s", pid, status)
	}
	want := strconv.FormatUint(uint64(hosttool.ID), 10)
	for _, field := range []string{"Uid:", "Gid:"} {
		ids := fieldOf(string(status), field)
		if len(ids) != 4 {
			t.Fatalf("%s %q", field, ids)
		}
		for _, id := range ids {
			if id != want {
				t.Errorf("fuse2fs %s %v, want %s in all four", field, ids, want)
				break
			}
		}
	}
	if g := fieldOf(string(status), "Groups:"); len(g) > 1 || (len(g) == 1 && g[0] != want) {
		t.Errorf("fuse2fs supplementary groups %v", g)
	}
	if fieldOf(string(status), "CapEff:")[0] != "0000000000000000" {
		t.Errorf("fuse2fs has capabilities:\n%s", status)
	}
	for _, ns := range []string{"mnt", "net"} {
		mine, _ := os.Readlink("/proc/self/ns/" + ns)
		its, err := os.Readlink("/proc/" + pid + "/ns/" + ns)
		if err != nil || its == mine {
			t.Errorf("fuse2fs %s namespace %q (%v), kiln's %q", ns, its, err, mine)
		}
	}
	env, err := os.ReadFile("/proc/" + pid + "/environ")
	must(t, err)
	if len(env) != 0 {
		t.Errorf("fuse2fs environment %q, want empty", env)
	}

	// No other uid may use the mount (no allow_other), the tools' not
	// either, even with every folder on the way open to it.
	for d := m.Dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		must(t, os.Chmod(d, 0o755))
	}
	asTools := func(path string) (string, error) {
		c := exec.Command("stat", "-c", "%F", path)
		c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: hosttool.ID, Gid: hosttool.ID}}
		out, err := c.CombinedOutput()
		return string(out), err
	}
	if out, err := asTools(filepath.Dir(m.Dir)); err != nil {
		t.Fatalf("uid %d cannot reach the mount's parent: %v: %s", hosttool.ID, err, out)
	}
	if out, err := asTools(m.Dir); err == nil || !strings.Contains(out, "Permission denied") {
		t.Errorf("uid %d looked into kiln's mount: %v: %s", hosttool.ID, err, out)
	}

	// kiln reads and writes through the mount.
	if b, err := os.ReadFile(filepath.Join(m.Dir, "etc/hostname")); err != nil || string(b) != "kiln\n" {
		t.Fatalf("read through the mount: %q, %v", b, err)
	}
	must(t, os.MkdirAll(filepath.Join(m.Dir, "srv"), 0o755))
	must(t, os.WriteFile(filepath.Join(m.Dir, "srv/written"), []byte("by kiln\n"), 0o640))
	if fi, err := os.Stat(filepath.Join(m.Dir, "srv/written")); err != nil || fi.Sys().(*syscall.Stat_t).Uid != 0 {
		t.Fatalf("file written through the mount: %v, %v", fi, err)
	}
	must(t, m.Close())
	select {
	case <-m.exited:
	default:
		t.Fatal("fuse2fs still running after Close")
	}

	// The image holds it: mount it again, read-only.
	m2, err := Mount(ctx, img, t.TempDir(), true)
	must(t, err)
	b, err := os.ReadFile(filepath.Join(m2.Dir, "srv/written"))
	must(t, m2.Close())
	if err != nil || string(b) != "by kiln\n" {
		t.Fatalf("after Close the image holds %q, %v", b, err)
	}
	fi, err := Stat(ctx, img, "/srv/written")
	must(t, err)
	if fi.Size != 8 || fi.Mode&0o777 != 0o640 || fi.UID != 0 {
		t.Fatalf("written file in the image: %+v", fi)
	}
}

// fieldOf returns the values of a /proc/PID/status line.
func fieldOf(status, name string) []string {
	for _, l := range strings.Split(status, "\n") {
		if strings.HasPrefix(l, name) {
			return strings.Fields(strings.TrimPrefix(l, name))
		}
	}
	return nil
}

// TestMountEndsWithKiln: when the thread that started fuse2fs ends (as
// when kiln dies), fuse2fs gets SIGTERM although it switched uids, writes
// the image back and exits rather than serving on.
func TestMountEndsWithKiln(t *testing.T) {
	needFUSE(t)
	ctx := context.Background()
	img := testImage(t)
	dir := t.TempDir()
	started := make(chan *Mounted, 1)
	onThreadThatEnds(func() {
		m, err := Mount(ctx, img, dir, false)
		if err != nil {
			t.Error(err)
			close(started)
			return
		}
		if err := os.WriteFile(filepath.Join(dir, "etc/late"), []byte("kept"), 0o644); err != nil {
			t.Error(err)
		}
		started <- m
	})
	m := <-started
	if m == nil {
		t.FailNow()
	}
	select {
	case <-m.exited:
	case <-time.After(20 * time.Second):
		m.Close()
		t.Fatal("fuse2fs still running after the thread that started it ended")
	}
	m.Close() // the dead mount
	if b, err := ReadFile(ctx, img, "/etc/late", 1<<10); err != nil || string(b) != "kept" {
		t.Fatalf("image after fuse2fs's exit: %q, %v", b, err)
	}
}

// onThreadThatEnds runs fn on an OS thread of its own that ends when fn
// returns. Go ends a thread when a goroutine exits locked to it, but only
// parks the main thread, so fn must not land there.
func onThreadThatEnds(fn func()) {
	for {
		ran := make(chan bool)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
			if syscall.Gettid() == syscall.Getpid() {
				runtime.UnlockOSThread()
				ran <- false
				return
			}
			fn()
			ran <- true
		}()
		if <-ran {
			return
		}
	}
}
