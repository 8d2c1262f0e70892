//go:build linux

package rootfs

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-sandbox/kiln/internal/hosttool"
)

// Mounted is an ext4 image served at Dir by fuse2fs.
//
// Why fuse2fs: disks that build VMs wrote are hostile input. The host
// kernel never parses them (no loop mount), and debugfs rdump cannot be
// used to take them apart either: it writes names from the image with
// open(2), so a crafted directory holding a symbolic link and a file of
// the same name would make it write through the link onto the host. Over
// a FUSE mount, callers go through os.Root like any other folder, and
// what a COPY does not touch (hard links, extended attributes, file
// capabilities) stays as it is in the image instead of being lost in a
// round trip.
type Mounted struct {
	Dir string

	cmd    *exec.Cmd
	exited chan struct{}
	stderr *boundedBuffer
	once   sync.Once
	err    error
}

// mountWait bounds how long fuse2fs may take to open an image, and
// unmountWait how long it may take to write one back after unmount.
var (
	mountWait   = 30 * time.Second
	unmountWait = 2 * time.Minute
)

// Mount serves image at dir (an existing, empty folder) with fuse2fs,
// read-only or writable. The mount lives until Close, or until ctx ends:
// then fuse2fs is killed, so that a file operation stuck on a hostile
// image fails instead of hanging. Close must be called either way.
//
// fuse2fs parses the hostile image, so it runs confined like every other
// host tool (hosttool: its own uid, no network, its own mount and PID
// namespaces, limits, an empty environment). The mount is kiln's own:
// kiln opens /dev/fuse and mounts it at dir with user_id and group_id its
// own (root's) and without allow_other, so only kiln may use it, and no
// host setting (/etc/fuse.conf's user_allow_other, fuse's
// allow_sys_admin_access) has to change. fuse2fs (libfuse 2, which cannot
// take a mounted descriptor as /dev/fd/N) receives that /dev/fuse
// descriptor through libfuse's fusermount fallback (hosttool.Spec.FUSE),
// and the image as a descriptor.
func Mount(ctx context.Context, image, dir string, readOnly bool) (*Mounted, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	img, err := hosttool.Open(image, !readOnly)
	if err != nil {
		return nil, fmt.Errorf("opening %s for fuse2fs: %w", image, err)
	}
	defer img.Close()
	dev, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("fuse2fs needs /dev/fuse (load the fuse module: modprobe fuse): %w", err)
	}
	// Closed once fuse2fs holds it: then the connection ends (and every
	// waiting file operation fails) as soon as fuse2fs exits.
	defer dev.Close()
	// No setuid files, devices or programs from the image on the host.
	flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
	if readOnly {
		flags |= unix.MS_RDONLY
	}
	data := fmt.Sprintf("fd=%d,rootmode=40000,user_id=%d,group_id=%d,default_permissions",
		dev.Fd(), os.Getuid(), os.Getgid())
	if err := unix.Mount("fuse2fs", dir, "fuse.fuse2fs", flags, data); err != nil {
		return nil, fmt.Errorf("mounting FUSE at %s: %w", dir, err)
	}
	// Options for fuse2fs itself; the kernel's were set above (libfuse
	// passes its own on to fusermount, which ignores them).
	opts := "no_default_opts,use_ino"
	if readOnly {
		opts += ",ro"
	}
	m := &Mounted{Dir: dir, exited: make(chan struct{}), stderr: &boundedBuffer{max: 8 << 10}}
	m.cmd, err = hosttool.Command(context.Background(), hosttool.Spec{
		Path: "fuse2fs", Args: []string{hosttool.FD(0), hosttool.MountPoint, "-f", "-o", opts},
		Files: []*os.File{img}, FUSE: dev,
		CPU: 30 * time.Minute, Stdout: m.stderr, Stderr: m.stderr,
	})
	if err == nil {
		err = m.cmd.Start()
	}
	if err != nil {
		unmount(dir)
		return nil, fmt.Errorf("starting fuse2fs: %w", err)
	}
	dev.Close()
	go func() {
		m.err = m.cmd.Wait()
		close(m.exited)
	}()
	go func() {
		select {
		case <-ctx.Done():
			m.cmd.Process.Kill()
		case <-m.exited:
		}
	}()
	// The first look at dir waits until fuse2fs answers (or is gone).
	served := make(chan error, 1)
	go func() {
		_, err := devOf(dir)
		served <- err
	}()
	deadline := time.NewTimer(mountWait)
	defer deadline.Stop()
	select {
	case err = <-served:
		if err == nil {
			return m, nil
		}
		// The connection ended: fuse2fs is exiting; take its message.
		select {
		case <-m.exited:
		case <-deadline.C:
		}
		m.Close()
		return nil, fmt.Errorf("fuse2fs %s: %s (%v, %v)", image, strings.TrimSpace(m.stderr.String()), err, m.err)
	case <-m.exited:
		unmount(dir)
		return nil, fmt.Errorf("fuse2fs %s: %s (%v)", image, strings.TrimSpace(m.stderr.String()), m.err)
	case <-deadline.C:
		m.Close()
		return nil, fmt.Errorf("fuse2fs %s: not serving after %s", image, mountWait)
	case <-ctx.Done():
		m.Close()
		return nil, ctx.Err()
	}
}

// Close unmounts and waits until fuse2fs has written the image back and
// exited. An error means a writable image may be incomplete.
func (m *Mounted) Close() error {
	var err error
	m.once.Do(func() { err = m.close() })
	return err
}

func (m *Mounted) close() error {
	unmount(m.Dir)
	t := time.NewTimer(unmountWait)
	defer t.Stop()
	select {
	case <-m.exited:
	case <-t.C:
		m.cmd.Process.Kill()
		<-m.exited
		return fmt.Errorf("fuse2fs did not finish writing %s back within %s", m.Dir, unmountWait)
	}
	if m.err != nil {
		return fmt.Errorf("fuse2fs %s: %s (%v)", m.Dir, strings.TrimSpace(m.stderr.String()), m.err)
	}
	return nil
}

// unmount detaches dir, lazily if something still holds it open; a dir
// that is not mounted is fine.
func unmount(dir string) {
	for i := 0; i < 20; i++ {
		err := syscall.Unmount(dir, 0)
		if err == nil || errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.ENOENT) {
			return
		}
		if !errors.Is(err, syscall.EBUSY) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = syscall.Unmount(dir, syscall.MNT_DETACH)
}

// UnmountUnder detaches every mount at or below dir, so that removing dir
// never deletes files inside a mounted image that a failed or killed
// build left behind.
func UnmountUnder(dir string) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	// mountinfo names mount points by their resolved paths.
	if r, err := filepath.EvalSymlinks(dir); err == nil {
		dir = r
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	defer f.Close()
	var points []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		p := unescapeMountinfo(fields[4])
		if p == dir || strings.HasPrefix(p, dir+"/") {
			points = append(points, p)
		}
	}
	// Deepest first.
	for i := len(points) - 1; i >= 0; i-- {
		unmount(points[i])
	}
	return sc.Err()
}

// unescapeMountinfo undoes the octal escapes (\040 for a space) of
// /proc/self/mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func devOf(dir string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		return 0, err
	}
	return st.Dev, nil
}

// boundedBuffer keeps the first max bytes written to it: fuse2fs's
// messages, which a hostile image could make endless.
type boundedBuffer struct {
	mu  sync.Mutex
	max int
	buf bytes.Buffer
}

func (b *boundedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if room := b.max - b.buf.Len(); room > 0 {
		if len(p) > room {
			b.buf.Write(p[:room])
		} else {
			b.buf.Write(p)
		}
	}
	return len(p), nil
}

func (b *boundedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Edit mounts image writable at a temporary folder, calls fn with the
// folder, and writes the image back.
func Edit(ctx context.Context, image string, fn func(dir string) error) error {
	dir, err := os.MkdirTemp("", "kiln-edit-")
	if err != nil {
		return err
	}
	defer os.Remove(dir)
	m, err := Mount(ctx, image, dir, false)
	if err != nil {
		return err
	}
	ferr := fn(dir)
	if err := m.Close(); err != nil {
		return err
	}
	return ferr
}
