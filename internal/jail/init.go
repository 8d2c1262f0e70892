//go:build linux

package jail

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// init turns this process into the jail's init when it was started as one
// (see Command); it never returns then.
func init() {
	if len(os.Args) != 2 || os.Args[0] != initArg {
		return
	}
	// Namespaces joined with setns, no_new_privs and the capability
	// bounding set are per thread: all of it and the execve happen on
	// this one.
	runtime.LockOSThread()
	var s initSpec
	if err := json.Unmarshal([]byte(os.Args[1]), &s); err != nil {
		fail("reading the jail spec", err)
	}
	if err := s.enter(); err != nil {
		fail("setting up the jail", err)
	}
	fail("exec "+s.Path, syscall.Exec(s.Path, s.Args, []string{}))
}

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "kiln-jail-init: %s: %v\n", what, err)
	os.Exit(127)
}

// enter confines the calling thread; execve is all that is left to do.
func (s *initSpec) enter() error {
	// The cgroup first, so that all that follows is accounted there.
	// Its namespace before that: the kernel checks the namespace
	// cgroup.procs was opened in (cgroupns.go).
	if s.CgroupNS != "" {
		if err := setns(s.CgroupNS, unix.CLONE_NEWCGROUP); err != nil {
			return fmt.Errorf("entering the host's cgroup namespace: %w", err)
		}
	}
	// "0" means the writing process, whatever PID namespace it is in.
	for _, d := range s.CgroupDirs {
		if err := os.WriteFile(filepath.Join(d, "cgroup.procs"), []byte("0"), 0); err != nil {
			return fmt.Errorf("joining cgroup %s: %w", d, errCgroupNSRefused(d, err))
		}
	}
	if s.NetNS != "" {
		if err := setns(s.NetNS, unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("entering netns: %w", err)
		}
	}
	if err := s.buildRoot(); err != nil {
		return err
	}
	if err := pivot(s.Root); err != nil {
		return err
	}
	dir := s.Dir
	if dir == "" {
		dir = "/"
	}
	if err := unix.Chdir(dir); err != nil {
		return fmt.Errorf("chdir %s: %w", dir, err)
	}
	if err := s.setRlimits(); err != nil {
		return err
	}
	// Drop every capability from the bounding set while still root, so
	// nothing executed later can regain one; then the ids.
	for c := 0; c <= unix.CAP_LAST_CAP; c++ {
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil && err != unix.EINVAL {
			return fmt.Errorf("dropping capability %d: %w", c, err)
		}
	}
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setresgid(int(s.GID), int(s.GID), int(s.GID)); err != nil {
		return fmt.Errorf("setresgid: %w", err)
	}
	if err := syscall.Setresuid(int(s.UID), int(s.UID), int(s.UID)); err != nil {
		return fmt.Errorf("setresuid: %w", err)
	}
	if s.Pdeathsig != 0 {
		if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(s.Pdeathsig), 0, 0, 0); err != nil {
			return fmt.Errorf("pdeathsig: %w", err)
		}
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	// Only stdin, stdout, stderr and the descriptors asked for survive the
	// exec; whatever else this process holds is closed by it.
	if err := unix.CloseRange(uint(3+s.NFiles), ^uint(0), unix.CLOSE_RANGE_CLOEXEC); err != nil {
		return fmt.Errorf("close_range: %w", err)
	}
	return nil
}

// setns moves the calling thread (locked by init) into the namespace
// file path names.
func setns(path string, kind int) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening %s: %w", path, err)
	}
	defer unix.Close(fd)
	if err := unix.Setns(fd, kind); err != nil {
		return fmt.Errorf("setns %s: %w", path, err)
	}
	return nil
}

// buildRoot prepares the jail's tree while the host's is still visible.
func (s *initSpec) buildRoot() error {
	// Nothing mounted here may reach the host's namespace.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making / private: %w", err)
	}
	// pivot_root needs the new root to be a mount point.
	if err := unix.Mount(s.Root, s.Root, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("binding the jail root: %w", err)
	}
	for _, b := range s.Binds {
		if err := bindInto(s.Root, b); err != nil {
			return err
		}
	}
	if err := s.makeDev(); err != nil {
		return err
	}
	proc := filepath.Join(s.Root, "proc")
	if err := os.MkdirAll(proc, 0o555); err != nil {
		return err
	}
	// A fresh /proc shows only this PID namespace.
	if err := unix.Mount("proc", proc, "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mounting /proc: %w", err)
	}
	return nil
}

func bindInto(root string, b Bind) error {
	dst := filepath.Join(root, filepath.Clean(b.Dst))
	st, err := os.Lstat(b.Src)
	if err != nil {
		return fmt.Errorf("bind %s: %w", b.Src, err)
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	if st.Mode()&os.ModeSymlink != 0 {
		target, err := os.Readlink(b.Src)
		if err != nil {
			return err
		}
		if cur, err := os.Readlink(dst); err == nil && cur == target {
			return nil
		}
		return os.Symlink(target, dst)
	}
	if st.IsDir() {
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return err
		}
	} else if _, err := os.Lstat(dst); err != nil {
		f, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		f.Close()
	}
	if err := unix.Mount(b.Src, dst, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s -> %s: %w", b.Src, b.Dst, err)
	}
	flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_NOSUID | unix.MS_NODEV)
	if b.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount("", dst, "", flags, ""); err != nil {
		return fmt.Errorf("remounting %s: %w", b.Dst, err)
	}
	return nil
}

// makeDev gives the jail a /dev of its own holding only the devices asked
// for, on a tiny tmpfs that vanishes with the mount namespace.
func (s *initSpec) makeDev() error {
	dev := filepath.Join(s.Root, "dev")
	if err := os.MkdirAll(dev, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("tmpfs", dev, "tmpfs", unix.MS_NOSUID|unix.MS_NOEXEC, "mode=755,size=64k,nr_inodes=64"); err != nil {
		return fmt.Errorf("mounting /dev: %w", err)
	}
	for _, d := range s.Devices {
		var st unix.Stat_t
		if err := unix.Stat(d, &st); err != nil {
			continue // not on this host
		}
		if st.Mode&unix.S_IFMT != unix.S_IFCHR {
			return fmt.Errorf("%s is not a character device", d)
		}
		dst := filepath.Join(dev, strings.TrimPrefix(filepath.Clean(d), "/dev/"))
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		perm := st.Mode & 0o666
		if err := unix.Mknod(dst, unix.S_IFCHR|perm, int(st.Rdev)); err != nil {
			return fmt.Errorf("mknod %s: %w", dst, err)
		}
		if err := unix.Chown(dst, int(s.UID), int(s.GID)); err != nil {
			return err
		}
		if err := unix.Chmod(dst, perm); err != nil {
			return err
		}
	}
	return unix.Mount("", dev, "", unix.MS_REMOUNT|unix.MS_NOSUID|unix.MS_NOEXEC|unix.MS_RDONLY, "mode=755,size=64k,nr_inodes=64")
}

// pivot makes root the new "/" and lets go of the host's tree entirely.
func pivot(root string) error {
	if err := unix.Chdir(root); err != nil {
		return err
	}
	// pivot_root(".", ".") stacks the old root on top of the new one; the
	// detach then removes it without needing a directory for it.
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detaching the old root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	// The jail's own tree is read-only; writable places are binds.
	if err := unix.Mount("", "/", "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return fmt.Errorf("remounting the jail root read-only: %w", err)
	}
	return nil
}

func (s *initSpec) setRlimits() error {
	for _, l := range []struct {
		res int
		v   uint64
	}{
		{unix.RLIMIT_NOFILE, s.Rlimits.NOFILE},
		{unix.RLIMIT_FSIZE, s.Rlimits.FSIZE},
		{unix.RLIMIT_NPROC, s.Rlimits.NPROC},
		{unix.RLIMIT_CPU, s.Rlimits.CPU},
		{unix.RLIMIT_AS, s.Rlimits.AS},
	} {
		if l.v == 0 {
			continue
		}
		if err := unix.Setrlimit(l.res, &unix.Rlimit{Cur: l.v, Max: l.v}); err != nil {
			return fmt.Errorf("setrlimit %d: %w", l.res, err)
		}
	}
	return nil
}
