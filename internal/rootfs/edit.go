//go:build linux

package rootfs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"strings"
	"syscall"

	"github.com/kiln-sandbox/kiln/internal/hosttool"
)

// maxLinkTarget is the longest symbolic link target ext4 stores (one
// block of the largest size).
const maxLinkTarget = 64 << 10

// Readlink returns the target of the symbolic link at path in the image.
func Readlink(ctx context.Context, image, path string) (string, error) {
	fi, err := Stat(ctx, image, path)
	if err != nil {
		return "", err
	}
	if fi.Mode&syscall.S_IFMT != syscall.S_IFLNK {
		return "", fmt.Errorf("%s in %s is not a symbolic link", path, image)
	}
	out, _, err := debugfs(ctx, image, "stat "+quote(path), maxStatOut)
	if err != nil && !errors.Is(err, errOutputFull) {
		return "", err
	}
	// Short targets live in the inode ("Fast link dest:"); long ones in a
	// data block, which cat prints.
	for _, line := range strings.Split(string(out), "\n") {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "Fast link dest: "); ok {
			return strings.Trim(rest, `"`), nil
		}
	}
	// Long targets fill at most one block.
	if fi.Size > maxLinkTarget {
		return "", fmt.Errorf("%w: symbolic link %s in the image is %d bytes long", ErrTooLarge, path, fi.Size)
	}
	b, _, err := debugfs(ctx, image, "cat "+quote(path), maxLinkTarget+1)
	if errors.Is(err, errOutputFull) {
		return "", fmt.Errorf("%w: symbolic link %s in the image is longer than it says", ErrTooLarge, path)
	}
	if err != nil {
		return "", err
	}
	return string(b), nil
}

// Remove deletes the file, symbolic link or empty directory at path in
// the image, in place. A missing path is not an error.
func Remove(ctx context.Context, image, path string) error {
	if err := checkDebugfsPath(path); err != nil {
		return err
	}
	fi, err := Stat(ctx, image, path)
	if err != nil {
		if isNotExist(err) {
			return nil
		}
		return err
	}
	cmd := "rm "
	if fi.Mode&syscall.S_IFMT == syscall.S_IFDIR {
		cmd = "rmdir "
	}
	return edit(ctx, image, cmd+quote(path))
}

// WriteFile replaces the file at path in the image (whose parent must
// exist) with data, mode (permission bits) and owner, in place.
func WriteFile(ctx context.Context, image, path string, data []byte, mode uint32, uid, gid int) error {
	if err := checkDebugfsPath(path); err != nil {
		return err
	}
	if err := Remove(ctx, image, path); err != nil {
		return err
	}
	tmp, err := os.CreateTemp("", "kiln-rootfs-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	if _, err := tmp.Write(data); err != nil {
		return err
	}
	// debugfs, as the tools' uid, opens it again through descriptor 4.
	if err := hosttool.Grant(tmp, false); err != nil {
		return err
	}
	return editFiles(ctx, image, []*os.File{tmp},
		"write "+hosttool.FD(1)+" "+quote(path),
		fmt.Sprintf("sif %s mode 0%o", quote(path), syscall.S_IFREG|mode&0o7777),
		fmt.Sprintf("sif %s uid %d", quote(path), uid),
		fmt.Sprintf("sif %s gid %d", quote(path), gid))
}

// Symlink creates a symbolic link at path (which must not exist) pointing
// to target, owned by root, in place.
func Symlink(ctx context.Context, image, path, target string) error {
	if err := checkDebugfsPath(path); err != nil {
		return err
	}
	if strings.ContainsAny(target, "\"\n ") {
		return fmt.Errorf("symlink target %q: debugfs cannot write it", target)
	}
	return edit(ctx, image, "symlink "+quote(path)+" "+target)
}

// edit runs debugfs -w commands in one session and fails on any error
// message (debugfs exits 0 even when a command fails).
func edit(ctx context.Context, image string, cmds ...string) error {
	return editFiles(ctx, image, nil, cmds...)
}

// editFiles is edit with files handed to debugfs as descriptors 4 and on.
func editFiles(ctx context.Context, image string, files []*os.File, cmds ...string) error {
	// The commands come on stdin ("-f -"): no file for the tools' uid to
	// open.
	_, e, err := toolRun{name: "debugfs", image: image, write: true, files: files,
		args:  []string{"-w", "-f", "-", "IMAGE"},
		stdin: strings.NewReader(strings.Join(cmds, "\n") + "\n")}.run(ctx)
	if err != nil {
		return fmt.Errorf("debugfs -w %s: %s: %w", image, strings.TrimSpace(e), err)
	}
	if msg := strings.TrimSpace(stripBanner(e)); msg != "" {
		return fmt.Errorf("debugfs -w %s (%s): %s", image, strings.Join(cmds, "; "), msg)
	}
	return nil
}

func isNotExist(err error) bool { return errors.Is(err, fs.ErrNotExist) }

// Clean reports whether the ext4 image was cleanly unmounted: state
// "clean" and no journal left to replay.
func Clean(ctx context.Context, image string) (bool, error) {
	h, err := readHeader(ctx, image)
	if err != nil {
		return false, err
	}
	return h["Filesystem state"] == "clean" && !strings.Contains(h["Filesystem features"], "needs_recovery"), nil
}

// Repair replays the journal and fixes what e2fsck -p may fix without
// asking. It fails when the file system needs more than that.
func Repair(ctx context.Context, image string) error {
	o, e, err := toolRun{name: "e2fsck", image: image, write: true, args: []string{"-f", "-p", "IMAGE"}}.run(ctx)
	if err != nil {
		// Exit 1: errors corrected; that is a success here.
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ExitCode() == 1 {
			return nil
		}
		return fmt.Errorf("e2fsck -f -p %s: %s: %w", image, strings.TrimSpace(string(o)+e), err)
	}
	return nil
}
