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
// fuse2fs is confined the same way (Spec.FUSE): kiln, root in the host's
// mount namespace, makes the FUSE mount itself and hands fuse2fs only the
// /dev/fuse descriptor of that mount, through libfuse 2's fusermount
// protocol (see fusermount.go). So the mount is kiln's and visible to it,
// while the parser of the hostile image runs unprivileged in its jail.
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
	// FUSE, for a libfuse 2 file system (fuse2fs), is an open /dev/fuse
	// whose connection kiln has already mounted. The tool is given
	// MountPoint as its mount point; its own mount(2) there fails for
	// lack of privilege, so libfuse runs /bin/fusermount, which in this
	// jail is kiln's own binary handing over FUSE (fusermount.go). The
	// tool's /dev holds /dev/fuse for that attempt; its /bin holds only
	// that fusermount.
	FUSE *os.File
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

// ErrToolMissing is returned when a tool is not installed.
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
	uid, gid := s.UID, s.GID
	if uid == 0 {
		uid = ID
	}
	if gid == 0 {
		gid = ID
	}
	// What C programs take for granted; nothing that reaches hardware.
	devices := []string{"/dev/null", "/dev/zero", "/dev/urandom"}
	root, binds, files := toolRoot, jail.SystemBinds(), s.Files
	var pdeath syscall.Signal
	if s.FUSE != nil {
		if root, binds, err = fuseJail(); err != nil {
			return nil, err
		}
		// libfuse tries /dev/fuse before it falls back to fusermount.
		devices = append(devices, "/dev/fuse")
		files = append(append([]*os.File(nil), s.Files...), s.FUSE)
		// /bin is fusermount alone here: name the tool by its real path.
		if tool, err = filepath.EvalSymlinks(tool); err != nil {
			return nil, err
		}
		// If kiln dies, fuse2fs writes the image back and exits instead
		// of serving a mount nobody will unmount until kiln restarts.
		// (The signal follows the OS thread that started it; Go ends a
		// thread only when a goroutine exits locked to it, which kiln's
		// namespace switching does only after a failure.)
		pdeath = syscall.SIGTERM
	}
	if err := root.prepare(); err != nil {
		return nil, err
	}
	cmd, err := jail.Command(ctx, jail.Spec{
		Root: root.dir, Binds: binds, Devices: devices,
		UID: uid, GID: gid,
		Rlimits: jail.Rlimits{CPU: cpuSecs, AS: as, NOFILE: DefaultOpenFiles, NPROC: DefaultProcesses},
		Path:    tool, Args: append([]string{tool}, s.Args...),
		ExtraFiles: files,
		Pdeathsig:  pdeath,
	})
	if err != nil {
		return nil, err
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = s.Stdin, s.Stdout, s.Stderr
	cmd.WaitDelay = 5 * time.Second
	return cmd, nil
}

// jailRoot is a jail root the confined tools share: an empty folder,
// root's and 0755, in which the mount points for the binds are made up
// front (each run mounts them in its own namespace), so concurrent runs
// do not race to create them.
type jailRoot struct {
	dir   string
	binds func() []jail.Bind
	// dirs and files are extra empty folders and files to make in it.
	dirs, files []string

	once sync.Once
	err  error
}

// toolRoot is the root of every tool but FUSE ones.
var toolRoot = &jailRoot{dir: "/run/kiln-hosttool", binds: jail.SystemBinds}

// fuseRoot is the root of FUSE tools (see fuseJail): the system folders
// but /bin, which is a folder of its own holding the mount point for the
// fusermount shim, and MountPoint.
var fuseRoot = &jailRoot{
	dir: "/run/kiln-hosttool-fuse", binds: fuseSystemBinds,
	dirs: []string{"/bin", MountPoint}, files: []string{fusermountPath},
}

func (r *jailRoot) prepare() error {
	r.once.Do(func() { r.err = r.make() })
	return r.err
}

func (r *jailRoot) make() error {
	if err := jail.Supported(); err != nil {
		return fmt.Errorf("running host tools confined: %w", err)
	}
	if err := os.MkdirAll(r.dir, 0o755); err != nil {
		return err
	}
	var st syscall.Stat_t
	if err := syscall.Lstat(r.dir, &st); err != nil {
		return err
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFDIR || st.Uid != 0 {
		return fmt.Errorf("%s is not a folder of root's: %w", r.dir, errdefs.ErrInvalid)
	}
	if err := os.Chmod(r.dir, 0o755); err != nil {
		return err
	}
	for _, d := range r.dirs {
		if err := ownDir(filepath.Join(r.dir, d)); err != nil {
			return err
		}
	}
	for _, f := range r.files {
		if err := emptyFile(filepath.Join(r.dir, f)); err != nil {
			return err
		}
	}
	for _, b := range r.binds() {
		dst := filepath.Join(r.dir, b.Dst)
		fi, err := os.Lstat(b.Src)
		if err != nil {
			continue
		}
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(b.Src)
			if err != nil {
				return err
			}
			if cur, err := os.Readlink(dst); err == nil && cur == target {
				continue
			}
			os.Remove(dst)
			if err := os.Symlink(target, dst); err != nil {
				return err
			}
		case fi.IsDir():
			if err := os.MkdirAll(dst, 0o755); err != nil {
				return err
			}
		default:
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return err
			}
			if err := emptyFile(dst); err != nil {
				return err
			}
		}
	}
	return nil
}

// ownDir makes p a real folder of root's, 0755 (not a link to one
// elsewhere).
func ownDir(p string) error {
	if fi, err := os.Lstat(p); err == nil && !fi.IsDir() {
		if err := os.Remove(p); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(p, 0o755); err != nil {
		return err
	}
	return os.Chmod(p, 0o755)
}

func emptyFile(p string) error {
	f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
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
