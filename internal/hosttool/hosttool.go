//go:build linux

// Package hosttool runs the host programs kiln points at disks a guest
// wrote (e2fsck, resize2fs, debugfs, dumpe2fs, fuse2fs, qemu-img). Those
// disks are hostile input to parsers written in C, so every such program
// starts here, confined by internal/jail: a uid of its own (not root), a
// new and empty network namespace, new mount, PID, IPC and UTS namespaces
// with a root holding only the read-only system folders (/usr, /lib...),
// no capabilities, no_new_privs, an empty environment, and limits on CPU
// time, address space, processes and open files. Files reach it only as
// descriptors (/proc/self/fd/N), so it sees nothing else of the host.
//
// fuse2fs is the exception (Spec.Root): its mount must be visible to kiln,
// so it keeps root and the host's mount namespace; it still gets an empty
// network namespace, new IPC and UTS namespaces, the empty environment,
// no_new_privs and the rlimits (set by util-linux's prlimit and setpriv,
// exec'd before it: Go's SysProcAttr has neither).
package hosttool

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/jail"
)

// ID is the uid and gid host tools run as when the caller names none: the
// id just above the range the QEMU driver picks VM uids from (0x6b690000
// plus 65536), so no VM's QEMU shares it. No account
// on the host should own it; the files a tool works on are handed to this
// group (Grant).
var ID uint32 = 0x6b6a0000

// Default limits. CPU time bounds a tool looping on a crafted image; the
// address space bounds what a crafted length field can make it allocate.
// e2fsck's need grows with the file system (about 1 MiB per GiB of
// metadata), qemu-img reserves coroutine stacks: 2 GiB covers both for
// images far above what a build makes.
const (
	DefaultCPU          = 5 * time.Minute
	DefaultAddressSpace = 2 << 30
	DefaultOpenFiles    = 1024
	// DefaultProcesses bounds the tools' uid as a whole (RLIMIT_NPROC
	// counts every process and thread of the uid, across concurrent tools;
	// qemu-img starts a pool of worker threads).
	DefaultProcesses = 1024
)

// Spec describes one confined run.
type Spec struct {
	// Path is the tool (an absolute path, or a name looked up in PATH,
	// /usr/sbin and /sbin).
	Path string
	Args []string
	// Files are handed over as descriptors 3, 4, ... in order (see
	// FD). The tool's uid must be allowed to open them again (Grant):
	// opening /proc/self/fd/N checks the inode's permissions.
	Files []*os.File
	// UID and GID the tool runs as; 0 means ID.
	UID, GID uint32
	// Root keeps uid 0 and the host's mount namespace (and file system),
	// for fuse2fs: its mount must be visible to kiln, and a FUSE mount
	// made by another uid is closed to root unless the host allows other
	// users (see rootfs.Mount). Network, IPC and UTS namespaces, rlimits,
	// the empty environment and no_new_privs still apply.
	Root bool
	// CPU time and address-space limits; 0 means the defaults.
	CPU          time.Duration
	AddressSpace uint64
	Stdin        io.Reader
	Stdout       io.Writer
	Stderr       io.Writer
}

// FD is the path under which the tool sees Spec.Files[i]. (/proc, not
// /dev/fd: the jail's /dev holds no such link.)
func FD(i int) string { return "/proc/self/fd/" + strconv.Itoa(3+i) }

// ErrToolMissing is returned when a tool or the util-linux helpers are
// not installed.
var ErrToolMissing = fmt.Errorf("host tool missing (install it with `make setup`, which runs scripts/setup.sh): %w", errdefs.ErrUnavailable)

// Look finds a tool by name, also in /usr/sbin and /sbin (a test runner's
// PATH may lack them).
func Look(name string) (string, error) {
	if filepath.IsAbs(name) {
		if _, err := os.Stat(name); err != nil {
			return "", fmt.Errorf("%s: %w", name, ErrToolMissing)
		}
		return name, nil
	}
	if p, err := exec.LookPath(name); err == nil {
		return filepath.Abs(p)
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		c := filepath.Join(dir, name)
		if _, err := os.Stat(c); err == nil {
			return c, nil
		}
	}
	return "", fmt.Errorf("%s: %w", name, ErrToolMissing)
}

// Command returns the confined command for s; the caller runs it (Run,
// Start, CombinedOutput). ctx kills it.
func Command(ctx context.Context, s Spec) (*exec.Cmd, error) {
	tool, err := Look(s.Path)
	if err != nil {
		return nil, err
	}
	cpu := s.CPU
	if cpu <= 0 {
		cpu = DefaultCPU
	}
	cpuSecs := uint64((cpu + time.Second - 1) / time.Second)
	as := s.AddressSpace
	if as == 0 {
		as = DefaultAddressSpace
	}
	if s.Root {
		return rootCommand(ctx, s, tool, cpuSecs, as)
	}
	uid, gid := s.UID, s.GID
	if uid == 0 {
		uid = ID
	}
	if gid == 0 {
		gid = ID
	}
	root, err := jailRoot()
	if err != nil {
		return nil, err
	}
	cmd, err := jail.Command(ctx, jail.Spec{
		Root: root, Binds: jail.SystemBinds(),
		// What C programs take for granted; nothing that reaches hardware.
		Devices: []string{"/dev/null", "/dev/zero", "/dev/urandom"},
		UID:     uid, GID: gid,
		Rlimits: jail.Rlimits{CPU: cpuSecs, AS: as, NOFILE: DefaultOpenFiles, NPROC: DefaultProcesses},
		Path:    tool, Args: append([]string{tool}, s.Args...),
		ExtraFiles: s.Files,
	})
	if err != nil {
		return nil, err
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = s.Stdin, s.Stdout, s.Stderr
	cmd.WaitDelay = 5 * time.Second
	return cmd, nil
}

// rootCommand runs fuse2fs-like tools: root, host mount namespace, the
// rest confined.
func rootCommand(ctx context.Context, s Spec, tool string, cpuSecs, as uint64) (*exec.Cmd, error) {
	prlimit, err := Look("prlimit")
	if err != nil {
		return nil, err
	}
	setpriv, err := Look("setpriv")
	if err != nil {
		return nil, err
	}
	args := []string{
		"--cpu=" + strconv.FormatUint(cpuSecs, 10),
		"--as=" + strconv.FormatUint(as, 10),
		"--nofile=" + strconv.Itoa(DefaultOpenFiles),
		"--", setpriv, "--no-new-privs", "--", tool,
	}
	args = append(args, s.Args...)
	cmd := exec.CommandContext(ctx, prlimit, args...)
	cmd.Env = []string{} // not nil: nil would inherit kiln's
	cmd.Dir = "/"
	cmd.Stdin, cmd.Stdout, cmd.Stderr = s.Stdin, s.Stdout, s.Stderr
	cmd.ExtraFiles = s.Files
	cmd.WaitDelay = 5 * time.Second
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNET | syscall.CLONE_NEWIPC | syscall.CLONE_NEWUTS,
		// fuse2fs unmounts and exits on SIGTERM: no mount outlives kiln.
		Pdeathsig: syscall.SIGTERM,
	}
	return cmd, nil
}

// rootDir is the jail root every confined tool shares: an empty folder,
// root's and 0755, in which the jail makes the mount points for the
// system binds (each run mounts them in its own namespace).
const rootDir = "/run/kiln-hosttool"

var (
	rootOnce sync.Once
	rootErr  error
)

// jailRoot makes rootDir once per process, with the mount points and
// links the binds need made up front, so concurrent runs do not race to
// create them.
func jailRoot() (string, error) {
	rootOnce.Do(func() {
		if err := jail.Supported(); err != nil {
			rootErr = fmt.Errorf("running host tools confined: %w", err)
			return
		}
		if err := os.MkdirAll(rootDir, 0o755); err != nil {
			rootErr = err
			return
		}
		var st syscall.Stat_t
		if err := syscall.Lstat(rootDir, &st); err != nil {
			rootErr = err
			return
		}
		if st.Mode&syscall.S_IFMT != syscall.S_IFDIR || st.Uid != 0 {
			rootErr = fmt.Errorf("%s is not a folder of root's: %w", rootDir, errdefs.ErrInvalid)
			return
		}
		if err := os.Chmod(rootDir, 0o755); err != nil {
			rootErr = err
			return
		}
		for _, b := range jail.SystemBinds() {
			dst := filepath.Join(rootDir, b.Dst)
			fi, err := os.Lstat(b.Src)
			if err != nil {
				continue
			}
			switch {
			case fi.Mode()&os.ModeSymlink != 0:
				target, err := os.Readlink(b.Src)
				if err != nil {
					rootErr = err
					return
				}
				if cur, err := os.Readlink(dst); err == nil && cur == target {
					continue
				}
				os.Remove(dst)
				if err := os.Symlink(target, dst); err != nil {
					rootErr = err
					return
				}
			case fi.IsDir():
				if err := os.MkdirAll(dst, 0o755); err != nil {
					rootErr = err
					return
				}
			default:
				if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
					rootErr = err
					return
				}
				if f, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
					f.Close()
				}
			}
		}
	})
	return rootDir, rootErr
}

// Grant lets the tools' group open path again through /proc/self/fd/N: it
// hands the file to group ID with group read (and write) permission.
// Kiln's folders are 0700, so the group reaches the file only through a
// descriptor kiln passes. Granting is idempotent and never undone, so
// concurrent tools on one file (a cached disk read by two builds) do not
// race.
func Grant(f *os.File, write bool) error {
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return errors.New("no stat_t")
	}
	if st.Gid != ID {
		if err := f.Chown(-1, int(ID)); err != nil {
			return fmt.Errorf("granting host tools %s: %w", f.Name(), err)
		}
	}
	perm := fi.Mode().Perm() | 0o040
	if write {
		perm |= 0o020
	}
	if perm != fi.Mode().Perm() {
		if err := f.Chmod(perm); err != nil {
			return fmt.Errorf("granting host tools %s: %w", f.Name(), err)
		}
	}
	return nil
}

// Open opens path for a tool (read-write when write) and grants the
// tools' group access to it.
func Open(path string, write bool) (*os.File, error) {
	flag := os.O_RDONLY
	if write {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%s is not a regular file: %w", path, errdefs.ErrInvalid)
	}
	if err := Grant(f, write); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}
