//go:build linux

// Package hosttool runs the host programs kiln points at disks a guest
// wrote (e2fsck, resize2fs, debugfs, dumpe2fs, fuse2fs, qemu-img). Those
// disks are hostile input to parsers written in C, so every such program
// starts here, confined: a uid of its own (not root), a new and empty
// network namespace, new mount, IPC and UTS namespaces, an empty
// environment, no_new_privs, and limits on CPU time, address space and
// open files. Files reach it as descriptors (/dev/fd/N), so it needs no
// path through kiln's 0700 folders.
//
// The rlimits are set by util-linux's prlimit and no_new_privs by setpriv,
// both exec'd in the child before the tool: Go's SysProcAttr has neither.
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
	"syscall"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
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
)

// Spec describes one confined run.
type Spec struct {
	// Path is the tool (an absolute path, or a name looked up in PATH,
	// /usr/sbin and /sbin).
	Path string
	Args []string
	// Files are handed over as /dev/fd/3, /dev/fd/4, ... in order (see
	// FD). The tool's uid must be allowed to open them again (Grant):
	// opening /dev/fd/N checks the inode's permissions.
	Files []*os.File
	// UID and GID the tool runs as; 0 means ID.
	UID, GID uint32
	// Root keeps uid 0 and the host's mount namespace, for fuse2fs: its
	// mount must be visible to kiln, and a FUSE mount made by another
	// uid is closed to root unless the host allows other users (see
	// rootfs.Mount). Network, IPC and UTS namespaces, rlimits, the empty
	// environment and no_new_privs still apply.
	Root bool
	// CPU time and address-space limits; 0 means the defaults.
	CPU          time.Duration
	AddressSpace uint64
	Stdin        io.Reader
	Stdout       io.Writer
	Stderr       io.Writer
}

// FD is the path under which the tool sees Spec.Files[i].
func FD(i int) string { return "/dev/fd/" + strconv.Itoa(3+i) }

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
	prlimit, err := Look("prlimit")
	if err != nil {
		return nil, err
	}
	setpriv, err := Look("setpriv")
	if err != nil {
		return nil, err
	}
	cpu := s.CPU
	if cpu <= 0 {
		cpu = DefaultCPU
	}
	as := s.AddressSpace
	if as == 0 {
		as = DefaultAddressSpace
	}
	args := []string{
		"--cpu=" + strconv.FormatInt(int64((cpu+time.Second-1)/time.Second), 10),
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
	attr := &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNET | syscall.CLONE_NEWIPC | syscall.CLONE_NEWUTS,
		// A tool outlives no kiln.
		Pdeathsig: syscall.SIGKILL,
		Setpgid:   true,
	}
	if !s.Root {
		uid, gid := s.UID, s.GID
		if uid == 0 {
			uid = ID
		}
		if gid == 0 {
			gid = ID
		}
		attr.Cloneflags |= syscall.CLONE_NEWNS
		attr.Credential = &syscall.Credential{Uid: uid, Gid: gid, Groups: []uint32{}}
	} else {
		attr.Pdeathsig = syscall.SIGTERM // fuse2fs unmounts on SIGTERM
	}
	cmd.SysProcAttr = attr
	// Kill the whole group: prlimit and setpriv exec, but a tool may fork.
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	return cmd, nil
}

// Grant lets the tools' group open path again through /dev/fd/N: it
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
