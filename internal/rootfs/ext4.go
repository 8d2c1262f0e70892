//go:build linux

// Package rootfs turns a folder into an ext4 disk image and works on one
// without the host kernel ever parsing it: mkfs.ext4 -d copies a folder
// into a new file system, debugfs reads and edits single files, and
// fuse2fs (a userspace ext4 driver) serves a whole image as a folder.
package rootfs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// ErrToolMissing is returned when e2fsprogs is not installed.
var ErrToolMissing = fmt.Errorf("e2fsprogs tool missing (install it with `make setup`, which runs scripts/setup.sh): %w", errdefs.ErrUnavailable)

const (
	// minSize keeps tiny images (FROM scratch + one file) large enough for
	// ext4's own metadata and a journal.
	minSize = 16 << 20
	// maxLabel is ext4's volume label limit in bytes.
	maxLabel = 16
)

func lookTool(name string) (string, error) {
	p, err := exec.LookPath(name)
	if err == nil {
		return p, nil
	}
	// Root's PATH on Debian has /usr/sbin, but a test runner's may not.
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		c := filepath.Join(dir, name)
		if _, err := os.Stat(c); err == nil {
			return c, nil
		}
	}
	return "", fmt.Errorf("%s: %w", name, ErrToolMissing)
}

// BuildExt4 writes an ext4 image at outImage holding the contents of srcDir
// (owners, modes, symlinks, devices and hard links as mkfs.ext4 -d copies
// them). sizeBytes 0 picks the content size plus headroom. The image is
// written to a temporary name and renamed into place, so outImage is either
// absent or complete; calling it again replaces the image.
func BuildExt4(ctx context.Context, srcDir, outImage string, sizeBytes int64, label string) error {
	mkfs, err := lookTool("mkfs.ext4")
	if err != nil {
		return err
	}
	if len(label) > maxLabel {
		return fmt.Errorf("ext4 label %q is longer than %d bytes", label, maxLabel)
	}
	st, err := os.Stat(srcDir)
	if err != nil {
		return fmt.Errorf("reading root folder: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("root folder %s is not a directory", srcDir)
	}
	if sizeBytes == 0 {
		used, inodes, err := DiskUsage(srcDir)
		if err != nil {
			return err
		}
		sizeBytes = AutoSize(used, inodes)
	}
	if sizeBytes < minSize {
		sizeBytes = minSize
	}
	// Round to whole 4 KiB blocks: mkfs takes the size in KiB below.
	sizeBytes = (sizeBytes + 4095) &^ 4095

	tmp := outImage + ".tmp"
	_ = os.Remove(tmp)
	args := []string{"-q", "-F", "-t", "ext4", "-d", srcDir, "-E", "root_owner=0:0"}
	if label != "" {
		args = append(args, "-L", label)
	}
	args = append(args, tmp, fmt.Sprintf("%dk", sizeBytes/1024))
	cmd := exec.CommandContext(ctx, mkfs, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		_ = os.Remove(tmp)
		if ctx.Err() != nil {
			// Killed because the caller gave up: say so, not "signal: killed".
			return fmt.Errorf("mkfs.ext4 -d %s: %w", srcDir, ctx.Err())
		}
		msg := strings.TrimSpace(out.String())
		if strings.Contains(msg, "Could not allocate block") || strings.Contains(msg, "No space left") {
			return fmt.Errorf("mkfs.ext4: image of %d bytes is too small for %s (give a larger size): %s: %w", sizeBytes, srcDir, msg, err)
		}
		return fmt.Errorf("mkfs.ext4 -d %s: %s: %w", srcDir, msg, err)
	}
	if err := os.Rename(tmp, outImage); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("placing ext4 image: %w", err)
	}
	return nil
}

// AutoSize is the image size BuildExt4 picks for content of usedBytes in
// inodes files: room for metadata (256-byte inodes, directories, journal)
// plus 20% headroom and a fixed 64 MiB so that a RUN step has space to write.
func AutoSize(usedBytes, inodes int64) int64 {
	return usedBytes + usedBytes/5 + inodes*512 + 64<<20
}

// DiskUsage counts the bytes (rounded to 4 KiB blocks, as ext4 stores
// them) and the entries under dir. Hard links count once.
func DiskUsage(dir string) (bytesUsed, entries int64, err error) {
	seen := map[uint64]bool{}
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		entries++
		info, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok && st.Nlink > 1 && !d.IsDir() {
			if seen[st.Ino] {
				return nil
			}
			seen[st.Ino] = true
		}
		bytesUsed += (info.Size() + 4095) &^ 4095
		return nil
	})
	if err != nil {
		return 0, 0, fmt.Errorf("measuring %s: %w", dir, err)
	}
	return bytesUsed, entries, nil
}

// ErrTooLarge is matched (errors.Is) by ReadFile's error for a file over
// its bound, as is errdefs.ErrInvalid.
var ErrTooLarge = errors.New("file too large")

// TooLargeError says which file was over which bound.
type TooLargeError struct {
	Path      string
	Size, Max int64
}

func (e *TooLargeError) Error() string {
	return fmt.Sprintf("%s in the image is %d bytes; kiln reads at most %s", e.Path, e.Size, byteSize(e.Max))
}

func (e *TooLargeError) Is(target error) bool {
	return target == ErrTooLarge || target == errdefs.ErrInvalid
}

// ReadFile returns the contents of the regular file at path (absolute,
// inside the file system) in the ext4 image, read with debugfs without
// mounting. A guest may have written the image: a file larger than
// maxBytes (its size as the inode records it, not what the superblock
// says) is refused before a byte is read, so a sparse 4 TiB file costs
// nothing.
func ReadFile(ctx context.Context, image, path string, maxBytes int64) ([]byte, error) {
	if err := checkDebugfsPath(path); err != nil {
		return nil, err
	}
	// debugfs prints "File not found" on stderr and still exits 0, so check
	// the inode first.
	fi, err := Stat(ctx, image, path)
	if err != nil {
		return nil, err
	}
	if fi.Mode&syscall.S_IFMT != syscall.S_IFREG {
		return nil, fmt.Errorf("%s in the image is not a regular file: %w", path, errdefs.ErrInvalid)
	}
	if fi.Size < 0 || fi.Size > maxBytes {
		return nil, &TooLargeError{Path: path, Size: fi.Size, Max: maxBytes}
	}
	out, _, err := debugfs(ctx, image, "cat "+quote(path), int(fi.Size)+1)
	if errors.Is(err, errOutputFull) {
		return nil, fmt.Errorf("%w: %s in the image holds more than its size of %d bytes", ErrTooLarge, path, fi.Size)
	}
	if err != nil {
		return nil, err
	}
	return out, nil
}

// byteSize writes n as people read it: "1 MiB", "64 KiB", "100 bytes".
func byteSize(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d bytes", n)
}

// FileInfo is what Stat reports about an inode in an image.
type FileInfo struct {
	Mode uint32 // type and permission bits, as in stat(2)
	UID  int
	GID  int
	Size int64
}

// Stat reports mode, owner and size of path inside the image.
func Stat(ctx context.Context, image, path string) (FileInfo, error) {
	if err := checkDebugfsPath(path); err != nil {
		return FileInfo{}, err
	}
	// "stat" output is verbose; the inode dump format is stable enough to
	// parse for these fields.
	// Past its bound only the extent list is cut: the fields come first.
	out, stderr, err := debugfs(ctx, image, "stat "+quote(path), maxStatOut)
	if err != nil && !errors.Is(err, errOutputFull) {
		return FileInfo{}, err
	}
	if strings.Contains(stderr, "File not found") || len(out) == 0 {
		return FileInfo{}, fmt.Errorf("%s in %s: %w", path, image, fs.ErrNotExist)
	}
	var fi FileInfo
	sizeSeen := false
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		for i := 0; i+1 < len(f); i++ {
			switch f[i] {
			case "Mode:":
				var m uint32
				fmt.Sscanf(f[i+1], "%o", &m)
				fi.Mode |= m
			case "User:":
				fmt.Sscanf(f[i+1], "%d", &fi.UID)
			case "Group:":
				fmt.Sscanf(f[i+1], "%d", &fi.GID)
			case "Size:":
				// Only the first "Size:" (on the User: line) is the file's;
				// "Fragment: ... Size: 0" follows.
				if !sizeSeen {
					fmt.Sscanf(f[i+1], "%d", &fi.Size)
					sizeSeen = true
				}
			case "Type:":
				switch f[i+1] {
				case "directory":
					fi.Mode |= syscall.S_IFDIR
				case "regular":
					fi.Mode |= syscall.S_IFREG
				case "symlink":
					fi.Mode |= syscall.S_IFLNK
				}
			}
		}
	}
	return fi, nil
}

func checkDebugfsPath(p string) error {
	if !strings.HasPrefix(p, "/") || strings.ContainsAny(p, "\"\n") {
		return fmt.Errorf("path %q: must be absolute and contain no quotes or newlines", p)
	}
	return nil
}

func quote(s string) string { return `"` + s + `"` }

// debugfs runs one read-only debugfs request, confined, with its stdout
// bounded by maxOut.
func debugfs(ctx context.Context, image, request string, maxOut int) (stdout []byte, stderr string, err error) {
	o, e, err := toolRun{name: "debugfs", image: image, args: []string{"-R", request, "IMAGE"}, maxOut: maxOut}.run(ctx)
	if err != nil && !errors.Is(err, errOutputFull) {
		return nil, e, fmt.Errorf("debugfs -R %q %s: %s: %w", request, image, strings.TrimSpace(e), err)
	}
	return o, e, err
}

// Mkdir creates the directory path (and missing parents, owned by root,
// mode 0755) inside the image, in place, without mounting. Existing
// directories are left alone.
func Mkdir(ctx context.Context, image, path string) error {
	if err := checkDebugfsPath(path); err != nil {
		return err
	}
	var cmds []string
	p := ""
	for _, part := range strings.Split(strings.Trim(path, "/"), "/") {
		if part == "" {
			continue
		}
		p += "/" + part
		if _, err := Stat(ctx, image, p); err == nil {
			continue
		}
		cmds = append(cmds, "mkdir "+quote(p))
	}
	for _, c := range cmds {
		if _, stderr, err := debugfsW(ctx, image, c); err != nil || strings.TrimSpace(stripBanner(stderr)) != "" {
			return fmt.Errorf("debugfs %s in %s: %s: %v", c, image, strings.TrimSpace(stderr), err)
		}
	}
	return nil
}

func stripBanner(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(l, "debugfs ") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

func debugfsW(ctx context.Context, image, request string) ([]byte, string, error) {
	return toolRun{name: "debugfs", image: image, write: true, args: []string{"-w", "-R", request, "IMAGE"}}.run(ctx)
}
