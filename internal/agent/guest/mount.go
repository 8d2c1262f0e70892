//go:build linux

package guest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/proto"
	"golang.org/x/sys/unix"
)

// Mounter mounts a build step's file systems (RUN --mount) into the
// guest's root. LinuxSystem implements it; a System without it (tests on
// a host) refuses mount requests.
type Mounter interface {
	MountStep(specs []proto.MountSpec) error
	UnmountStep() ([]proto.MountUsage, error)
}

func (s *Server) mount(req proto.MountRequest) error {
	m, ok := s.cfg.System.(Mounter)
	if !ok {
		return errors.New("mount: not supported by this agent's system")
	}
	if len(req.Mounts) > proto.MaxMounts {
		return fmt.Errorf("mount: %d mounts, at most %d", len(req.Mounts), proto.MaxMounts)
	}
	return m.MountStep(req.Mounts)
}

func (s *Server) unmount() (any, error) {
	m, ok := s.cfg.System.(Mounter)
	if !ok {
		return nil, errors.New("unmount: not supported by this agent's system")
	}
	u, err := m.UnmountStep()
	return proto.UnmountResult{Usage: u}, err
}

// stagingDir holds the disks' own mounts; a disk's Sub is bind-mounted
// from there onto the target. It is on /dev (devtmpfs), so the folders
// never land in the root disk the step is building.
const stagingDir = "/dev/.kiln-mnt"

// diskAppearWait bounds the wait for an attached disk's device node.
const diskAppearWait = 5 * time.Second

type activeMount struct {
	spec    proto.MountSpec
	staging string // "" for tmpfs
	target  bool   // the target is mounted
}

// MountStep implements Mounter. On error, what it mounted is undone.
func (l *LinuxSystem) MountStep(specs []proto.MountSpec) error {
	l.mountMu.Lock()
	defer l.mountMu.Unlock()
	if len(l.mounts) > 0 {
		return errors.New("mount: a step's mounts are in place already; unmount first")
	}
	for i, sp := range specs {
		a, err := mountOne(i, sp)
		if a != nil {
			l.mounts = append(l.mounts, a)
		}
		if err != nil {
			l.unmountAll()
			return fmt.Errorf("mount %s: %w", sp.Target, err)
		}
	}
	return nil
}

// UnmountStep implements Mounter: it unmounts in reverse order, lazily
// when a process the step left behind still holds a file.
func (l *LinuxSystem) UnmountStep() ([]proto.MountUsage, error) {
	l.mountMu.Lock()
	defer l.mountMu.Unlock()
	return l.unmountAll()
}

func (l *LinuxSystem) unmountAll() ([]proto.MountUsage, error) {
	usage := make([]proto.MountUsage, len(l.mounts))
	var errs []error
	for i := len(l.mounts) - 1; i >= 0; i-- {
		a := l.mounts[i]
		usage[i].Target = a.spec.Target
		if a.staging != "" {
			var st unix.Statfs_t
			if unix.Statfs(a.staging, &st) == nil {
				bs := uint64(st.Bsize)
				usage[i].TotalBytes, usage[i].FreeBytes = st.Blocks*bs, st.Bavail*bs
				usage[i].TotalInodes, usage[i].FreeInodes = st.Files, st.Ffree
			}
		}
		if a.target {
			errs = append(errs, detach(a.spec.Target))
		}
		if a.staging != "" {
			errs = append(errs, detach(a.staging))
			_ = os.Remove(a.staging)
		}
	}
	l.mounts = nil
	return usage, errors.Join(errs...)
}

func detach(dir string) error {
	if err := unix.Unmount(dir, 0); err == nil {
		return nil
	}
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("unmounting %s: %w", dir, err)
	}
	return nil
}

func checkSpec(sp proto.MountSpec) error {
	if !filepath.IsAbs(sp.Target) || filepath.Clean(sp.Target) != sp.Target || sp.Target == "/" {
		return fmt.Errorf("target %q is not a clean absolute path below /", sp.Target)
	}
	if sp.Sub != "" && !filepath.IsLocal(sp.Sub) {
		return fmt.Errorf("sub %q is not a path inside the disk", sp.Sub)
	}
	if sp.Mode > 0o7777 || sp.SizeBytes < 0 {
		return errors.New("bad mode or size")
	}
	return nil
}

func mountOne(i int, sp proto.MountSpec) (*activeMount, error) {
	if err := checkSpec(sp); err != nil {
		return nil, err
	}
	switch sp.Kind {
	case proto.MountTmpfs:
		if err := os.MkdirAll(sp.Target, 0o755); err != nil {
			return nil, err
		}
		data := "mode=1777"
		if sp.SizeBytes > 0 {
			data += ",size=" + strconv.FormatInt(sp.SizeBytes, 10)
		}
		if err := unix.Mount("tmpfs", sp.Target, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, data); err != nil {
			return nil, fmt.Errorf("mounting tmpfs: %w", err)
		}
		return &activeMount{spec: sp, target: true}, nil
	case proto.MountDisk:
	default:
		return nil, fmt.Errorf("unknown mount kind %q", sp.Kind)
	}
	dev, err := findDisk(sp.Serial)
	if err != nil {
		return nil, err
	}
	staging := filepath.Join(stagingDir, strconv.Itoa(i))
	if err := os.MkdirAll(staging, 0o700); err != nil {
		return nil, err
	}
	var flags uintptr
	if sp.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount(dev, staging, "ext4", flags, ""); err != nil {
		_ = os.Remove(staging)
		return nil, fmt.Errorf("mounting disk %s (ext4): %w", sp.Serial, err)
	}
	a := &activeMount{spec: sp, staging: staging}
	if sp.Init && !sp.ReadOnly {
		_ = os.RemoveAll(filepath.Join(staging, "lost+found"))
		if err := os.Chown(staging, int(sp.UID), int(sp.GID)); err != nil {
			return a, err
		}
		if err := os.Chmod(staging, os.FileMode(sp.Mode&0o777)|modeBits(sp.Mode)); err != nil {
			return a, err
		}
	}
	src := filepath.Join(staging, sp.Sub)
	fi, err := os.Lstat(src)
	if err != nil {
		return a, fmt.Errorf("the disk holds no %s: %w", sp.Sub, err)
	}
	if err := makeTarget(sp.Target, fi.IsDir()); err != nil {
		return a, err
	}
	if err := unix.Mount(src, sp.Target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return a, fmt.Errorf("bind-mounting: %w", err)
	}
	a.target = true
	if sp.ReadOnly {
		if err := unix.Mount("", sp.Target, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
			return a, fmt.Errorf("making it read-only: %w", err)
		}
	}
	return a, nil
}

// modeBits maps the setuid, setgid and sticky bits of a Unix mode to Go's.
func modeBits(m uint32) os.FileMode {
	var out os.FileMode
	if m&0o4000 != 0 {
		out |= os.ModeSetuid
	}
	if m&0o2000 != 0 {
		out |= os.ModeSetgid
	}
	if m&0o1000 != 0 {
		out |= os.ModeSticky
	}
	return out
}

// makeTarget creates the mount point when missing: a folder, or an empty
// file for a file. It stays in the root afterwards, as BuildKit's do.
func makeTarget(target string, dir bool) error {
	if _, err := os.Stat(target); err == nil {
		return nil
	}
	if dir {
		return os.MkdirAll(target, 0o755)
	}
	if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(target, os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}

// findDisk returns the device node of the virtio disk whose serial is
// serial, waiting a little for it to appear.
func findDisk(serial string) (string, error) {
	if serial == "" {
		return "", errors.New("no disk serial")
	}
	deadline := time.Now().Add(diskAppearWait)
	for {
		paths, _ := filepath.Glob("/sys/block/vd*/serial")
		for _, p := range paths {
			b, err := os.ReadFile(p)
			if err == nil && strings.TrimSpace(string(b)) == serial {
				dev := "/dev/" + filepath.Base(filepath.Dir(p))
				if _, err := os.Stat(dev); err == nil {
					return dev, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no disk with serial %q appeared within %s", serial, diskAppearWait)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
