//go:build linux

// Package jail starts a command confined the way Firecracker's jailer
// confines a VMM: new mount, PID, IPC and UTS namespaces, a network
// namespace of its own (empty) or a named one, a root pivoted into a jail
// directory holding only the bind mounts asked for, a minimal /dev, a
// cgroup with memory, pids and CPU limits, rlimits, an unprivileged
// uid/gid with no supplementary groups, no capabilities, no_new_privs,
// no inherited descriptors but the ones given, and an empty environment.
//
// Go cannot run code between fork and exec, so the confinement is done by
// a small init: the running binary re-executes itself (/proc/self/exe)
// with argv[0] = "kiln-jail-init" inside the new namespaces; this
// package's init function notices that, sets up the jail and execve's the
// target. The target thus keeps the host PID that exec.Cmd reports (and
// its start time), and is PID 1 of its PID namespace. Any binary that
// imports this package (kiln, test binaries) can act as the init.
package jail

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// initArg is argv[0] of the re-executed binary acting as the jail's init.
const initArg = "kiln-jail-init"

// Bind makes host path Src visible at Dst inside the jail. A Src that is a
// symbolic link is reproduced as the same link (Debian's /lib -> usr/lib).
type Bind struct {
	Src      string `json:"src"`
	Dst      string `json:"dst"`
	ReadOnly bool   `json:"ro,omitempty"`
}

// Rlimits are set (soft = hard) before the exec; zero leaves a limit as
// inherited.
type Rlimits struct {
	NOFILE uint64 `json:"nofile,omitempty"` // open descriptors
	FSIZE  uint64 `json:"fsize,omitempty"`  // bytes of any file written
	NPROC  uint64 `json:"nproc,omitempty"`  // processes and threads of the uid
	CPU    uint64 `json:"cpu,omitempty"`    // CPU seconds
	AS     uint64 `json:"as,omitempty"`     // bytes of address space
}

// CgroupSpec names the jail's cgroup (a relative path such as
// "kiln/vm-1.ab12cd34", created under each controller's hierarchy) and its
// limits; zero leaves a limit unset.
type CgroupSpec struct {
	Name        string
	MemoryBytes int64
	Pids        int64
	// CPUWeight is cgroup v2's cpu.weight (1-10000, default 100); on v1 it
	// becomes cpu.shares (weight*1024/100).
	CPUWeight uint64
}

// Spec says what to run and how to confine it.
type Spec struct {
	// Root is the host directory that becomes "/" (it must exist and be
	// owned by root: the mount points for Binds are created in it). It is
	// remounted read-only, nosuid, nodev; writable places must be Binds.
	Root  string
	Binds []Bind
	// Devices are host character devices (paths under /dev) recreated
	// inside the jail's own /dev (a small tmpfs), owned by UID:GID.
	// Missing ones are skipped (e.g. /dev/kvm on a host without it).
	Devices []string
	// NetNS is the path of a network namespace to join (/run/netns/x);
	// empty means a new, empty one (only a loopback, down).
	NetNS string
	// UID and GID the command runs as; both must be non-zero.
	UID, GID uint32
	Rlimits  Rlimits
	Cgroup   *CgroupSpec
	// Path is the command's path inside the jail; Args its arguments
	// (Args[0] included); Dir its working directory inside the jail ("/"
	// if empty).
	Path string
	Args []string
	Dir  string
	// ExtraFiles are passed as descriptors 3, 4, ...; nothing else is
	// inherited beyond stdin, stdout and stderr.
	ExtraFiles []*os.File
	// Pdeathsig, if set, is sent to the command when the thread that
	// started it ends (kiln dying). Set again after the uid switch, which
	// clears it.
	Pdeathsig syscall.Signal
}

// initSpec is what the init receives (as argv[1], JSON).
type initSpec struct {
	Root       string   `json:"root"`
	Binds      []Bind   `json:"binds,omitempty"`
	Devices    []string `json:"devices,omitempty"`
	NetNS      string   `json:"netns,omitempty"`
	UID        uint32   `json:"uid"`
	GID        uint32   `json:"gid"`
	Rlimits    Rlimits  `json:"rlimits"`
	CgroupDirs []string `json:"cgroups,omitempty"`  // host paths; the init joins each
	CgroupNS   string   `json:"cgroupns,omitempty"` // entered first (cgroupns.go)
	Path       string   `json:"path"`
	Args       []string `json:"args"`
	Dir        string   `json:"dir,omitempty"`
	NFiles     int      `json:"nfiles"` // descriptors 3..3+NFiles-1 stay open
	Pdeathsig  int      `json:"pdeathsig,omitempty"`
}

// Command returns a command that runs spec confined. The cgroup, if any,
// is created (or reused) now; the caller removes it with RemoveCgroup when
// the command has ended. The command gets its own session, so it outlives
// its parent unless ctx ends or the caller kills it.
func Command(ctx context.Context, spec Spec) (*exec.Cmd, error) {
	if err := spec.check(); err != nil {
		return nil, err
	}
	is := initSpec{Root: spec.Root, Binds: spec.Binds, Devices: spec.Devices, NetNS: spec.NetNS,
		UID: spec.UID, GID: spec.GID, Rlimits: spec.Rlimits, Path: spec.Path, Args: spec.Args,
		Dir: spec.Dir, NFiles: len(spec.ExtraFiles), Pdeathsig: int(spec.Pdeathsig)}
	if spec.Cgroup != nil {
		ns, err := cgroupNSToEnter()
		if err != nil {
			return nil, err
		}
		dirs, err := createCgroup(*spec.Cgroup)
		if err != nil {
			return nil, err
		}
		is.CgroupDirs, is.CgroupNS = dirs, ns
	}
	b, err := json.Marshal(is)
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, "/proc/self/exe")
	cmd.Args = []string{initArg, string(b)}
	cmd.Env = []string{} // the init needs nothing; the target gets nothing
	cmd.Dir = "/"
	cmd.ExtraFiles = spec.ExtraFiles
	flags := uintptr(syscall.CLONE_NEWNS | syscall.CLONE_NEWPID | syscall.CLONE_NEWIPC | syscall.CLONE_NEWUTS)
	if spec.NetNS == "" {
		flags |= syscall.CLONE_NEWNET
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Cloneflags: flags, Pdeathsig: spec.Pdeathsig}
	return cmd, nil
}

func (s *Spec) check() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("jail: "+format+": %w", append(a, errdefs.ErrInvalid)...)
	}
	if !filepath.IsAbs(s.Root) || filepath.Clean(s.Root) == "/" {
		return bad("root %q must be an absolute path other than /", s.Root)
	}
	if st, err := os.Stat(s.Root); err != nil || !st.IsDir() {
		return bad("root %q is not a directory", s.Root)
	} else if st.Mode().Perm()&0o001 == 0 || st.Mode().Perm()&0o022 != 0 {
		// It becomes "/": the uid must be able to look paths up in it
		// and must not be able to change it.
		return bad("root %q has mode %v: use 0755", s.Root, st.Mode().Perm())
	}
	if s.UID == 0 || s.GID == 0 {
		return bad("uid and gid must not be 0")
	}
	if !filepath.IsAbs(s.Path) || len(s.Args) == 0 {
		return bad("path %q must be absolute inside the jail, and args must hold argv[0]", s.Path)
	}
	for _, b := range s.Binds {
		if !filepath.IsAbs(b.Src) || !insideJail(b.Dst) {
			return bad("bind %s -> %s: both must be absolute, the target below /", b.Src, b.Dst)
		}
	}
	for _, d := range s.Devices {
		if !strings.HasPrefix(filepath.Clean(d), "/dev/") {
			return bad("device %q is not under /dev", d)
		}
	}
	if s.Cgroup != nil {
		if err := checkCgroupName(s.Cgroup.Name); err != nil {
			return err
		}
	}
	return nil
}

// insideJail: an absolute path that stays below the jail's root.
func insideJail(p string) bool {
	return filepath.IsAbs(p) && filepath.Clean(p) != "/" && !strings.Contains(p, "..")
}

// ErrNotRoot: confinement needs root (namespaces, mounts, the uid switch).
var ErrNotRoot = errors.New("jail: confining a command needs root")

// Supported says whether this process can confine commands.
func Supported() error {
	if os.Geteuid() != 0 {
		return ErrNotRoot
	}
	return nil
}

// SystemBinds are the read-only binds a dynamically linked host program
// needs: /usr, and /lib, /lib64, /bin and /sbin (links into /usr on a
// merged-/usr system such as Debian 12, directories elsewhere), plus the
// dynamic linker's cache.
func SystemBinds() []Bind {
	var out []Bind
	for _, p := range []string{"/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc/ld.so.cache"} {
		if _, err := os.Lstat(p); err == nil {
			out = append(out, Bind{Src: p, Dst: p, ReadOnly: true})
		}
	}
	return out
}
