//go:build linux

package guest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// LinuxSystem is the System of a real guest: workloads live in one cgroup
// v2 directory, which it freezes, thaws and kills.
type LinuxSystem struct {
	CgroupDir string
	Log       *slog.Logger

	// Opened at the first Freeze and kept: a restored guest runs under TCG
	// with a cold translation cache, so every path lookup it can skip on
	// the restore path (which clone start-up waits for) is time saved.
	freezeFD *os.File
	urandom  *os.File

	mountMu sync.Mutex
	mounts  []*activeMount // a build step's (mount.go)
}

var _ System = (*LinuxSystem)(nil)

// Freeze freezes the workload cgroup, waits until the kernel reports it
// frozen, then syncs filesystems so a disk snapshot taken now is consistent.
func (l *LinuxSystem) Freeze(ctx context.Context) error {
	if l.freezeFD == nil {
		if f, err := os.OpenFile(filepath.Join(l.CgroupDir, "cgroup.freeze"), os.O_WRONLY, 0); err == nil {
			l.freezeFD = f
		}
	}
	if l.urandom == nil {
		if f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0); err == nil {
			l.urandom = f
		}
	}
	if err := l.setFrozen(ctx, true); err != nil {
		return err
	}
	unix.Sync()
	return nil
}

// Thaw thaws the workload cgroup. It does not wait for the kernel to
// report the thaw: tasks run again as soon as they are scheduled.
func (l *LinuxSystem) Thaw(ctx context.Context) error {
	if l.freezeFD != nil {
		if _, err := unix.Pwrite(int(l.freezeFD.Fd()), []byte("0"), 0); err == nil {
			return nil
		}
	}
	return l.setFrozen(ctx, false)
}

func (l *LinuxSystem) setFrozen(ctx context.Context, frozen bool) error {
	v, want := "0", "frozen 0"
	if frozen {
		v, want = "1", "frozen 1"
	}
	if err := os.WriteFile(filepath.Join(l.CgroupDir, "cgroup.freeze"), []byte(v), 0); err != nil {
		return fmt.Errorf("writing cgroup.freeze: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for {
		ev, err := os.ReadFile(filepath.Join(l.CgroupDir, "cgroup.events"))
		if err != nil {
			return fmt.Errorf("reading cgroup.events: %w", err)
		}
		if slices.Contains(strings.Split(string(ev), "\n"), want) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for cgroup %q: %w", want, ctx.Err())
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// Reseed credits entropy to the kernel RNG (RNDADDENTROPY) and forces the
// CRNG to reseed from it (RNDRESEEDCRNG), so clones of one snapshot stop
// sharing the template's RNG state.
func (l *LinuxSystem) Reseed(entropy []byte) error {
	f := l.urandom
	if f == nil {
		var err error
		if f, err = os.OpenFile("/dev/urandom", os.O_WRONLY, 0); err != nil {
			return fmt.Errorf("opening /dev/urandom: %w", err)
		}
		defer f.Close()
	}
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	buf := make([]byte, 8+(len(entropy)+3)/4*4)
	binary.NativeEndian.PutUint32(buf[0:], uint32(len(entropy)*8))
	binary.NativeEndian.PutUint32(buf[4:], uint32(len(entropy)))
	copy(buf[8:], entropy)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", errno)
	}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDRESEEDCRNG, 0); errno != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %w", errno)
	}
	return nil
}

// SetClock sets CLOCK_REALTIME.
func (l *LinuxSystem) SetClock(t time.Time) error {
	ts := unix.NsecToTimespec(t.UnixNano())
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
		return fmt.Errorf("clock_settime: %w", err)
	}
	return nil
}

// SetHostname sets the kernel hostname. It leaves /etc/hostname alone:
// writing it cost ~45 ms per clone under TCG (ext4 journal), on the path
// every restore waits for, and programs ask the kernel (uname) anyway.
func (l *LinuxSystem) SetHostname(name string) error {
	if len(name) > 64 {
		return fmt.Errorf("hostname %q longer than 64 bytes", name)
	}
	if err := unix.Sethostname([]byte(name)); err != nil {
		return fmt.Errorf("sethostname: %w", err)
	}
	return nil
}

// KillAll signals every process in the workload cgroup.
func (l *LinuxSystem) KillAll(sig int) error {
	if sig == int(unix.SIGKILL) {
		// cgroup.kill (Linux 5.14+) kills atomically, racing no forks.
		if err := os.WriteFile(filepath.Join(l.CgroupDir, "cgroup.kill"), []byte("1"), 0); err == nil {
			return nil
		}
	}
	procs, err := os.ReadFile(filepath.Join(l.CgroupDir, "cgroup.procs"))
	if err != nil {
		return fmt.Errorf("reading cgroup.procs: %w", err)
	}
	for _, line := range strings.Fields(string(procs)) {
		if pid, err := strconv.Atoi(line); err == nil && pid > 1 {
			_ = unix.Kill(pid, unix.Signal(sig))
		}
	}
	return nil
}

// Running counts the processes in the workload cgroup.
func (l *LinuxSystem) Running() int {
	procs, err := os.ReadFile(filepath.Join(l.CgroupDir, "cgroup.procs"))
	if err != nil {
		return 0
	}
	return len(strings.Fields(string(procs)))
}

// PowerOff unmounts what it can, remounts the root read-only and powers off.
func (l *LinuxSystem) PowerOff() error {
	unix.Sync()
	mounts, _ := os.ReadFile("/proc/self/mounts")
	var points []string
	sc := bufio.NewScanner(bytes.NewReader(mounts))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 2 && f[1] != "/" {
			points = append(points, f[1])
		}
	}
	for i := len(points) - 1; i >= 0; i-- {
		_ = unix.Unmount(points[i], unix.MNT_DETACH)
	}
	if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil && l.Log != nil {
		l.Log.Warn("remounting root read-only", "err", err)
	}
	unix.Sync()
	err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	return errors.Join(errors.New("reboot(POWER_OFF) returned"), err)
}
