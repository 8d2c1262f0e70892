//go:build linux

package image

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiln-sandbox/kiln/internal/image/layer"
	"github.com/kiln-sandbox/kiln/internal/rootfs"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

// netRawCap is a security.capability value granting cap_net_raw+ep, as
// setcap writes it for ping.
func netRawCap() []byte {
	b := make([]byte, 20)
	binary.LittleEndian.PutUint32(b[0:], 0x02000001) // revision 2, effective
	binary.LittleEndian.PutUint32(b[4:], 1<<13)      // CAP_NET_RAW
	return b
}

func needRootAndFUSE(t *testing.T) {
	t.Helper()
	testenv.NeedRoot(t, "namespaces, mounts or other users")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("no /dev/fuse")
	}
}

// TestCopyAfterRunKeepsTheDisk: a COPY after a RUN writes into the RUN's
// disk, so what the RUN made (hard links, file capabilities, extended
// attributes, setuid bits) is still there for the next RUN and in the
// image, and a COPY larger than the disk's free room still fits.
func TestCopyAfterRunKeepsTheDisk(t *testing.T) {
	needRootAndFUSE(t)
	ctx := context.Background()
	data := t.TempDir()
	bctx := t.TempDir()
	big := bytes.Repeat([]byte("k"), 40<<20)
	writeFiles(t, bctx, map[string]string{
		"Dockerfile": `FROM scratch
COPY etc/ /etc/
RUN install-ping
COPY app.txt /srv/
COPY --chown=app big.bin /srv/
RUN check
`,
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/srv:/bin/sh\n",
		"etc/group":  "root:x:0:\napp:x:1000:\n",
		"app.txt":    "app",
	})
	if err := os.WriteFile(filepath.Join(bctx, "big.bin"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	var checked []string
	runner := &fakeRunner{fn: func(root string, step RunStep) error {
		bin := filepath.Join(root, "usr/bin")
		switch step.Args[2] {
		case "install-ping":
			if err := os.MkdirAll(bin, 0o755); err != nil {
				return err
			}
			ping := filepath.Join(bin, "ping")
			if err := os.WriteFile(ping, []byte("#!ping"), 0o755); err != nil {
				return err
			}
			if err := syscall.Setxattr(ping, "security.capability", netRawCap(), 0); err != nil {
				return err
			}
			if err := syscall.Setxattr(ping, "user.origin", []byte("debian"), 0); err != nil {
				return err
			}
			if err := os.Link(ping, filepath.Join(bin, "ping4")); err != nil {
				return err
			}
			su := filepath.Join(bin, "su")
			if err := os.WriteFile(su, []byte("#!su"), 0o755); err != nil {
				return err
			}
			return os.Chmod(su, 0o755|os.ModeSetuid)
		case "check":
			var a, b syscall.Stat_t
			syscall.Stat(filepath.Join(bin, "ping"), &a)
			syscall.Stat(filepath.Join(bin, "ping4"), &b)
			if a.Ino != b.Ino || a.Nlink != 2 {
				checked = append(checked, "hard link lost")
			}
			buf := make([]byte, 64)
			n, err := syscall.Getxattr(filepath.Join(bin, "ping"), "security.capability", buf)
			if err != nil || !bytes.Equal(buf[:n], netRawCap()) {
				checked = append(checked, "file capability lost")
			}
			if n, err := syscall.Getxattr(filepath.Join(bin, "ping"), "user.origin", buf); err != nil || string(buf[:n]) != "debian" {
				checked = append(checked, "xattr lost")
			}
			if fi, err := os.Stat(filepath.Join(bin, "su")); err != nil || fi.Mode()&os.ModeSetuid == 0 {
				checked = append(checked, "setuid bit lost")
			}
			var fi syscall.Stat_t
			if err := syscall.Stat(filepath.Join(root, "srv/big.bin"), &fi); err != nil || fi.Size != int64(len(big)) || fi.Uid != 1000 {
				checked = append(checked, "big copy missing or not chowned")
			}
			checked = append(checked, "ran")
		}
		return nil
	}}
	b := &Builder{DataDir: data, Runner: runner, RunHeadroom: 8 << 20}
	out := filepath.Join(t.TempDir(), "root.ext4")
	var log bytes.Buffer
	if _, err := b.Build(ctx, Request{Account: "test", ContextDir: bctx, Output: out, Log: &log}); err != nil {
		t.Fatalf("build: %v\n%s", err, log.String())
	}
	if strings.Join(checked, ", ") != "ran" {
		t.Fatalf("second RUN saw: %v", checked)
	}
	// The image itself, read without the kernel's help.
	err := rootfs.Edit(ctx, copyOf(t, out), func(root string) error {
		buf := make([]byte, 64)
		n, err := syscall.Getxattr(filepath.Join(root, "usr/bin/ping4"), "security.capability", buf)
		if err != nil || !bytes.Equal(buf[:n], netRawCap()) {
			t.Errorf("image: ping4 capability = %x, %v", buf[:max(n, 0)], err)
		}
		if b, err := os.ReadFile(filepath.Join(root, "srv/app.txt")); err != nil || string(b) != "app" {
			t.Errorf("image: app.txt = %q, %v", b, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("e2fsck", "-fn", out).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck: %v\n%s", err, out)
	}
	checkNoWork(t, data)
}

func copyOf(t *testing.T, file string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), filepath.Base(file))
	if out, err := exec.Command("cp", "--sparse=always", file, dst).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v: %s", err, out)
	}
	os.Chmod(dst, 0o644)
	return dst
}

// TestCopyFromHostileDisk: a build VM owns its disk and may write any
// bytes to it. A directory holding a symbolic link and a file of the same
// name (which debugfs rdump would write through, onto the host) must not
// let COPY --from write outside the build.
func TestCopyFromHostileDisk(t *testing.T) {
	needRootAndFUSE(t)
	ctx := context.Background()
	data := t.TempDir()
	bctx := t.TempDir()
	target := filepath.Join(t.TempDir(), "pwned")
	writeFiles(t, bctx, map[string]string{
		"Dockerfile": "FROM scratch AS evil\nRUN craft\nFROM scratch\nCOPY --from=evil / /loot/\n",
	})
	payload := filepath.Join(t.TempDir(), "payload")
	os.WriteFile(payload, []byte("written on the host"), 0o644)
	runner := &fakeRunner{diskFn: func(disk string) error {
		// debugfs's ln adds a name without checking for an existing one.
		return debugfsW(disk,
			"mkdir /d",
			"symlink /d/x "+target,
			"write "+payload+" /x",
			"ln /x /d",
		)
	}}
	b := &Builder{DataDir: data, Runner: runner, RunHeadroom: 8 << 20}
	out := filepath.Join(t.TempDir(), "root.ext4")
	var log bytes.Buffer
	_, err := b.Build(ctx, Request{Account: "test", ContextDir: bctx, Output: out, Log: &log})
	if _, serr := os.Lstat(target); !errors.Is(serr, os.ErrNotExist) {
		t.Fatalf("the build wrote %s on the host (build error: %v)", target, err)
	}
	t.Logf("build result: %v", err)
	if err == nil {
		// Both names read as one file through the mount; the copy got it.
		if got, _ := rootfs.ReadFile(ctx, out, "/loot/x", 1<<20); string(got) != "written on the host" {
			t.Errorf("/loot/x = %q", got)
		}
	}
	checkNoWork(t, data)
}

func debugfsW(disk string, cmds ...string) error {
	f := filepath.Join(filepath.Dir(disk), "cmds")
	if err := os.WriteFile(f, []byte(strings.Join(cmds, "\n")+"\n"), 0o600); err != nil {
		return err
	}
	defer os.Remove(f)
	out, err := exec.Command("debugfs", "-w", "-f", f, disk).CombinedOutput()
	if err != nil {
		return err
	}
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if !strings.HasPrefix(l, "debugfs") && !strings.HasPrefix(l, "Allocated inode") {
			return errors.New(string(out))
		}
	}
	return nil
}

// TestFailedCopyIntoDiskLeavesNoMount: a COPY that fails while the RUN's
// disk is mounted (an unknown --chown user) leaves no mount and no work
// files.
func TestFailedCopyIntoDiskLeavesNoMount(t *testing.T) {
	needRootAndFUSE(t)
	data := t.TempDir()
	bctx := t.TempDir()
	writeFiles(t, bctx, map[string]string{
		"Dockerfile": "FROM scratch\nRUN make\nCOPY --chown=ghost f /f\n",
		"f":          "x",
	})
	runner := &fakeRunner{fn: func(root string, step RunStep) error { return nil }}
	b := &Builder{DataDir: data, Runner: runner, RunHeadroom: 8 << 20}
	_, err := b.Build(context.Background(), Request{Account: "test", ContextDir: bctx, Output: filepath.Join(t.TempDir(), "r.ext4")})
	if err == nil || !strings.Contains(err.Error(), "ghost") {
		t.Fatalf("err = %v, want the unknown user named", err)
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mounts), data) {
		t.Fatalf("a mount under the data dir is left:\n%s", mounts)
	}
	checkNoWork(t, data)
}

// TestCopyOfHugeSparseFileIsBounded: a build VM can make a file claim
// terabytes (its size field) at no cost. Copying it into a RUN's disk must
// not grow that disk to match: the copy limits refuse it first.
func TestCopyOfHugeSparseFileIsBounded(t *testing.T) {
	needRootAndFUSE(t)
	ctx := context.Background()
	data := t.TempDir()
	bctx := t.TempDir()
	writeFiles(t, bctx, map[string]string{
		"Dockerfile": "FROM scratch AS evil\nRUN craft\nFROM scratch\nRUN other\nCOPY --from=evil /huge /huge\n",
	})
	payload := filepath.Join(t.TempDir(), "payload")
	os.WriteFile(payload, []byte("x"), 0o644)
	runner := &fakeRunner{
		fn: func(string, RunStep) error { return nil },
		diskFn: func(disk string) error {
			return debugfsW(disk, "write "+payload+" /huge", "sif /huge size 17592186044416")
		},
	}
	// Only the first RUN crafts; the second is a plain step.
	crafted := false
	diskFn := runner.diskFn
	runner.diskFn = func(disk string) error {
		if crafted {
			return nil
		}
		crafted = true
		return diskFn(disk)
	}
	b := &Builder{DataDir: data, Runner: runner, RunHeadroom: 8 << 20, Limits: layer.Limits{MaxEntries: 1000, MaxEntryBytes: 64 << 20, MaxTotalBytes: 64 << 20}}
	start := time.Now()
	_, err := b.Build(ctx, Request{Account: "test", ContextDir: bctx, Output: filepath.Join(t.TempDir(), "r.ext4")})
	if err == nil {
		t.Fatal("copying a 16 TiB file succeeded")
	}
	t.Logf("refused in %v: %v", time.Since(start), err)
	checkNoWork(t, data)
}
